"""Fixtures for the HTTP stack: maild with [http] on port 0, tokens, an HTTP client, and
the application alone (build_app + HttpServer) with routers a test plugs in."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter

from maild.config import load_settings
from maild.http.app import ApiContext, Ops, build_app
from maild.http.auth import Authenticator
from maild.http.server import HttpServer
from maild.store.database import Database
from maild.store.tokens import Scope, create_token
from tests.conftest import RunningMaild, mail
from tests.fake_events import FakeEvents
from tests.outbound.test_acks import outbound_section
from tests.outbound.test_correspondence import DESK_SECTION
from tests.outbound.test_paging import pagerduty_section
from tests.sink import SmtpSink
from tests.test_operator import Proxy as _CuttableProxy


def http_url(maild: RunningMaild, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{maild.service.addresses['http'][1]}"


def make_token(
    database: Database, name: str, scope: str = "read", customer: str | None = None
) -> str:
    """A new token, made as `maild tokens create` makes it; the token itself."""
    return database.run_write(lambda s: create_token(s, name, Scope(scope), customer)[1])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem(response: httpx2.Response) -> dict[str, Any]:
    """The RFC 9457 body of an error answer, checked for its media type and members."""
    assert response.headers["content-type"] == "application/problem+json", response.text
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == response.status_code
    return body


@pytest.fixture
def http_config(make_config: Callable[..., Path]) -> Callable[..., Path]:
    """A config with [http] on port 0; `http` adds keys to [http], `extra` more TOML."""

    def make(http: str = "", extra: str = "") -> Path:
        return make_config(f'[http]\nlisten = "127.0.0.1:0"\n{http}\n{extra}')

    return make


@pytest.fixture
def served(http_config: Callable[..., Path]) -> Iterator[RunningMaild]:
    """maild with SMTP and the HTTP listener on free loopback ports."""
    with RunningMaild(load_settings(http_config())) as running:
        yield running


@pytest.fixture
def client(served: RunningMaild) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=http_url(served), timeout=30) as http:
        yield http


class AppServer:
    """build_app and HttpServer alone on an event loop thread, over a real database: for
    routers a test plugs in (as the ticket routes will be) and limits tuned small."""

    def __init__(
        self,
        database: Database,
        config: Path,
        routers: Sequence[APIRouter],
        authenticator: Authenticator | None,
    ) -> None:
        self.database = database
        settings = load_settings(config)
        self.settings = settings

        async def ok() -> dict[str, Any]:
            return {"status": "ok"}

        async def ready() -> dict[str, Any]:
            return {"status": "ready"}

        async def backlog() -> dict[str, int]:
            return {}

        app = build_app(
            Ops(health=ok, ready=ready, backlog=backlog),
            ApiContext(database, settings, rules=lambda: None, queued=lambda: None),
            settings.http,
            authenticator=authenticator,
            routers=routers,
        )
        self.server = HttpServer(app, settings.http)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> AppServer:
        self.thread.start()
        self.port = self.call(self.server.start())[1]
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def url(self) -> str:
        scheme = "https" if self.server.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"


@pytest.fixture
def app_server(
    database_url: str, tmp_path: Path, quiet_logging: None
) -> Iterator[Callable[..., AppServer]]:
    """Start the application alone with `routers` and [http] keys `http`."""
    database = Database(database_url, 2.0)
    database.create_schema()
    with contextlib.ExitStack() as stack:

        def start(
            routers: Sequence[APIRouter] = (),
            http: str = "",
            authenticator_clock: Callable[[], float] | None = None,
        ) -> AppServer:
            authenticator = (
                Authenticator(database, clock=authenticator_clock) if authenticator_clock else None
            )
            config = tmp_path / "app.toml"
            config.write_text(
                f'[database]\nurl = "{database_url}"\n[http]\nlisten = "127.0.0.1:0"\n{http}\n'
            )
            return stack.enter_context(AppServer(database, config, routers, authenticator))

        yield start
    database.close()


def rss(pid: int | str = "self") -> int:
    """A process's resident memory in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raw_connection(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


class Proxy(_CuttableProxy):
    """The PostgreSQL proxy of test_operator, which can also take connections again
    (restore) on the same port after a cut."""

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()


# The desk's API: maild with [http], acknowledgements and desk mail through a sink, agents,
# and paging to the Events API stand-in (tests/http/test_tickets*.py).

ALICE = "alice@customer.example"
BOB = "bob@customer.example"
CAROL = "carol@customer.example"
DANA = "dana@other.example"
SUPPORT = "support@altis-dxp.com"
SYSOPS = "sysops@altis-dxp.com"
JO = "jo@altis-dxp.com"  # an agent


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def events(tmp_path: Path) -> Iterator[FakeEvents]:
    with FakeEvents(tmp_path / "events") as fake:
        yield fake


@pytest.fixture
def desk_config(
    http_config: Callable[..., Path], sink: SmtpSink, events: FakeEvents
) -> Callable[..., Path]:
    """A config for the desk's API: [http] on port 0 (and `http`'s keys), mail through the
    sink, agents, paging to the stand-in; `extra` more TOML."""

    def make(extra: str = "", http: str = "") -> Path:
        return http_config(
            http,
            extra=outbound_section(sink)
            + DESK_SECTION
            + pagerduty_section(events.url, events.ca_file)
            + extra,
        )

    return make


@pytest.fixture
def desk(desk_config: Callable[..., Path], quiet_logging: None) -> Iterator[RunningMaild]:
    """The running daemon of the desk's API."""
    with RunningMaild(load_settings(desk_config())) as running:
        yield running


class Api:
    """An HTTP client of the running daemon with tokens made on its database."""

    def __init__(self, maild: RunningMaild) -> None:
        self.maild = maild
        self.http = httpx2.Client(base_url=http_url(maild), timeout=30)
        self._count = 0

    def token(self, scope: str = "write", customer: str | None = None) -> dict[str, str]:
        """Authorization headers for a new token."""
        self._count += 1
        name = f"t{self._count}-{scope}" + ("-customer" if customer else "")
        return bearer(make_token(self.maild.service.database, name, scope, customer))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def api(desk: RunningMaild) -> Iterator[Api]:
    client = Api(desk)
    yield client
    client.close()


def new_ticket(maild: RunningMaild, subject: str, frm: str = ALICE, **headers: str) -> int:
    """A ticket opened by mail to support@ (filed before this returns); its id."""
    message = mail(subject, frm=frm, **headers)
    maild.send(message, [SUPPORT], sender=frm)
    maild.settle()
    (found,) = [t for t in maild.tickets() if t["subject"] == subject]
    return int(found["id"])
