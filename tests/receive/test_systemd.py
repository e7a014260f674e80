"""maild under systemd: sd_notify readiness and watchdog, socket activation, the unit files."""

from __future__ import annotations

import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, mail, wait_until
from tests.daemon import Daemon

pytestmark = pytest.mark.slow
UNITS = REPO / "systemd"


class NotifySocket:
    """The datagram socket systemd would listen on for sd_notify messages."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        """Every message received so far (each a newline-separated set of states)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return [text for _, text in self.messages]

    def states(self) -> list[str]:
        return [state for text in self.drain() for state in text.split("\n")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    # a short folder: unix socket paths are limited to 108 bytes
    folder = Path(f"/tmp/maild-notify-{tmp_path.name[-20:]}")
    folder.mkdir(exist_ok=True)
    listener = NotifySocket(folder)
    yield listener
    listener.close()
    shutil.rmtree(folder, ignore_errors=True)


def can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_ready_watchdog_reload_and_stopping_reach_the_notify_socket(
    make_config: Callable[..., Path], notify: NotifySocket, tmp_path: Path
) -> None:
    """READY=1 once SMTP answers, WATCHDOG=1 heartbeats, RELOADING/READY on SIGHUP, STOPPING=1."""
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    daemon = Daemon(make_config(), tmp_path / "maild.log", env=env).start()
    try:
        wait_until(lambda: "READY=1" in notify.states(), 30, "READY=1")
        assert can_connect(daemon.smtp_port), "READY=1 before the SMTP port answers"
        assert any(
            s.startswith("STATUS=accepting mail: smtp on 127.0.0.1:") for s in notify.states()
        )
        wait_until(lambda: notify.states().count("WATCHDOG=1") >= 3, 30, "three heartbeats")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "RELOADING=1" in notify.states(), 30, "RELOADING=1")
        reload_message = next(t for _, t in notify.messages if "RELOADING=1" in t)
        assert re.search(r"^MONOTONIC_USEC=\d+$", reload_message, re.MULTILINE), reload_message
        wait_until(lambda: notify.states().count("READY=1") >= 2, 30, "READY=1 after reload")
        assert daemon.terminate() == 0
        assert "STOPPING=1" in notify.states()
    finally:
        daemon.__exit__()


def test_a_stuck_event_loop_stops_the_heartbeat(
    make_config: Callable[..., Path], notify: NotifySocket, tmp_path: Path
) -> None:
    """SIGSTOP (a stand-in for a stuck loop) stops WATCHDOG=1; SIGCONT brings it back."""
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    with Daemon(make_config(), tmp_path / "maild.log", env=env) as daemon:
        wait_until(lambda: notify.states().count("WATCHDOG=1") >= 2, 30, "heartbeats")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # let a datagram sent just before the stop arrive
        before = notify.states().count("WATCHDOG=1")
        time.sleep(1.0)
        assert notify.states().count("WATCHDOG=1") == before
        daemon.process.send_signal(signal.SIGCONT)
        wait_until(lambda: notify.states().count("WATCHDOG=1") > before, 30, "heartbeats again")


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate (Debian package systemd) is not installed",
)
def test_socket_activation_serves_the_socket_systemd_passed(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """With LISTEN_FDS (FileDescriptorName=smtp), maild serves that socket, not [smtp] listen."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    activate = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=smtp"]
    results: list[object] = []

    def first_client() -> None:  # systemd-socket-activate starts maild on the first connection
        deadline = time.monotonic() + 30
        while not can_connect(port) and time.monotonic() < deadline:
            time.sleep(0.02)  # until systemd-socket-activate listens (the probe starts maild)
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                results.append(
                    client.send_message(
                        mail("Through the passed socket"),
                        from_addr="alice@customer.example",
                        to_addrs=["support@altis-dxp.com"],
                    )
                )
        except Exception as exc:
            results.append(exc)

    daemon = Daemon(make_config(), tmp_path / "maild.log", prefix=activate)
    try:
        daemon.start(trigger=first_client)
        assert daemon.smtp_port == port
        wait_until(lambda: results, 60, "the first client's delivery")
        assert results == [{}]
        assert daemon.terminate() == 0
    finally:
        daemon.__exit__()


@pytest.fixture
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze (Debian package systemd) is not installed")
    return tool


def test_units_pass_systemd_analyze_verify(analyze: str, tmp_path: Path) -> None:
    """systemd-analyze verify accepts maild.service and maild.socket.

    verify insists that ExecStart's program exists, so the copy checked here
    points at this checkout's maild instead of /usr/local/bin/maild.
    """
    service = (UNITS / "maild.service").read_text()
    assert "ExecStart=/usr/local/bin/maild serve" in service
    maild = Path(sys.executable).parent / "maild"
    (tmp_path / "maild.service").write_text(service.replace("/usr/local/bin/maild", str(maild)))
    shutil.copy(UNITS / "maild.socket", tmp_path / "maild.socket")
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "maild.service"), str(tmp_path / "maild.socket")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_service_exposure_is_2_or_lower(analyze: str) -> None:
    """systemd-analyze security --offline=yes rates maild.service 2.0 or lower."""
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(UNITS / "maild.service")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for maild\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
