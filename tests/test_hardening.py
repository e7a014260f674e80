"""The attack on maild, replayed: each broken or doubtful result of issue 15, over real SMTP.

One section per item: what one mail may make maild send, what one client may
hold, what a sick database or smarthost does to senders, and what the health
checks, hygiene and shutdown do about it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlmodel import select
from structlog.testing import capture_logs

from maild import metrics
from maild.cli import main
from maild.config import load_settings
from maild.errors import ConfigError
from maild.store.models import Inbound, Outmail, OutmailRecipient, Page, utcnow
from tests.conftest import PG_URL, Client, RunningMaild, mail, wait_until
from tests.daemon import Daemon
from tests.fake_events import FakeEvents
from tests.outbound.test_acks import outbound_section
from tests.outbound.test_paging import pagerduty_section
from tests.sink import SmtpSink

SUPPORT = "support@altis-dxp.com"
SYSOPS = "sysops@altis-dxp.com"
ALICE = "alice@customer.example"


@pytest.fixture
def sqlite_only(database_url: str) -> None:
    """For the limits of the SMTP layer and the smarthost client, which never touch the
    database's kind: the PostgreSQL run would repeat the SQLite one."""
    if not database_url.startswith("sqlite"):
        pytest.skip("an SMTP-layer limit, the same on every database: run on SQLite")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


def send_raw(maild: RunningMaild, raw: bytes, rcpts: list[str], sender: str) -> None:
    with maild.smtp() as client:
        client.sendmail(sender, rcpts, raw)


def many_addresses(count: int, start: int = 0) -> str:
    return ", ".join(f"u{n:04d}@spam{n % 7}.example" for n in range(start, start + count))


def inbound_rows(maild: RunningMaild) -> list[Inbound]:
    return maild.service.database.run_read(
        lambda s: list(s.exec(select(Inbound).order_by(Inbound.id)).all())  # type: ignore[arg-type]
    )


def spread_mail(sender: str, subject: str) -> bytes:
    """A mail to support@ and 4,000 others in 20 To and Cc fields of 200 addresses, as the
    attack's mail had them (each field within the 8 KiB maild reads of one)."""
    fields = "".join(
        f"{'To' if n < 10 else 'Cc'}: {many_addresses(200, start=200 * n)}\r\n" for n in range(20)
    )
    return (
        f"From: {sender}\r\nTo: {SUPPORT}\r\n{fields}Subject: {subject}\r\n"
        f"Message-ID: {make_msgid(domain='customer.example')}\r\n\r\nbuy now\r\n"
    ).encode()


def deferred(reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("maild_messages_deferred_total", {"reason": reason}) or 0
    )


def http_get(port: int, path: str, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# 1. One inbound mail must not make maild a spammer.


def test_a_strangers_mail_to_4000_addresses_is_acknowledged_to_the_sender_alone(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """The attack's mail: one acknowledgement, to its sender only, without the links it carried;
    the ticket keeps every address on the message and adds 20 participants."""
    config = make_config(outbound_section(sink))
    raw = spread_mail(
        '"Visit http://evil.example now" <spammer@evil.example>',
        "CHEAP PILLS http://evil.example www.evil.example/buy",
    )
    assert len(raw) > 79_000
    with RunningMaild(load_settings(config)) as maild:
        send_raw(maild, raw, [SUPPORT], sender="spammer@evil.example")
        (ack,) = sink.wait_for(1)
        maild.settle()
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "sent")
        view = maild.ticket(1)
    assert ack.rcpt_tos == ["spammer@evil.example"]
    assert ack.message["Cc"] is None
    assert ack.header("Subject") == "[#1] CHEAP PILLS"
    assert "Hello Visit now," in ack.body
    assert "evil" not in ack.body
    assert len(view["participants"]) == 20
    (message,) = [m for m in view["messages"] if m["direction"] == "inbound"]
    assert len(message["to"]) + len(message["cc"]) == 4001  # kept on the message
    assert (
        "TooManyAddresses: 3981 more addresses in From, To and Cc were not added as "
        "participants ([outbound] max_recipients = 20)"
    ) in message["defects"]
    assert view["acknowledgements"][0]["recipients"] == [
        {"email": "spammer@evil.example", "status": "sent", "error": None}
    ]


def test_a_known_senders_mail_to_4000_addresses_reaches_at_most_20(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """A correspondent the desk knows gets the Cc'd acknowledgement, to 20 addresses at most:
    the envelope and the headers alike."""
    config = make_config(outbound_section(sink))
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("First contact"), [SUPPORT])  # alice is known from now on
        sink.wait_for(1)
        send_raw(
            maild,
            spread_mail("Alice Example <alice@customer.example>", "Everyone"),
            [SUPPORT],
            ALICE,
        )
        ack = sink.wait_for(2)[1]
        maild.settle()
        wait_until(lambda: maild.ticket(2)["acknowledgements"][0]["status"] == "sent")
        view = maild.ticket(2)
    assert len(ack.rcpt_tos) == 20
    assert ack.rcpt_tos[0] == ALICE
    header_addresses = re.findall(r"[\w.+-]+@[\w.-]+", ack.header("To") + ack.header("Cc"))
    assert sorted(header_addresses) == sorted(ack.rcpt_tos)
    assert "Hello Alice Example," in ack.body  # a known sender's own words are kept
    assert len(view["participants"]) == 20
    (row,) = view["acknowledgements"]
    assert len(row["recipients"]) == 20


def test_the_mailer_refuses_a_row_with_more_recipients_than_the_cap(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """However an outmail row came to hold 24 pending recipients, nothing is sent: it fails."""
    config = make_config(outbound_section(sink, "max_recipients = 3"))
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Hello"), [SUPPORT])
        sink.wait_for(1)
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "sent")

        def many_pending(session: Any) -> None:  # as a bug, or a hand in the database, might
            outmail = session.get(Outmail, 1)
            outmail.status, outmail.next_attempt_at = "pending", utcnow()
            session.add(outmail)
            for n in range(24):
                address = f"x{n}@customer.example"
                session.add(OutmailRecipient(outmail_id=1, email=address, status="pending"))

        maild.service.database.run_write(many_pending)
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "failed")
        row = maild.ticket(1)["acknowledgements"][0]
    assert row["reason"] == "not sent: 24 recipients, more than [outbound] max_recipients = 3"
    assert len(sink.received) == 1


# 2. One client must not eat maild's memory.


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def with_smtp_keys(config: Path, keys: str) -> Path:
    config.write_text(config.read_text().replace("[smtp]\n", "[smtp]\n" + keys, 1))
    return config


def long_command_line(port: int, size: int, replies: list[bytes]) -> None:
    """Greet, then send one command line of `size` bytes before its CRLF; keep the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        chunk = b"A" * (1 << 20)
        sent = 0
        while sent < size:
            sock.sendall(chunk[: size - sent])
            sent += len(chunk)
        sock.sendall(b"\r\n")
        replies.append(reader.readline())
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        reader.close()


@pytest.mark.usefixtures("sqlite_only")
@pytest.mark.slow
def test_100_connections_with_20_mib_command_lines_leave_rss_near_its_baseline(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Each gets 500, and the daemon's RSS stays within 100 MiB of its baseline during the
    attack and after it (before, each connection buffered its whole line: +2.4 GB)."""
    config = with_smtp_keys(make_config(), "max_connections_per_ip = 0\n")
    with Daemon(config, tmp_path / "maild.log") as daemon:
        assert daemon.process is not None
        pid = daemon.process.pid
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            client.send_message(mail("warm-up"), ALICE, [SUPPORT])
        time.sleep(1)
        baseline = rss_mib(pid)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(rss_mib(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        replies: list[bytes] = []
        attackers = [
            threading.Thread(target=long_command_line, args=(daemon.smtp_port, 20 << 20, replies))
            for _ in range(100)
        ]
        for thread in attackers:
            thread.start()
        for thread in attackers:
            thread.join(300)
        time.sleep(1)
        done.set()
        sampler.join(10)
        after = rss_mib(pid)
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            assert client.send_message(mail("still fine"), ALICE, [SUPPORT]) == {}
    assert replies == [b"500 Command line too long\r\n"] * 100
    assert max(peak) - baseline < 100, (baseline, max(peak))
    assert after - baseline < 100, (baseline, after)
    warnings = [e for e in daemon.events() if e.get("event") == "command line too long"]
    assert len(warnings) == 100


def data_lines(count: int, width: int = 1022) -> bytes:
    return (b"x" * width + b"\r\n") * count


def open_data(port: int) -> Client:
    client = Client(port)
    assert client.reply()[:3] == b"220"
    assert client.say(b"EHLO client.example")[:3] == b"250"
    assert client.say(b"MAIL FROM:<alice@customer.example>")[:3] == b"250"
    assert client.say(b"RCPT TO:<support@altis-dxp.com>")[:3] == b"250"
    assert client.say(b"DATA")[:3] == b"354"
    return client


@pytest.mark.usefixtures("sqlite_only")
def test_data_beyond_max_data_memory_gets_452_4_3_1_and_the_first_transfer_goes_on(
    limited: Callable[..., RunningMaild],
) -> None:
    """With 100 KiB for all transfers, one holding 60 KiB leaves no room for another 60 KiB:
    the second gets 452 4.3.1 after its final dot, the first is stored."""
    maild = limited(max_message_size='"64 KiB"', max_data_memory='"100 KiB"')
    budget = maild.service.listeners[0].limits.data_budget
    before = deferred("memory_budget")
    first = open_data(maild.smtp_port)
    first.sock.sendall(b"Subject: first\r\n\r\n" + data_lines(60))
    wait_until(lambda: budget.used >= 60 * 1024, what="the first transfer's lines held")
    second = open_data(maild.smtp_port)
    assert second.say(b"Subject: second\r\n\r\n" + data_lines(60) + b".") == (
        b"452 4.3.1 Insufficient system storage, try again later\r\n"
    )
    assert first.say(b".")[:3] == b"250"
    assert budget.used == 0
    assert deferred("memory_budget") - before == 1
    (row,) = maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))
    assert row.raw.startswith(b"Subject: first\r\n")
    first.close()
    second.close()


@pytest.mark.usefixtures("sqlite_only")
def test_data_is_refused_at_once_while_the_memory_budget_is_spent(
    limited: Callable[..., RunningMaild],
) -> None:
    """A transfer holding the whole budget: the next DATA command gets 452 4.3.1 before 354."""
    maild = limited(max_message_size='"64 KiB"', max_data_memory='"64 KiB"')
    budget = maild.service.listeners[0].limits.data_budget
    first = open_data(maild.smtp_port)
    first.sock.sendall(data_lines(64))
    # all of it but the last four bytes, which may begin the end of data (data_pieces)
    wait_until(lambda: budget.used == 64 * 1024 - 4, what="the whole budget held")
    assert budget.spent
    second = Client(maild.smtp_port)
    second.reply()
    second.say(b"EHLO client.example")
    second.say(b"MAIL FROM:<alice@customer.example>")
    second.say(b"RCPT TO:<support@altis-dxp.com>")
    assert second.say(b"DATA") == b"452 4.3.1 Insufficient system storage, try again later\r\n"
    assert first.say(b".")[:3] == b"250"
    assert second.say(b"DATA")[:3] == b"354"  # room again
    first.close()
    second.close()


@pytest.mark.usefixtures("sqlite_only")
def test_a_data_line_of_200_kb_is_stored_as_sent(limited: Callable[..., RunningMaild]) -> None:
    """Lines longer than the command-line cap are fine inside DATA: the bytes are kept exactly."""
    maild = limited()
    client = open_data(maild.smtp_port)
    body = b"Subject: long\r\n\r\n" + b"z" * 200_000 + b"\r\n..dot-stuffed\r\n"
    assert client.say(body + b".")[:3] == b"250"
    client.close()
    (row,) = maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))
    assert row.raw == b"Subject: long\r\n\r\n" + b"z" * 200_000 + b"\r\n.dot-stuffed\r\n"


def test_max_data_memory_below_max_message_size_is_refused(tmp_path: Path) -> None:
    """No message of the largest size could ever fit: the config error names file, line, key."""
    path = tmp_path / "config.toml"
    path.write_text('[smtp]\nmax_message_size = "10 MiB"\nmax_data_memory = "5 MiB"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:3: [smtp] max_data_memory: 5242880 bytes is less")


# 3. The per-sender page limit is a limit, with two workers, on PostgreSQL too.


@pytest.fixture
def events(tmp_path: Path) -> Iterator[FakeEvents]:
    with FakeEvents(tmp_path / "events") as fake:
        yield fake


def paging_config(make_config: Callable[..., Path], events: FakeEvents, extra: str = "") -> Path:
    config = make_config(pagerduty_section(events.url, events.ca_file) + extra)
    return config


def page_rows(maild: RunningMaild) -> list[Page]:
    return maild.service.database.run_read(lambda s: list(s.exec(select(Page)).all()))


def test_50_pages_from_one_sender_filed_by_two_workers_send_exactly_the_limit(
    make_config: Callable[..., Path], events: FakeEvents
) -> None:
    """50 sysops@ mails from one sender over 25 connections at once, two workers filing them
    in parallel: 10 pages are sent and 40 withheld (before: 19 sent on PostgreSQL)."""
    config = paging_config(make_config, events)
    config.write_text(config.read_text().replace("workers = 1", "workers = 2"))
    with RunningMaild(load_settings(config)) as maild:
        start = threading.Barrier(25)

        def burst(number: int) -> None:
            source = (f"127.0.0.{2 + number % 5}", 0)  # [smtp] max_connections_per_ip = 20
            with smtplib.SMTP(
                "127.0.0.1", maild.smtp_port, timeout=30, source_address=source
            ) as client:
                start.wait(30)  # every connection open: the mail arrives together
                for n in range(2):
                    client.send_message(mail(f"Down {number}.{n}", to=SYSOPS), ALICE, [SYSOPS])

        senders = [threading.Thread(target=burst, args=(n,)) for n in range(25)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(60)
        maild.settle(60)
        wait_until(
            lambda: all(p.status in ("sent", "withheld") for p in page_rows(maild)),
            what="every page sent or withheld",
        )
        rows = page_rows(maild)
        tickets = maild.tickets()
    assert len(tickets) == 50
    assert sorted(p.status for p in rows).count("sent") == 10
    assert [p.status for p in rows].count("withheld") == 40
    assert events.requests == 10


def test_the_page_limit_counts_the_sender_without_case_or_tag(
    make_config: Callable[..., Path], events: FakeEvents
) -> None:
    """a+0@ … A+4@trusted.example are one sender: with a limit of 3, two pages are withheld."""
    config = paging_config(
        make_config, events, "\n[escalation]\nmax_pages_per_sender_per_hour = 3\n"
    )
    with RunningMaild(load_settings(config)) as maild:
        for n in range(5):
            sender = f"{'A' if n % 2 else 'a'}+{n}@trusted.example"
            maild.send(mail(f"Down {n}", to=SYSOPS, frm=sender), [SYSOPS], sender=sender)
            maild.settle()
        statuses = [p.status for p in sorted(page_rows(maild), key=lambda p: p.id or 0)]
        reasons = [p.reason for p in page_rows(maild) if p.status == "withheld"]
    assert [s != "withheld" for s in statuses] == [True, True, True, False, False]
    assert all("already paged 3 times" in (r or "") for r in reasons)


# 4. A reused Message-ID changes nobody's ticket.


def test_a_strangers_mail_reusing_a_message_id_changes_nobody_elses_ticket(
    maild: RunningMaild,
) -> None:
    """Mallory's sysops@ mail with ticket 1's Message-ID makes a ticket of its own; ticket 1
    stays normal, unpaged, with its one message."""
    original = mail("Invoice question")
    maild.send(original, [SUPPORT])
    maild.settle()
    hostile = mail("Site down!!", to=SYSOPS, frm="mallory@elsewhere.example", body="page them")
    hostile.replace_header("Message-ID", original["Message-ID"])
    maild.send(hostile, [SYSOPS], sender="mallory@elsewhere.example")
    maild.settle()
    first = maild.ticket(1)
    assert (first["priority"], first["message_count"], first["page"]) == ("normal", 1, None)
    second = maild.ticket(2)
    assert (second["type"], second["priority"], second["requester"]) == (
        "incident",
        "urgent",
        "mallory@elsewhere.example",
    )
    (message,) = second["messages"]
    assert message["text"] == "page them"
    assert message["message_id"].startswith("<reused-")
    (defect,) = [d for d in message["defects"] if d.startswith("ReusedMessageId")]
    assert original["Message-ID"] in defect
    assert [row.status for row in inbound_rows(maild)] == ["processed", "processed"]


def test_alerts_sharing_one_message_id_each_reach_a_ticket_and_a_retry_is_a_duplicate(
    maild: RunningMaild,
) -> None:
    """Three alerts from one monitor under one Message-ID, different texts: three tickets with
    their texts. The same alert's bytes again (an MTA retry) is a duplicate."""
    shared = make_msgid(domain="monitor.example")
    raws = []
    for n in range(3):
        alert = mail("CPU high", to=SYSOPS, frm="monitor@monitor.example", body=f"host web{n}")
        alert.replace_header("Message-ID", shared)
        raws.append(alert.as_bytes())
        send_raw(maild, raws[-1], [SYSOPS], sender="monitor@monitor.example")
        maild.settle()
    send_raw(maild, raws[1], [SYSOPS], sender="monitor@monitor.example")
    maild.settle()
    texts = sorted(maild.ticket(t["id"])["messages"][0]["text"] for t in maild.tickets())
    assert texts == ["host web0", "host web1", "host web2"]
    assert [row.status for row in inbound_rows(maild)] == [
        "processed",
        "processed",
        "processed",
        "duplicate",
    ]


def test_a_repeated_alert_for_a_closed_ticket_pages_nobody(
    make_config: Callable[..., Path], events: FakeEvents
) -> None:
    """The same alert delivered again after its ticket was closed: a duplicate, no page (before:
    a page for a ticket that stayed closed)."""
    config = paging_config(make_config, events)
    alert = mail("Disk full", to=SYSOPS, frm="monitor@monitor.example", body="db1 at 100%")
    with RunningMaild(load_settings(config)) as maild:
        send_raw(maild, alert.as_bytes(), [SYSOPS], sender="monitor@monitor.example")
        events.wait_for(1)
        maild.settle()
        from maild.enums import TicketStatus

        maild.change(1, status=TicketStatus.CLOSED)
        maild.service.pager.notify()  # type: ignore[union-attr]
        events.wait_for(2)  # the resolve
        send_raw(maild, alert.as_bytes(), [SYSOPS], sender="monitor@monitor.example")
        maild.settle()
        time.sleep(0.5)
        view = maild.ticket(1)
        rows = inbound_rows(maild)
    assert view["status"] == "closed"
    assert [(p["action"], p["status"]) for p in view["pages"]] == [
        ("trigger", "sent"),
        ("resolve", "sent"),
    ]
    assert events.requests == 2
    assert [row.status for row in rows] == ["processed", "duplicate"]


# 5. A frozen database answers senders 451 within busy_timeout, not never.


@pytest.fixture
def frozen_url(database_url: str) -> str:
    """The test database under an application_name of its own, for finding its backends."""
    if not database_url.startswith("postgresql"):
        pytest.skip("freezing the server's backends is a PostgreSQL test")
    return database_url + f"&application_name=maild-frozen-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def backends_stopped(name: str) -> Iterator[list[int]]:
    """SIGSTOP every PostgreSQL backend serving `name` (as `kill -STOP` on a hung server
    would look to maild: connections open, nothing answers); SIGCONT after."""
    admin = create_engine(PG_URL)
    with admin.connect() as connection:
        pids = list(
            connection.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": name},
            ).scalars()
        )
    admin.dispose()
    assert pids, f"no backend of {name}"
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.postgres
def test_a_frozen_postgresql_gets_451_within_busy_timeout(
    make_config: Callable[..., Path], frozen_url: str, database_url: str
) -> None:
    """Its backends stopped with SIGSTOP: DATA is answered 451 4.3.0 within busy_timeout (2 s)
    plus a second, logged and counted; /readyz says mail cannot be stored; after SIGCONT
    mail is taken again."""
    config = make_config('[http]\nlisten = "127.0.0.1:0"\n')
    config.write_text(config.read_text().replace(database_url, frozen_url))
    name = frozen_url.rsplit("application_name=", 1)[1]
    before = deferred("store_timeout")
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("before"), [SUPPORT])
        maild.settle()
        http = maild.service.addresses["http"][1]
        with backends_stopped(name), capture_logs() as logs:
            started = time.monotonic()
            with pytest.raises(smtplib.SMTPDataError) as info:
                maild.send(mail("while frozen"), [SUPPORT])
            elapsed = time.monotonic() - started
            status, ready = http_get(http, "/readyz")
        assert (info.value.smtp_code, info.value.smtp_error[:5]) == (451, b"4.3.0")
        assert elapsed < 2 + 1, elapsed
        assert (status, ready["status"]) == (503, "not ready")
        assert "mail cannot be stored" in ready["reason"]
        assert deferred("store_timeout") - before == 1
        assert [e["busy_timeout"] for e in logs if e["event"].startswith("spool commit did not")]
        wait_until(lambda: http_get(http, "/readyz")[0] == 200, what="ready again")
        maild.send(mail("after"), [SUPPORT])
        maild.settle()


# 6. A slow smarthost is waited for, not sent the mail again.


@pytest.mark.usefixtures("sqlite_only")
@pytest.mark.slow
def test_a_smarthost_that_answers_data_after_40_s_gets_one_copy(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """With the default timeouts (connect 30 s, end of DATA 10 min): one copy, one attempt
    (before: a copy every 30 s until one was answered in time)."""
    config = make_config(
        f'[outbound]\nsmarthost = "{sink.address}"\nfrom = "Altis Support <{SUPPORT}>"\n'
        'secret = "test-secret-0123456789abcdef"\n'
    )
    sink.behaviour.data_delay = 40
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Slow smarthost"), [SUPPORT])
        maild.settle()
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "sent", timeout=90)
        time.sleep(1)
        (row,) = maild.ticket(1)["acknowledgements"]
    assert len(sink.received) == 1
    assert row["attempts"] == 1


@pytest.mark.usefixtures("sqlite_only")
def test_no_reply_to_the_end_of_data_is_retried_as_possibly_delivered(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """data_timeout 1 s against a smarthost that answers after 2 s: the retry is logged as
    "possibly delivered" (and the customer may get a second copy, never none)."""
    config = make_config(outbound_section(sink, 'data_timeout = "1s"'))
    sink.behaviour.data_delay = 2
    with capture_logs() as logs, RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Slow"), [SUPPORT])
        maild.settle()
        wait_until(lambda: [e for e in logs if "possibly delivered" in e["event"]])
        sink.behaviour.data_delay = 0
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "sent")
    (entry,) = [e for e in logs if "possibly delivered" in e["event"]][:1]
    assert entry["event"] == "acknowledgement possibly delivered; sending it again"
    assert "no reply to the end of DATA" in entry["error"]


def test_outbound_timeouts_default_to_rfc_5321(tmp_path: Path) -> None:
    """Connecting 30 s; each command's reply 5 min; the end of DATA 10 min."""
    path = tmp_path / "config.toml"
    path.write_text("")
    outbound = load_settings(path).outbound
    assert (outbound.timeout, outbound.command_timeout, outbound.data_timeout) == (30, 300, 600)
    assert outbound.max_recipients == 20


# 7. NOOP loops cannot hold every slot.

EVICTED = b"421 4.7.0 mx.test.invalid Busy: closing an idle connection for a new client\r\n"
EVICTED_EVENT = "idle connection closed to make room for a new client"
TOO_MANY_JUNK = b"421 4.7.0 Too many commands without mail, closing connection\r\n"


def noop_loop(port: int, source: str, stop: threading.Event, closed: list[bytes]) -> None:
    """An attacker's connection: greet once, then NOOP every half second until told to stop."""
    with contextlib.suppress(OSError):
        client = Client(port, source)
        client.reply()
        client.say(b"EHLO loop.example")
        while not stop.wait(0.5):
            reply = client.say(b"NOOP")
            if reply[:3] != b"250":
                closed.append(reply)
                break
        client.close()


@pytest.mark.usefixtures("sqlite_only")
def test_100_noop_loops_do_not_lock_out_a_new_client(
    limited: Callable[..., RunningMaild],
) -> None:
    """100 connections NOOPing hold every slot; a new client still gets in (the loop idle
    longest is closed with 421 for it) and its mail is stored (before: 421 for 16 of 16)."""
    maild = limited(max_junk_commands="0")  # the loops never run out of NOOPs here
    stop = threading.Event()
    closed: list[bytes] = []
    loops = [
        threading.Thread(
            target=noop_loop, args=(maild.smtp_port, f"127.0.0.{2 + n // 20}", stop, closed)
        )
        for n in range(100)
    ]
    try:
        for thread in loops:
            thread.start()
        listener = maild.service.listeners[0]
        wait_until(lambda: len(listener.connections) == 100, what="100 loops connected")
        time.sleep(5.5)  # EVICT_AFTER_IDLE: the loops have done nothing useful for that long
        with capture_logs() as logs:
            maild.send(mail("Let me in"), [SUPPORT])
            # the eviction's log line may follow its 421 on a loaded machine: wait in here
            wait_until(lambda: closed, what="an evicted loop")
            wait_until(
                lambda: any(e["event"].startswith("idle connection closed") for e in logs),
                what="the eviction logged",
            )
        maild.settle()
        assert [t["subject"] for t in maild.tickets()] == ["Let me in"]
        assert (
            closed[0]
            == b"421 4.7.0 mx.test.invalid Busy: closing an idle connection for a new client\r\n"
        )
        assert [
            e for e in logs if e["event"] == "idle connection closed to make room for a new client"
        ]
    finally:
        stop.set()
        for thread in loops:
            thread.join(30)


@pytest.mark.usefixtures("sqlite_only")
def test_a_full_listener_of_busy_connections_still_refuses_the_next(
    limited: Callable[..., RunningMaild], connect: Callable[..., Client]
) -> None:
    """Connections inside a transaction are never evicted: the newcomer gets 421 as before."""
    maild = limited(max_connections="2")
    busy = [connect(maild.smtp_port) for _ in range(2)]
    for client in busy:
        client.reply()
        client.say(b"EHLO client.example")
        assert client.say(b"MAIL FROM:<alice@customer.example>")[:3] == b"250"
    time.sleep(5.5)
    assert connect(maild.smtp_port).reply()[:3] == b"421"
    assert [c.say(b"RCPT TO:<support@altis-dxp.com>")[:3] for c in busy] == [b"250"] * 2


@pytest.mark.usefixtures("sqlite_only")
def test_junk_commands_beyond_the_limit_get_421_and_an_accepted_message_resets_them(
    limited: Callable[..., RunningMaild], connect: Callable[..., Client]
) -> None:
    """With max_junk_commands = 3: three NOOP/RSET/VRFY pass, a message clears the count, and
    the fourth junk command after that closes the connection with 421 4.7.0."""
    maild = limited(max_junk_commands="3")
    client = connect(maild.smtp_port)
    client.reply()
    client.say(b"EHLO client.example")
    assert [client.say(c)[:3] for c in (b"NOOP", b"RSET", b"VRFY <a@b.example>")] == [
        b"250",
        b"250",
        b"252",
    ]
    client.say(b"MAIL FROM:<alice@customer.example>")
    client.say(b"RCPT TO:<support@altis-dxp.com>")
    client.say(b"DATA")
    assert client.say(b"Subject: hi\r\n\r\nhello\r\n.")[:3] == b"250"
    assert [client.say(b"NOOP")[:3] for _ in range(3)] == [b"250"] * 3
    assert (
        client.say(b"HELP") == b"421 4.7.0 Too many commands without mail, closing connection\r\n"
    )
    assert client.reply() == b""


@pytest.mark.usefixtures("sqlite_only")
def test_a_session_past_max_session_time_is_closed_between_transactions(
    limited: Callable[..., RunningMaild], connect: Callable[..., Client]
) -> None:
    """max_session_time = 1 s: a client busy sending NOOPs hears 421 4.4.2 after a second."""
    maild = limited(max_session_time='"1s"')
    client = connect(maild.smtp_port)
    client.reply()
    started = time.monotonic()
    replies = []
    while time.monotonic() - started < 5:
        reply = client.say(b"NOOP")
        replies.append(reply)
        if reply[:3] != b"250":
            break
        time.sleep(0.1)
    assert replies[-1] == (
        b"421 4.4.2 mx.test.invalid Session time limit reached, closing connection\r\n"
    )
    assert 0.9 < time.monotonic() - started < 3


def test_session_limits_have_documented_defaults(tmp_path: Path) -> None:
    """20 junk commands, 30 minutes a session, 256 MiB of DATA in memory."""
    path = tmp_path / "config.toml"
    path.write_text("")
    smtp = load_settings(path).smtp
    assert (smtp.max_junk_commands, smtp.max_session_time, smtp.max_data_memory) == (
        20,
        1800,
        256 << 20,
    )


# 8. Health checks that see trouble.


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (root only; skipped, saying so, elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk under `folder` is full."""
    filler = folder / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


def test_a_full_disk_makes_readyz_and_healthz_fail_until_there_is_room(
    make_config: Callable[..., Path], small_disk: Path
) -> None:
    """SQLite on a disk with no room for a message: /readyz and /healthz answer 503 and say
    so (before: 200 while every message got 451); with room again, 200."""
    config = make_config('[http]\nlisten = "127.0.0.1:0"\n')
    text_ = config.read_text()
    url = re.search(r'url = "([^"]+)"', text_)
    assert url is not None
    if not url.group(1).startswith("sqlite"):
        pytest.skip("the disk under a SQLite database; PostgreSQL's disk is the server's")
    config.write_text(
        text_.replace(url.group(1), f"sqlite:///{small_disk / 'maild.db'}").replace(
            "[smtp]\n", '[smtp]\nmax_message_size = "256 KiB"\n', 1
        )
    )
    with RunningMaild(load_settings(config)) as maild:
        port = maild.service.addresses["http"][1]
        assert http_get(port, "/readyz")[0] == 200
        filler = fill(small_disk)
        status, ready = http_get(port, "/readyz")
        assert (status, ready["status"]) == (503, "not ready")
        assert "disk nearly full" in ready["reason"]
        status, health = http_get(port, "/healthz")
        assert (status, health["status"]) == (503, "failing")
        assert health["checks"]["storage"].startswith("disk nearly full")
        filler.unlink()
        assert http_get(port, "/readyz") == (200, {"status": "ready"})


# 9. Hygiene: what maild acts on is found wherever it stands; robots; spoofing text.


def test_auto_submitted_after_600_header_fields_still_stops_the_acknowledgement(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """From, Subject and Auto-Submitted placed after 600 other fields are read: the ticket
    has them, is flagged automatic and is not acknowledged."""
    config = make_config(outbound_section(sink))
    junk = "".join(f"X-Junk-{n}: {n}\r\n" for n in range(600))
    raw = (
        f"To: {SUPPORT}\r\nMessage-ID: {make_msgid(domain='ooo.example')}\r\n{junk}"
        "From: Away <away@customer.example>\r\nSubject: Out of office\r\n"
        "Auto-Submitted: auto-replied\r\n\r\nI am away.\r\n"
    ).encode()
    with RunningMaild(load_settings(config)) as maild:
        send_raw(maild, raw, [SUPPORT], sender="away@customer.example")
        maild.settle()
        view = maild.ticket(1)
    assert (view["subject"], view["requester"]) == ("Out of office", "away@customer.example")
    assert view["messages"][0]["kind"] == "auto"
    assert "Auto-Submitted: auto-replied" in view["messages"][0]["auto_reasons"]
    assert view["acknowledgements"] == []
    assert sink.received == []


def test_noreply_with_a_tag_gets_no_acknowledgement(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """noreply+x@ is a robot address like noreply@: the acknowledgement is withheld."""
    config = make_config(outbound_section(sink))
    with RunningMaild(load_settings(config)) as maild:
        sender = "noreply+x@shop.example"
        maild.send(mail("Order 7", frm=sender), [SUPPORT], sender="bounces@shop.example")
        maild.settle()
        view = maild.ticket(1)
    assert "sender noreply@" in view["messages"][0]["auto_reasons"]
    assert view["acknowledgements"] == []
    assert sink.received == []


@pytest.mark.usefixtures("quiet_logging")
def test_bidi_controls_are_shown_not_obeyed_by_the_cli(maild: RunningMaild) -> None:
    """A subject with U+202E shows it as <U+202E> in `tickets list` and `show`; the JSON
    escapes it (the stored subject is as sent)."""
    subject = "invoice \u202efdp.exe"
    message = mail(subject, frm="Eve \u202eevE <eve@customer.example>", body="see \x1b[2J")
    maild.send(message, [SUPPORT])
    maild.settle()
    assert maild.ticket(1)["subject"] == subject
    config = str(maild.settings.source)
    runner = CliRunner()
    listed = runner.invoke(main, ["tickets", "list", "--config", config])
    shown = runner.invoke(main, ["tickets", "show", "1", "--config", config])
    as_json = runner.invoke(main, ["tickets", "show", "1", "--json", "--config", config])
    for output in (listed.output, shown.output, as_json.output):
        assert "\u202e" not in output
        assert "\x1b" not in output
    assert "invoice <U+202E>fdp.exe" in listed.output
    assert "Eve <U+202E>evE" in shown.output
    assert "see <U+001B>[2J" in shown.output
    assert "invoice \\u202efdp.exe" in as_json.output
    assert json.loads(as_json.output)["subject"] == subject


# 10. Every wait gives way to SIGTERM.


@pytest.mark.slow
def test_sigterm_during_the_processors_back_off_exits_at_once(
    make_config: Callable[..., Path], tmp_path: Path, database_url: str
) -> None:
    """The processor failing and waiting 4 s or more before its next try: SIGTERM ends maild
    within 3 s (before: after the rest of the wait, up to 30 s)."""
    if not database_url.startswith("sqlite"):
        pytest.skip("breaks the spool's table by renaming it in the SQLite file")
    config = make_config()
    with Daemon(config, tmp_path / "maild.log") as daemon:
        engine = create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE inbound RENAME TO inbound_away"))
        engine.dispose()
        wait_until(
            lambda: [
                e
                for e in daemon.events()
                if e.get("event") == "processing batch failed; will retry"
                and e.get("retry_in", 0) >= 4
            ],
            timeout=30,
            what="a back-off of 4 s or more",
        )
        started = time.monotonic()
        assert daemon.terminate(30) == 0
        assert time.monotonic() - started < 3
