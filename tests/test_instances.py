"""Two `maild serve` processes on one PostgreSQL: one ticket per message, one page per ticket.

PostgreSQL only (MAILD_TEST_DATABASE_URL): SQLite is one host's database.
"""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlmodel import Session, select

from maild.store.database import Database
from maild.store.models import Inbound, Message, Page, Ticket
from tests.conftest import PG_URL, mail, wait_until
from tests.daemon import Daemon
from tests.fake_events import FakeEvents

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="needs MAILD_TEST_DATABASE_URL (PostgreSQL)"),
]
KEY = "0123456789abcdef0123456789abcdef"
SYSOPS = "sysops@altis-dxp.com"
SUPPORT = "support@altis-dxp.com"


@pytest.fixture
def events(tmp_path: Path) -> Iterator[FakeEvents]:
    with FakeEvents(tmp_path / "events") as fake:
        yield fake


@pytest.fixture
def two_configs(
    make_config: Callable[..., Path], events: FakeEvents, tmp_path: Path, database_url: str
) -> tuple[Path, Path]:
    """Two config files (two daemons) for the same PostgreSQL schema, paging on."""
    if not database_url.startswith("postgresql"):
        pytest.skip("several instances share a PostgreSQL database")
    base = make_config(
        f"""
[pagerduty]
routing_key = "{KEY}"
events_url = "{events.url}"
ca_file = "{events.ca_file}"
timeout = "2s"
retry_initial = "0.05s"
retry_max = "0.2s"

[escalation]
max_pages_per_sender_per_hour = 0
"""
    )
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs.append(Path(shutil.copy(base, tmp_path / name / "config.toml")))
    upgrade = subprocess.run(
        [sys.executable, "-m", "maild", "db", "upgrade", "--config", str(configs[0])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    return configs[0], configs[1]


def deliver(port: int, message: EmailMessage, rcpt: str, errors: list[BaseException]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            assert client.send_message(message, "alice@customer.example", [rcpt]) == {}
    except BaseException as exc:
        errors.append(exc)


def race(ports: list[int], messages: list[tuple[EmailMessage, str]]) -> None:
    """Each message to every daemon at the same moment (one thread per delivery)."""
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=deliver, args=(port, message, rcpt, errors))
        for message, rcpt in messages
        for port in ports
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []


def counts(database: Database) -> dict[str, int]:
    def read(s: Session) -> dict[str, int]:
        inbound = list(s.exec(select(Inbound.status)).all())
        return {
            "tickets": len(s.exec(select(Ticket.id)).all()),
            "messages": len(s.exec(select(Message.id)).all()),
            "received": inbound.count("received"),
            "processed": inbound.count("processed"),
            "duplicate": inbound.count("duplicate"),
            "failed": inbound.count("failed"),
            "pages_sent": len(s.exec(select(Page.id).where(Page.status == "sent")).all()),
        }

    return database.run_read(read)


@pytest.fixture
def pair(
    two_configs: tuple[Path, Path], tmp_path: Path, database_url: str
) -> Iterator[tuple[Database, Daemon, Daemon]]:
    """The shared database and two running daemons on it."""
    database = Database(database_url)
    a = Daemon(two_configs[0], tmp_path / "a.log").start()
    b = Daemon(two_configs[1], tmp_path / "b.log").start()
    try:
        yield database, a, b
    finally:
        a.__exit__()
        b.__exit__()
        database.close()


def test_the_same_messages_raced_into_two_daemons_make_one_ticket_and_one_page_each(
    pair: tuple[Database, Daemon, Daemon], events: FakeEvents
) -> None:
    """20 messages, each sent to both daemons at once: 20 tickets, 10 pages, nothing failed."""
    database, a, b = pair
    messages = [
        (mail(f"Raced {n}", to=SYSOPS if n % 2 else SUPPORT), SYSOPS if n % 2 else SUPPORT)
        for n in range(20)
    ]
    race([a.smtp_port, b.smtp_port], messages)
    wait_until(
        lambda: counts(database)["received"] == 0 and counts(database)["pages_sent"] == 10,
        60,
        "every delivery filed and every page sent",
    )
    final = counts(database)
    assert final == {
        "tickets": 20,
        "messages": 20,
        "received": 0,
        "processed": 20,
        "duplicate": 20,
        "failed": 0,
        "pages_sent": 10,
    }
    triggers = [e for e in events.events if e["event_action"] == "trigger"]
    assert len(triggers) == 10
    assert len({e["dedup_key"] for e in triggers}) == 10


def test_the_survivor_finishes_the_work_of_a_killed_daemon(
    pair: tuple[Database, Daemon, Daemon], events: FakeEvents
) -> None:
    """kill -9 one daemon right after its 250s: the other files that mail and sends its pages."""
    database, a, b = pair
    with smtplib.SMTP("127.0.0.1", a.smtp_port, timeout=60) as client:
        for n in range(5):
            client.send_message(mail(f"To the doomed one {n}", to=SYSOPS), to_addrs=[SYSOPS])
    a.kill()
    race([b.smtp_port], [(mail(f"To the survivor {n}", to=SYSOPS), SYSOPS) for n in range(5)])
    wait_until(
        lambda: counts(database)["received"] == 0 and counts(database)["pages_sent"] == 10,
        90,  # a page the killed daemon had claimed waits for its lease (about 10 s)
        "the survivor to file everything and send every page",
    )
    final = counts(database)
    assert b.process is not None
    assert b.process.poll() is None
    assert (final["tickets"], final["processed"], final["failed"]) == (10, 10, 0)
    triggers = {e["dedup_key"] for e in events.events if e["event_action"] == "trigger"}
    assert len(triggers) == 10
