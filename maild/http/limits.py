"""Request limits of the HTTP stack that live above the protocol (maild/http/server.py
holds the per-connection ones: connection cap, header and body timeouts).

- `RequestLimits`: a request line and headers over 16 KiB are answered 431 (h11
  refuses a head that arrives in pieces past that size; one that arrives whole is
  measured here). A request body over `[http] max_body_size` is answered 413 without
  being buffered. A declared Content-Length over the cap is refused before a byte
  of the body is read; a body without one (chunked) is counted as the route reads
  it, and the read that crosses the cap raises the 413. Any answer given while the
  request's body is still arriving carries `Connection: close`, so a client cannot
  keep streaming into a connection whose answer it already has.
- `FailureLimiter`: failed authentications per client address in a sliding
  window (10 a minute); past it, 429 with Retry-After. Kept in memory, per
  process: a restart forgets it, and several maild hosts count apart. That is
  enough against guessing, which a 256-bit token defeats anyway; the limit keeps
  a misbehaving client from costing a database lookup per request.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maild import metrics
from maild.http.problems import ProblemError, problem_response

CLOSE = (b"connection", b"close")
MAX_HEAD = 16 * 1024  # the request line and headers


def _too_large(limit: int) -> str:
    return f"the request body is over {limit} bytes ([http] max_body_size)"


def head_size(scope: Scope) -> int:
    """The request line and headers' size, near enough: what a client made us hold."""
    line = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class RequestLimits:
    """ASGI middleware: refuse heads over `max_head` bytes (431) and bodies over
    `max_size` bytes (413)."""

    def __init__(self, app: ASGIApp, max_size: int, max_head: int) -> None:
        self.app = app
        self.max_size = max_size
        self.max_head = max_head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if head_size(scope) > self.max_head:
            metrics.HTTP_REFUSED.labels("head_too_large").inc()
            response = problem_response(
                431,
                f"the request line and headers are over {self.max_head} bytes",
                kind="head-too-large",
                headers={"connection": "close"},
            )
            await response(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > self.max_size:
            metrics.HTTP_REFUSED.labels("body_too_large").inc()
            response = problem_response(
                413,
                _too_large(self.max_size),
                kind="body-too-large",
                headers={"connection": "close"},
            )
            await response(scope, receive, send)
            return
        finished = not (length or "transfer-encoding" in headers)
        received = 0

        async def limited_receive() -> Message:
            nonlocal finished, received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_size:
                    metrics.HTTP_REFUSED.labels("body_too_large").inc()
                    raise ProblemError(413, _too_large(self.max_size), kind="body-too-large")
                if not message.get("more_body", False):
                    finished = True
            elif message["type"] == "http.disconnect":
                finished = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not finished:
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


def client_key(address: str) -> str:
    """What the failure limit counts by: the IP address; for IPv6 its /64, since one host
    commonly holds a whole /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FailureLimiter:
    """At most `limit` failures per client address in any `window` seconds."""

    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients  # memory bound: the least recently failing are forgotten
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again; None when it may now."""
        times = self._failures.get(client_key(address))
        if times is None:
            return None
        now = self._clock()
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.limit:
            return None
        return max(times[0] + self.window - now, 0.001)

    def failed(self, address: str) -> bool:
        """Count a failure; True when it reaches the limit (for one log line per episode)."""
        key = client_key(address)
        now = self._clock()
        times = self._failures.pop(key, None) or deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        self._failures[key] = times  # most recent last
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return len(times) == self.limit
