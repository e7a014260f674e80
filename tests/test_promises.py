"""Promises of the README and docs/architecture.md that no other test held maild to.

Reply codes a sending MTA acts on (250 2.0.0, 552 5.3.4, 451 4.3.0, 421 4.3.2),
CLI exit codes an operator or MTA acts on, and the durability of the outboxes
across a stop and a crash. Real SMTP/LMTP over loopback, real daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from click.testing import CliRunner, Result
from sqlmodel import col, select

from maild import metrics
from maild.cli import main
from maild.config import load_settings
from maild.store.database import Database
from maild.store.models import Inbound, Outmail, OutmailRecipient
from tests.conftest import RunningMaild, mail, wait_until, write_config
from tests.daemon import Daemon
from tests.fake_events import FakeEvents
from tests.outbound.test_paging import pagerduty_section, pages_of, sysops_mail, wait_pages
from tests.receive.test_smtp import hold_write_lock, raw_dialogue
from tests.sink import SmtpSink, _Handler

SUPPORT = "support@altis-dxp.com"
HOSTING = "hosting@humanmade.com"
ALICE = "alice@customer.example"
QUEUED = "250 2.0.0 OK: queued as {}\r\n"
TOO_LARGE = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
TEMPFAIL = b"451 4.3.0 Temporary local problem, please try again later\r\n"
SHUTDOWN = b"421 4.3.2 Service shutting down, try again later\r\n"
SECRET = "test-secret-0123456789abcdef"


# Helpers.


def inbound_rows(maild: RunningMaild) -> list[Inbound]:
    return maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))


def counter(name: str, reason: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"reason": reason}) or 0


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lmtp_delivery(port: int, rcpts: list[str], raw: bytes, wait: float = 15) -> list[bytes]:
    """One LMTP transaction to accepted `rcpts`; the reply lines after the final dot that
    arrive within `wait` seconds (RFC 2033: one per recipient)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            return line

        assert reply()[:3] == b"220"
        for command in (b"LHLO mta.test\r\n", b"MAIL FROM:<alice@customer.example>\r\n"):
            sock.sendall(command)
            assert reply()[:3] == b"250"
        for rcpt in rcpts:
            sock.sendall(b"RCPT TO:<" + rcpt.encode() + b">\r\n")
            assert reply() == b"250 2.1.5 OK\r\n"
        sock.sendall(b"DATA\r\n")
        assert reply()[:3] == b"354"
        sock.sendall(crlf(raw) + b".\r\n")
        sock.settimeout(wait)
        after: list[bytes] = []
        with contextlib.suppress(TimeoutError):
            while len(after) < len(rcpts):
                line = reader.readline()
                if not line:
                    break
                after.append(line)
        reader.close()
    return after


def rows_in(config: Path, model: Any) -> list[Any]:
    """Every row of `model`, oldest first, read straight from the configured database."""
    database = Database(load_settings(config).database.url)
    try:
        return database.run_read(
            lambda s: list(s.exec(select(model).order_by(col(model.id))).all())
        )
    finally:
        database.close()


# 1. The reply codes a sending MTA acts on.


def test_data_is_answered_250_2_0_0_queued_as_the_stored_id(maild: RunningMaild) -> None:
    """SMTP answers the end of DATA `250 2.0.0 OK: queued as <id>`; LMTP once per recipient."""
    with maild.smtp() as client:
        client.mail(ALICE)
        client.rcpt(SUPPORT)
        code, text = client.data(mail("Over SMTP").as_bytes())
    after = lmtp_delivery(maild.lmtp_port, [SUPPORT, HOSTING], mail("Over LMTP").as_bytes())
    first, second = sorted(row.id or 0 for row in inbound_rows(maild))
    assert (code, text) == (250, f"2.0.0 OK: queued as {first}".encode())
    assert after == [QUEUED.format(second).encode()] * 2


def test_too_large_is_552_5_3_4_by_size_by_data_and_by_an_over_long_line(
    limited: Callable[..., RunningMaild],
) -> None:
    """SIZE= over the limit, DATA over it and one line longer than it all get 552 5.3.4."""
    maild = limited(max_message_size="10000")
    before = counter("maild_messages_refused_total", "too_large")
    head = b"From: alice@customer.example\r\nSubject: big\r\n\r\n"
    transaction = [
        b"MAIL FROM:<alice@customer.example>\r\n",
        b"RCPT TO:<support@altis-dxp.com>\r\n",
    ]
    replies = raw_dialogue(
        maild.smtp_port,
        [
            b"EHLO client.example\r\n",
            b"MAIL FROM:<alice@customer.example> SIZE=20000\r\n",
            b"RSET\r\n",
            *transaction,
            b"DATA\r\n",
            head + (b"y" * 70 + b"\r\n") * 300 + b".\r\n",  # 21,600 bytes in short lines
            *transaction,
            b"DATA\r\n",
            head + b"y" * 20_000 + b"\r\n.\r\n",  # one line over line_length_limit
            b"NOOP\r\n",
        ],
    )
    assert [replies[2], replies[7], replies[11]] == [TOO_LARGE] * 3
    assert [reply[:3] for reply in replies] == [
        b"220",
        b"250",
        b"552",
        b"250",
        b"250",
        b"250",
        b"354",
        b"552",
        b"250",
        b"250",
        b"354",
        b"552",
        b"250",
    ]
    assert counter("maild_messages_refused_total", "too_large") - before == 3
    assert inbound_rows(maild) == []


def test_lmtp_too_large_gets_one_552_5_3_4_per_recipient(
    limited: Callable[..., RunningMaild],
) -> None:
    """Over LMTP, a message over max_message_size is refused with one 552 5.3.4 per recipient."""
    maild = limited(max_message_size="10000")
    raw = mail("Too big", body=("y" * 70 + "\n") * 300).as_bytes()
    after = lmtp_delivery(maild.lmtp_port, [SUPPORT, HOSTING], raw, wait=3)
    assert after == [TOO_LARGE, TOO_LARGE]
    assert inbound_rows(maild) == []


def not_stored() -> float:
    """Messages answered 451 because the database failed them or did not commit in time
    (a held lock ends either way, whichever of its wait and busy_timeout ends first)."""
    return sum(
        counter("maild_messages_deferred_total", reason)
        for reason in ("store_failed", "store_timeout")
    )


def test_lmtp_store_failure_answers_451_4_3_0_once_per_recipient(maild: RunningMaild) -> None:
    """When the spool cannot commit, each LMTP recipient hears 451 4.3.0 and nothing is stored."""
    before = not_stored()
    with hold_write_lock(maild):
        after = lmtp_delivery(maild.lmtp_port, [SUPPORT, HOSTING], mail("Locked").as_bytes())
    assert after == [TEMPFAIL, TEMPFAIL]
    assert not_stored() - before == 1
    assert inbound_rows(maild) == []


def test_an_unexpected_error_while_storing_answers_451_4_3_0(
    maild: RunningMaild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of ours in the spool (not a database refusal) still answers 451 4.3.0, never 5xx."""

    async def broken(delivery: object) -> int:
        raise RuntimeError("a bug in the spool")

    monkeypatch.setattr(maild.service.spool, "put", broken)
    before = counter("maild_messages_deferred_total", "internal_error")
    with maild.smtp() as client:
        client.mail(ALICE)
        client.rcpt(SUPPORT)
        reply = client.data(mail("Hit a bug").as_bytes())
    assert reply == (451, TEMPFAIL[4:-2])
    assert counter("maild_messages_deferred_total", "internal_error") - before == 1


def test_an_exception_in_a_command_answers_451_4_3_0_and_the_session_goes_on(
    maild: RunningMaild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in RCPT (handle_exception) gets 451 4.3.0; the next RCPT and DATA work."""

    class BrokenTable:
        def resolve(self, address: str) -> None:
            raise RuntimeError("a bug in the rules table")

    with maild.smtp() as client:
        client.mail(ALICE)
        monkeypatch.setattr(maild.service, "rules", BrokenTable())
        refused = client.rcpt(SUPPORT)
        monkeypatch.undo()
        accepted = client.rcpt(SUPPORT)
        code, _ = client.data(mail("After the bug").as_bytes())
    assert refused == (451, TEMPFAIL[4:-2])
    assert accepted == (250, b"2.1.5 OK")
    assert code == 250
    assert [row.rcpt_tos for row in inbound_rows(maild)] == [[SUPPORT]]


@pytest.mark.slow
def test_sigterm_says_421_4_3_2_to_idle_connections_and_to_transactions_cut_by_the_grace(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """On SIGTERM an idle client hears 421 4.3.2 at once, one in DATA after shutdown_timeout."""
    config = make_config()
    text = config.read_text()
    assert text.count('shutdown_timeout = "5s"') == 1
    config.write_text(text.replace('shutdown_timeout = "5s"', 'shutdown_timeout = "1s"'))
    daemon = Daemon(config, tmp_path / "maild.log").start()
    try:
        with contextlib.ExitStack() as stack:
            idle = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.smtp_port)))
            busy = stack.enter_context(socket.create_connection(("127.0.0.1", daemon.smtp_port)))
            idle_reader = stack.enter_context(idle.makefile("rb"))
            busy_reader = stack.enter_context(busy.makefile("rb"))
            assert idle_reader.readline()[:3] == b"220"
            idle.sendall(b"HELO client.example\r\n")
            assert idle_reader.readline()[:3] == b"250"
            assert busy_reader.readline()[:3] == b"220"
            for line in (
                b"HELO client.example\r\n",
                b"MAIL FROM:<alice@customer.example>\r\n",
                b"RCPT TO:<support@altis-dxp.com>\r\n",
                b"DATA\r\n",
            ):
                busy.sendall(line)
                reply = busy_reader.readline()
            assert reply[:3] == b"354"
            busy.sendall(b"From: alice@customer.example\r\nSubject: Cut\r\n\r\nhalf of it")
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            assert idle_reader.readline() == SHUTDOWN
            assert idle_reader.readline() == b""
            assert daemon.process.poll() is None  # still giving the transaction its grace
            assert busy_reader.readline() == SHUTDOWN
            assert busy_reader.readline() == b""
        assert daemon.process.wait(30) == 0
    finally:
        daemon.__exit__()
    cut = [
        e["transactions"]
        for e in daemon.events()
        if e.get("event") == "open transactions cut at shutdown; their senders will retry"
    ]
    assert cut == [1]
    assert rows_in(config, Inbound) == []


# 2. CLI exit codes.


@pytest.fixture
def unreachable(tmp_path: Path, rules_dir: Path) -> Path:
    """A config whose PostgreSQL refuses connections (nothing listens on port 1)."""
    return write_config(
        tmp_path,
        f"""
[smtp]
listen = "127.0.0.1:0"
[database]
url = "postgresql+psycopg://maild@127.0.0.1:1/maild"
busy_timeout = "1s"
[rules]
path = "{rules_dir}"
watch = false
[pagerduty]
enabled = false
""",
    )


def invoke(config: Path, *args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(
        main, [*args, "--config", str(config)], env=env, catch_exceptions=False
    )


@pytest.mark.usefixtures("quiet_logging")
def test_an_unreachable_database_exits_1_saying_so(unreachable: Path) -> None:
    """tickets list, db current, db upgrade and serve exit 1 naming the unusable database."""
    url = "postgresql+psycopg://maild@127.0.0.1:1/maild"
    listed = invoke(unreachable, "tickets", "list")
    current = invoke(unreachable, "db", "current")
    upgraded = invoke(unreachable, "db", "upgrade")
    served = subprocess.run(
        [sys.executable, "-m", "maild", "serve", "--config", str(unreachable)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (listed.exit_code, listed.stdout) == (1, "")
    assert listed.stderr.startswith(f"maild: database {url} is not usable: ")
    assert (current.exit_code, current.stdout) == (1, "")
    assert current.stderr.startswith(f"maild: database {url} is not usable: ")
    assert (upgraded.exit_code, upgraded.stdout) == (1, "")
    assert upgraded.stderr.startswith(
        f"maild: migration failed, the database is unchanged: database {url} is not usable: "
    )
    assert served.returncode == 1
    assert served.stderr.startswith(f"maild: cannot start: database {url} is not usable: ")
    assert "maild started" not in served.stdout
    for result in (listed.stderr, current.stderr, upgraded.stderr, served.stderr):
        assert result.count("\n") == 1, result  # one line, no traceback, no SQL


@pytest.mark.usefixtures("quiet_logging")
def test_rules_explain_of_an_unknown_delivery_exits_1_and_of_both_exits_2(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """rules explain --message 99 (none) exits 1; --message with a FILE as well is usage, 2."""
    config = make_config()
    assert invoke(config, "db", "upgrade").exit_code == 0
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("Explain me").as_bytes())
    missing = invoke(config, "rules", "explain", "--message", "99")
    both = invoke(config, "rules", "explain", "--message", "1", str(eml))
    assert (missing.exit_code, missing.stdout, missing.stderr) == (
        1,
        "",
        "maild: no inbound delivery 99\n",
    )
    assert (both.exit_code, both.stdout, both.stderr) == (
        2,
        "",
        "maild: give either --message ID or FILE.eml\n",
    )


@pytest.mark.usefixtures("quiet_logging")
def test_pages_test_without_a_routing_key_exits_78(tmp_path: Path, rules_dir: Path) -> None:
    """`maild pages test` with no routing key configured is a config error, 78, sending nothing."""
    config = write_config(tmp_path, f'[rules]\npath = "{rules_dir}"\n')
    result = invoke(config, "pages", "test", env={"CREDENTIALS_DIRECTORY": None})
    assert (result.exit_code, result.stdout, result.stderr) == (
        78,
        "",
        "maild: [pagerduty] has no routing_key or routing_key_file\n",
    )


def break_template(config: Path) -> str:
    """A stray $ on line 2 of templates/ack.txt beside the config; the error it gives."""
    folder = config.parent / "templates"
    folder.mkdir()
    (folder / "ack.txt").write_text("We have your mail.\nIt costs 5$.\n")
    return (
        f"{folder / 'ack.txt'}:2: a stray $ (write $$ for a dollar sign, "
        "${name} for a placeholder)"
    )


@pytest.mark.usefixtures("quiet_logging")
def test_ingest_stores_and_exits_0_when_processing_cannot_run_and_reprocess_exits_78(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A broken template: ingest still stores the mail and exits 0; reprocess refuses with 78."""
    config = make_config()
    problem = break_template(config)
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("Piped while broken").as_bytes())
    ingested = invoke(config, "ingest", "--recipient", SUPPORT, str(eml))
    (row,) = rows_in(config, Inbound)
    reprocessed = invoke(config, "reprocess")
    assert (ingested.exit_code, ingested.stdout, ingested.stderr) == (
        0,
        "",
        f"maild: stored as {row.id}; processing deferred: {problem}\n",
    )
    assert (row.status, row.raw) == ("received", eml.read_bytes())
    assert (reprocessed.exit_code, reprocessed.stdout, reprocessed.stderr) == (
        78,
        "",
        f"maild: {problem}\n",
    )


@pytest.mark.usefixtures("quiet_logging")
def test_reprocess_files_mail_whose_ingest_processing_was_deferred_once_fixed(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Mail ingest stored but could not process is filed by `maild reprocess` after the fix."""
    config = make_config()
    break_template(config)
    eml = tmp_path / "m.eml"
    eml.write_bytes(mail("Piped while broken").as_bytes())
    assert invoke(config, "ingest", "--recipient", SUPPORT, str(eml)).exit_code == 0
    (config.parent / "templates" / "ack.txt").unlink()
    reprocessed = invoke(config, "reprocess", "--json")
    assert reprocessed.exit_code == 0
    assert [(r["inbound"], r["outcome"]) for r in json.loads(reprocessed.stdout)] == [
        (1, "created")
    ]


# 3. Durability of the outboxes.


@pytest.mark.usefixtures("quiet_logging")
def test_a_page_pending_when_maild_stops_is_sent_after_it_is_back(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A page PagerDuty keeps refusing with 503 is pending after a stop and sent after restart."""
    with FakeEvents(tmp_path / "events") as events:
        config = make_config(pagerduty_section(events.url, events.ca_file))
        events.fail_always(503)
        with RunningMaild(load_settings(config)) as maild:
            maild.send(sysops_mail(), ["sysops@altis-dxp.com"])
            wait_pages(maild.service.database, lambda r: r[0]["attempts"] >= 1, "a 503 recorded")
        database = Database(load_settings(config).database.url)
        try:
            (stopped,) = pages_of(database)
        finally:
            database.close()
        assert (stopped["action"], stopped["status"], events.events) == ("trigger", "pending", [])
        events.reset()
        with RunningMaild(load_settings(config)) as maild:
            (event,) = events.wait_for(1)
            (sent,) = wait_pages(maild.service.database, lambda r: r[0]["status"] == "sent", "sent")
    assert (event["event_action"], event["dedup_key"]) == ("trigger", stopped["dedup_key"])
    assert (sent["id"], sent["attempts"] > stopped["attempts"]) == (stopped["id"], True)


class _QuitHangs(_Handler):
    """The sink's handler, except that QUIT is never answered."""

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(self._sink, Smarthost)
        self._sink.quit_seen.set()
        await asyncio.Event().wait()  # until the connection is lost (aiosmtpd cancels this)
        return "221 Bye"


class Smarthost(SmtpSink):
    """The test smarthost on a chosen port (0: any); `hang_quit` keeps QUIT unanswered."""

    def __init__(self, port: int = 0, hang_quit: bool = False) -> None:
        super().__init__()
        self._wanted = port
        self._hang_quit = hang_quit
        self.quit_seen = threading.Event()

    async def _start(self) -> int:
        self._server = await self._loop.create_server(self._factory, "127.0.0.1", self._wanted)
        return int(self._server.sockets[0].getsockname()[1])

    def _factory(self) -> SMTP:
        if not self._hang_quit:
            return super()._factory()
        return SMTP(
            _QuitHangs(self),
            hostname="smarthost.test.invalid",
            decode_data=False,
            enable_SMTPUTF8=True,
            loop=self._loop,
        )


@pytest.mark.slow
def test_an_acknowledgement_killed_between_the_smarthosts_250_and_its_record_is_sent_again(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """kill -9 after the smarthost's 250 but before maild recorded it: sent again after restart."""
    first_smarthost = Smarthost(hang_quit=True)
    with first_smarthost:
        port = first_smarthost.port
        config = make_config(
            f"""
[outbound]
smarthost = "127.0.0.1:{port}"
from = "Altis Support <support@altis-dxp.com>"
secret = "{SECRET}"
timeout = "30s"
retry_initial = "0.1s"
retry_max = "0.3s"
"""
        )
        daemon = Daemon(config, tmp_path / "first.log").start()
        try:
            with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
                assert client.send_message(mail("Backups missing"), ALICE, [SUPPORT]) == {}
            (first,) = first_smarthost.wait_for(1)
            assert first_smarthost.quit_seen.wait(30), "maild never sent QUIT after the 250"
            daemon.kill()
        finally:
            daemon.__exit__()
    (outmail,) = rows_in(config, Outmail)
    (recipient,) = rows_in(config, OutmailRecipient)
    assert (outmail.status, recipient.email, recipient.status) == ("pending", ALICE, "pending")
    with Smarthost(port) as second_smarthost, Daemon(config, tmp_path / "second.log"):
        (again,) = second_smarthost.wait_for(1)
        wait_until(
            lambda: [r.status for r in rows_in(config, Outmail)] == ["sent"],
            30,
            "the acknowledgement recorded as sent",
        )
    assert again.rcpt_tos == [ALICE]
    assert again.header("Message-ID") == first.header("Message-ID")
    assert [r.status for r in rows_in(config, OutmailRecipient)] == ["sent"]
