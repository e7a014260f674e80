"""uvicorn inside maild's event loop, with the limits uvicorn leaves out.

`HttpServer(app, settings.http).start(sock)` binds `[http] listen` (or takes a
socket systemd passed, named "http"), and serves `app` from a task on the
running loop; `stop()` ends it. Embedding uvicorn takes three changes:

- No signal handling. `uvicorn.Server.serve()` replaces the process's SIGINT and
  SIGTERM handlers (and re-raises the signal when it returns); maild owns its
  signals (SIGTERM drains SMTP first, SIGHUP reloads), so `capture_signals` is a
  no-op and `stop()` sets `should_exit`.
- No logging set-up (`log_config=None`, no access log: /api/ requests are logged by
  app.ApiLog through structlog), no lifespan, no `Server:` header.
- Our own sockets and protocol. `startup` is uvicorn's without the branches maild
  does not use: it serves the socket maild bound (so port 0 is known before
  serving, a bind error is raised to the caller rather than uvicorn's
  `sys.exit`, and a socket-activated one works the same way), with a TLS
  handshake timeout, through `GuardedH11Protocol`.

uvicorn's h11 protocol has no timeout while a request's head or body arrives: a
client sending a byte every few seconds (slowloris) would hold its connection
for ever, and connections without number would take the process's file
descriptors, which SMTP needs too. `GuardedH11Protocol` adds:

- a cap on open connections (`[http] max_connections`): one more is answered 503
  and closed before anything is read from it;
- a deadline for the request line and headers (`header_timeout`, from the
  connection's start or the end of the previous answer plus `keep_alive_timeout`),
  not reset by trickled bytes;
- an idle limit while a body arrives (`body_timeout`), which does not run while
  the application itself has paused reading;
- a lingering close: an answer given while the request body still arrives (a 413,
  a 401 to an upload) ends with `Connection: close`; closing the socket at once
  with unread bytes would make the kernel send a reset that can destroy the
  answer before the client reads it. So the connection half-closes (FIN) and
  reads and discards for up to LINGER_SECONDS or LINGER_BYTES, then closes;
- a 400 for a half-sent request head followed by EOF (uvicorn just closes), and
  431 rather than uvicorn's 400 for a head past 16 KiB (h11's incomplete-event
  limit; a head that arrives whole is measured by limits.RequestLimits).

The
class uses uvicorn's H11Protocol internals (`conn`, `flow`, `transport`): the
version is pinned in constraints.txt, and tests/http/test_limits.py exercises
each limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from maild import metrics
from maild.config import HttpSettings, parse_hostport
from maild.errors import ConfigError
from maild.http.limits import MAX_HEAD

log = structlog.get_logger("maild.http")

SHUTDOWN_GRACE = 5  # seconds requests in flight get at shutdown
LINGER_SECONDS = 2.0  # after an early answer, how long the rest of a body is read and dropped
LINGER_BYTES = 4 * 1024 * 1024  # ...and how much of it
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
    b"content-length: 26\r\nconnection: close\r\n\r\ntoo many HTTP connections\n"
)


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float

    @classmethod
    def from_settings(cls, settings: HttpSettings) -> Limits:
        return cls(
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
        )


class _Transport(asyncio.Transport):
    """The socket's transport as uvicorn sees it: `close()` lingers while the client is
    still sending a request body (GuardedH11Protocol._close)."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        super().__init__()
        self.real = transport
        self.protocol = protocol

    def close(self) -> None:
        self.protocol._close()

    def is_closing(self) -> bool:
        return self.protocol._lingering or self.real.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.real.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.real.pause_reading()

    def resume_reading(self) -> None:
        self.real.resume_reading()

    def is_reading(self) -> bool:
        return self.real.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.real.get_protocol()

    def abort(self) -> None:
        self.real.abort()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a head deadline and a body idle limit."""

    def __init__(self, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.access_log = False  # app.ApiLog logs /api/ requests through structlog
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._lingering = False
        self._discarded = 0
        self._real: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            metrics.HTTP_REFUSED.labels("too_many_connections").inc()
            transport.write(_BUSY)
            transport.close()
            return
        self._real = transport
        nodelay(transport)
        super().connection_made(_Transport(transport, self))
        self._arm(self.limits.header_timeout, self._head_late)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._close_now()
            return
        super().data_received(data)
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm(self.limits.body_timeout, self._body_idle)
        elif state is not h11.IDLE:  # the whole request is in: the application's turn
            self._disarm()

    def eof_received(self) -> None:
        if self._lingering:
            self._close_now()
            return
        if not self._refused and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self.conn.receive_data(b"")  # h11 then reports the truncated head: uvicorn's 400
            self.handle_events()

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) <= MAX_HEAD:
            super().send_400_response(msg)
            return
        metrics.HTTP_REFUSED.labels("head_too_large").inc()
        body = b"the request line and headers are over 16384 bytes\n"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            # the next head: keep-alive idle time, then header_timeout to send it
            limits = self.limits
            self._arm(limits.keep_alive_timeout + limits.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            self.connections.discard(self)
            return
        super().connection_lost(exc)

    def _close(self) -> None:
        """uvicorn closes the connection: at once, unless the client is still sending a
        body; then half-close and drop what still comes, for a while."""
        real = self._real
        if real is None or self._lingering or real.is_closing():
            return
        if self.conn.their_state is not h11.SEND_BODY:
            real.close()
            return
        self._lingering = True
        if real.can_write_eof():
            real.write_eof()  # FIN after the answer: the client can read it in full
        real.resume_reading()
        self._arm(LINGER_SECONDS, self._close_now)

    def _close_now(self) -> None:
        self._disarm()
        if self._real is not None:
            self._real.close()

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            metrics.HTTP_REFUSED.labels("header_timeout").inc()
            self.transport.close()

    def _body_idle(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the application is not reading: not the client's delay
            self._arm(self.limits.body_timeout, self._body_idle)
            return
        metrics.HTTP_REFUSED.labels("body_timeout").inc()
        self.transport.close()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server on maild's loop and sockets, without signal handling."""

    def __init__(self, config: uvicorn.Config, limits: Limits) -> None:
        super().__init__(config)
        self.limits = limits
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # maild's own handlers stay in place

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        assert sockets, "maild always passes the socket it bound"
        config = self.config
        loop = asyncio.get_running_loop()

        def create_protocol() -> asyncio.Protocol:
            return GuardedH11Protocol(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                limits=self.limits,
                _loop=loop,
            )

        handshake = self.limits.header_timeout if config.ssl is not None else None
        self.servers = [
            await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=handshake,
            )
            for sock in sockets
        ]
        self.started = True
        self.listening.set()


def nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on the connection's socket. asyncio sets it only on sockets whose proto
    is IPPROTO_TCP, and an accepted socket inherits the listening one's: a listener made
    with proto 0 (socket.create_server, some passed by systemd) left Nagle on, and a
    response written in two parts (head, body) waited for the client's delayed ACK:
    40 ms on every keep-alive request after the first (docs/benchmarks.md)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on "host:port" (port 0: any free port)."""
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise ConfigError(
            f"[http] listen: cannot listen on {listen}: {exc.strerror or exc}"
        ) from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """The HTTP listener: `app` served by uvicorn on the running event loop."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self.app = app
        self.settings = settings
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def tls(self) -> bool:
        return self.settings.tls_cert is not None

    async def start(self, sock: socket.socket | None = None) -> tuple[str, int]:
        """Serve on `sock` (a socket systemd passed) or on `[http] listen`; the address."""
        settings = self.settings
        config = uvicorn.Config(
            self.app,
            http=GuardedH11Protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,  # app.py adds it for [http] trusted_proxies only
            server_header=False,
            timeout_keep_alive=max(1, math.ceil(settings.keep_alive_timeout)),
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            h11_max_incomplete_event_size=MAX_HEAD,
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        )
        # uvicorn's own lines ("Started server process", one per malformed request) are not
        # worth a log line each; its errors are.
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
        try:
            config.load()  # builds the TLS context: a bad certificate or key fails here
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"[http] tls_cert, tls_key: cannot use {settings.tls_cert} and "
                f"{settings.tls_key}: {exc}"
            ) from None
        if sock is None:
            assert settings.listen is not None
            sock = bind(settings.listen)
        else:
            sock.setblocking(False)
        server = _EmbeddedServer(config, Limits.from_settings(settings))
        task = asyncio.create_task(server.serve(sockets=[sock]), name="maild-http")
        self._server, self._task = server, task
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait([task, listening], return_when=asyncio.FIRST_COMPLETED)
        if not server.listening.is_set():
            listening.cancel()
            task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server ended before it listened")
        task.add_done_callback(_log_end)
        address = sock.getsockname()
        return str(address[0]), int(address[1])

    async def stop(self) -> None:
        """Stop accepting, give requests in flight SHUTDOWN_GRACE seconds, close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):  # logged by _log_end
            await self._task
        for connection in list(self._server.server_state.connections):
            connection.transport.abort()  # still open after the grace: a slow client's


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the HTTP server stopped", error=repr(task.exception()))
