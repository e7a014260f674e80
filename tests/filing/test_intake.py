"""From accepted mail to tickets: dedup, routing of several recipients, threading, reopening."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import select

from maild.enums import TicketStatus
from maild.filing.intake import Filed, FilingContext, file_batch
from maild.mail.parsing import ParsedMessage, parse_message
from maild.receive.spool import Delivery, insert_deliveries
from maild.routing.rules import load_rules
from maild.store.database import Database
from maild.store.models import Inbound, Message
from maild.store.tickets import show_ticket
from tests.conftest import RunningMaild, change, mail


def statuses(maild: RunningMaild) -> list[str]:
    rows = maild.service.database.run_read(
        lambda s: s.exec(select(Inbound.status).order_by(Inbound.id)).all()
    )
    return list(rows)


def close(maild: RunningMaild, ticket_id: int, status: TicketStatus = TicketStatus.CLOSED) -> None:
    maild.change(ticket_id, status=status)


Items = list[tuple[int, ParsedMessage | BaseException]]


def deliver(database: Database, *messages: Any) -> Items:
    """Spool these messages (from alice, to support@) and parse them: file_batch's items."""
    deliveries = [
        Delivery("smtp", "alice@customer.example", ["support@altis-dxp.com"], m.as_bytes())
        for m in messages
    ]
    ids = database.run_write(lambda s: insert_deliveries(s, deliveries))
    return [(i, parse_message(d.raw)) for i, d in zip(ids, deliveries, strict=True)]


def file_now(database: Database, table: Any, *messages: Any) -> list[Filed]:
    """Spool and parse these messages (deliver), then file them in one batch."""
    items = deliver(database, *messages)
    return database.run_write(partial(file_batch, context=FilingContext(table), items=items))


def file_while_held(
    table: Any, first: tuple[Database, Items], second: tuple[Database, Items]
) -> tuple[list[Filed], list[Filed]]:
    """The first filer files its items and keeps its transaction open; the second files
    its own meanwhile, and must wait until the first commits. What each filed."""
    (first_db, first_items), (second_db, second_items) = first, second
    waited: list[list[Filed]] = []
    with first_db.write_session() as session:
        filed = file_batch(session, FilingContext(table), first_items)
        session.flush()
        racer = threading.Thread(
            target=lambda: waited.append(
                second_db.run_write(
                    partial(file_batch, context=FilingContext(table), items=second_items)
                )
            )
        )
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the second filer did not wait for the first"
        session.commit()
    racer.join(10)
    return filed, waited[0]


def test_reply_with_in_reply_to_joins_the_ticket(maild: RunningMaild) -> None:
    """A reply naming the first message in In-Reply-To lands in the same ticket."""
    first = mail("Backups missing")
    maild.send(first, ["support@altis-dxp.com"])
    reply = mail("Re: Backups missing", body="Any news?", In_Reply_To=first["Message-ID"])
    maild.send(reply, ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    assert ticket["message_count"] == 2
    texts = [m["text"] for m in maild.ticket(ticket["id"])["messages"]]
    assert texts == ["Hello, our site is slow.", "Any news?"]


def test_reply_with_only_references_joins_the_ticket(maild: RunningMaild) -> None:
    """A client that sets only References (folded, several ids) still threads."""
    first = mail("Deploy stuck")
    maild.send(first, ["hosting@altis-dxp.com"])
    reply = (
        "From: alice@customer.example\r\nTo: hosting@altis-dxp.com\r\n"
        "Subject: Deploy stuck, again\r\nMessage-ID: <second@customer.example>\r\n"
        f"References: <unrelated@elsewhere.example>,\r\n {first['Message-ID']}\r\n\r\nStill.\r\n"
    )
    with maild.smtp() as client:
        client.sendmail("alice@customer.example", ["hosting@altis-dxp.com"], reply.encode())
    maild.settle()
    (ticket,) = maild.tickets()
    assert ticket["message_count"] == 2


def test_reply_from_a_colleague_by_headers_joins_and_adds_them(maild: RunningMaild) -> None:
    """Header threading does not depend on who replies; a new sender becomes a participant."""
    first = mail("Cache purge")
    maild.send(first, ["support@altis-dxp.com"])
    reply = mail(
        "Re: Cache purge",
        frm="Carol <carol@customer.example>",
        In_Reply_To=first["Message-ID"],
    )
    maild.send(reply, ["support@altis-dxp.com"], sender="carol@customer.example")
    maild.settle()
    (ticket,) = maild.tickets()
    people = {(p["email"], p["role"]) for p in maild.ticket(ticket["id"])["participants"]}
    assert people == {("alice@customer.example", "requester"), ("carol@customer.example", "cc")}


def test_subject_tag_threads_for_a_participant(maild: RunningMaild) -> None:
    """`[#ID]` in the subject joins ticket ID when the sender already takes part in it."""
    maild.send(mail("DNS question"), ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    maild.send(mail(f"More about DNS [#{ticket['id']}]"), ["support@altis-dxp.com"])
    maild.settle()
    (again,) = maild.tickets()
    assert again["message_count"] == 2


def test_subject_tag_from_a_stranger_opens_a_new_ticket(maild: RunningMaild) -> None:
    """Guessing a ticket number never joins someone else's ticket."""
    maild.send(mail("Private matter"), ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    intruder = mail(f"Re: [#{ticket['id']}] hello", frm="mallory@evil.example")
    maild.send(intruder, ["support@altis-dxp.com"], sender="mallory@evil.example")
    maild.settle()
    tickets = maild.tickets()
    assert len(tickets) == 2
    assert maild.ticket(ticket["id"])["message_count"] == 1


def test_unknown_references_open_a_new_ticket(maild: RunningMaild) -> None:
    """A reply to a message we never stored starts a ticket of its own."""
    maild.send(
        mail("Re: old thread", In_Reply_To="<never-seen@elsewhere.example>"),
        ["support@altis-dxp.com"],
    )
    maild.settle()
    (ticket,) = maild.tickets()
    assert ticket["subject"] == "Re: old thread"


def test_same_message_id_twice_is_stored_once(maild: RunningMaild) -> None:
    """An MTA retry of the same message files nothing new; the delivery is marked duplicate."""
    message = mail("Retry me")
    maild.send(message, ["support@altis-dxp.com"])
    maild.settle()
    maild.send(message, ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    assert ticket["message_count"] == 1
    assert statuses(maild) == ["processed", "duplicate"]


def test_message_without_message_id_is_deduplicated_by_its_bytes(maild: RunningMaild) -> None:
    """Without a Message-ID, the same bytes delivered twice still make one message."""
    raw = (
        b"From: alice@customer.example\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: no id\r\n\r\nbody\r\n"
    )
    for _ in range(2):
        with maild.smtp() as client:
            client.sendmail("alice@customer.example", ["support@altis-dxp.com"], raw)
    maild.settle()
    (ticket,) = maild.tickets()
    (message,) = maild.ticket(ticket["id"])["messages"]
    assert message["message_id"].startswith("<sha256-")
    assert statuses(maild) == ["processed", "duplicate"]


def test_one_message_to_several_desk_addresses_makes_one_ticket_at_the_highest_priority(
    maild: RunningMaild,
) -> None:
    """support@ + sysops@ in one envelope: one ticket, urgent incident, route sysops."""
    message = mail("Outage, FYI support", to="support@altis-dxp.com", Cc="sysops@humanmade.com")
    maild.send(message, ["support@altis-dxp.com", "sysops@humanmade.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    assert (ticket["type"], ticket["priority"], ticket["rule"]) == ("incident", "urgent", "sysops")


def test_priority_ties_go_to_the_first_route_in_the_table(maild: RunningMaild) -> None:
    """support@ and hosting@ are both normal: support comes first in the table and wins."""
    maild.send(mail("Tie"), ["hosting@altis-dxp.com", "support@humanmade.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    assert (ticket["rule"], ticket["type"]) == ("support", "question")


def test_same_message_reaching_a_second_address_later_raises_the_priority(
    maild: RunningMaild,
) -> None:
    """When the sender's MTA splits one message per address, the sysops@ copy still counts."""
    message = mail("Split delivery")
    maild.send(message, ["support@altis-dxp.com"])
    maild.settle()
    maild.send(message, ["sysops@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    assert (ticket["priority"], ticket["message_count"]) == ("urgent", 1)


def test_cc_and_other_to_addresses_become_participants_but_desk_addresses_do_not(
    maild: RunningMaild,
) -> None:
    """Everyone who should get copies is recorded; our own desk addresses are not people."""
    message = mail(
        "Loop in Bob",
        to="support@altis-dxp.com, Dana <dana@customer.example>",
        Cc="Bob <Bob@Customer.example>, hosting@humanmade.com",
    )
    maild.send(message, ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    people = maild.ticket(ticket["id"])["participants"]
    assert people == [
        {"email": "alice@customer.example", "name": "Alice Example", "role": "requester"},
        {"email": "dana@customer.example", "name": "Dana", "role": "cc"},
        {"email": "bob@customer.example", "name": "Bob", "role": "cc"},
    ]


def test_reply_to_a_closed_ticket_reopens_it(maild: RunningMaild) -> None:
    """A customer's reply brings a closed (or solved) ticket back to open."""
    first = mail("Please reopen")
    maild.send(first, ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    for status in (TicketStatus.CLOSED, TicketStatus.SOLVED):
        close(maild, ticket["id"], status)
        assert maild.ticket(ticket["id"])["status"] == status.value
        maild.send(
            mail("Re: Please reopen", In_Reply_To=first["Message-ID"]), ["support@altis-dxp.com"]
        )
        maild.settle()
        assert maild.ticket(ticket["id"])["status"] == "open"


def test_what_filing_changes_is_in_the_tickets_history(maild: RunningMaild) -> None:
    """A customer's reply reopening a solved ticket, and a reply to sysops@ raising it, are
    events beside the desk's own changes: who (the sender), what, old and new."""
    first = mail("Cache stale")
    maild.send(first, ["support@altis-dxp.com"])
    maild.settle()
    (ticket,) = maild.tickets()
    close(maild, ticket["id"], TicketStatus.SOLVED)
    maild.send(mail("Re: Cache stale", In_Reply_To=first["Message-ID"]), ["support@altis-dxp.com"])
    maild.settle()
    maild.send(
        mail(
            "Re: Cache stale, now down", to="sysops@altis-dxp.com", In_Reply_To=first["Message-ID"]
        ),
        ["sysops@altis-dxp.com"],
    )
    maild.settle()
    events = [
        (e["field"], e["old"], e["new"], e["by"]) for e in maild.ticket(ticket["id"])["events"]
    ]
    assert events[1:] == [
        ("status", "solved", "open", "alice@customer.example"),
        ("priority", "normal", "urgent", "alice@customer.example"),
    ]
    assert events[0][:3] == ("status", "open", "solved")


def test_html_only_and_attachment_only_mail_make_useful_tickets(maild: RunningMaild) -> None:
    """No blank tickets: HTML becomes text, an attachment-only message keeps its file."""
    html = mail("HTML only")
    html.set_content("<p>Site <b>down</b></p><script>alert(1)</script>", subtype="html")
    maild.send(html, ["support@altis-dxp.com"])
    bare = mail("Log only")
    bare.clear_content()
    bare.add_attachment(b"fatal error\n", maintype="text", subtype="plain", filename="error.log")
    maild.send(bare, ["support@altis-dxp.com"])
    maild.settle()
    by_subject = {t["subject"]: maild.ticket(t["id"]) for t in maild.tickets()}
    assert by_subject["HTML only"]["messages"][0]["text"] == "Site down"
    (attachment,) = by_subject["Log only"]["messages"][0]["attachments"]
    assert (attachment["filename"], attachment["size"]) == ("error.log", 12)


def test_two_filers_of_one_delivery_file_it_once(database_url: str, rules_dir: Path) -> None:
    """The daemon and `maild ingest` (or two instances) racing on one delivery file it once.

    The first filer holds its transaction open; the second must wait for it and
    then skip the delivery, not file it again as a duplicate of itself.
    """
    table = load_rules(rules_dir)
    first_db, second_db = Database(database_url), Database(database_url)
    first_db.create_schema()
    items = deliver(first_db, mail("Filed once"))
    ((inbound_id, _),) = items
    try:
        first, second = file_while_held(table, (first_db, items), (second_db, items))
        assert [f.outcome for f in first] == ["created"]
        assert second == []
        row = first_db.run_read(lambda s: s.get(Inbound, inbound_id))
        assert row is not None
        assert (row.status, row.attempts) == ("processed", 1)
        assert first_db.run_read(lambda s: len(s.exec(select(Message)).all())) == 1
    finally:
        first_db.close()
        second_db.close()


def test_a_failure_in_a_batch_stays_with_its_delivery(database_url: str, rules_dir: Path) -> None:
    """One batch: a new ticket, a delivery no route takes, an unparsable one, and a reply
    to the first. The batch is filed again delivery by delivery once one of them
    fails; the reply still finds the ticket filed earlier in the same batch, the
    failures are marked with their own errors, and every attempt counts once."""
    table = load_rules(rules_dir)
    database = Database(database_url)
    database.create_schema()
    first = mail("Disk full")
    reply = mail("Re: Disk full", body="Still full", In_Reply_To=first["Message-ID"])
    stray = mail("For nobody", to="nobody@altis-dxp.com")
    deliveries = [
        Delivery("smtp", "alice@customer.example", [rcpt], message.as_bytes())
        for message, rcpt in (
            (first, "support@altis-dxp.com"),
            (stray, "nobody@altis-dxp.com"),  # accepted under older rules, routed by none now
            (reply, "support@altis-dxp.com"),
            (reply, "support@altis-dxp.com"),  # stands in for a message the parser gave up on
        )
    ]
    try:
        ids = database.run_write(lambda s: insert_deliveries(s, deliveries))
        items: list[tuple[int, ParsedMessage | BaseException]] = [
            (ids[0], parse_message(deliveries[0].raw)),
            (ids[1], parse_message(deliveries[1].raw)),
            (ids[2], parse_message(deliveries[2].raw)),
            (ids[3], TimeoutError("parsing took longer than 60 s")),
        ]
        filed = database.run_write(partial(file_batch, context=FilingContext(table), items=items))
        assert [(f.inbound_id, f.outcome) for f in filed] == [
            (ids[0], "created"),
            (ids[1], "failed"),
            (ids[2], "threaded"),
            (ids[3], "failed"),
        ]
        assert filed[2].ticket_id == filed[0].ticket_id
        assert filed[1].error is not None
        assert "no route for nobody@altis-dxp.com" in filed[1].error
        assert filed[3].error == "parse: TimeoutError: parsing took longer than 60 s"
        rows = database.run_read(
            lambda s: s.exec(
                select(Inbound.status, Inbound.attempts, Inbound.ticket_id).order_by(Inbound.id)
            ).all()
        )
        ticket = filed[0].ticket_id
        assert [tuple(r) for r in rows] == [
            ("processed", 1, ticket),
            ("failed", 1, None),
            ("processed", 1, ticket),
            ("failed", 1, None),
        ]
        assert database.run_read(lambda s: len(s.exec(select(Message)).all())) == 2
    finally:
        database.close()


def test_one_batch_sees_what_it_filed_itself(database_url: str, rules_dir: Path) -> None:
    """Filed together in one transaction, with its lookups made once and its rows written
    at the end: each delivery still sees what the ones before it in the batch did.

    A reply reopens a solved ticket and adds Carol; Carol's next mail finds the ticket
    by its subject tag (she is on it now, though not yet written); the same message
    delivered twice is one duplicate; and a reply to a new ticket of the same batch
    joins it. Nothing here fails, so no delivery is filed a second time."""
    table = load_rules(rules_dir)
    database = Database(database_url)
    database.create_schema()
    file = partial(file_now, database, table)

    try:
        first = mail("Disk full")
        (earlier,) = file(first)
        ticket = earlier.ticket_id
        assert ticket is not None
        change(database, ticket, status=TicketStatus.SOLVED)

        carol = "Carol Example <carol@customer.example>"
        reopening = mail("Re: Disk full", frm=carol, In_Reply_To=first["Message-ID"])
        tagged = mail(f"[#{ticket}] one more thing", frm=carol)
        fresh = mail("Certificate expired")
        answer = mail("Re: Certificate expired", In_Reply_To=fresh["Message-ID"])
        savepoints: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("SAVEPOINT"):
                savepoints.append(statement)

        event.listen(database.write_engine, "before_cursor_execute", count)
        filed = file(reopening, tagged, tagged, fresh, answer)
        event.remove(database.write_engine, "before_cursor_execute", count)
        assert len(savepoints) == 1, "the batch was filed again one by one"

        assert [(f.outcome, f.threaded_by) for f in filed] == [
            ("threaded", "in-reply-to"),
            ("threaded", "subject-tag"),
            ("duplicate", None),
            ("created", None),
            ("threaded", "in-reply-to"),
        ]
        assert [f.ticket_id for f in filed[:3]] == [ticket] * 3
        assert filed[4].ticket_id == filed[3].ticket_id != ticket
        view = database.run_read(lambda s: show_ticket(s, ticket))
        assert view["status"] == "open"
        assert [p["email"] for p in view["participants"]] == [
            "alice@customer.example",
            "carol@customer.example",
        ]
        assert view["message_count"] == 3
        rows = database.run_read(
            lambda s: s.exec(
                select(Inbound.status, Inbound.attempts, Inbound.ticket_id).order_by(Inbound.id)
            ).all()
        )
        assert [tuple(r) for r in rows[1:]] == [
            ("processed", 1, ticket),
            ("processed", 1, ticket),
            ("duplicate", 1, ticket),
            ("processed", 1, filed[3].ticket_id),
            ("processed", 1, filed[3].ticket_id),
        ]
    finally:
        database.close()


def test_a_second_filer_sees_the_reopening_of_the_first(database_url: str, rules_dir: Path) -> None:
    """Two filers of replies to one solved ticket at once (two workers on PostgreSQL):
    the customer's reply reopens it; the out-of-office reply filed meanwhile must
    wait for that and leave the ticket open, not write back the `solved` it would
    have read before. (On SQLite writers take turns whole, so this is PostgreSQL's.)"""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one writer at a time; the race needs PostgreSQL")
    table = load_rules(rules_dir)
    first_db, second_db = Database(database_url), Database(database_url)
    first_db.create_schema()

    try:
        first = mail("Site down")
        (created,) = first_db.run_write(
            partial(file_batch, context=FilingContext(table), items=deliver(first_db, first))
        )
        ticket = created.ticket_id
        assert ticket is not None
        change(first_db, ticket, status=TicketStatus.SOLVED)
        human = deliver(first_db, mail("Re: Site down", In_Reply_To=first["Message-ID"]))
        away = deliver(
            second_db,
            mail(
                "Out of office: Re: Site down",
                In_Reply_To=first["Message-ID"],
                Auto_Submitted="auto-replied",
            ),
        )
        (reopening,), second = file_while_held(table, (first_db, human), (second_db, away))
        assert reopening.outcome == "threaded"
        assert [(f.outcome, f.kind) for f in second] == [("threaded", "auto")]
        view = first_db.run_read(lambda s: show_ticket(s, ticket))
        assert view["status"] == "open"
        assert view["message_count"] == 3
    finally:
        first_db.close()
        second_db.close()


def test_a_batch_of_new_tickets_is_one_insert_on_sqlite(database_url: str, rules_dir: Path) -> None:
    """On SQLite a batch's new tickets go in together, with the ids counted from the largest
    stored: the ones SQLite would give, in the batch's order, each message on its own
    ticket. PostgreSQL draws each id from its sequence, one INSERT per ticket."""
    table = load_rules(rules_dir)
    database = Database(database_url)
    database.create_schema()
    file = partial(file_now, database, table)

    try:
        (before,) = file(mail("The first"))
        assert before.ticket_id is not None
        inserts: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("INSERT INTO ticket "):
                inserts.append(statement)

        event.listen(database.write_engine, "before_cursor_execute", count)
        filed = file(mail("Second"), mail("Third"), mail("Fourth"))
        event.remove(database.write_engine, "before_cursor_execute", count)
        ids = [f.ticket_id for f in filed]
        assert ids == [before.ticket_id + 1, before.ticket_id + 2, before.ticket_id + 3]
        assert len(inserts) == (1 if database.write_engine.dialect.name == "sqlite" else 3)
        subjects = database.run_read(
            lambda s: [show_ticket(s, i)["subject"] for i in ids if i is not None]
        )
        assert subjects == ["Second", "Third", "Fourth"]
    finally:
        database.close()
