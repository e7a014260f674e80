"""Prometheus metrics, and the small HTTP listener that serves them with health checks.

`[http] listen = "127.0.0.1:9125"` turns on:

- `/metrics`: Prometheus text format (prometheus-client), from maild's own registry.
- `/healthz`: 200 when every SMTP/LMTP listener is open and the database answers;
  503 otherwise. The JSON body names each check and the backlogs (deliveries not
  yet processed, pages not yet sent), so a probe's log says what is wrong.
- `/readyz`: 200 while maild accepts mail and can store it; 503 while starting
  or stopping, or while writes fail or the disk is too full (the body says which),
  so a load balancer drains it first.

The listener is plain asyncio (GET only, one request per connection): it has
three fixed answers and should not cost a web framework.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate

log = structlog.get_logger("maild.metrics")

REGISTRY = CollectorRegistry()

RECEIVED = Counter(
    "maild_messages_received",
    "Messages accepted with 250 (committed to the spool), by listener protocol.",
    ["protocol"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "maild_recipients_refused",
    "Recipients and connections refused, by reason (unknown_mailbox, relay, too_many_*).",
    ["reason"],
    registry=REGISTRY,
)
DEFERRED = Counter(
    "maild_messages_deferred",
    "Messages answered 451 because maild could not store them (the sender retries).",
    ["reason"],
    registry=REGISTRY,
)
PROCESSED = Counter(
    "maild_messages_processed",
    "Accepted messages filed, by outcome (created, threaded, duplicate, bounce, dropped, failed).",
    ["outcome"],
    registry=REGISTRY,
)
TICKETS = Counter(
    "maild_tickets_created",
    "Tickets created, by type and priority.",
    ["type", "priority"],
    registry=REGISTRY,
)
PROCESSING_SECONDS = Histogram(
    "maild_processing_seconds",
    "From a message's 250 to its ticket being stored.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
PAGES = Counter(
    "maild_pages",
    "Pages (PagerDuty events) by action and result (sent, failed, withheld, retried).",
    ["action", "result"],
    registry=REGISTRY,
)
ACKS = Counter(
    "maild_acknowledgements",
    "Acknowledgements by result (queued, withheld, sent, failed, retried).",
    ["result"],
    registry=REGISTRY,
)
MAIL = Counter(
    "maild_mail",
    "Mail maild sends, by kind (ack, agent, copy, notify, solved) and result (queued, "
    "withheld, sent, failed, retried).",
    ["kind", "result"],
    registry=REGISTRY,
)
HYGIENE = Counter(
    "maild_messages_flagged",
    "Accepted messages that are not a person's mail, by kind (auto, bounce, loop).",
    ["kind"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "maild_rules_reloads",
    "Rules table reloads by trigger (sighup: SIGHUP or systemctl reload; watch: the "
    "[rules] watch file watcher) and result (ok, failed).",
    ["trigger", "result"],
    registry=REGISTRY,
)
MESSAGES_REFUSED = Counter(
    "maild_messages_refused",
    "Messages refused after RCPT, by reason (too_large).",
    ["reason"],
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "maild_backlog",
    "Work waiting, read at scrape time: inbound (accepted, not processed), "
    "failed (kept for reprocess), pages (pending), acknowledgements (mail not sent yet).",
    ["queue"],
    registry=REGISTRY,
)
UP = Gauge(
    "maild_listener_up", "1 while a listener accepts connections.", ["protocol"], registry=REGISTRY
)


def generate() -> bytes:
    return _generate(REGISTRY)


Check = Callable[[], Awaitable[dict[str, Any]]]


class HttpListener:
    """GET /metrics, /healthz and /readyz on one address."""

    def __init__(self, health: Check, ready: Check, backlog: Check) -> None:
        self._health = health
        self._ready = ready
        self._backlog = backlog
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        address = self._server.sockets[0].getsockname()
        return str(address[0]), int(address[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, content_type, body = await self._answer(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except Exception as exc:  # a probe must get an answer, whatever broke
            log.exception("HTTP request failed")
            status, content_type = 500, "text/plain"
            body = f"internal error: {type(exc).__name__}\n".encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Service Unavailable')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            for queue, count in (await self._backlog()).items():
                BACKLOG.labels(queue).set(count)
            return 200, CONTENT_TYPE_LATEST, generate()
        if path == "/healthz":
            report = await self._health()
            code = 200 if report["status"] == "ok" else 503
            return code, "application/json", json.dumps(report).encode() + b"\n"
        if path == "/readyz":
            report = await self._ready()
            code = 200 if report["status"] == "ready" else 503
            return code, "application/json", json.dumps(report).encode() + b"\n"
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"
