"""Copies to participants and notifications to the team, against a real SMTP smarthost.

maild runs on loopback with `[outbound] smarthost` pointed at tests/sink.py; every
assertion about what was sent reads what the sink actually received.
"""

from __future__ import annotations

import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from maild.config import load_settings
from maild.enums import ParticipantRole, TicketStatus
from maild.errors import ConfigError
from maild.outbound.acks import make_token
from maild.outbound.correspondence import attachments_within, shortened, template_fields
from maild.outbound.templates import KIND_PLACEHOLDERS, KINDS, load_templates
from maild.store.models import Inbound, Participant
from tests.conftest import REPO, RunningMaild, mail, wait_until
from tests.outbound.test_acks import SECRET, outbound_section, send_raw
from tests.sink import Received, SmtpSink

SUPPORT = "support@altis-dxp.com"
ALICE = "alice@customer.example"
BOB = "bob@customer.example"
CAROL = "carol@customer.example"
DESK_SECTION = """
[desk]
agents = ["*@altis-dxp.com", "*@humanmade.com"]
ticket_url = "https://desk.example/tickets/{id}"
"""


def desk_config(make_config: Callable[..., Path], sink: SmtpSink, desk: str = "") -> Path:
    return make_config(outbound_section(sink) + DESK_SECTION + desk)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def desk(make_config: Callable[..., Path], sink: SmtpSink) -> Iterator[RunningMaild]:
    """maild with acknowledgements and desk mail on, sending through the sink."""
    with RunningMaild(load_settings(desk_config(make_config, sink))) as running:
        yield running


def drain(maild: RunningMaild, sink: SmtpSink, count: int) -> list[Received]:
    """Wait for `count` mails, let the outbox settle, return them and empty the sink."""
    got = sink.wait_for(count)
    maild.settle()
    time.sleep(0.3)  # anything more would have been sent by now
    with sink.lock:
        assert len(sink.received) == count, [r.header("Subject") for r in sink.received]
        sink.received.clear()
    return got


def opened(maild: RunningMaild, sink: SmtpSink, cc: str = f"Bob <{BOB}>, Carol <{CAROL}>") -> str:
    """Alice's ticket with Bob and Carol copied (Alice is known first, so the acknowledgement
    goes to all three); its first Message-ID. The sink is emptied."""
    maild.send(mail("Hello"), [SUPPORT], sender=ALICE)
    drain(maild, sink, 1)
    first = mail("Staging is slow", Cc=cc)
    maild.send(first, [SUPPORT], sender=ALICE)
    drain(maild, sink, 1)
    return str(first["Message-ID"])


def follow_up(first: str, body: str = "It got worse.", **headers: str) -> EmailMessage:
    return mail("Re: Staging is slow", body=body, In_Reply_To=first, References=first, **headers)


def add_participants(maild: RunningMaild, ticket_id: int, *emails: str) -> None:
    """Participant rows written directly (as an old row or a hand edit would be)."""

    def add(session: Session) -> None:
        for email in emails:
            session.add(
                Participant(ticket_id=ticket_id, email=email, role=ParticipantRole.CC.value)
            )

    maild.service.database.run_write(add)


def kinds(maild: RunningMaild, ticket_id: int) -> list[tuple[str, str]]:
    return [(m["direction"], m["kind"]) for m in maild.ticket(ticket_id)["messages"]]


def test_a_follow_up_is_copied_to_exactly_the_participants_it_did_not_reach(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """Alice writes with Carol in Cc: Bob alone gets a copy, from the desk, threaded."""
    first = opened(desk, sink)
    reply = follow_up(first, Cc=f"Carol <{CAROL}>")
    desk.send(reply, [SUPPORT], sender=ALICE)
    (copy,) = drain(desk, sink, 1)
    token = make_token(SECRET.encode(), 2)
    assert copy.rcpt_tos == [BOB]
    assert copy.mail_from == f"support+{token}@altis-dxp.com"
    assert copy.header("From") == f"Alice Example via Altis Support <{SUPPORT}>"
    assert copy.header("To") == f"Bob <{BOB}>"
    assert copy.header("Reply-To") == f"support+{token}@altis-dxp.com"
    assert copy.header("Subject") == "[#2] Re: Staging is slow"
    assert copy.header("In-Reply-To") == reply["Message-ID"]
    assert copy.header("References").split()[0] == first
    assert copy.header("References").split()[-1] == reply["Message-ID"]
    assert copy.header("Auto-Submitted") == "auto-generated"
    assert copy.header("X-Auto-Response-Suppress") == "All"
    assert copy.header("X-Maild-Loop") == desk.service.acks.loop_id
    assert copy.header("X-Maild-Ticket") == "2"
    assert "Alice Example wrote to ticket #2:" in copy.body
    assert "It got worse." in copy.body
    assert kinds(desk, 2) == [
        ("inbound", "human"),
        ("outbound", "ack"),
        ("inbound", "human"),
        ("outbound", "copy"),
    ]
    assert desk.ticket(2)["messages"][3]["message_id"] == copy.header("Message-ID")


def test_a_follow_up_to_everyone_sends_no_copy_and_a_first_mail_none_either(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """A reply-all reaches everybody itself; a new ticket's CCs have the acknowledgement."""
    first = opened(desk, sink)  # drain() checked: one acknowledgement, no copy
    desk.send(follow_up(first, Cc=f"{BOB}, {CAROL}"), [SUPPORT], sender=ALICE)
    desk.settle()
    time.sleep(0.5)
    assert sink.received == []
    assert [k for _, k in kinds(desk, 2)] == ["human", "ack", "human"]


def test_a_reply_to_a_copy_threads_and_is_copied_to_the_others(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """Bob answers the copy he got (to its reply address): Alice and Carol get his copy."""
    first = opened(desk, sink)
    desk.send(follow_up(first), [SUPPORT], sender=ALICE)
    (copy,) = drain(desk, sink, 1)
    assert sorted(copy.rcpt_tos) == [BOB, CAROL]
    answer = mail(
        "Re: [#2] Re: Staging is slow",
        to=copy.header("Reply-To"),
        frm=f"Bob <{BOB}>",
        body="Same here.",
        In_Reply_To=copy.header("Message-ID"),
    )
    desk.send(answer, [copy.header("Reply-To")], sender=BOB)
    (second,) = drain(desk, sink, 1)
    assert second.rcpt_tos == [ALICE, CAROL]
    assert second.header("From") == f"Bob via Altis Support <{SUPPORT}>"
    assert "Same here." in second.body
    assert [t["id"] for t in desk.tickets()] == [2, 1]


def test_automatic_mail_a_bounce_and_a_newcomer_are_never_copied(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """An out-of-office reply, and a stranger writing to the reply address, are filed but
    copied to nobody."""
    first = opened(desk, sink)
    away = follow_up(first, body="I am away.", Auto_Submitted="auto-replied")
    desk.send(away, [SUPPORT], sender=ALICE)
    address = f"support+{make_token(SECRET.encode(), 2)}@altis-dxp.com"
    stranger = mail("me too", to=address, frm="Eve <eve@elsewhere.example>")
    desk.send(stranger, [address], sender="eve@elsewhere.example")
    desk.settle()
    time.sleep(0.5)
    assert sink.received == []
    assert [k for _, k in kinds(desk, 2)] == ["human", "ack", "auto", "human"]


def test_attachments_go_along_up_to_the_limit_and_are_listed_above_it(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """copy_attachments_max = 1 KiB: a 500-byte file is attached, a 2000-byte one listed."""
    config = desk_config(make_config, sink, 'copy_attachments_max = "1 KiB"\n')
    with RunningMaild(load_settings(config)) as maild:
        first = opened(maild, sink, cc=BOB)
        small = follow_up(first, body="small one")
        small.add_attachment(b"s" * 500, maintype="text", subtype="plain", filename="small.log")
        maild.send(small, [SUPPORT], sender=ALICE)
        (with_file,) = drain(maild, sink, 1)
        big = follow_up(first, body="big one")
        big.add_attachment(b"b" * 2000, maintype="image", subtype="png", filename="big.png")
        maild.send(big, [SUPPORT], sender=ALICE)
        (listed,) = drain(maild, sink, 1)
    files = [(p.get_filename(), p.get_content()) for p in with_file.message.iter_attachments()]
    assert files == [("small.log", "s" * 500)]
    assert list(listed.message.iter_attachments()) == []
    assert (
        "Attachments not included (over 1 KiB in all; they are on the ticket): big.png (2 KiB)"
        in listed.body
    )


@pytest.mark.parametrize("where", ["desk", "route"])
def test_copies_can_be_turned_off_for_the_desk_or_one_route(
    make_config: Callable[..., Path], rules_dir: Path, sink: SmtpSink, where: str
) -> None:
    """[desk] copy_participants = false, or the route's copy_participants = false: no copy."""
    extra = "copy_participants = false\n" if where == "desk" else ""
    if where == "route":
        rules = rules_dir / "desk.toml"
        rules.write_text(
            rules.read_text().replace(
                'name = "support"', 'name = "support"\ncopy_participants = false'
            )
        )
    with RunningMaild(load_settings(desk_config(make_config, sink, extra))) as maild:
        first = opened(maild, sink)
        maild.send(follow_up(first), [SUPPORT], sender=ALICE)
        maild.settle()
        time.sleep(0.5)
        assert sink.received == []


def test_copies_beyond_the_hourly_limit_are_withheld_with_the_reason(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """max_copies_per_address_per_hour = 1: Bob gets the first copy; the second is withheld."""
    config = desk_config(make_config, sink, "max_copies_per_address_per_hour = 1\n")
    with RunningMaild(load_settings(config)) as maild:
        first = opened(maild, sink, cc=BOB)
        maild.send(follow_up(first, body="one"), [SUPPORT], sender=ALICE)
        drain(maild, sink, 1)
        maild.send(follow_up(first, body="two"), [SUPPORT], sender=ALICE)
        maild.settle()
        time.sleep(0.5)
        assert sink.received == []
        mails = maild.ticket(2)["acknowledgements"]
    assert [(m["kind"], m["status"]) for m in mails] == [
        ("ack", "sent"),
        ("copy", "sent"),
        ("copy", "withheld"),
    ]
    assert mails[2]["reason"] == (
        "already sent 1 mails in the last hour ([desk] max_copies_per_address_per_hour = 1)"
    )
    assert mails[2]["recipients"] == [
        {"email": BOB, "status": "withheld", "error": mails[2]["reason"]}
    ]


def test_a_desk_address_on_the_ticket_is_never_copied(desk: RunningMaild, sink: SmtpSink) -> None:
    """A participant row naming a desk address (an old row, or a hand edit) gets no copy."""
    first = opened(desk, sink, cc=BOB)
    add_participants(desk, 2, "hosting@humanmade.com", "support+x@altis-dxp.com")
    desk.send(follow_up(first), [SUPPORT], sender=ALICE)
    (copy,) = drain(desk, sink, 1)
    assert copy.rcpt_tos == [BOB]


def test_our_own_copy_coming_back_is_dropped_as_a_loop(desk: RunningMaild, sink: SmtpSink) -> None:
    """The copy's own bytes delivered to support@ are kept as dropped, never filed."""
    first = opened(desk, sink, cc=BOB)
    desk.send(follow_up(first), [SUPPORT], sender=ALICE)
    (copy,) = drain(desk, sink, 1)
    send_raw(desk, copy.raw, [SUPPORT], sender=copy.mail_from)
    desk.settle()
    looped = desk.service.database.run_read(
        lambda s: s.exec(select(Inbound).order_by(col(Inbound.id).desc())).first()
    )
    assert (looped.status, looped.error) == (
        "dropped",
        "loop: our own X-Maild-Loop header; our own mail came back",
    )
    time.sleep(0.3)
    assert sink.received == []


def test_no_header_can_be_injected_through_a_writers_name(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """An encoded CR LF in Alice's name stays inside the copy's From display name."""
    first = opened(desk, sink, cc=BOB)
    raw = (
        "From: =?utf-8?q?Alice=0D=0ABcc=3A_victim=40example=2Ecom?= <alice@customer.example>\r\n"
        "To: support@altis-dxp.com\r\n"
        "Subject: =?utf-8?q?Re=3A_x=0D=0ABcc=3A_victim=40example=2Ecom?=\r\n"
        f"Message-ID: {make_msgid(domain='customer.example')}\r\n"
        f"In-Reply-To: {first}\r\n"
        "\r\nmore\r\n"
    ).encode()
    send_raw(desk, raw, [SUPPORT], sender=ALICE)
    (copy,) = drain(desk, sink, 1)
    head = copy.raw.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in head
    assert copy.message["Bcc"] is None
    assert copy.rcpt_tos == [BOB]
    assert parseaddr(copy.header("From"))[1] == SUPPORT
    assert copy.header("From").startswith('"Alice Bcc: victim@example.com via Altis Support"')


def notify_rules(rules_dir: Path, addresses: str = '["team@ops.example"]') -> None:
    rules = rules_dir / "desk.toml"
    rules.write_text(
        rules.read_text().replace('name = "support"', f'name = "support"\nnotify = {addresses}')
    )


def test_notify_addresses_hear_of_new_tickets_and_follow_ups_not_of_automatic_mail(
    make_config: Callable[..., Path], rules_dir: Path, sink: SmtpSink
) -> None:
    """notify on support@: the team gets a new ticket and its follow-up, with the link;
    an out-of-office reply notifies nobody."""
    notify_rules(rules_dir)
    with RunningMaild(load_settings(desk_config(make_config, sink))) as maild:
        first = mail("Staging is slow", body="Since 10:04 the admin takes 30 s.")
        maild.send(first, [SUPPORT], sender=ALICE)
        got = drain(maild, sink, 2)
        by_rcpt = {tuple(r.rcpt_tos): r for r in got}
        assert set(by_rcpt) == {(ALICE,), ("team@ops.example",)}
        new = by_rcpt[("team@ops.example",)]
        assert new.header("Subject") == "[#1] Staging is slow"
        assert new.header("From") == f"Alice Example via Altis Support <{SUPPORT}>"
        assert new.header("Reply-To") == by_rcpt[(ALICE,)].header("Reply-To")
        assert new.header("Auto-Submitted") == "auto-generated"
        assert "New ticket #1 (question, normal, route support)" in new.body
        assert "https://desk.example/tickets/1" in new.body
        assert "Since 10:04 the admin takes 30 s." in new.body
        reply = mail("Re: Staging is slow", body="Now 60 s.", In_Reply_To=first["Message-ID"])
        maild.send(reply, [SUPPORT], sender=ALICE)
        (later,) = drain(maild, sink, 1)
        assert later.rcpt_tos == ["team@ops.example"]
        assert "Follow-up to ticket #1" in later.body
        assert "Now 60 s." in later.body
        away = mail(
            "Auto: Staging is slow", In_Reply_To=first["Message-ID"], Auto_Submitted="auto-replied"
        )
        maild.send(away, [SUPPORT], sender=ALICE)
        maild.settle()
        time.sleep(0.5)
        assert sink.received == []


def test_a_desk_address_in_notify_is_never_sent_to(
    make_config: Callable[..., Path], rules_dir: Path, sink: SmtpSink
) -> None:
    """notify naming a desk address would loop: it is skipped, the others are told."""
    notify_rules(rules_dir, '["hosting@altis-dxp.com", "team@ops.example"]')
    with RunningMaild(load_settings(desk_config(make_config, sink))) as maild:
        maild.send(mail("Question"), [SUPPORT], sender=ALICE)
        got = drain(maild, sink, 2)
    assert sorted(r.rcpt_tos[0] for r in got) == [ALICE, "team@ops.example"]


def test_desk_mail_metrics_count_by_kind(desk: RunningMaild, sink: SmtpSink) -> None:
    """maild_mail_total counts copies queued and sent, by kind."""
    from maild import metrics

    def value(kind: str, result: str) -> float:
        sample = metrics.REGISTRY.get_sample_value(
            "maild_mail_total", {"kind": kind, "result": result}
        )
        return sample or 0.0

    first = opened(desk, sink, cc=BOB)
    before = (value("copy", "queued"), value("copy", "sent"))
    desk.send(follow_up(first), [SUPPORT], sender=ALICE)
    drain(desk, sink, 1)
    wait_until(lambda: value("copy", "sent") > before[1], what="the copy counted as sent")
    assert (value("copy", "queued") - before[0], value("copy", "sent") - before[1]) == (1, 1)


# Templates: every kind, per route, checked at load.


def test_every_kind_has_a_built_in_template_using_only_its_placeholders(tmp_path: Path) -> None:
    """With an empty folder each kind renders from maild's own text, every placeholder known."""
    templates = load_templates(tmp_path)
    assert set(templates.defaults) == set(KINDS)
    for kind in KINDS:
        used = templates.get(kind, "support").get_identifiers()
        assert set(used) <= KIND_PLACEHOLDERS[kind], kind


def test_the_desk_fills_every_placeholder_a_desk_template_may_use() -> None:
    """template_fields gives a value for each placeholder of reply, copy, notify and solved."""
    from maild.outbound.acks import AckPolicy
    from maild.outbound.correspondence import DeskPolicy
    from maild.store.models import Ticket

    templates = load_templates(Path("/nonexistent"))
    acks = AckPolicy(True, b"k" * 20, "D <d@x.example>", "d@x.example", "x.example", "l", templates)
    ticket = Ticket(
        id=5, type="question", priority="normal", status="open", subject="s", rule="support"
    )
    fields = template_fields(DeskPolicy(acks=acks), ticket)
    for kind in ("reply", "copy", "notify", "solved"):
        assert KIND_PLACEHOLDERS[kind] <= set(fields), kind
        everything = "".join(f"${{{name}}}" for name in sorted(KIND_PLACEHOLDERS[kind]))
        string.Template(everything).substitute(fields)


def test_a_per_route_template_of_a_desk_kind_is_used_and_checked(tmp_path: Path) -> None:
    """copy-sysops.txt is the copy for sysops tickets; ${paging_note} is refused there."""
    (tmp_path / "copy-sysops.txt").write_text("Incident ${ticket_id}: ${body}\n")
    templates = load_templates(tmp_path)
    assert templates.get("copy", "sysops").template == "Incident ${ticket_id}: ${body}\n"
    assert templates.get("copy", "support") is templates.defaults["copy"]
    (tmp_path / "notify.txt").write_text("${event}\n${paging_note}\n")
    with pytest.raises(ConfigError) as caught:
        load_templates(tmp_path)
    assert str(caught.value).startswith(
        f"{tmp_path / 'notify.txt'}:2: unknown placeholder ${{paging_note}} (known in notify "
        "templates: "
    )


def test_the_shipped_acknowledgement_promises_only_what_maild_does() -> None:
    """It says the people copied receive our answers: agents' replies go to every participant."""
    for name in ("ack.txt", "ack-sysops.txt"):
        text = (REPO / "templates" / name).read_text()
        assert "copied on it receives our" in text, name


def test_attachments_within_and_shortened_text() -> None:
    """Files within the limit go along; over it they are listed. Long text is cut, marked."""

    class File:
        def __init__(self, name: str, size: int) -> None:
            self.filename, self.content_type, self.data = name, "text/plain", b"x" * size

    files = [File("a.log", 600), File("b.log", 600)]
    assert attachments_within(files, 2000) == (files, "")
    kept, note = attachments_within(files, 1000)
    assert kept == []
    assert "a.log (600 bytes), b.log (600 bytes)" in note
    assert shortened("line\n" * 100, lines=3) == "line\nline\nline\n[…]"
    assert shortened("x" * 50, chars=10) == "x" * 9 + "\n[…]"
    assert shortened("short") == "short"


def test_a_copy_to_many_is_capped_by_max_recipients(
    make_config: Callable[..., Path], sink: SmtpSink
) -> None:
    """With max_recipients = 3 a copy reaches the first three other participants."""
    config = make_config(outbound_section(sink, "max_recipients = 3") + DESK_SECTION)
    with RunningMaild(load_settings(config)) as maild:
        first = opened(maild, sink, cc=f"{BOB}, {CAROL}")
        dave = "dave@customer.example"
        add_participants(maild, 2, dave, "erin@customer.example")
        maild.send(follow_up(first), [SUPPORT], sender=ALICE)
        (copy,) = drain(maild, sink, 1)
        row = maild.ticket(2)["acknowledgements"][-1]
    assert copy.rcpt_tos == [BOB, CAROL, dave]
    assert row["reason"] is None
    assert Counter(r["status"] for r in row["recipients"]) == {"sent": 3}


# The solved notice.


def test_solving_tells_the_requester_and_a_reply_to_the_notice_reopens(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """set --status solved: Alice alone gets the notice (from the desk, automatic); her
    reply to it reopens the ticket and is copied to Bob and Carol."""
    opened(desk, sink)
    result = desk.change(2, status=TicketStatus.SOLVED)
    assert result.notice is not None
    assert result.notice.outmail.status == "pending"
    (notice,) = drain(desk, sink, 1)
    assert notice.rcpt_tos == [ALICE]
    assert notice.header("From") == f"Altis Support <{SUPPORT}>"
    assert notice.header("Subject") == "[#2] Staging is slow"
    assert notice.header("Auto-Submitted") == "auto-generated"
    assert "We have marked ticket #2 as solved:" in notice.body
    assert "reply to this email: your reply reopens the\nticket." in notice.body.replace(
        "\r\n", "\n"
    )
    again = desk.change(2, status=TicketStatus.SOLVED)  # nothing changes: no second notice
    assert (again.events, again.notice) == ([], None)
    answer = mail(
        "Re: [#2] Staging is slow", body="Still slow.", In_Reply_To=notice.header("Message-ID")
    )
    desk.send(answer, [SUPPORT], sender=ALICE)
    (copy,) = drain(desk, sink, 1)
    assert copy.rcpt_tos == [BOB, CAROL]
    view = desk.ticket(2)
    assert view["status"] == "open"
    assert [m["kind"] for m in view["messages"]][-3:] == ["solved", "human", "copy"]


def test_a_ticket_a_program_opened_gets_no_solved_notice(
    desk: RunningMaild, sink: SmtpSink
) -> None:
    """A monitoring alert's ticket solved: its sender is told nothing."""
    desk.send(mail("CRITICAL: disk", Auto_Submitted="auto-generated"), [SUPPORT], sender=ALICE)
    desk.settle()
    result = desk.change(1, status=TicketStatus.SOLVED)
    assert [e.field for e in result.events] == ["status"]
    assert result.notice is None
    time.sleep(1.2)
    assert sink.received == []


@pytest.mark.usefixtures("quiet_logging")
def test_tickets_set_solved_says_the_notice_was_queued(desk: RunningMaild, sink: SmtpSink) -> None:
    """The CLI names the notice's outbox row; `tickets solve` (its shortcut) does too."""
    from click.testing import CliRunner

    from maild.cli import main

    opened(desk, sink, cc=BOB)
    config = str(desk.settings.source)
    done = CliRunner().invoke(
        main,
        [
            "tickets",
            "set",
            "2",
            "--status",
            "solved",
            "--by",
            "jo@altis-dxp.com",
            "--config",
            config,
        ],
    )
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [
        "status: open → solved",
        "solved notice to the requester queued as mail 3",
    ]
    (notice,) = drain(desk, sink, 1)
    assert notice.rcpt_tos == [ALICE]
