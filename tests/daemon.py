"""`maild serve` as a real subprocess, for crash and signal tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import wait_until


class Daemon:
    """One `maild serve --config PATH` process whose JSON log is kept in a file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.config = config
        self.log_path = log
        self.env = env or {}
        self.prefix = prefix or []  # e.g. systemd-socket-activate and its options
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 30, trigger: Callable[[], object] | None = None) -> Daemon:
        """Start it and wait for "maild started"; `trigger` runs in between (a first
        connection that systemd-socket-activate waits for before it starts maild)."""
        self.log_path.write_bytes(b"")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "maild",
                    "serve",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        if trigger is not None:
            threading.Thread(target=trigger, daemon=True).start()
        try:
            started = wait_until(self._started, timeout, "maild serve to log 'maild started'")
        except BaseException:
            self.__exit__()
            raise
        self.ports = {name: int(value.rsplit(":", 1)[1]) for name, value in started.items()}
        return self

    def _started(self) -> dict[str, str] | None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"maild serve exited {self.process.returncode}:\n{self.text()}")
        for event in self.events():
            if event.get("event") == "maild started":
                listen: dict[str, str] = event["listen"]
                return listen
        return None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a torn last line is skipped)."""
        events = []
        for line in self.text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    @property
    def smtp_port(self) -> int:
        return self.ports["smtp"]

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
