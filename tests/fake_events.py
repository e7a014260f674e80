"""An HTTPS stand-in for PagerDuty's Events API v2 (`POST /v2/enqueue`), for the paging tests.

It listens on loopback with a certificate from a test CA (trustme), whose PEM
is written to `ca_file` for `[pagerduty] ca_file`. It checks each event the
way the real API documents it and answers 202 or 400 with PagerDuty's body
shapes; failures can be scripted (`fail_next`, `fail_always`) to exercise the
pager's retries and permanent errors. Accepted events (the JSON bodies as
sent, routing_key included) are kept in order.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.https_stand_in import HttpsStandIn, TlsServer

ACTIONS = ("trigger", "acknowledge", "resolve")
SEVERITIES = ("critical", "error", "warning", "info")
INVALID = "Event object is invalid"
MAX_EVENT_BYTES = 512 * 1024  # "Events API payloads are limited to 512 KB"


def validate(event: Any) -> list[str]:
    """What the Events API v2 would object to in `event` (empty when it is valid)."""
    if not isinstance(event, dict):
        return ["The request body must be a JSON object"]
    errors = []
    key = event.get("routing_key")
    if not isinstance(key, str) or len(key) != 32:
        errors.append("Length of 'routing_key' is incorrect (should be 32 characters)")
    action = event.get("event_action")
    if action not in ACTIONS:
        errors.append(
            "'event_action' is missing or invalid (must be trigger, acknowledge or resolve)"
        )
    dedup = event.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or len(dedup) > 255):
        errors.append("'dedup_key' must be a string of at most 255 characters")
    if action == "trigger":
        payload = event.get("payload")
        if not isinstance(payload, dict):
            errors.append("'payload' is missing or not an object")
        else:
            summary = payload.get("summary")
            if not isinstance(summary, str) or not 1 <= len(summary) <= 1024:
                errors.append("'payload.summary' is missing, blank or over 1024 characters")
            source = payload.get("source")
            if not isinstance(source, str) or not source:
                errors.append("'payload.source' is missing or blank")
            if payload.get("severity") not in SEVERITIES:
                errors.append(
                    "'payload.severity' is invalid (must be one of the following: "
                    "'critical', 'warning', 'error' or 'info')"
                )
    elif action in ("acknowledge", "resolve") and not (isinstance(dedup, str) and dedup):
        errors.append(f"'dedup_key' is required for event_action {action!r}")
    return errors


class _Handler(BaseHTTPRequestHandler):
    server: TlsServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at stop

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        status, body = fake.answer(self.path, raw)
        fake.wait_released()
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"  # as PagerDuty: one connection carries many events


class FakeEvents(HttpsStandIn):
    """PagerDuty Events API v2 on https://127.0.0.1:PORT; a context manager that starts it.

    The CA file exists from construction, so a daemon can be configured (and
    started) before the server listens; `port` binds a given port for that.
    Each request gets a connection of its own unless `keep_alive`, which the
    benchmark sets: there a TLS handshake per event would be a cost PagerDuty's
    own keep-alive does not have (with it, one client needs one connection).
    """

    ca_name = "events-ca.pem"
    thread_name = "fake-events"

    def __init__(self, folder: Path, port: int = 0, keep_alive: bool = False) -> None:
        super().__init__(folder, port)
        self.keep_alive = keep_alive
        self._lock = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._bodies: list[Any] = []
        self._arrivals: list[float] = []  # time.time() of each request, beside _bodies
        self._scripted: deque[tuple[int, dict[str, Any]]] = deque()
        self._always: tuple[int, dict[str, Any]] | None = None
        self._released = threading.Event()
        self._released.set()

    # Lifecycle.

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _KeepAliveHandler if self.keep_alive else _Handler

    def start(self) -> FakeEvents:
        started: FakeEvents = super().start()
        return started

    def stop(self) -> None:
        self.release()
        super().stop()

    def __enter__(self) -> FakeEvents:
        return self.start()

    @property
    def url(self) -> str:
        """The events_url to configure (the port is known once started, or when given)."""
        assert self.port, "start the server first, or construct it with a port"
        return f"https://127.0.0.1:{self.port}"

    # Scripting.

    def fail_next(self, codes: Iterable[int], message: str = "injected") -> None:
        """Answer the next requests with these status codes, one each, before behaving."""
        with self._lock:
            self._scripted.extend((code, _error_body(code, message)) for code in codes)

    def fail_always(
        self, code: int, message: str = "injected", errors: list[str] | None = None
    ) -> None:
        """Answer every request with `code` until `reset()`."""
        with self._lock:
            self._always = (code, _error_body(code, message, errors))

    def reset(self) -> None:
        """Accept valid events again (scripted failures dropped)."""
        with self._lock:
            self._scripted.clear()
            self._always = None

    def hold(self) -> None:
        """Accept (and record) events but keep their 202 back until `release()`: PagerDuty
        has the event while the client still waits for the answer."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    # What it saw.

    @property
    def events(self) -> list[dict[str, Any]]:
        """The accepted events, oldest first."""
        with self._lock:
            return list(self._events)

    @property
    def bodies(self) -> list[Any]:
        """Every request's parsed body (None when not JSON), answered 2xx or not."""
        with self._lock:
            return list(self._bodies)

    @property
    def arrivals(self) -> list[tuple[float, Any]]:
        """Every request's arrival (time.time(), once its body was read) and parsed body."""
        with self._lock:
            return list(zip(self._arrivals, self._bodies, strict=True))

    @property
    def requests(self) -> int:
        """Every POST to /v2/enqueue, answered 2xx or not."""
        with self._lock:
            return len(self._bodies)

    def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """Block until at least `count` events were accepted; all of them."""
        self._wait(lambda: len(self._events), count, timeout, "events")
        return self.events

    def wait_for_requests(self, count: int, timeout: float = 30) -> int:
        """Block until at least `count` requests arrived; how many did."""
        return self._wait(lambda: len(self._bodies), count, timeout, "requests")

    def _wait(self, seen: Callable[[], int], count: int, timeout: float, what: str) -> int:
        deadline = time.monotonic() + timeout
        with self._lock:
            while seen() < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout} s waiting for {count} {what}; got "
                        f"{len(self._events)} events of {len(self._bodies)} requests"
                    )
                self._lock.wait(left)
            return seen()

    def wait_released(self) -> None:
        self._released.wait(60)

    # The API.

    def answer(self, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        if path != "/v2/enqueue":
            return 404, {"status": "error", "message": f"no route {path}"}
        try:
            event: Any = json.loads(raw)
        except ValueError:
            event = None
        arrived = time.time()
        with self._lock:
            self._bodies.append(event)
            self._arrivals.append(arrived)
            self._lock.notify_all()
            if self._scripted:
                return self._scripted.popleft()
            if self._always is not None:
                return self._always
            errors = validate(event)
            if len(raw) > MAX_EVENT_BYTES:
                errors.append(f"Event is {len(raw)} bytes; events are limited to 512 KB")
            if errors:
                return 400, {"status": "invalid event", "message": INVALID, "errors": errors}
            self._events.append(event)
            self._lock.notify_all()
            return 202, {
                "status": "success",
                "message": "Event processed",
                "dedup_key": event.get("dedup_key") or f"fake-{len(self._events)}",
            }


def _error_body(code: int, message: str, errors: list[str] | None = None) -> dict[str, Any]:
    if code == 400:
        return {"status": "invalid event", "message": message, "errors": errors or []}
    return {"status": "error", "message": message}


def free_port() -> int:
    """A loopback port nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
