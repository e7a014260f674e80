"""A webhook receiver over real HTTPS, for the webhook tests.

It listens on loopback with a certificate from a test CA (tests/https_stand_in.py, as
the Events API stand-in does), whose PEM is written to `ca_file` for `[[webhook]]
ca_file`. It keeps every request (headers, body, whether its signature
verifies, what it answered), and processes each event once, as a receiver should:
by its Maild-Delivery id, a repeat of an event already processed is answered 200 and
not processed again. Failures can be scripted (`fail_next`, `fail_always`) and answers
held back (`hold`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from maild.outbound.webhooks import verify
from tests.https_stand_in import HttpsStandIn, TlsServer

SECRET = "receiver-secret-0123456789"


@dataclass(frozen=True)
class Request:
    """One POST as it arrived, and what it was answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int

    @property
    def delivery(self) -> str:
        return self.headers.get("maild-delivery", "")

    @property
    def event(self) -> str:
        return self.headers.get("maild-event", "")

    def json(self) -> Any:
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    server: TlsServer
    protocol_version = "HTTP/1.1"  # keep-alive, as receivers serve webhooks

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        status = self.server.fake.receive(self.path, headers, body)
        self.server.fake.wait_released()
        answer = json.dumps({"status": status}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class FakeReceiver(HttpsStandIn):
    """https://127.0.0.1:PORT/hooks; a context manager that starts it."""

    ca_name = "receiver-ca.pem"
    thread_name = "fake-receiver"

    def __init__(self, folder: Path, secret: str = SECRET, port: int = 0) -> None:
        super().__init__(folder, port)
        self.secret = secret.encode()
        self._lock = threading.Condition()
        self._requests: list[Request] = []
        self._processed: dict[str, Request] = {}  # by Maild-Delivery, the first 2xx'd
        self._order: list[str] = []  # deliveries in the order processed
        self._scripted: deque[int] = deque()
        self._always: int | None = None
        self._released = threading.Event()
        self._released.set()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    def start(self) -> FakeReceiver:
        started: FakeReceiver = super().start()
        return started

    def stop(self) -> None:
        self.release()
        super().stop()

    def __enter__(self) -> FakeReceiver:
        return self.start()

    @property
    def url(self) -> str:
        assert self.port, "start the receiver first, or construct it with a port"
        return f"https://127.0.0.1:{self.port}/hooks"

    # Scripting.

    def fail_next(self, codes: Iterable[int]) -> None:
        with self._lock:
            self._scripted.extend(codes)

    def fail_always(self, code: int) -> None:
        with self._lock:
            self._always = code

    def reset(self) -> None:
        with self._lock:
            self._scripted.clear()
            self._always = None

    def hold(self) -> None:
        """Process events but keep the answers back until `release()`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def wait_released(self) -> None:
        self._released.wait(60)

    # The receiving end.

    def receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        verified = verify(self.secret, body, headers.get("maild-signature", ""))
        with self._lock:
            if self._scripted:
                status = self._scripted.popleft()
            elif self._always is not None:
                status = self._always
            else:
                status = 200 if verified else 401
            request = Request(path, headers, body, verified, status)
            self._requests.append(request)
            if status == 200 and request.delivery not in self._processed:
                self._processed[request.delivery] = request
                self._order.append(request.delivery)
            self._lock.notify_all()
            return status

    # What it saw.

    @property
    def requests(self) -> list[Request]:
        """Every POST, answered 2xx or not, repeats included."""
        with self._lock:
            return list(self._requests)

    @property
    def processed(self) -> list[Request]:
        """Each event once (deduplicated on Maild-Delivery), in the order processed."""
        with self._lock:
            return [self._processed[d] for d in self._order]

    def wait_processed(self, count: int, timeout: float = 30) -> list[Request]:
        return self._wait(lambda: len(self._order) >= count, timeout, f"{count} events")

    def wait_requests(self, count: int, timeout: float = 30) -> list[Request]:
        self._wait(lambda: len(self._requests) >= count, timeout, f"{count} requests")
        return self.requests

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> list[Request]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout} s waiting for {what}; processed "
                        f"{len(self._order)} of {len(self._requests)} requests"
                    )
                self._lock.wait(left)
        return self.processed
