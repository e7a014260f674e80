"""The SMTP and LMTP front door, spoken to over real loopback sockets."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import smtplib
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from sqlalchemy import text
from sqlmodel import select

from maild.config import load_settings
from maild.receive.smtp import MaildSMTP
from maild.store.models import Inbound
from tests.conftest import RunningMaild, mail, wait_until


def inbound_rows(maild: RunningMaild) -> list[Inbound]:
    return maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))


@contextlib.contextmanager
def hold_write_lock(maild: RunningMaild) -> Iterator[None]:
    """Another client holds the database's write lock for the duration."""
    engine = maild.service.database.write_engine
    if engine.dialect.name == "sqlite":
        assert engine.url.database
        blocker = sqlite3.connect(engine.url.database, timeout=0, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    else:
        with engine.connect() as connection, connection.begin():
            connection.execute(text("LOCK TABLE inbound IN ACCESS EXCLUSIVE MODE"))
            yield


def raw_dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    """Send SMTP lines one by one over a plain socket; the reply to each."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        replies.append(reader.readline())
        for line in lines:
            sock.sendall(line)
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            replies.append(reply)
    return replies


@pytest.mark.parametrize(
    ("rcpt", "kind", "priority"),
    [
        ("support@altis-dxp.com", "question", "normal"),
        ("support@humanmade.com", "question", "normal"),
        ("hosting@altis-dxp.com", "incident", "normal"),
        ("hosting@humanmade.com", "incident", "normal"),
        ("sysops@altis-dxp.com", "incident", "urgent"),
        ("SysOps+myapp-production@HumanMade.com", "incident", "urgent"),
    ],
)
def test_each_desk_address_makes_its_kind_of_ticket(
    maild: RunningMaild, rcpt: str, kind: str, priority: str
) -> None:
    """Mail to a desk address becomes one open ticket of the route's type and priority."""
    maild.send(mail("Routing check", to=rcpt), [rcpt])
    maild.settle()
    (ticket,) = maild.tickets()
    assert (ticket["type"], ticket["priority"], ticket["status"]) == (kind, priority, "open")
    assert ticket["requester"] == "alice@customer.example"


def test_unknown_mailbox_is_refused_with_550_5_1_1(maild: RunningMaild) -> None:
    """A recipient at our domain with no route is refused at RCPT time and nothing is stored."""
    with maild.smtp() as client:
        client.mail("alice@customer.example")
        code, text = client.rcpt("nobody@altis-dxp.com")
    assert code == 550
    assert text.startswith(b"5.1.1")
    assert inbound_rows(maild) == []


def test_other_domains_are_refused_as_relay(maild: RunningMaild) -> None:
    """A recipient outside our domains gets 550 5.7.1: maild is never an open relay."""
    with maild.smtp() as client:
        client.mail("alice@customer.example")
        code, text = client.rcpt("someone@elsewhere.example")
        assert (code, text[:5]) == (550, b"5.7.1")
        code, _ = client.rcpt("support@altis-dxp.com.evil.example")
        assert code == 550
    assert inbound_rows(maild) == []


def test_refused_recipients_are_not_stored_beside_accepted_ones(maild: RunningMaild) -> None:
    """Only the accepted recipients reach the stored envelope."""
    refused = maild.send(mail("Mixed"), ["support@altis-dxp.com", "ghost@altis-dxp.com"])
    assert set(refused) == {"ghost@altis-dxp.com"}
    maild.settle()
    (row,) = inbound_rows(maild)
    assert row.rcpt_tos == ["support@altis-dxp.com"]


def test_250_comes_with_the_stored_envelope_and_exact_bytes(maild: RunningMaild) -> None:
    """The raw bytes and the envelope (peer, MAIL FROM, RCPT TOs, time) are stored as sent."""
    message = mail("Envelope")
    raw = message.as_bytes().replace(b"\n", b"\r\n")
    with maild.smtp() as client:
        client.mail("bounce+x@customer.example")
        client.rcpt("support@altis-dxp.com")
        code, reply = client.data(raw)
    assert code == 250
    assert b"queued as" in reply
    (row,) = inbound_rows(maild)
    assert row.raw == raw
    assert row.mail_from == "bounce+x@customer.example"
    assert row.rcpt_tos == ["support@altis-dxp.com"]
    assert row.peer.startswith("127.0.0.1:")
    assert row.helo == "client.customer.example"
    assert row.received_at.tzinfo is not None


def test_lines_longer_than_1000_bytes_are_accepted_whole(maild: RunningMaild) -> None:
    """Real mail has long lines; they are stored byte for byte, not refused with 500."""
    long_line = "x" * 5000
    raw = (
        b"From: alice@customer.example\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: Long line\r\nMessage-ID: <long@customer.example>\r\n\r\n"
        + long_line.encode()
        + b"\r\n"
    )
    with maild.smtp() as client:
        client.mail("alice@customer.example")
        client.rcpt("support@altis-dxp.com")
        code, _ = client.data(raw)
    assert code == 250
    maild.settle()
    (ticket,) = maild.tickets()
    assert long_line in maild.ticket(ticket["id"])["messages"][0]["text"]


def test_8bitmime_and_smtputf8_are_offered_and_accepted(maild: RunningMaild) -> None:
    """An internationalised sender and an 8-bit UTF-8 body go through untouched."""
    with maild.smtp() as client:
        assert client.has_extn("8bitmime")
        assert client.has_extn("smtputf8")
        raw = (
            "From: Jürgen <jürgen@bücher.example>\r\nTo: support@altis-dxp.com\r\n"
            "Subject: Grüße aus Köln\r\nMessage-ID: <utf8@bücher.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nStraße kaputt\r\n"
        ).encode()
        client.mail("jürgen@bücher.example", ["SMTPUTF8", "BODY=8BITMIME"])
        client.rcpt("support@altis-dxp.com")
        code, _ = client.data(raw)
    assert code == 250
    maild.settle()
    (ticket,) = maild.tickets()
    assert ticket["subject"] == "Grüße aus Köln"
    shown = maild.ticket(ticket["id"])
    assert shown["messages"][0]["text"] == "Straße kaputt"
    assert ticket["requester"] == "jürgen@bücher.example"


def test_size_over_the_limit_is_refused_with_552(make_config: Any) -> None:
    """Both the SIZE= declaration and the actual DATA are held to max_message_size."""
    settings = load_settings(make_config())
    settings = settings.model_copy(
        update={"smtp": settings.smtp.model_copy(update={"max_message_size": 10_000})}
    )
    with RunningMaild(settings) as maild:
        with maild.smtp() as client:
            code, _ = client.mail("alice@customer.example", ["SIZE=20000"])
            assert code == 552
            client.rset()
            client.mail("alice@customer.example")
            client.rcpt("support@altis-dxp.com")
            code, _ = client.data(mail("Big", body="y" * 20_000).as_bytes())
            assert code == 552
        assert inbound_rows(maild) == []


def test_database_failure_answers_451_and_the_retry_succeeds(
    maild: RunningMaild, tmp_path: Path
) -> None:
    """When the spool cannot commit, the sender hears 451 4.3.0 (retry), never a 5xx."""
    with hold_write_lock(maild):
        with maild.smtp() as client:
            client.mail("alice@customer.example")
            client.rcpt("support@altis-dxp.com")
            code, text = client.data(mail("Locked out").as_bytes())
        assert (code, text[:5]) == (451, b"4.3.0")
    maild.send(mail("After the lock"), ["support@altis-dxp.com"])
    maild.settle()
    assert [t["subject"] for t in maild.tickets()] == ["After the lock"]


def test_lmtp_answers_once_per_recipient(maild: RunningMaild) -> None:
    """After DATA, LMTP gives one reply line per accepted recipient (RFC 2033)."""
    client = smtplib.LMTP("127.0.0.1", maild.lmtp_port, timeout=30)
    try:
        assert client.ehlo("mta.test")[0] == 250  # smtplib's LMTP sends LHLO here
        client.mail("alice@customer.example")
        assert client.rcpt("support@altis-dxp.com")[0] == 250
        assert client.rcpt("ghost@altis-dxp.com")[0] == 550
        assert client.rcpt("hosting@humanmade.com")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(mail("Via LMTP").as_bytes().replace(b"\n", b"\r\n") + b".\r\n")
        replies = [client.getreply(), client.getreply()]
        assert [code for code, _ in replies] == [250, 250]
        client.quit()
    finally:
        client.close()
    maild.settle()
    (ticket,) = maild.tickets()
    assert ticket["subject"] == "Via LMTP"


def test_lmtp_refuses_helo_and_ehlo(maild: RunningMaild) -> None:
    """LMTP speaks LHLO only."""
    replies = raw_dialogue(maild.lmtp_port, [b"EHLO x\r\n", b"HELO x\r\n", b"LHLO x\r\n"])
    assert replies[1].startswith(b"500")
    assert replies[2].startswith(b"500")
    assert replies[3].startswith(b"250")


def test_message_from_a_client_that_hangs_up_is_not_stored(maild: RunningMaild) -> None:
    """A DATA cut off before the final dot is not a message: nothing is stored."""
    with socket.create_connection(("127.0.0.1", maild.smtp_port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for line in (
            b"HELO x\r\n",
            b"MAIL FROM:<a@customer.example>\r\n",
            b"RCPT TO:<support@altis-dxp.com>\r\n",
            b"DATA\r\n",
        ):
            sock.sendall(line)
            reader.readline()
        sock.sendall(b"Subject: half\r\n\r\nhalf a mess")
        reader.close()  # the socket closes only when its file object does too
    wait_until(lambda: not maild.service.listeners[0].connections, 10, "connection closed")
    assert inbound_rows(maild) == []


def test_path_fast_path_agrees_with_aiosmtpd() -> None:
    """MAIL/RCPT paths read by our regular expression give exactly what aiosmtpd's own
    parser gives; every other form is left to aiosmtpd."""
    import random

    from aiosmtpd.smtp import SMTP

    from maild.receive.smtp import _SIMPLE_PATH, _ConnectionFixes

    class Parser(_ConnectionFixes, SMTP):  # only the path parser, on no connection
        local_part_limit = 0

        def __init__(self) -> None:
            pass

    class Original:
        local_part_limit = 0

    ours, theirs = Parser(), Original()
    rnd = random.Random(7)
    alphabet = 'ab.@<> \t"[]:,=\\\x80é{}Z9-_+();'

    def piece(chars: str, most: int) -> str:
        return "".join(rnd.choice(chars) for _ in range(rnd.randint(0, most)))

    cases = [
        "<a@b.c>",
        "<a@b.c> SIZE=100",
        " <a@b.c>  BODY=8BITMIME",
        "<a@b.c>\tSIZE=1",
        "<a@b> (comment) SIZE=1",
        "<a@b> ",
        "<a+tag@b.c> NOTIFY=NEVER ORCPT=rfc822;a@b",
        "<a@[127.0.0.1]>",
        '<"a b"@c>',
        "<>",
        "a@b",
        "<@x,@y:a@b>",
    ]
    for _ in range(20000):
        cases.append(
            piece(" \t", 1)
            + "<"
            + piece('ab.{}9-+é"', 4)
            + "@"
            + piece("ab.9-[]é", 4)
            + ">"
            + piece(" \t", 2)
            + piece(alphabet, 8)
        )

    def outcome(parse: Any, case: str) -> object:
        try:
            return parse(case)
        except Exception as exc:  # the stdlib parser itself fails on some junk
            return type(exc)

    fast = 0
    for case in cases:
        fast += _SIMPLE_PATH.fullmatch(case.lstrip(" \t")) is not None
        original = outcome(lambda c: SMTP._getaddr(theirs, c), case)  # type: ignore[arg-type]
        assert outcome(ours._getaddr, case) == original, case
    assert fast > 500  # the fast path was taken, not only the fallback


def test_the_data_override_matches_the_aiosmtpd_it_was_written_against() -> None:
    """maild's smtp_DATA copies aiosmtpd's and uses its private _reader: a release that
    changes the method must be read before maild runs on it (pyproject pins the series)."""
    upstream = inspect.getsource(SMTP.smtp_DATA)
    assert hashlib.sha256(upstream.encode()).hexdigest() == MaildSMTP.UPSTREAM_DATA_SHA256, (
        "aiosmtpd's SMTP.smtp_DATA changed: compare it with maild/smtp.py's override, "
        "carry the change over, then update UPSTREAM_DATA_SHA256"
    )
    assert "_reader" in upstream  # the stream the override reads from


def test_auth_methods_found_once_per_class_are_each_connections_own() -> None:
    """aiosmtpd's SMTP.__init__ sees maild's `inspect` (getmembers remembered per class):
    each connection still gets the AUTH mechanisms the real one finds, bound to itself."""
    import asyncio

    import aiosmtpd.smtp

    from maild.receive.smtp import Handler

    async def two() -> tuple[Any, Any, dict[str, Any]]:
        handler = Handler("smtp", lambda: None, None)  # type: ignore[arg-type,return-value]

        def connection() -> Any:
            return MaildSMTP(
                handler, admit=lambda c, p: None, on_lost=lambda c: None, hostname="mx.test"
            )

        first, second = connection(), connection()
        shim = aiosmtpd.smtp.inspect  # type: ignore[attr-defined]
        aiosmtpd.smtp.inspect = inspect  # type: ignore[attr-defined]
        try:
            real = connection()._auth_methods
        finally:
            aiosmtpd.smtp.inspect = shim  # type: ignore[attr-defined]
        return first, second, real

    first, second, real = asyncio.run(two())
    assert type(aiosmtpd_inspect()).__name__ == "_MembersByClass"
    assert set(first._auth_methods) == set(second._auth_methods) == set(real) == {"LOGIN", "PLAIN"}
    for mechanism in real:
        assert first._auth_methods[mechanism].method.__self__ is first
        assert second._auth_methods[mechanism].method.__self__ is second
        assert first._auth_methods[mechanism].is_builtin


def aiosmtpd_inspect() -> Any:
    import aiosmtpd.smtp

    return aiosmtpd.smtp.inspect  # type: ignore[attr-defined]
