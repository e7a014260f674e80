"""`maild tickets reply`: an agent's answer from the command line, mailed through a real
SMTP smarthost (tests/sink.py) by a running maild; internal notes never leave."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlmodel import col, select

from maild.cli import main
from maild.config import load_settings
from maild.outbound.acks import make_token
from maild.store.models import Attachment, Blob, Outmail, OutmailRecipient
from tests.conftest import RunningMaild, mail, wait_until
from tests.daemon import Daemon
from tests.outbound.test_acks import SECRET, outbound_section
from tests.outbound.test_correspondence import DESK_SECTION, drain, opened
from tests.sink import SmtpSink

SUPPORT = "support@altis-dxp.com"
ALICE = "alice@customer.example"
BOB = "bob@customer.example"
CAROL = "carol@customer.example"
JO = "Jo Bloggs <jo@altis-dxp.com>"


@pytest.fixture(autouse=True)
def _quiet(quiet_logging: None) -> None:
    """The CLI reconfigures logging; keep the in-process daemon's logs off stdout."""


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture
def config(make_config: Callable[..., Path], sink: SmtpSink) -> Path:
    return make_config(outbound_section(sink) + DESK_SECTION)


@pytest.fixture
def desk(config: Path) -> Iterator[RunningMaild]:
    with RunningMaild(load_settings(config)) as running:
        yield running


def reply(config: Path, *args: str, body: str | None = "We purged the cache.\n") -> Result:
    command = ["tickets", "reply", *args, "--config", str(config)]
    if body is not None:
        command[3:3] = ["--body-file", "-"]
    return CliRunner().invoke(main, command, input=body)


def test_a_reply_reaches_the_requester_and_both_ccs_once_threaded(
    config: Path, desk: RunningMaild, sink: SmtpSink
) -> None:
    """One mail to Alice, Bob and Carol: from the desk address in Jo's name, the ticket's
    reply address, [#2] subject, In-Reply-To the latest message, References the thread."""
    first = opened(desk, sink)
    done = reply(config, "2", "--from", JO, "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert (result["ticket"], result["kind"], result["status"]) == (2, "agent", "pending")
    (sent,) = drain(desk, sink, 1)
    token = make_token(SECRET.encode(), 2)
    assert sent.rcpt_tos == [ALICE, BOB, CAROL]
    assert sent.mail_from == f"support+{token}@altis-dxp.com"
    assert sent.header("From") == f"Jo Bloggs via Altis Support <{SUPPORT}>"
    assert sent.header("To") == f"Alice Example <{ALICE}>"
    assert sent.header("Cc") == f"Bob <{BOB}>, Carol <{CAROL}>"
    assert sent.header("Reply-To") == f"support+{token}@altis-dxp.com"
    assert sent.header("Subject") == "[#2] Staging is slow"
    view = desk.ticket(2)
    ack_id = view["messages"][1]["message_id"]
    assert sent.header("In-Reply-To") == ack_id
    assert sent.header("References").split() == [first, ack_id]
    assert sent.message["Auto-Submitted"] is None  # a person wrote it (RFC 3834)
    assert sent.message["Precedence"] is None
    assert sent.header("X-Maild-Loop") == desk.service.acks.loop_id
    body = sent.body.replace("\r\n", "\n")
    assert body.startswith("We purged the cache.\n\n-- \nJo Bloggs\nAltis Support\n")
    wait_until(lambda: desk.ticket(2)["acknowledgements"][-1]["status"] == "sent")
    view = desk.ticket(2)
    agent = view["messages"][-1]
    assert (agent["direction"], agent["kind"], agent["text"]) == (
        "outbound",
        "agent",
        "We purged the cache.\n",
    )
    assert agent["from"] == {"name": "Jo Bloggs", "email": "jo@altis-dxp.com"}
    assert agent["message_id"] == sent.header("Message-ID")
    assert view["status"] == "open"  # an answer does not change the status
    assert "jo@altis-dxp.com" not in [p["email"] for p in view["participants"]]


def test_an_internal_note_is_stored_and_never_sent(
    config: Path, desk: RunningMaild, sink: SmtpSink
) -> None:
    """--internal: a note (direction internal) on the ticket, no outbox row, nothing mailed."""
    opened(desk, sink)
    done = reply(config, "2", "--from", JO, "--internal", body="Check billing first.\n")
    assert done.exit_code == 0, done.output
    assert done.stdout == "ticket 2: internal note stored as message 5; not mailed\n"
    time.sleep(1.5)  # the mailer polls every second
    assert sink.received == []
    note = desk.ticket(2)["messages"][-1]
    assert (note["direction"], note["kind"], note["text"]) == (
        "internal",
        "note",
        "Check billing first.\n",
    )
    rows = desk.service.database.run_read(lambda s: s.exec(select(Outmail)).all())
    assert [r.kind for r in rows] == ["ack", "ack"]
    reply(config, "2", "--from", JO, body="Public answer.\n")
    shown = CliRunner().invoke(main, ["tickets", "show", "2", "--config", str(config)])
    assert "(internal note, never sent)" in shown.stdout
    assert "(reply, sent by maild)" in shown.stdout
    assert "  acknowledgement 2: " in shown.stdout
    assert "  reply 3: " in shown.stdout


def test_cc_adds_participants_who_get_the_reply(
    config: Path, desk: RunningMaild, sink: SmtpSink
) -> None:
    """--cc adds Dan as a participant; the reply goes to him too; the agent is not added."""
    opened(desk, sink, cc=BOB)
    done = reply(config, "2", "--from", JO, "--cc", "Dan <dan@partner.example>", "--cc", BOB)
    assert done.exit_code == 0, done.output
    (sent,) = drain(desk, sink, 1)
    assert sent.rcpt_tos == [ALICE, BOB, "dan@partner.example"]
    people = {p["email"]: p["role"] for p in desk.ticket(2)["participants"]}
    assert people == {ALICE: "requester", BOB: "cc", "dan@partner.example": "cc"}


def test_attachments_are_sent_and_kept_under_their_file_name(
    config: Path, desk: RunningMaild, sink: SmtpSink, tmp_path: Path
) -> None:
    """--attach sends the exact bytes under the file's own name (no folder) and keeps them."""
    opened(desk, sink, cc=BOB)
    folder = tmp_path / "secret-folder"
    folder.mkdir()
    data = bytes(range(256)) * 40
    (folder / "trace.bin").write_bytes(data)
    done = reply(config, "2", "--from", JO, "--attach", str(folder / "trace.bin"))
    assert done.exit_code == 0, done.output
    (sent,) = drain(desk, sink, 1)
    (part,) = sent.message.iter_attachments()
    assert (part.get_filename(), part.get_content()) == ("trace.bin", data)
    assert b"secret-folder" not in sent.raw
    (att,) = desk.ticket(2)["messages"][-1]["attachments"]
    assert (att["filename"], att["size"]) == ("trace.bin", len(data))
    blob = desk.service.database.run_read(
        lambda s: s.exec(select(Blob).where(Blob.sha256 == att["sha256"])).one().data
    )
    assert blob == data


@pytest.mark.parametrize(
    ("args", "body", "message"),
    [
        (["--from", "eve@elsewhere.example"], "hi", "--from: eve@elsewhere.example is not one of"),
        (["--from", "not an address"], "hi", "--from: 'not an address' is not an email address"),
        (["--from", JO], "  \n", "the reply is empty"),
        (["--from", JO, "--cc", "hosting@humanmade.com"], "hi", "one of the desk's own"),
        (["--from", JO, "--cc", "support+7-x@altis-dxp.com"], "hi", "one of the desk's own"),
        (["--from", JO, "--internal", "--cc", BOB], "hi", "an internal note is sent to nobody"),
    ],
)
def test_a_reply_that_cannot_be_made_exits_2_saying_why_and_stores_nothing(
    config: Path, desk: RunningMaild, sink: SmtpSink, args: list[str], body: str, message: str
) -> None:
    """Not an agent, no text, a desk address in --cc, --cc on a note: exit 2, nothing sent."""
    opened(desk, sink)
    done = reply(config, "2", *args, body=body)
    assert done.exit_code == 2, done.output
    assert message in done.stderr
    assert len(desk.ticket(2)["messages"]) == 2
    time.sleep(1.2)
    assert sink.received == []


def test_an_unknown_ticket_exits_1_and_mail_off_exits_78(
    config: Path, desk: RunningMaild, sink: SmtpSink, tmp_path: Path
) -> None:
    """No ticket 99: exit 1. No smarthost: a public reply exits 78; a note still works."""
    opened(desk, sink)
    missing = reply(config, "99", "--from", JO)
    assert (missing.exit_code, missing.stderr) == (1, "maild: no ticket 99\n")
    off = tmp_path / "off.toml"
    off.write_text(config.read_text().replace(f'smarthost = "{sink.address}"', ""))
    refused = reply(off, "2", "--from", JO)
    assert refused.exit_code == 78, refused.output
    assert "set [outbound] smarthost" in refused.stderr
    note = reply(off, "2", "--from", JO, "--internal")
    assert note.exit_code == 0, note.output


def test_a_reply_to_a_ticket_with_an_undeliverable_cc_skips_it(
    config: Path, desk: RunningMaild, sink: SmtpSink
) -> None:
    """Bob refused by the smarthost once: the reply is not sent to him again, and says why."""
    opened(desk, sink, cc=BOB)

    def mark(session: object) -> None:
        from maild.outbound.outgoing import mark_undeliverable
        from maild.store.models import utcnow

        mark_undeliverable(session, 2, BOB, "550 5.1.1 no such user", utcnow())  # type: ignore[arg-type]

    desk.service.database.run_write(mark)
    done = reply(config, "2", "--from", JO, "--json")
    result = json.loads(done.stdout)
    assert result["recipients"] == [
        {"email": ALICE, "status": "pending", "error": None},
        {"email": BOB, "status": "withheld", "error": "undeliverable (a bounce said so)"},
    ]
    (sent,) = drain(desk, sink, 1)
    assert sent.rcpt_tos == [ALICE]


@pytest.mark.slow
def test_a_restart_between_two_recipients_sends_no_duplicate(
    config: Path, sink: SmtpSink, tmp_path: Path
) -> None:
    """Alice and Bob accepted, Carol deferred; maild killed after recording them; after the
    restart only Carol is sent the reply: each got exactly one copy."""
    with Daemon(config, tmp_path / "first.log") as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            client.send_message(mail("Hello"), ALICE, [SUPPORT])
            sink.wait_for(1)
            client.send_message(mail("Staging is slow", Cc=f"{BOB}, {CAROL}"), ALICE, [SUPPORT])
            sink.wait_for(2)
        sink.behaviour.rcpt_replies = {CAROL: "450 4.2.1 mailbox busy, try later"}
        done = reply(config, "2", "--from", JO)
        assert done.exit_code == 0, done.output

        def recorded() -> bool:
            states = _states(config)
            return states.get(ALICE) == "sent" and states.get(BOB) == "sent"

        wait_until(recorded, 30, "alice and bob recorded as sent")
        daemon.kill()
    assert _states(config)[CAROL] == "pending"
    sink.behaviour.rcpt_replies = {}
    with Daemon(config, tmp_path / "second.log"):
        wait_until(lambda: _states(config)[CAROL] == "sent", 30, "carol sent after the restart")
    replies = [r for r in sink.received if "We purged the cache." in r.body]
    got = sorted(a for r in replies for a in r.rcpt_tos)
    assert got == [ALICE, BOB, CAROL]
    assert len({r.header("Message-ID") for r in replies}) == 1


def _states(config: Path) -> dict[str, str]:
    """The reply's recipients and their states, read from the database the config names."""
    from maild.store.database import Database

    settings = load_settings(config)
    database = Database(settings.database.url, settings.database.busy_timeout)
    try:
        return database.run_read(
            lambda s: {
                r.email: r.status
                for r in s.exec(
                    select(OutmailRecipient)
                    .join(Outmail, col(Outmail.id) == col(OutmailRecipient.outmail_id))
                    .where(Outmail.kind == "agent")
                ).all()
            }
        )
    finally:
        database.close()


def test_a_note_keeps_its_attachment(
    config: Path, desk: RunningMaild, sink: SmtpSink, tmp_path: Path
) -> None:
    """--internal --attach: the file is kept on the note, and nothing is sent."""
    opened(desk, sink)
    (tmp_path / "notes.txt").write_text("internal")
    done = reply(config, "2", "--from", JO, "--internal", "--attach", str(tmp_path / "notes.txt"))
    assert done.exit_code == 0, done.output
    rows = desk.service.database.run_read(lambda s: s.exec(select(Attachment)).all())
    assert [r.filename for r in rows] == ["notes.txt"]
