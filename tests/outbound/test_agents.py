"""Agents answering by mail: a verified agent's mail is the desk's answer and is sent on;
a forged or unverifiable one is a customer's message, sent on to nobody.

Real parts only: maild on loopback, the sink as its smarthost, DKIM signatures made
with a key generated here, and the key served by a tiny UDP DNS server that maild's
filing worker (another process) asks through `[desk] dns_resolver`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner

from maild.cli import main
from maild.config import load_settings
from maild.enums import TicketStatus
from maild.outbound.acks import make_token
from tests.conftest import RunningMaild, mail
from tests.mail.test_authenticity import SIGNED, Key, TinyDns, make_key
from tests.outbound.test_acks import SECRET, send_raw
from tests.outbound.test_correspondence import desk_config, drain, kinds, opened
from tests.sink import SmtpSink

SUPPORT = "support@altis-dxp.com"
ALICE = "alice@customer.example"
BOB = "bob@customer.example"
CAROL = "carol@customer.example"
JO = "jo@altis-dxp.com"
TOKEN_ADDRESS = f"support+{make_token(SECRET.encode(), 2)}@altis-dxp.com"


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"altis-dxp.com": make_key(), "evil.example": make_key()}


@pytest.fixture
def tiny_dns(keys: dict[str, Key]) -> Iterator[TinyDns]:
    server = TinyDns({f"sel._domainkey.{d}": k.record for d, k in keys.items()})
    server.thread.start()
    yield server
    server.stopping.set()
    server.thread.join()
    server.sock.close()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def desk(
    make_config: Callable[..., Path], sink: SmtpSink, tiny_dns: TinyDns
) -> Iterator[RunningMaild]:
    resolver = f'dns_resolver = "127.0.0.1:{tiny_dns.port}"\ndns_timeout = "2s"\n'
    with RunningMaild(load_settings(desk_config(make_config, sink, resolver))) as running:
        yield running


def agent_mail(
    keys: dict[str, Key],
    *,
    to: str = TOKEN_ADDRESS,
    cc: str = f"Alice Example <{ALICE}>",
    subject: str = "Re: [#2] Staging is slow",
    body: str = "We restarted the staging web tier.",
    signer: str | None = "altis-dxp.com",
    frm: str = f"Jo Bloggs <{JO}>",
) -> bytes:
    """Jo's reply, CRLF throughout, signed by `signer`'s key (None: unsigned)."""
    raw = (
        f"From: {frm}\r\nTo: {to}\r\n"
        + (f"Cc: {cc}\r\n" if cc else "")
        + f"Subject: {subject}\r\nDate: {format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: {make_msgid(domain='altis-dxp.com')}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"\r\n{body}\r\n"
    ).encode()
    if signer is None:
        return raw
    header = dkim.sign(raw, b"sel", signer.encode(), keys[signer].pem, include_headers=SIGNED)
    return bytes(header) + raw


def test_a_verified_agents_mail_is_sent_on_to_those_it_did_not_reach(
    desk: RunningMaild, sink: SmtpSink, keys: dict[str, Key]
) -> None:
    """Jo (DKIM by altis-dxp.com) answers the solved ticket with Alice in Cc: stored as an
    agent reply, sent on to Bob and Carol from the desk in Jo's name; still solved; Jo is
    no participant; no copy, no notification."""
    opened(desk, sink)
    desk.change(2, status=TicketStatus.SOLVED)
    drain(desk, sink, 1)  # the solved notice to Alice
    send_raw(desk, agent_mail(keys), [TOKEN_ADDRESS], sender=JO)
    (sent,) = drain(desk, sink, 1)
    assert sent.rcpt_tos == [BOB, CAROL]
    assert sent.header("From") == f"Jo Bloggs via Altis Support <{SUPPORT}>"
    assert sent.header("Reply-To") == TOKEN_ADDRESS
    assert sent.header("Subject") == "[#2] Staging is slow"
    assert sent.message["Auto-Submitted"] is None
    assert sent.body.startswith("We restarted the staging web tier.")
    view = desk.ticket(2)
    assert view["status"] == "solved"
    assert JO not in [p["email"] for p in view["participants"]]
    assert kinds(desk, 2)[2:] == [
        ("outbound", "solved"),
        ("inbound", "agent"),
        ("outbound", "agent"),
    ]
    assert view["messages"][3]["defects"] == []


def test_a_verified_agents_subject_tag_threads_without_being_a_participant(
    desk: RunningMaild, sink: SmtpSink, keys: dict[str, Key]
) -> None:
    """To support@ with [#2] in the subject and no other link: Jo's verified mail is an
    answer to ticket 2 and goes to all three."""
    opened(desk, sink)
    raw = agent_mail(keys, to=SUPPORT, cc="")
    send_raw(desk, raw, [SUPPORT], sender=JO)
    (sent,) = drain(desk, sink, 1)
    assert sent.rcpt_tos == [ALICE, BOB, CAROL]
    assert [t["id"] for t in desk.tickets()] == [2, 1]


@pytest.mark.usefixtures("quiet_logging")
@pytest.mark.parametrize(
    ("case", "signer", "why"),
    [
        ("unsigned", None, "(no DKIM signature by altis-dxp.com)"),
        (
            "other domain",
            "evil.example",
            "(no DKIM signature by altis-dxp.com (1 by other domains, not checked))",
        ),
        ("broken", "altis-dxp.com", "(DKIM signature by altis-dxp.com does not verify: "),
    ],
)
def test_an_unverified_agents_mail_is_a_customers_message_sent_on_to_nobody(
    desk: RunningMaild,
    sink: SmtpSink,
    keys: dict[str, Key],
    case: str,
    signer: str | None,
    why: str,
) -> None:
    """No signature, a signature by another domain, or a body changed after signing: Jo's
    mail (Jo is even on the ticket) is filed as a customer's, with the reason, and
    nothing is sent: no copy, no relay."""
    opened(desk, sink, cc=f"Bob <{BOB}>, Jo <{JO}>")
    raw = agent_mail(keys, signer=signer)
    if case == "broken":
        raw = raw.replace(b"staging web tier", b"production database")
    send_raw(desk, raw, [TOKEN_ADDRESS], sender=JO)
    desk.settle()
    time.sleep(0.5)
    assert sink.received == []
    message = desk.ticket(2)["messages"][-1]
    assert (message["direction"], message["kind"]) == ("inbound", "human")
    (defect,) = [d for d in message["defects"] if d.startswith("UnverifiedAgent:")]
    assert defect.startswith(
        f"UnverifiedAgent: From {JO} is one of [desk] agents, but the mail is not verified ("
    )
    assert why in defect
    assert defect.endswith("filed as a customer's message, sent on to nobody")
    shown = CliRunner().invoke(
        main, ["tickets", "show", "2", "--config", str(desk.settings.source)]
    )
    assert f"Defects: {defect}" in shown.stdout


def test_an_agents_mail_that_threads_nowhere_opens_a_ticket_as_anyones(
    desk: RunningMaild, sink: SmtpSink, keys: dict[str, Key]
) -> None:
    """A verified agent writing to support@ about nothing known opens a ticket, acknowledged."""
    raw = agent_mail(keys, to=SUPPORT, cc="", subject="New customer onboarding")
    send_raw(desk, raw, [SUPPORT], sender=JO)
    (ack,) = drain(desk, sink, 1)
    assert ack.rcpt_tos == [JO]
    (ticket,) = desk.tickets()
    assert (ticket["requester"], ticket["subject"]) == (JO, "New customer onboarding")
    assert kinds(desk, ticket["id"]) == [("inbound", "human"), ("outbound", "ack")]


def test_an_agents_answer_to_a_notification_reaches_the_customer(
    make_config: Callable[..., Path],
    rules_dir: Path,
    sink: SmtpSink,
    tiny_dns: TinyDns,
    keys: dict[str, Key],
) -> None:
    """The team is notified of Alice's ticket; Jo replies to the notification (its
    Reply-To), verified: Alice gets the answer, the team hears nothing more."""
    rules = rules_dir / "desk.toml"
    rules.write_text(
        rules.read_text().replace(
            'name = "support"', 'name = "support"\nnotify = ["team@ops.example"]'
        )
    )
    resolver = f'dns_resolver = "127.0.0.1:{tiny_dns.port}"\n'
    with RunningMaild(load_settings(desk_config(make_config, sink, resolver))) as maild:
        maild.send(mail("Staging is slow"), [SUPPORT], sender=ALICE)
        notice = next(r for r in drain(maild, sink, 2) if r.rcpt_tos == ["team@ops.example"])
        address = notice.header("Reply-To")
        raw = agent_mail(keys, to=address, cc="", subject="Re: [#1] Staging is slow")
        send_raw(maild, raw, [address], sender=JO)
        (answer,) = drain(maild, sink, 1)
    assert answer.rcpt_tos == [ALICE]
    assert answer.header("From") == f"Jo Bloggs via Altis Support <{SUPPORT}>"


def test_the_trusted_mtas_authentication_results_verify_an_agent(
    make_config: Callable[..., Path], sink: SmtpSink, keys: dict[str, Key]
) -> None:
    """verify_dkim = false, trusted_authserv_id set: the MTA's dkim=pass at the top of the
    header makes Jo's unsigned mail an agent reply; the same result lower down does not."""
    extra = 'trusted_authserv_id = "mx.altis-dxp.com"\nverify_dkim = false\n'
    result = b"Authentication-Results: mx.altis-dxp.com; dkim=pass header.d=altis-dxp.com\r\n"
    with RunningMaild(load_settings(desk_config(make_config, sink, extra))) as maild:
        opened(maild, sink)
        trusted = result + agent_mail(keys, signer=None, body="Trusted answer.")
        send_raw(maild, trusted, [TOKEN_ADDRESS], sender=JO)
        (sent,) = drain(maild, sink, 1)
        assert sent.rcpt_tos == [BOB, CAROL]
        assert kinds(maild, 2)[-2:] == [("inbound", "agent"), ("outbound", "agent")]
        raw = agent_mail(keys, signer=None, body="Forged answer.")
        head, body = raw.split(b"\r\n\r\n", 1)
        forged = b"Received: from evil.example by mx.evil.example\r\n" + head + b"\r\n" + result
        send_raw(maild, forged + b"\r\n" + body, [TOKEN_ADDRESS], sender=JO)
        maild.settle()
        time.sleep(0.5)
        assert sink.received == []
        assert kinds(maild, 2)[-1] == ("inbound", "human")
