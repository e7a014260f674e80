"""Shared fixtures: a real maild on loopback port 0, real SMTP clients, real databases.

`database_url` runs each test that uses it on SQLite, and on PostgreSQL too when
MAILD_TEST_DATABASE_URL is set (an empty database the tests may wipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlmodel import select

from maild.config import Settings, load_settings
from maild.desk.actions import ChangeResult, Changes, DeskContext, change_ticket
from maild.logs import configure_logging
from maild.routing.rules import load_rules
from maild.service import Service
from maild.store.database import Database
from maild.store.tickets import list_tickets, show_ticket

REPO = Path(__file__).resolve().parent.parent
AGENT = "jo@altis-dxp.com"  # an agent of the desk, as tests name one
PG_URL = os.environ.get("MAILD_TEST_DATABASE_URL", "")
# A route the default table lacks, for tests that change the rules under a running maild.
BILLING = """
[[route]]
name = "billing"
recipients = ["billing@altis-dxp.com"]
type = "task"
priority = "low"
"""


def _backends() -> list[Any]:
    params: list[Any] = ["sqlite"]
    if PG_URL:
        params.append(pytest.param("postgresql", marks=pytest.mark.postgres))
    return params


def pytest_report_header() -> str:
    if PG_URL:
        return f"maild databases: sqlite and postgresql ({PG_URL})"
    return "maild databases: sqlite only (set MAILD_TEST_DATABASE_URL for PostgreSQL too)"


@contextlib.contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A new, empty schema in the test PostgreSQL; the URL that uses it. Dropped after.

    A schema of its own per test lets several test runs share one server.
    """
    name = f"maild_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield str(make_url(url).update_query_dict({"options": f"-csearch_path={name}"}))
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=_backends())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema in the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'maild.db'}"
        return
    with postgres_schema(PG_URL) as url:
        yield url


@pytest.fixture
def quiet_logging() -> Iterator[None]:
    """The CLI reconfigures process-wide logging; keep an in-process daemon off stdout."""
    configure_logging("json", "info", stream=io.StringIO())
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """A copy of the repository's default routing table."""
    target = tmp_path / "rules"
    shutil.copytree(REPO / "rules", target, ignore=shutil.ignore_patterns("*.md"))
    return target


def write_config(folder: Path, body: str) -> Path:
    path = folder / "config.toml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture
def make_config(tmp_path: Path, rules_dir: Path, database_url: str) -> Callable[..., Path]:
    """Write a config on port 0 with the test database and rules; extra TOML appended.

    Paging is off (pages recorded as withheld) unless `extra` has a [pagerduty]
    section: the paging tests bring their own HTTPS Events API. The rules
    watcher is off unless `watch`: tests that reload by SIGHUP count reloads.
    """

    def make(extra: str = "", *, lmtp: bool = False, watch: bool = False) -> Path:
        if "[pagerduty]" not in extra:
            extra += "\n[pagerduty]\nenabled = false\n"
        return write_config(
            tmp_path,
            f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "mx.test.invalid"
shutdown_timeout = "5s"
{"[lmtp]" + chr(10) + 'listen = "127.0.0.1:0"' if lmtp else ""}
[database]
url = "{database_url}"
busy_timeout = "2s"

[rules]
path = "{rules_dir}"
watch = {"true" if watch else "false"}

[processing]
workers = 1
poll_interval = "0.5s"

[log]
format = "json"
level = "info"
{extra}
""",
        )

    return make


class RunningMaild:
    """A Service running on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.service = Service(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="maild-test-loop", daemon=True
        )

    def __enter__(self) -> RunningMaild:
        self.thread.start()
        self.call(self.service.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.service.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def smtp_port(self) -> int:
        return self.service.addresses["smtp"][1]

    @property
    def lmtp_port(self) -> int:
        return self.service.addresses["lmtp"][1]

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30)
        client.ehlo("client.customer.example")
        return client

    def send(
        self, message: EmailMessage, rcpts: list[str], sender: str = "alice@customer.example"
    ) -> dict[str, Any]:
        with self.smtp() as client:
            return client.send_message(message, from_addr=sender, to_addrs=rcpts)

    def settle(self, timeout: float = 30) -> None:
        """Wait until no accepted delivery is still waiting to be processed."""
        from maild.store.models import Inbound

        def waiting() -> int:
            return len(
                self.service.database.run_read(
                    lambda s: s.exec(select(Inbound.id).where(Inbound.status == "received")).all()
                )
            )

        wait_until(lambda: waiting() == 0, timeout, "deliveries still unprocessed")
        # ...and until the processor has logged and announced its last batch
        wait_until(lambda: not self.service.processor.busy, timeout, "processor still busy")

    def tickets(self, status: str = "all") -> list[dict[str, Any]]:
        return self.service.database.run_read(lambda s: list_tickets(s, status=status))

    def ticket(self, ticket_id: int) -> dict[str, Any]:
        return self.service.database.run_read(lambda s: show_ticket(s, ticket_id))

    def change(self, ticket_id: int, *, by: str = AGENT, **changes: Any) -> ChangeResult:
        """The desk changes a ticket, with this daemon's rules and paging policy."""
        return change(self.service.database, ticket_id, self.service.desk(), by=by, **changes)


def change(
    database: Database,
    ticket_id: int,
    context: DeskContext | None = None,
    *,
    by: str = AGENT,
    **changes: Any,
) -> ChangeResult:
    """desk/actions.change_ticket in one transaction, as `maild tickets set` runs it; without
    a context, the shipped rules and no paging policy (resolves are still queued)."""
    context = context or DeskContext(load_rules(REPO / "rules"), None)
    return database.run_write(
        lambda s: change_ticket(s, ticket_id, Changes(**changes), by=by, context=context)
    )


@pytest.fixture
def limited(make_config: Callable[..., Path]) -> Iterator[Callable[..., RunningMaild]]:
    """Start maild (SMTP and LMTP) with the given [smtp] keys, as TOML; stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(**smtp: str) -> RunningMaild:
            path = make_config(lmtp=True)
            keys = "".join(f"{key} = {value}\n" for key, value in smtp.items())
            path.write_text(path.read_text().replace("[smtp]\n", "[smtp]\n" + keys, 1))
            return stack.enter_context(RunningMaild(load_settings(path)))

        yield start


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def maild(make_config: Callable[..., Path]) -> Iterator[RunningMaild]:
    """maild serving SMTP and LMTP on free loopback ports with the default rules."""
    with RunningMaild(load_settings(make_config(lmtp=True))) as running:
        yield running


def mail(
    subject: str,
    to: str = "support@altis-dxp.com",
    frm: str = "Alice Example <alice@customer.example>",
    body: str = "Hello, our site is slow.",
    **headers: str,
) -> EmailMessage:
    """A plain customer message with a fresh Message-ID."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = frm, to, subject
    message["Message-ID"] = make_msgid(domain="customer.example")
    for key, value in headers.items():
        message[key.replace("_", "-")] = value
    message.set_content(body)
    return message


class Client:
    """A plain-socket SMTP client that reads one whole reply per command."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=30, source_address=(source, 0)
        )
        self.reader = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """The last line of the next reply (b"" once the server has closed)."""
        line = self.reader.readline()
        while line[3:4] == b"-":
            line = self.reader.readline()
        return line

    def say(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.reader.close()  # the socket closes only when its file object does too
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """Open clients that are all closed at the end of the test."""
    with contextlib.ExitStack() as stack:

        def open_client(port: int, source: str = "127.0.0.1") -> Client:
            client = Client(port, source)
            stack.callback(client.close)
            return client

        yield open_client
