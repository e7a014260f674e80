"""The servers under test, as subprocesses, and the memory they use.

`Server` starts either the reference (`python -m bench.reference`) or
`maild serve` with a config written for the run, waits for its port, and stops
it with SIGTERM. `MemoryWatch` samples the resident set of the server and all
its descendants (maild's parse workers and their forkserver) every 10 ms from
/proc, and keeps the peak of the sum: what the host must have free.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.fake_events import free_port

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def maild_config(
    folder: Path, port: int, database_url: str, events_url: str, ca_file: Path, http_port: int
) -> Path:
    """maild's defaults, except what a benchmark on one host must change (said here)."""
    config = folder / "maild.toml"
    config.write_text(
        f"""# written by bench/servers.py
[smtp]
listen = "127.0.0.1:{port}"
hostname = "bench.invalid"
max_message_size = "30 MiB"   # the memory row sends 25 MiB messages; the default is 25 MiB
max_connections_per_ip = 0    # the whole load comes from one address

[http]
listen = "127.0.0.1:{http_port}"  # the API's rows (bench/api.py)

[console]
enabled = true   # the console's rows (bench/api.py); it adds no work per message

[desk]
agents = ["*@altis-dxp.com"]   # who may have a console account

[database]
url = "{database_url}"

[rules]
path = "{REPO / "rules"}"

[log]
format = "json"
level = "info"

[pagerduty]
routing_key = "0123456789abcdef0123456789abcdef"
events_url = "{events_url}"
ca_file = "{ca_file}"

[escalation]
max_pages_per_sender_per_hour = 0   # every sysops@ message must page, to time each one
"""
    )
    return config


class Server:
    """One server process; a context manager."""

    def __init__(
        self, name: str, argv: list[str], port: int, log: Path, config: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log
        self.config = config  # maild's
        self.http_port = 0  # maild's [http] listen
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def reference(cls, folder: Path) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "bench.reference", str(port)]
        return cls("reference", argv, port, folder / "reference.log")

    @classmethod
    def maild(cls, folder: Path, database_url: str, events_url: str, ca_file: Path) -> Server:
        port, http_port = free_port(), free_port()
        config = maild_config(folder, port, database_url, events_url, ca_file, http_port)
        argv = [sys.executable, "-m", "maild", "serve", "--config", str(config)]
        server = cls("maild", argv, port, folder / "maild.log", config)
        server.http_port = http_port
        return server

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60) -> Server:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited {self.process.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not open port {self.port} in {timeout} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    found.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (the forkserver's, its workers') counted once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process tree so far: of each process still running, and
    of its children that exited and were reaped (a worker the pool replaced)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for process in descendants(pid):
        try:
            with open(f"/proc/{process}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / ticks  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            continue
    return total


class MemoryWatch:
    """The peak, over 10 ms samples, of the process tree's summed RSS (and, with
    `pss`, of its summed PSS, which counts pages shared between processes once);
    a context manager."""

    def __init__(self, pid: int, interval: float = 0.01, pss: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.pss = pss
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def _run(self) -> None:
        processes = descendants(self.pid)
        refreshed = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 0.2:
                processes = descendants(self.pid)
                refreshed = time.monotonic()
            self.peak = max(self.peak, sum(rss_bytes(p) for p in processes))
            if self.pss:
                self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in processes))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def _events_child(folder: str, pipe: Any) -> None:
    """In a process of its own: the Events API stand-in, its arrivals sent to the
    parent as they come (a list of (time.time(), body) at a time), until told to stop."""
    from tests.fake_events import FakeEvents

    fake = FakeEvents(Path(folder), keep_alive=True).start()
    pipe.send((fake.url, str(fake.ca_file)))
    sent = 0
    try:
        while not pipe.poll(0.01):
            arrivals = fake.arrivals
            if len(arrivals) > sent:
                pipe.send(arrivals[sent:])
                sent = len(arrivals)
    finally:
        fake.stop()


class EventsProcess:
    """The Events API stand-in (tests.fake_events) in a process of its own, with the same
    face the bench uses (url, ca_file, requests, arrivals, wait_for_requests, stop).

    In the bench's own process its handler waited for the load client's GIL: a page's
    arrival, the figure measured, was late by the client's work, not maild's (under
    twenty 1 MiB connections the POST took 170–580 ms). Arrival times are time.time(),
    comparable across processes."""

    def __init__(self, folder: Path) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_events_child, args=(str(folder), child), name="bench-events", daemon=True
        )
        self._lock = threading.Condition()
        self._arrivals: list[tuple[float, Any]] = []
        self._process.start()
        child.close()
        if not self._pipe.poll(60):
            self._process.kill()
            raise RuntimeError("the Events API stand-in did not start within 60 s")
        try:
            url, ca_file = self._pipe.recv()
        except EOFError:
            raise RuntimeError("the Events API stand-in exited before it started") from None
        self.url: str = url
        self.ca_file = Path(ca_file)
        self._thread = threading.Thread(target=self._drain, name="bench-events", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                got = self._pipe.recv()
            except (EOFError, OSError):
                return
            with self._lock:
                self._arrivals.extend(got)
                self._lock.notify_all()

    @property
    def arrivals(self) -> list[tuple[float, Any]]:
        with self._lock:
            return list(self._arrivals)

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self._arrivals)

    def wait_for_requests(self, count: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._arrivals) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout} s waiting for {count} requests; "
                        f"got {len(self._arrivals)}"
                    )
                self._lock.wait(left)
            return len(self._arrivals)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._thread.join(5)
        self._pipe.close()
