"""Acknowledgements, auto-reply handling, bounces and loops, against a real SMTP smarthost.

maild runs on loopback with `[outbound] smarthost` pointed at tests/sink.py (aiosmtpd
on port 0); every assertion about what was sent reads what the sink actually received.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
import trustme
from sqlmodel import select

from maild.config import load_settings
from maild.errors import ConfigError
from maild.outbound.acks import load_templates, make_token, read_token
from maild.store.models import Inbound, OutmailRecipient
from tests.conftest import REPO, RunningMaild, mail, wait_until
from tests.fake_events import FakeEvents
from tests.sink import Received, SmtpSink

SECRET = "test-secret-0123456789abcdef"
DESK = "Altis Support <support@altis-dxp.com>"


def outbound_section(
    sink: SmtpSink | str, more: str = "", templates: Path = REPO / "templates"
) -> str:
    address = sink if isinstance(sink, str) else sink.address
    return f"""
[outbound]
smarthost = "{address}"
from = "{DESK}"
secret = "{SECRET}"
templates = "{templates}"
timeout = "5s"
retry_initial = "0.1s"
retry_max = "0.3s"
{more}
"""


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def desk(make_config: Callable[..., Path], sink: SmtpSink) -> Iterator[RunningMaild]:
    """maild with acknowledgements on, sending through the sink."""
    with RunningMaild(load_settings(make_config(outbound_section(sink)))) as running:
        yield running


def send_raw(maild: RunningMaild, raw: bytes, rcpts: list[str], sender: str) -> None:
    with maild.smtp() as client:
        client.sendmail(sender, rcpts, raw)


def inbound_rows(maild: RunningMaild) -> list[Inbound]:
    return maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))


def token_address(received: Received) -> str:
    return received.header("Reply-To")


def introduce(maild: RunningMaild, sink: SmtpSink) -> None:
    """Make alice known to the desk (a stranger's new ticket is acknowledged to them
    alone): her first ticket, #1, acknowledged to her; the sink's record is emptied."""
    maild.send(mail("Hello"), ["support@altis-dxp.com"])
    (first,) = sink.wait_for(1)
    assert first.rcpt_tos == ["alice@customer.example"]
    with sink.lock:
        sink.received.clear()


def test_a_new_ticket_is_acknowledged_to_the_requester_and_the_cc(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """A known requester's new ticket: one mail to them and the Cc, ticket number in the
    subject, RFC 3834 headers, token."""
    desk.send(mail("First contact"), ["support@altis-dxp.com"])  # Alice is known from now on
    sink.wait_for(1)
    original = mail("Backups missing", Cc="Bob Jones <bob@customer.example>")
    desk.send(original, ["support@altis-dxp.com"])
    ack = sink.wait_for(2)[1]
    token = make_token(SECRET.encode(), 2)
    assert ack.mail_from == f"support+{token}@altis-dxp.com"
    assert ack.rcpt_tos == ["alice@customer.example", "bob@customer.example"]
    assert ack.header("Subject") == "[#2] Backups missing"
    assert ack.header("From") == DESK
    assert ack.header("To") == "Alice Example <alice@customer.example>"
    assert ack.header("Cc") == "Bob Jones <bob@customer.example>"
    assert ack.header("Reply-To") == f"support+{token}@altis-dxp.com"
    assert ack.header("In-Reply-To") == original["Message-ID"]
    assert ack.header("Auto-Submitted") == "auto-replied"
    assert ack.header("X-Auto-Response-Suppress") == "All"
    assert ack.header("Precedence") == "bulk"
    assert ack.header("X-Maild-Loop") == desk.service.acks.loop_id
    assert "Your request is ticket #2:" in ack.body  # templates/ack.txt
    assert "Hello Alice Example," in ack.body
    wait_until(lambda: desk.ticket(2)["acknowledgements"][0]["status"] == "sent", what="ack sent")
    view = desk.ticket(2)
    (row,) = view["acknowledgements"]
    assert row["recipients"] == [
        {"email": "alice@customer.example", "status": "sent", "error": None},
        {"email": "bob@customer.example", "status": "sent", "error": None},
    ]
    assert [(m["direction"], m["kind"]) for m in view["messages"]] == [
        ("inbound", "human"),
        ("outbound", "ack"),
    ]
    assert view["messages"][1]["message_id"] == ack.header("Message-ID")


def test_the_route_template_is_used_for_its_route(desk: RunningMaild, sink: SmtpSink) -> None:
    """sysops@ mail is acknowledged with templates/ack-sysops.txt, from the sysops address."""
    desk.send(mail("Site down", to="sysops@humanmade.com"), ["sysops@humanmade.com"])
    (ack,) = sink.wait_for(1)
    assert "We have opened urgent incident #1:" in ack.body
    assert "paged" not in ack.body  # paging is off in this config: the page was withheld
    assert ack.mail_from.startswith("sysops+1-")
    assert ack.mail_from.endswith("@humanmade.com")


def test_a_reply_to_the_acknowledgement_threads_into_the_ticket(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """A reply carrying the acknowledgement's Message-ID joins ticket 1 and is not acknowledged."""
    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    reply = mail(
        "Re: [#1] Backups missing",
        frm="Carol <carol@customer.example>",
        In_Reply_To=ack.header("Message-ID"),
    )
    desk.send(reply, ["support@altis-dxp.com"], sender="carol@customer.example")
    desk.settle()
    assert [t["id"] for t in desk.tickets()] == [1]
    assert desk.ticket(1)["message_count"] == 3
    time.sleep(0.3)  # a second acknowledgement, if one were queued, would be sent by now
    assert len(sink.received) == 1


def test_mail_to_the_reply_address_joins_the_ticket_whoever_sends_it(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """support+<token>@ is enough: no In-Reply-To, a stranger's address, still ticket 1."""
    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    address = token_address(ack)
    desk.send(
        mail("more logs", to=address, frm="Eve <eve@elsewhere.example>"),
        [address],
        sender="eve@elsewhere.example",
    )
    desk.settle()
    assert [t["id"] for t in desk.tickets()] == [1]
    emails = [p["email"] for p in desk.ticket(1)["participants"]]
    assert "eve@elsewhere.example" in emails


def test_an_invalid_token_is_plain_mail_to_the_base_address(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """A forged or mistyped +token opens a new ticket through the base address's route."""
    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    sink.wait_for(1)
    forged = "support+1-0000000000000000@altis-dxp.com"
    desk.send(mail("guess", to=forged, frm="eve@elsewhere.example"), [forged])
    desk.settle()
    tickets = desk.tickets()
    assert [(t["id"], t["type"], t["subject"]) for t in tickets] == [
        (2, "question", "guess"),
        (1, "question", "Backups missing"),
    ]


def test_tokens_round_trip_and_refuse_tampering() -> None:
    """A token names its ticket; a changed id, MAC or secret is not a token."""
    token = make_token(b"k" * 20, 42)
    assert read_token(b"k" * 20, token) == 42
    assert read_token(b"k" * 20, token.upper()) == 42  # some MTAs upper-case local parts
    assert read_token(b"k" * 20, "43" + token[2:]) is None
    assert read_token(b"x" * 20, token) is None
    assert read_token(b"k" * 20, token[:-1] + ("0" if token[-1] != "0" else "1")) is None
    assert read_token(b"k" * 20, "billing") is None


def test_a_route_with_ack_false_sends_nothing(
    make_config: Callable[..., Path], rules_dir: Path, sink: SmtpSink
) -> None:
    """ack = false on hosting@: tickets open, no acknowledgement is written or sent."""
    desk_rules = rules_dir / "desk.toml"
    desk_rules.write_text(
        desk_rules.read_text().replace('name = "hosting"', 'name = "hosting"\nack = false')
    )
    with RunningMaild(load_settings(make_config(outbound_section(sink)))) as maild:
        maild.send(mail("Deploy stuck", to="hosting@humanmade.com"), ["hosting@humanmade.com"])
        maild.send(mail("Backups missing"), ["support@altis-dxp.com"])
        (ack,) = sink.wait_for(1)
        maild.settle()
        assert ack.header("Subject") == "[#2] Backups missing"
        assert maild.ticket(1)["acknowledgements"] == []


AUTO_KINDS: list[tuple[dict[str, str], str, str, list[str]]] = [
    ({"Auto-Submitted": "auto-replied"}, "", "", ["Auto-Submitted: auto-replied"]),
    ({"Auto-Submitted": "auto-generated"}, "", "", ["Auto-Submitted: auto-generated"]),
    ({"Precedence": "bulk"}, "", "", ["Precedence: bulk"]),
    ({"Precedence": "junk"}, "", "", ["Precedence: junk"]),
    ({"Precedence": "list"}, "", "", ["Precedence: list"]),
    ({"Precedence": "auto_reply"}, "", "", ["Precedence: auto_reply"]),
    ({"X-Autoreply": "yes"}, "", "", ["X-Autoreply"]),
    ({"X-Autorespond": "yes"}, "", "", ["X-Autorespond"]),
    ({"X-Auto-Response-Suppress": "All"}, "", "", ["X-Auto-Response-Suppress"]),
    ({"List-Id": "<ops.lists.example>"}, "", "", ["List-Id"]),
    ({"List-Unsubscribe": "<mailto:leave@lists.example>"}, "", "", ["List-Unsubscribe"]),
    ({}, "<>", "", ["empty return path"]),
    ({}, "", "MAILER-DAEMON@mx.example", ["sender mailer-daemon@"]),
    ({}, "", "postmaster@mx.example", ["sender postmaster@"]),
    ({}, "", "no-reply@service.example", ["sender no-reply@"]),
    ({}, "", "noreply@service.example", ["sender noreply@"]),
]


def test_no_acknowledgement_for_any_kind_of_auto_generated_mail(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """Each auto-generated kind opens a flagged ticket and gets no acknowledgement."""
    for number, (headers, envelope, sender, _) in enumerate(AUTO_KINDS, start=1):
        frm = sender or f"robot{number}@monitor.example"
        message = mail(
            f"auto {number}", frm=frm, **{k.replace("-", "_"): v for k, v in headers.items()}
        )
        with desk.smtp() as client:
            client.send_message(
                message,
                from_addr="" if envelope == "<>" else frm,
                to_addrs=["support@altis-dxp.com"],
            )
    desk.send(mail("a person, last"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    desk.settle()
    assert ack.header("Subject") == f"[#{len(AUTO_KINDS) + 1}] a person, last"
    for number, (*_, reasons) in enumerate(AUTO_KINDS, start=1):
        view = desk.ticket(number)
        (message,) = view["messages"]
        assert (view["subject"], message["kind"], message["auto_reasons"]) == (
            f"auto {number}",
            "auto",
            reasons,
        )
        assert view["acknowledgements"] == []
    time.sleep(0.3)
    assert len(sink.received) == 1


def test_an_out_of_office_reply_lands_in_its_closed_ticket_without_reopening_it(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """An auto-reply to the acknowledgement threads (flagged) and leaves the ticket closed."""
    desk.send(mail("Backups missing", Cc="bob@customer.example"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    desk.change(1, status=_closed())
    away = mail(
        "Out of office: [#1] Backups missing",
        frm="Bob <bob@customer.example>",
        to=token_address(ack),
        In_Reply_To=ack.header("Message-ID"),
        Auto_Submitted="auto-replied",
    )
    desk.send(away, [token_address(ack)], sender="")
    desk.settle()
    view = desk.ticket(1)
    assert view["status"] == "closed"
    assert [(m["kind"], m["auto_reasons"]) for m in view["messages"]] == [
        ("human", []),
        ("ack", []),
        ("auto", ["Auto-Submitted: auto-replied", "empty return path"]),
    ]
    human = mail("Re: [#1] Backups missing", In_Reply_To=ack.header("Message-ID"))
    desk.send(human, ["support@altis-dxp.com"])
    desk.settle()
    assert desk.ticket(1)["status"] == "open"  # a person's reply still reopens


def _closed() -> Any:
    from maild.enums import TicketStatus

    return TicketStatus.CLOSED


def test_a_monitoring_alert_to_sysops_still_pages(
    make_config: Callable[..., Path], sink: SmtpSink, tmp_path: Path
) -> None:
    """Auto-Submitted: auto-generated to sysops@ makes the urgent ticket and reaches PagerDuty."""
    with FakeEvents(tmp_path / "events") as events:
        config = make_config(outbound_section(sink) + paging_section(events))
        with RunningMaild(load_settings(config)) as maild:
            alert = mail(
                "CRITICAL: web-1 HTTP 502",
                to="sysops@altis-dxp.com",
                frm="Alertmanager <alerts@monitor.example>",
                Auto_Submitted="auto-generated",
            )
            maild.send(alert, ["sysops@altis-dxp.com"], sender="alerts@monitor.example")
            (event,) = events.wait_for(1)
            maild.settle()
            assert event["payload"]["summary"].startswith("[URGENT] CRITICAL: web-1 HTTP 502")
            view = maild.ticket(1)
            assert (view["priority"], view["messages"][0]["kind"]) == ("urgent", "auto")
            assert view["acknowledgements"] == []
    assert sink.received == []


def paging_section(events: FakeEvents) -> str:
    return f"""
[pagerduty]
routing_key = "{"a" * 32}"
events_url = "{events.url}"
ca_file = "{events.ca_file}"
"""


def dsn(original_message_id: str, failed: str, to: str, *, headers_only: bool = True) -> bytes:
    """A delivery status notification (RFC 3464) as Postfix writes one."""
    boundary = "dsn-boundary-1"
    original = (
        f"From: {DESK}\r\nTo: {failed}\r\nSubject: [#1] Backups missing\r\n"
        f"Message-ID: {original_message_id}\r\n"
    )
    last_part = (
        f"Content-Type: text/rfc822-headers\r\n\r\n{original}"
        if headers_only
        else f"Content-Type: message/rfc822\r\n\r\n{original}\r\nbody\r\n"
    )
    return (
        "From: MAILER-DAEMON@mx.customer.example (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {make_msgid(domain='mx.customer.example')}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        f"--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.customer.example\r\n\r\n"
        f"Final-Recipient: rfc822; {failed}\r\n"
        "Action: failed\r\n"
        "Status: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <bob@customer.example>: user unknown\r\n"
        f"--{boundary}\r\n"
        f"{last_part}"
        f"--{boundary}--\r\n"
    ).encode()


@pytest.mark.parametrize("headers_only", [True, False])
def test_a_bounce_of_an_acknowledgement_is_attached_and_marks_the_address(
    desk: RunningMaild, sink: SmtpSink, headers_only: bool
) -> None:
    """The DSN joins ticket 2, marks bob undeliverable, opens nothing and sends nothing."""
    introduce(desk, sink)
    desk.send(mail("Backups missing", Cc="bob@customer.example"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    wait_until(lambda: desk.ticket(2)["acknowledgements"][0]["status"] == "sent")
    bounce = dsn(
        ack.header("Message-ID"), "bob@customer.example", ack.mail_from, headers_only=headers_only
    )
    send_raw(desk, bounce, [ack.mail_from], sender="")
    desk.settle()
    assert sorted(t["id"] for t in desk.tickets()) == [1, 2]
    view = desk.ticket(2)
    assert view["status"] == "open"
    bounced = view["messages"][-1]
    assert (bounced["kind"], bounced["report"]["original_message_id"]) == (
        "bounce",
        ack.header("Message-ID").strip("<>"),
    )
    assert bounced["report"]["recipients"][0]["status"] == "5.1.1"
    bob = next(p for p in view["participants"] if p["email"] == "bob@customer.example")
    assert bob["undeliverable"].startswith("bounced: 5.1.1 smtp; 550 5.1.1")
    states = {r["email"]: r["status"] for r in view["acknowledgements"][0]["recipients"]}
    assert states == {"alice@customer.example": "sent", "bob@customer.example": "bounced"}
    # The next ticket with bob on it is not acknowledged to bob again.
    desk.send(mail("Another", Cc="bob@customer.example"), ["support@altis-dxp.com"])
    second = sink.wait_for(2)[1]
    assert second.rcpt_tos == ["alice@customer.example"]
    assert len(sink.received) == 2


def test_a_bounce_about_no_message_of_ours_is_dropped(desk: RunningMaild, sink: SmtpSink) -> None:
    """Backscatter (a DSN about mail we never sent) is kept as dropped: no ticket, no mail."""
    bounce = dsn("<never-sent@elsewhere.example>", "x@customer.example", "support@altis-dxp.com")
    send_raw(desk, bounce, ["support@altis-dxp.com"], sender="")
    desk.settle()
    (row,) = inbound_rows(desk)
    assert (row.status, row.ticket_id) == ("dropped", None)
    assert row.error == (
        "bounce about a message that is in no ticket (original Message-ID "
        "<never-sent@elsewhere.example>)"
    )
    assert desk.tickets() == []
    assert sink.received == []


def test_acknowledgements_per_address_are_limited_per_hour(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """With a limit of 2, the third and fourth new tickets from one address are not acknowledged."""
    config = make_config(outbound_section(sink, "max_acks_per_sender_per_hour = 2"))
    with RunningMaild(load_settings(config)) as maild:
        for number in range(1, 5):
            maild.send(mail(f"question {number}"), ["support@altis-dxp.com"])
        maild.settle()
        sent = sink.wait_for(2)
        time.sleep(0.3)
        assert len(sink.received) == 2
        assert [r.header("Subject") for r in sent] == ["[#1] question 1", "[#2] question 2"]
        withheld = maild.ticket(3)["acknowledgements"][0]
        assert withheld["status"] == "withheld"
        assert withheld["reason"] == (
            "already sent 2 mails in the last hour ([outbound] max_acks_per_sender_per_hour = 2)"
        )


def test_our_own_acknowledgement_coming_back_is_dropped(desk: RunningMaild, sink: SmtpSink) -> None:
    """The acknowledgement's own bytes delivered to support@ are kept as dropped."""
    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    send_raw(desk, ack.raw, ["support@altis-dxp.com"], sender=ack.mail_from)
    desk.settle()
    looped = inbound_rows(desk)[-1]
    assert (looped.status, looped.ticket_id) == ("dropped", None)
    assert looped.error == "loop: our own X-Maild-Loop header; our own mail came back"
    assert desk.ticket(1)["message_count"] == 2
    time.sleep(0.3)
    assert len(sink.received) == 1


def test_a_copy_with_our_message_id_but_no_loop_header_is_dropped(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """A forwarder that strips our loop header still cannot bring our Message-ID back in."""
    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    echoed = mail("Backups missing", frm="robot@forwarder.example")
    del echoed["Message-ID"]
    echoed["Message-ID"] = ack.header("Message-ID")
    desk.send(echoed, ["support@altis-dxp.com"], sender="robot@forwarder.example")
    desk.settle()
    looped = inbound_rows(desk)[-1]
    assert looped.status == "dropped"
    assert looped.error == (
        f"loop: our own Message-ID {ack.header('Message-ID')}; our own mail came back"
    )


@pytest.mark.parametrize("marked", [True, False])
def test_a_ping_pong_with_an_auto_responder_ends_within_two_messages(
    desk: RunningMaild, sink: SmtpSink, marked: bool
) -> None:
    """Our acknowledgement, its auto-reply, and nothing more: marked or not, it threads silently."""
    replies: list[str] = []

    def auto_respond(received: Received) -> None:
        answer = EmailMessage()
        answer["From"] = "Alice Example <alice@customer.example>"
        answer["To"] = received.header("Reply-To")
        answer["Subject"] = f"Auto: {received.header('Subject')}"
        answer["Message-ID"] = make_msgid(domain="customer.example")
        answer["In-Reply-To"] = received.header("Message-ID")
        if marked:
            answer["Auto-Submitted"] = "auto-replied"
        answer.set_content("I am away.")
        with smtplib.SMTP("127.0.0.1", desk.smtp_port, timeout=30) as client:
            client.send_message(answer, to_addrs=[received.header("Reply-To")])
        replies.append(answer["Message-ID"])

    sink.behaviour.on_message = auto_respond
    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    sink.wait_for(1)
    wait_until(lambda: replies, what="the auto-responder's reply")
    desk.settle()
    time.sleep(0.5)
    assert len(sink.received) == 1
    assert [(m["direction"], m["kind"]) for m in desk.ticket(1)["messages"]] == [
        ("inbound", "human"),
        ("outbound", "ack"),
        ("inbound", "auto" if marked else "human"),
    ]


def test_a_deferring_smarthost_is_retried_and_a_refused_recipient_is_marked(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """451 to DATA is retried; a 550 recipient is refused and undeliverable; the rest get it."""
    introduce(desk, sink)
    sink.behaviour.data_replies = ["451 4.3.0 try again"]
    sink.behaviour.rcpt_replies = {"bob@customer.example": "550 5.1.1 no such user"}
    desk.send(mail("Backups missing", Cc="bob@customer.example"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    assert ack.rcpt_tos == ["alice@customer.example"]
    wait_until(lambda: desk.ticket(2)["acknowledgements"][0]["status"] == "sent")
    row = desk.ticket(2)["acknowledgements"][0]
    assert row["attempts"] == 2
    assert row["recipients"] == [
        {"email": "alice@customer.example", "status": "sent", "error": None},
        {"email": "bob@customer.example", "status": "refused", "error": "550 5.1.1 no such user"},
    ]
    bob = next(p for p in desk.ticket(2)["participants"] if p["email"] == "bob@customer.example")
    assert bob["undeliverable"] == "550 5.1.1 no such user"


def test_a_recipient_deferred_with_4xx_is_sent_later_and_the_other_not_twice(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """Bob's 450 keeps him pending; alice, accepted at once, is never sent a second copy."""
    introduce(desk, sink)
    sink.behaviour.rcpt_replies = {"bob@customer.example": "450 4.2.1 mailbox busy"}
    desk.send(mail("Backups missing", Cc="bob@customer.example"), ["support@altis-dxp.com"])
    (first,) = sink.wait_for(1)
    assert first.rcpt_tos == ["alice@customer.example"]
    sink.behaviour.rcpt_replies = {}
    second = sink.wait_for(2)[1]
    assert second.rcpt_tos == ["bob@customer.example"]
    assert second.header("Message-ID") == first.header("Message-ID")
    wait_until(lambda: desk.ticket(2)["acknowledgements"][0]["status"] == "sent")


def test_an_acknowledgement_waits_out_a_smarthost_outage_across_a_restart(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Queued while the smarthost is down; after maild restarts with it up, it is sent."""
    with SmtpSink() as probe:
        port = probe.port  # free now: nothing listens there until the second run
    config = make_config(outbound_section(f"127.0.0.1:{port}"))
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("Backups missing"), ["support@altis-dxp.com"])
        maild.settle()
        wait_until(
            lambda: maild.ticket(1)["acknowledgements"][0]["attempts"] >= 1,
            what="a failed attempt recorded",
        )
        row = maild.ticket(1)["acknowledgements"][0]
        assert row["status"] == "pending"
        assert row["last_error"].startswith(f"127.0.0.1:{port}: SMTPConnectError: ")
    with SinkOnPort(port) as sink, RunningMaild(load_settings(config)) as maild:
        (ack,) = sink.wait_for(1)
        assert ack.header("Subject") == "[#1] Backups missing"
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "sent")


class SinkOnPort(SmtpSink):
    """A sink on a given port (the one the daemon was configured with)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._wanted = port

    async def _start(self) -> int:
        self._server = await self._loop.create_server(self._factory, "127.0.0.1", self._wanted)
        return self._wanted


def test_starttls_and_login_to_the_smarthost(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """tls = "starttls" with a CA file and a login: the sink sees the login, then the mail."""
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "smarthost-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with SmtpSink(tls_context=server, login=("maild", "s3cret-pass")) as sink:
        more = (
            f'tls = "starttls"\nca_file = "{ca_file}"\nusername = "maild"\npassword = "s3cret-pass"'
        )
        with RunningMaild(load_settings(make_config(outbound_section(sink, more)))) as maild:
            maild.send(mail("Backups missing"), ["support@altis-dxp.com"])
            (ack,) = sink.wait_for(1)
            assert ack.header("Subject") == "[#1] Backups missing"
            assert sink.logins == ["maild"]


def test_no_header_can_be_injected_through_the_subject_or_a_name(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """Encoded CR/LF in the subject and the sender's name stay inside their header."""
    raw = (
        "From: =?utf-8?q?Mallory=0D=0ABcc=3A_victim=40example=2Ecom?="
        " <mallory@customer.example>\r\n"
        "To: support@altis-dxp.com\r\n"
        "Subject: =?utf-8?q?help=0D=0ABcc=3A_victim=40example=2Ecom=0D=0A=0D=0Abody?=\r\n"
        f"Message-ID: {make_msgid(domain='customer.example')}\r\n"
        "\r\nhello\r\n"
    ).encode()
    send_raw(desk, raw, ["support@altis-dxp.com"], sender="mallory@customer.example")
    (ack,) = sink.wait_for(1)
    assert ack.rcpt_tos == ["mallory@customer.example"]
    head = ack.raw.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in head
    assert ack.message["Bcc"] is None
    # a stranger's subject is echoed without the address in it (outgoing.echo)
    assert ack.header("Subject") == "[#1] help Bcc: body"


def test_a_template_with_an_unknown_placeholder_is_refused_with_its_line(tmp_path: Path) -> None:
    """${ticket} is not a placeholder: the error names the file, the line and what is known."""
    (tmp_path / "ack.txt").write_text("Hello,\n\nticket ${ticket}\n")
    with pytest.raises(ConfigError) as caught:
        load_templates(tmp_path)
    assert str(caught.value).startswith(
        f"{tmp_path / 'ack.txt'}:3: unknown placeholder ${{ticket}}"
    )


def test_a_template_with_a_stray_dollar_is_refused_with_its_line(tmp_path: Path) -> None:
    """A lone $ (not $$ or a placeholder) is reported with its line."""
    (tmp_path / "ack-sysops.txt").write_text("ok ${ticket_id}\ncosts 5$ today\n")
    with pytest.raises(ConfigError) as caught:
        load_templates(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'ack-sysops.txt'}:2: a stray $")


def test_the_built_in_template_is_used_when_the_folder_has_none(tmp_path: Path) -> None:
    """An empty templates folder still gives every route a body."""
    templates = load_templates(tmp_path)
    body = templates.for_route("support").substitute(
        ticket_id=7,
        subject="s",
        ticket_type="question",
        priority="normal",
        greeting_name="Alice",
        requester_name="Alice",
        requester_email="a@x.example",
        reply_address="support+7-x@x.example",
        desk_address="support@x.example",
        paging_note="",
    )
    assert "opened ticket #7" in body


def test_acknowledgements_need_a_sender_and_a_secret(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """A smarthost without from or secret is a config error naming the missing key."""
    config = make_config(f'[outbound]\nsmarthost = "{sink.address}"\nfrom = "{DESK}"\n')
    with pytest.raises(ConfigError, match=r"acknowledgements need \[outbound\] secret"):
        load_settings(config)
    config = make_config(f'[outbound]\nsmarthost = "{sink.address}"\nsecret = "{SECRET}"\n')
    with pytest.raises(ConfigError, match=r"acknowledgements need a sender"):
        load_settings(config)
    config = make_config(
        f'[outbound]\nsmarthost = "{sink.address}"\nfrom = "{DESK}"\nsecret = "short"\n'
    )
    with pytest.raises(ConfigError, match=r"too short \(5 characters; use 16 or more\)"):
        load_settings(config)


def test_recipients_of_withheld_acknowledgements_do_not_count_toward_the_limit(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """Only acknowledgements actually queued count: a withheld one does not use up the hour."""
    config = make_config(outbound_section(sink, "max_acks_per_sender_per_hour = 1"))
    with RunningMaild(load_settings(config)) as maild:
        for number in range(1, 4):
            maild.send(mail(f"q{number}"), ["support@altis-dxp.com"])
        sink.wait_for(1)
        maild.settle()

        def states() -> list[tuple[str, str]]:
            return maild.service.database.run_read(
                lambda s: [
                    (r.email, r.status)
                    for r in s.exec(select(OutmailRecipient).order_by(OutmailRecipient.id)).all()
                ]
            )

        wait_until(lambda: states()[0][1] == "sent", what="the first acknowledgement sent")
        assert states() == [
            ("alice@customer.example", "sent"),
            ("alice@customer.example", "withheld"),
            ("alice@customer.example", "withheld"),
        ]


@pytest.mark.usefixtures("quiet_logging")
def test_acks_list_and_retry_from_the_cli(make_config: Callable[..., Path], sink: SmtpSink) -> None:
    """`maild acks list --json` shows a withheld acknowledgement; `acks retry` gets it sent."""
    from click.testing import CliRunner

    from maild.cli import main

    config = make_config(outbound_section(sink, "max_acks_per_sender_per_hour = 1"))
    with RunningMaild(load_settings(config)) as maild:
        maild.send(mail("first"), ["support@altis-dxp.com"])
        sink.wait_for(1)
        maild.send(mail("second"), ["support@altis-dxp.com"])
        maild.settle()
        listed = CliRunner().invoke(
            main, ["acks", "list", "--status", "withheld", "--json", "--config", str(config)]
        )
        assert listed.exit_code == 0, listed.output
        (row,) = json.loads(listed.stdout)
        assert (row["id"], row["ticket_id"], row["subject"]) == (2, 2, "[#2] second")
        assert row["recipients"][0]["status"] == "withheld"
        retried = CliRunner().invoke(main, ["acks", "retry", "2", "--config", str(config)])
        assert (retried.exit_code, retried.stdout) == (
            0,
            "acknowledgement 2 (ticket 2) is pending\n",
        )
        second = sink.wait_for(2)[1]
        assert second.header("Subject") == "[#2] second"
        wait_until(lambda: maild.ticket(1)["acknowledgements"][0]["status"] == "sent")
        again = CliRunner().invoke(main, ["acks", "retry", "1", "--config", str(config)])
        assert again.exit_code == 1
        assert "already sent" in again.stderr
        missing = CliRunner().invoke(main, ["acks", "retry", "99", "--config", str(config)])
        assert (missing.exit_code, missing.stderr) == (1, "maild: no acknowledgement 99\n")


def test_acknowledgement_and_flag_counters_move(desk: RunningMaild, sink: SmtpSink) -> None:
    """/metrics counts acknowledgements queued and sent, and auto-generated mail."""
    from maild import metrics

    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        value("maild_acknowledgements_total", result="queued"),
        value("maild_acknowledgements_total", result="sent"),
        value("maild_messages_flagged_total", kind="auto"),
    )
    desk.send(mail("person"), ["support@altis-dxp.com"])
    desk.send(mail("robot", Auto_Submitted="auto-generated"), ["support@altis-dxp.com"])
    sink.wait_for(1)
    desk.settle()
    wait_until(lambda: value("maild_acknowledgements_total", result="sent") > before[1])
    after = (
        value("maild_acknowledgements_total", result="queued"),
        value("maild_acknowledgements_total", result="sent"),
        value("maild_messages_flagged_total", kind="auto"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_a_sysops_acknowledgement_says_on_call_was_paged_only_when_it_was(
    make_config: Callable[..., Path], sink: SmtpSink, tmp_path: Path
) -> None:
    """With paging on, the sysops@ acknowledgement says on-call was paged; its page went out."""
    with FakeEvents(tmp_path / "events") as events:
        config = make_config(outbound_section(sink) + paging_section(events))
        with RunningMaild(load_settings(config)) as maild:
            maild.send(mail("Site down", to="sysops@altis-dxp.com"), ["sysops@altis-dxp.com"])
            events.wait_for(1)
            (ack,) = sink.wait_for(1)
    assert "We have opened urgent incident #1:" in ack.body
    assert "Our on-call engineers have been paged." in ack.body


@pytest.mark.usefixtures("quiet_logging")
def test_inbound_list_shows_dropped_deliveries_with_their_reason(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """`maild inbound list --status dropped` lists our own mail that came back, and why."""
    from click.testing import CliRunner

    from maild.cli import main

    desk.send(mail("Backups missing"), ["support@altis-dxp.com"])
    (ack,) = sink.wait_for(1)
    send_raw(desk, ack.raw, ["support@altis-dxp.com"], sender=ack.mail_from)
    desk.settle()
    config = str(desk.settings.source)
    listed = CliRunner().invoke(
        main, ["inbound", "list", "--status", "dropped", "--json", "--config", config]
    )
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["status"], row["error"]) == (
        2,
        "dropped",
        "loop: our own X-Maild-Loop header; our own mail came back",
    )


def test_a_broken_template_on_reload_keeps_the_previous_templates(
    make_config: Callable[..., Path], sink: SmtpSink, tmp_path: Path
) -> None:
    """A reload with a stray $ in ack.txt fails, and acknowledgements keep the old text."""
    import shutil

    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    config = make_config(outbound_section(sink, templates=templates))
    with RunningMaild(load_settings(config)) as maild:
        (templates / "ack.txt").write_text("costs 5$ now\n")
        assert maild.call(_reload(maild)) is False
        maild.send(mail("Backups missing"), ["support@altis-dxp.com"])
        (ack,) = sink.wait_for(1)
    assert "Your request is ticket #1:" in ack.body


async def _reload(maild: RunningMaild) -> bool:
    return maild.service.reload_rules()


def test_a_bounce_of_a_message_whose_id_has_a_space_joins_its_ticket(maild: RunningMaild) -> None:
    """A customer's `Message-ID: <a b@customer.example>` is stored as `a b@customer.example`;
    a DSN about it must find that ticket (the DSN reader kept the brackets: dropped)."""
    first = (
        b"From: Alice <alice@customer.example>\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: Odd id\r\nMessage-ID: <a b@customer.example>\r\n\r\nHello\r\n"
    )
    send_raw(maild, first, ["support@altis-dxp.com"], sender="alice@customer.example")
    maild.settle()
    bounce = dsn("<a b@customer.example>", "bob@customer.example", "support@altis-dxp.com")
    send_raw(maild, bounce, ["support@altis-dxp.com"], sender="")
    maild.settle()
    (ticket,) = maild.tickets()
    messages = maild.ticket(ticket["id"])["messages"]
    assert [m["kind"] for m in messages] == ["human", "bounce"]
    assert messages[1]["report"]["original_message_id"] == "a b@customer.example"
