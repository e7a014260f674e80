"""systemd integration without a dependency: readiness, watchdog, socket activation.

- `notify("READY=1")` and friends write to `$NOTIFY_SOCKET` (a datagram unix
  socket; `@name` is in the abstract namespace). Without it they do nothing,
  and a failure to send is logged, never raised: systemd's bookkeeping must not
  take the mail server down.
- `watchdog_interval()` is half of `$WATCHDOG_USEC` when the watchdog is for
  this process. The heartbeat is sent from the event loop (service.py), so it
  stops when the loop is stuck and systemd restarts maild.
- `passed_sockets()` takes the sockets of a socket unit (`$LISTEN_FDS` from fd 3,
  named by `FileDescriptorName=` in `$LISTEN_FDNAMES`), so maild can serve
  port 25 without ever holding CAP_NET_BIND_SERVICE.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger("maild.systemd")

SD_LISTEN_FDS_START = 3
_warned = False


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=...") to systemd; False when not under it."""
    global _warned
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode("utf-8"), address)
    except OSError as exc:
        if not _warned:
            _warned = True
            log.warning("cannot notify systemd", notify_socket=address, error=str(exc))
        return False
    return True


def monotonic_usec() -> str:
    """MONOTONIC_USEC=..., which systemd wants with RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 heartbeats (half of WatchdogSec), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


def passed_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, by name ("smtp", "lmtp").

    An unnamed single socket is taken as SMTP. The variables are removed so
    that processes we start do not think the sockets are theirs.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if not count.isdigit():
        return {}
    result: dict[str, socket.socket] = {}
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else ""
        if not name or name == "unknown":
            name = "smtp" if "smtp" not in result else f"fd{fd}"
        os.set_inheritable(fd, False)
        result[name] = socket.socket(fileno=fd)
    return result
