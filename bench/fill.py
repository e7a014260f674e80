"""Fill an empty maild database with N stored messages, for the benchmark's scale rows.

The question the scale rows answer: does filing stay as fast at 1,000,000
stored messages as on an empty desk? Filing looks up every new message's
Message-ID (dedup) and its In-Reply-To/References (threading) among all stored
ones, so those lookups must stay index lookups. Sending a million messages
through SMTP to get there would take hours; this writes the rows directly, in
the shapes maild's own filing (maild/intake.py) leaves for ordinary human mail
to support@altis-dxp.com:

- `ticket`: one per about four messages, opened by its first message (type,
  priority and route from the shipped rules table, as routing decides them);
- `participant`: the requester of each ticket (replies come from the requester,
  so filing adds nobody else);
- `inbound`: the accepted SMTP delivery, processed and filed into its ticket,
  with a small valid RFC 5322 message as its raw bytes;
- `message`: inbound human mail, Message-ID `fill-<n>@bench.invalid` stored
  normalised and hashed by maild's own functions; a reply points at the
  ticket's previous message (In-Reply-To) and the whole chain (References).

A ticket's messages are INTERLEAVE messages apart, and the timestamps spread
evenly over the last 90 days. Ids, Message-IDs, senders and subjects do not
depend on N (only the timestamps do), so `message_id(n)` tells the benchmark
client how to write a reply that threads into a stored ticket (In-Reply-To).

The schema is created the way `maild db upgrade` does (maild.store.schema.upgrade).
The rows are made in another process (marshal down a pipe) and go in through
the raw DB-API: executemany in large transactions on SQLite (synchronous=OFF
for the fill only; the file stays in WAL mode), binary COPY FROM STDIN in one
transaction on PostgreSQL (foreign keys and secondary indexes dropped before
and made again after it, id sequences moved past the ids written, ANALYZE).
Only an empty database is filled. The search index (migration 0009) is
written as maild writes it: on SQLite by its triggers, row by row; on
PostgreSQL the generated column during COPY and the GIN index with the
others after it. A million messages take about two minutes on two cores
(40–50 s without the index), on either database; the file or schema holds
about 2.4 GB.

    .venv/bin/python bench/fill.py sqlite:////tmp/maild.db --count 1000000
    .venv/bin/python bench/fill.py postgresql+psycopg://maild@/bench --count 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import marshal
import multiprocessing
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NamedTuple, cast

import psycopg
from psycopg import sql

from maild.enums import Direction, InboundStatus, MessageKind, ParticipantRole, TicketStatus
from maild.errors import MaildError
from maild.filing.intake import SUBJECT_TAG
from maild.mail import hygiene
from maild.mail.message_ids import message_id_hash, normalize_message_id
from maild.mail.parsing import parse_message
from maild.routing.rules import MessageContext, best_decision, load_rules
from maild.store.database import make_engines
from maild.store.models import utcnow
from maild.store.schema import upgrade

SUPPORT = "support@altis-dxp.com"
ID_DOMAIN = "bench.invalid"
RULES = Path(__file__).resolve().parent.parent / "rules"  # the table maild ships (desk.toml)
INTERLEAVE = 100  # tickets open at once: a ticket's next message comes this many messages later
PER_TICKET = 4  # messages per ticket: the first opens it, the others are replies
BLOCK = INTERLEAVE * PER_TICKET
CUSTOMERS = 100_000  # requesters; with more tickets than this, customers write again
MAX_MAKERS = 3  # processes making rows, at most; one per core beside the writer's
SPAN = timedelta(days=90)  # the timestamps spread over this much of the past
FILING_DELAY = timedelta(milliseconds=40)  # from the 250 to the message's filing
DATE_SKEW = timedelta(seconds=3)  # the sender's Date: is a little before we received it
TABLES = ("ticket", "participant", "inbound", "message")  # in the order they are written

TOPICS = (
    "Site slow on production",
    "502 errors on the checkout page",
    "Cannot log in to the dashboard",
    "Deploy stuck in the queue",
    "Certificate renewal for our custom domain",
    "Search results out of date",
    "Media uploads failing",
    "Question about our invoice",
    "Staging environment not responding",
    "Scheduled posts not publishing",
    "Cache not cleared after publishing",
    "Request to add a new editor account",
)

COLUMNS: dict[str, tuple[str, ...]] = {
    "ticket": (
        "id",
        "type",
        "priority",
        "status",
        "subject",
        "requester_email",
        "requester_name",
        "rule",
        "rules_version",
        "created_at",
        "updated_at",
        "application",
        "tags",
    ),
    "participant": (
        "id",
        "ticket_id",
        "email",
        "name",
        "role",
        "created_at",
        "undeliverable_at",
        "undeliverable_reason",
    ),
    "inbound": (
        "id",
        "received_at",
        "protocol",
        "peer",
        "helo",
        "session_id",
        "mail_from",
        "rcpt_tos",
        "size",
        "sha256",
        "status",
        "error",
        "attempts",
        "processed_at",
        "ticket_id",
        "raw",
    ),
    "message": (
        "id",
        "ticket_id",
        "inbound_id",
        "message_id",
        "message_id_hash",
        "message_id_synthesized",
        "in_reply_to",
        "references",
        "from_email",
        "from_name",
        "to",
        "cc",
        "subject",
        "date",
        "text",
        "rule",
        "defects",
        "created_at",
        "direction",
        "kind",
        "auto_reasons",
        "report",
    ),
}

Row = tuple[Any, ...]


class FillError(RuntimeError):
    """The database cannot be filled (it is not empty, or the rows would not be maild's)."""


# -- what the client needs to know about message n (1-based) --------------------------------


def message_id(n: int) -> str:
    """The n-th stored message's Message-ID as written in a header: `<fill-n@bench.invalid>`."""
    _check_n(n)
    return f"<fill-{n}@{ID_DOMAIN}>"


def ticket_id(n: int) -> int:
    """The id of the ticket the n-th stored message is in."""
    _check_n(n)
    block, offset = divmod(n - 1, BLOCK)
    return block * INTERLEAVE + offset % INTERLEAVE + 1


def sender(n: int) -> str:
    """The address the n-th message came from: its ticket's requester (a participant)."""
    return _email(_customer(ticket_id(n)))


def ticket_subject(n: int) -> str:
    """The subject of the n-th message's ticket, as stored (its first message's subject)."""
    return _subject(ticket_id(n))


def tickets_for(count: int) -> int:
    """How many tickets `count` messages make."""
    blocks, rest = divmod(count, BLOCK)
    return blocks * INTERLEAVE + min(rest, INTERLEAVE)


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"messages are numbered from 1, not {n}")


def _customer(ticket: int) -> int:
    return (ticket - 1) % CUSTOMERS + 1


def _email(customer: int) -> str:
    return f"customer{customer}@customer{customer % 1000}.example"


def _subject(ticket: int) -> str:
    return f"{TOPICS[ticket % len(TOPICS)]} ({ticket})"


def _last_message(ticket: int, count: int) -> int:
    """The number of the ticket's last message among the first `count`."""
    block, offset = divmod(ticket - 1, INTERLEAVE)
    first = block * BLOCK + offset + 1
    return first + (min(PER_TICKET, (count - first) // INTERLEAVE + 1) - 1) * INTERLEAVE


# -- one message, as the sender wrote it and as maild stores it --------------------------------

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_OPENING = (  # after the line that says what is wrong
    "Nothing changed on our side that we know of, and it affects every editor on\n"
    "the team. The error log shows nothing unusual and the status page says all is well.\n"
    "Could you have a look and tell us what you find?\n"
    "\n"
    "Thanks,\n"
)
_REPLY = (  # after the line that says it happened again
    "We cleared the cache and redeployed the last release, but the problem\n"
    "came back within the hour. Our visitors notice it, and so does our boss.\n"
    "What else can we send you to help?\n"
    "\n"
    "Best regards,\n"
)


class _Mail(NamedTuple):
    ticket: int
    customer: int
    email: str
    name: str
    message_id: str  # normalised, as stored
    previous: list[str]  # the ticket's earlier messages' ids, oldest first (References)
    subject: str
    date: datetime  # the Date: header, whole seconds (naive UTC, as all times here)
    date_header: str
    text: str  # the body as maild's parser reads it
    raw: bytes


def _rfc5322_date(value: datetime) -> str:
    """email.utils.format_datetime() of a UTC time, in a fifth of the time."""
    return (
        f"{_DAYS[value.weekday()]}, {value.day:02d} {_MONTHS[value.month - 1]} {value.year:04d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d} +0000"
    )


def _mail(n: int, received: datetime) -> _Mail:
    """Message n, received at `received` (naive UTC). Kept lean: it runs a million times."""
    block, offset = divmod(n - 1, BLOCK)
    position, column = divmod(offset, INTERLEAVE)
    ticket = block * INTERLEAVE + column + 1
    customer = (ticket - 1) % CUSTOMERS + 1
    domain = customer % 1000
    email = f"customer{customer}@customer{domain}.example"
    name = f"Customer {customer}"
    topic = TOPICS[ticket % len(TOPICS)]
    clock = f"{received.hour:02d}:{received.minute:02d}"
    if position:
        previous = [f"fill-{n - k * INTERLEAVE}@{ID_DOMAIN}" for k in range(position, 0, -1)]
        subject = f"Re: {topic} ({ticket})"
        thread_headers = (
            f"In-Reply-To: <{previous[-1]}>\r\nReferences: <{'> <'.join(previous)}>\r\n"
        )
        text = (
            f"Hi,\n\na follow-up on ticket {ticket}: it happened again at {clock} UTC.\n"
            f"{_REPLY}{name}"
        )
    else:
        previous = []
        subject = f"{topic} ({ticket})"
        thread_headers = ""
        text = (
            f"Hello,\n\nsince {clock} UTC today we see this on customer{domain}.example: "
            f"{topic.lower()}.\n{_OPENING}{name}"
        )
    date = (received - DATE_SKEW).replace(microsecond=0)
    date_header = _rfc5322_date(date)
    head = (
        f"From: {name} <{email}>\r\n"
        f"To: {SUPPORT}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {date_header}\r\n"
        f"Message-ID: <fill-{n}@{ID_DOMAIN}>\r\n"
        f"{thread_headers}"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    )
    raw = (head + text.replace("\n", "\r\n") + "\r\n").encode()
    return _Mail(
        ticket,
        customer,
        email,
        name,
        normalize_message_id(message_id(n)),
        previous,
        subject,
        date,
        date_header,
        text,
        raw,
    )


def _json_ids(ids: list[str]) -> str:
    """json.dumps() of a list of plain ids (no quotes, backslashes or controls), faster."""
    return '["' + '", "'.join(ids) + '"]' if ids else "[]"


# -- the route support@ mail takes, and a check that the rows are what filing writes ----------


@dataclass(frozen=True)
class _Route:
    name: str
    type: str
    priority: str
    application: str
    tags: list[str]
    rules_version: str


def _route(rules: Path) -> _Route:
    """How maild's routing files the first message; the others take the same route."""
    table = load_rules(rules)
    parsed = parse_message(_mail(1, _utcnow()).raw)
    assert parsed.from_ is not None
    context = MessageContext(
        sender=parsed.from_.email, subject=parsed.subject, headers=tuple(parsed.headers)
    )
    decisions, unrouted = table.decide_all([SUPPORT], context)
    if unrouted or not decisions:
        raise FillError(f"the rules in {rules} do not route {SUPPORT}")
    decision = best_decision(decisions)
    if decision.drop:
        raise FillError(f"the rules in {rules} drop mail to {SUPPORT}")
    if table.is_ours(parsed.from_.email):
        raise FillError(f"the rules in {rules} take the customers' addresses for the desk's")
    return _Route(
        name=decision.name,
        type=decision.type.value,
        priority=decision.priority.value,
        application=decision.application,
        tags=list(decision.tags),
        rules_version=table.version,
    )


def _check_parse(n: int) -> None:
    """maild's parser must read message n as the row we store for it says."""
    mail = _mail(n, _utcnow())
    parsed = parse_message(mail.raw)
    seen = {
        "message_id": parsed.message_id,
        "hash": message_id_hash(parsed.message_id),
        "synthesized": parsed.message_id_synthesized,
        "in_reply_to": parsed.in_reply_to,
        "references": parsed.references,
        "in_reply_to_json": json.dumps(parsed.in_reply_to),
        "references_json": json.dumps(parsed.references),
        "subject": parsed.subject,
        "from": parsed.from_.as_dict() if parsed.from_ else None,
        "to": [a.as_dict() for a in parsed.to],
        "cc": [a.as_dict() for a in parsed.cc],
        "date": parsed.date,
        "date_header": format_datetime(mail.date.replace(tzinfo=UTC)),
        "text": parsed.text,
        "defects": parsed.defects,
        "report": parsed.report,
        "attachments": parsed.attachments,
        "auto_reasons": hygiene.auto_reasons(
            parsed.headers, envelope_sender=mail.email, from_email=mail.email
        ),
        "subject_tags": SUBJECT_TAG.findall(parsed.subject),
    }
    written = {
        "message_id": mail.message_id,
        "hash": message_id_hash(mail.message_id),
        "synthesized": False,
        "in_reply_to": mail.previous[-1:],
        "references": mail.previous,
        "in_reply_to_json": _json_ids(mail.previous[-1:]),
        "references_json": _json_ids(mail.previous),
        "subject": mail.subject,
        "from": {"name": mail.name, "email": mail.email},
        "to": [{"name": "", "email": SUPPORT}],
        "cc": [],
        "date": mail.date.replace(tzinfo=UTC),
        "date_header": mail.date_header,
        "text": mail.text,
        "defects": [],
        "report": None,
        "attachments": [],
        "auto_reasons": [],
        "subject_tags": [],
    }
    wrong = {k: (seen[k], written[k]) for k in written if seen[k] != written[k]}
    if wrong:
        raise FillError(f"maild reads message {n} differently from the row for it: {wrong}")
    if (mail.ticket, mail.email, mail.subject.removeprefix("Re: ")) != (
        ticket_id(n),
        sender(n),
        ticket_subject(n),
    ):
        raise FillError(f"message {n}'s row and the public helpers disagree")


# -- batches of rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    count: int
    route: _Route
    start: datetime  # when message 1 was received
    step: timedelta  # between two messages
    stamp: Callable[[datetime], str | int]  # a time as the rows carry it to the database


_PG_EPOCH = datetime(2000, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def _utcnow() -> datetime:
    """Now, naive UTC: the rows' times are made naive, and cheaply, and stored as UTC."""
    return utcnow().replace(tzinfo=None)


def _sqlite_stamp(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text of a UTC time: naive, always with microseconds."""
    return value.isoformat(" ", "microseconds")


def _postgresql_stamp(value: datetime) -> int:
    """A timestamptz as binary COPY sends it: microseconds since 2000-01-01 UTC."""
    return (value - _PG_EPOCH) // _MICROSECOND


def _batch(plan: _Plan, first: int, last: int) -> dict[str, list[Row]]:
    """The rows of messages first..last (inclusive), and of the tickets they open."""
    rows: dict[str, list[Row]] = {table: [] for table in TABLES}
    tickets, participants = rows["ticket"], rows["participant"]
    inbound, messages = rows["inbound"], rows["message"]
    route, stamp, start, step, count = plan.route, plan.stamp, plan.start, plan.step, plan.count
    # SQLAlchemy's JSON type stores json.dumps() text, on SQLite and PostgreSQL alike;
    # None in a JSON column is JSON null, as in maild's own rows.
    rcpt_tos = json.dumps([SUPPORT])
    to = json.dumps([{"name": "", "email": SUPPORT}])
    empty = json.dumps([])
    null = json.dumps(None)
    tags = json.dumps(route.tags)
    opened = TicketStatus.OPEN.value
    requester = ParticipantRole.REQUESTER.value
    processed = InboundStatus.PROCESSED.value
    inbound_mail = Direction.INBOUND.value
    human = MessageKind.HUMAN.value
    sha256 = hashlib.sha256
    received = start + step * (first - 1)  # step is whole microseconds: adding it is exact
    for n in range(first, last + 1):
        filed = stamp(received + FILING_DELAY)
        mail = _mail(n, received)
        ticket = mail.ticket
        if not mail.previous:
            final = start + step * (_last_message(ticket, count) - 1) + FILING_DELAY
            tickets.append(
                (
                    ticket,
                    route.type,
                    route.priority,
                    opened,
                    mail.subject,
                    mail.email,
                    mail.name,
                    route.name,
                    route.rules_version,
                    filed,
                    stamp(final),
                    route.application,
                    tags,
                )
            )
            participants.append(
                (ticket, ticket, mail.email, mail.name, requester, filed, None, None)
            )
        domain = mail.customer % 1000
        raw = mail.raw
        inbound.append(
            (
                n,
                stamp(received),
                "smtp",
                f"198.51.100.{domain % 254 + 1}:{40000 + n % 20000}",
                f"mail.customer{domain}.example",
                f"{n * 2654435761 % (1 << 48):012x}",  # like the daemon's token_hex(6)
                mail.email,
                rcpt_tos,
                len(raw),
                sha256(raw).hexdigest(),
                processed,
                None,
                1,
                filed,
                ticket,
                raw,
            )
        )
        messages.append(
            (
                n,
                ticket,
                n,
                mail.message_id,
                message_id_hash(mail.message_id),
                False,
                _json_ids(mail.previous[-1:]),
                _json_ids(mail.previous),
                mail.email,
                mail.name,
                to,
                empty,
                mail.subject,
                stamp(mail.date),
                mail.text,
                route.name,
                empty,
                filed,
                inbound_mail,
                human,
                empty,
                null,
            )
        )
        received += step
    return rows


def _make_batches(plan: _Plan, size: int, index: int, makers: int, out: Connection) -> None:
    """In a maker process: every `makers`-th batch from the `index`-th, sent in order.

    marshal, not pickle: the rows are plain str, bytes, int and None, and marshal
    writes them in a third of the time.
    """
    try:
        for number, first in enumerate(range(1, plan.count + 1, size)):
            if number % makers == index:
                rows = _batch(plan, first, min(first + size - 1, plan.count))
                out.send_bytes(marshal.dumps(("rows", rows)))
    except BaseException as exc:  # the writer reports it
        out.send_bytes(marshal.dumps(("error", f"{type(exc).__name__}: {exc}")))
    finally:
        out.close()


def _batches(plan: _Plan, size: int) -> Iterator[dict[str, list[Row]]]:
    """The batches in order, made in other processes while the caller writes.

    Making rows is pure Python, and so is binding them: in threads they would
    take turns on the GIL. Each maker sends one batch at a time down its pipe
    and waits until the writer takes it, so at most two per maker are in memory.
    """
    total = -(-plan.count // size)
    if total == 0:
        return
    makers = max(1, min(total, MAX_MAKERS, (os.cpu_count() or 2) - 1))
    context = multiprocessing.get_context(
        "spawn"
    )  # a clean interpreter: no copy of our connections
    pipes: list[Connection] = []
    processes: list[BaseProcess] = []
    try:
        for index in range(makers):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_make_batches,
                args=(plan, size, index, makers, send),
                name=f"fill-rows-{index}",
                daemon=True,
            )
            process.start()
            send.close()
            pipes.append(receive)
            processes.append(process)
        for number in range(total):
            try:
                message = pipes[number % makers].recv_bytes()
            except EOFError:
                raise FillError(f"the process making batch {number + 1} died") from None
            kind, value = marshal.loads(message)  # noqa: S302 (our own child's rows)
            if kind == "error":
                raise FillError(f"making batch {number + 1} failed: {value}")
            yield cast(dict[str, list[Row]], value)
    finally:
        for maker in processes:
            if maker.is_alive():  # the writer failed: its makers' work is not wanted
                maker.terminate()
            maker.join()
        for pipe in pipes:
            pipe.close()


# -- writing -----------------------------------------------------------------------------------


def _columns(table: str) -> str:
    return ", ".join(f'"{c}"' for c in COLUMNS[table])


def _require_empty(cursor: Any) -> None:
    for table in TABLES:
        cursor.execute(f"SELECT 1 FROM {table} LIMIT 1")  # noqa: S608 (our own table names)
        if cursor.fetchone() is not None:
            raise FillError(
                f"the {table} table already has rows: bench/fill.py only fills an empty "
                "maild database (give it a new SQLite file or PostgreSQL schema)"
            )


def _fill_sqlite(connection: sqlite3.Connection, plan: _Plan, size: int) -> None:
    # Set-up, not the measured run: no fsync and a big page cache, for this connection
    # only. The file stays in WAL mode, as maild/database.py opens it.
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("PRAGMA cache_size=-524288")  # KiB: 512 MiB
    cursor = connection.cursor()
    try:
        _require_empty(cursor)
        inserts = {
            table: f"INSERT INTO {table} ({_columns(table)}) "  # noqa: S608 (our own names)
            f"VALUES ({', '.join('?' * len(COLUMNS[table]))})"
            for table in TABLES
        }
        for rows in _batches(plan, size):
            cursor.execute("BEGIN IMMEDIATE")
            try:
                for table in TABLES:
                    cursor.executemany(inserts[table], rows[table])
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
        if mode != "wal":
            raise FillError(f"the SQLite file is in journal mode {mode}, not WAL as maild sets")
    finally:
        cursor.close()
        connection.execute("PRAGMA cache_size=-2000")  # SQLite's default
        connection.execute("PRAGMA synchronous=FULL")  # as maild/database.py sets it


# What binary COPY sends a column's values as, when not as the column's own type:
# - json: our json.dumps() text (binary json is its text; the server still checks it);
# - timestamptz: its binary form, an int8 of microseconds since 2000-01-01 UTC
#   (_postgresql_stamp), so that the rows need no datetime objects.
_SENT_AS = {"json": "text", "timestamp with time zone": "bigint"}


def _binary_types(cursor: Any, table: str) -> list[str]:
    """The types binary COPY sends the table's columns as, from the database's catalogue."""
    cursor.execute(
        "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (table,),
    )
    types: dict[str, str] = dict(cursor.fetchall())
    return [_SENT_AS.get(types[c], types[c]) for c in COLUMNS[table]]


def _foreign_keys(cursor: Any) -> list[tuple[str, str, str]]:
    """(table, constraint, definition) of the foreign keys of the tables we fill."""
    cursor.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype = 'f' AND conrelid = ANY(%s::regclass[]) ORDER BY conrelid, conname",
        (list(TABLES),),
    )
    return [(str(t), str(c), str(d)) for t, c, d in cursor.fetchall()]


def _secondary_indexes(cursor: Any) -> list[tuple[str, str, str | None, str]]:
    """(table, index, its unique constraint or None, definition) of the tables we fill,
    primary keys aside (other tables' foreign keys hang on them)."""
    cursor.execute(
        "SELECT i.indrelid::regclass::text, i.indexrelid::regclass::text, c.conname, "
        "coalesce(pg_get_constraintdef(c.oid), pg_get_indexdef(i.indexrelid)) "
        "FROM pg_index i LEFT JOIN pg_constraint c "
        "ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('u', 'x') "
        "WHERE i.indrelid = ANY(%s::regclass[]) AND NOT i.indisprimary ORDER BY 1, 2",
        (list(TABLES),),
    )
    return [(str(t), str(i), c, str(d)) for t, i, c, d in cursor.fetchall()]


def _fill_postgresql(connection: psycopg.Connection[Any], plan: _Plan, size: int) -> None:
    """One transaction: the database has all the rows, or none."""
    with connection.cursor() as cursor:
        try:
            _require_empty(cursor)
            cursor.execute("SET LOCAL synchronous_commit = off")  # set-up only
            cursor.execute("SET LOCAL maintenance_work_mem = '256MB'")  # index builds sort in it
            types = {table: _binary_types(cursor, table) for table in TABLES}
            # As PostgreSQL's "Populating a Database" advises: checking each row's
            # foreign keys, and adding each row to every index, make COPY three
            # times slower than checking and indexing all the rows at once after
            # it. So the keys and indexes are dropped, and made again exactly as
            # they were, from the catalogue's own definitions; all in this one
            # transaction, so no one ever sees the tables without them.
            keys = _foreign_keys(cursor)
            indexes = _secondary_indexes(cursor)
            for table, name, _ in keys:
                cursor.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                        sql.SQL(table), sql.Identifier(name)
                    )
                )
            for table, index, constraint, _ in indexes:
                if constraint is not None:
                    cursor.execute(
                        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                            sql.SQL(table), sql.Identifier(constraint)
                        )
                    )
                else:
                    cursor.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
            for rows in _batches(plan, size):
                for table in TABLES:
                    statement = f"COPY {table} ({_columns(table)}) FROM STDIN (FORMAT BINARY)"
                    with cursor.copy(statement) as copy:
                        copy.set_types(types[table])
                        for row in rows[table]:
                            copy.write_row(row)
            for table, _, constraint, definition in indexes:
                if constraint is not None:
                    cursor.execute(
                        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                            sql.SQL(table), sql.Identifier(constraint), sql.SQL(definition)
                        )
                    )
                else:
                    cursor.execute(sql.SQL(definition))
            for table, name, definition in keys:
                cursor.execute(
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                        sql.SQL(table), sql.Identifier(name), sql.SQL(definition)
                    )
                )
            for table in TABLES:
                # maild's next insert takes the id after the last one written here
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence(%s, 'id'), max(id)) FROM {table}",  # noqa: S608
                    (table,),
                )
                cursor.execute(f"ANALYZE {table}")  # the planner's statistics for the new rows
            connection.commit()
        except BaseException:
            connection.rollback()
            raise


def fill(
    url: str, count: int, *, batch: int = 50_000, rules: Path | str | None = None
) -> dict[str, Any]:
    """Create maild's schema at `url` if it has none, then store `count` messages in it.

    `url` is a SQLAlchemy URL as in maild's [database] url. `rules` is the rules
    folder whose route and version the tickets record: by default the table maild
    ships, which the benchmark runs maild with. Raises FillError, naming the
    table, when the database already holds tickets, participants, deliveries or
    messages. Returns {"count", "tickets", "seconds", "database"}; seconds
    covers the whole fill, schema included.

    The rows are made in spawned processes, which import the caller's main
    module again: a script that calls fill() needs `if __name__ == "__main__":`
    (`python -m bench` does not, multiprocessing skips a package's __main__).
    """
    if count < 0:
        raise ValueError(f"count must be 0 or more, not {count}")
    if batch < 1:
        raise ValueError(f"batch must be 1 or more, not {batch}")
    began = time.perf_counter()
    route = _route(Path(rules) if rules is not None else RULES)
    for n in (1, 1 + INTERLEAVE, 1 + (PER_TICKET - 1) * INTERLEAVE):
        _check_parse(n)
    write_engine, read_engine = make_engines(url)
    try:
        upgrade(write_engine)  # as `maild db upgrade`; it creates an empty database's schema
        database = write_engine.dialect.name
        now = _utcnow()
        plan = _Plan(
            count=count,
            route=route,
            start=now - SPAN,
            step=_MICROSECOND * (SPAN // _MICROSECOND // max(count, 1)),  # exact to add up
            stamp=_sqlite_stamp if database == "sqlite" else _postgresql_stamp,
        )
        proxy = write_engine.raw_connection()  # set up as maild's own connections are
        try:
            connection = proxy.driver_connection
            if isinstance(connection, sqlite3.Connection):
                _fill_sqlite(connection, plan, batch)
            elif isinstance(connection, psycopg.Connection):
                _fill_postgresql(connection, plan, batch)
            else:
                raise FillError(f"no fill for {database} through {type(connection).__name__}")
        finally:
            proxy.close()
    finally:
        write_engine.dispose()
        read_engine.dispose()
    return {
        "count": count,
        "tickets": tickets_for(count),
        "seconds": round(time.perf_counter() - began, 3),
        "database": database,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("url", help="SQLAlchemy URL, as maild's [database] url")
    parser.add_argument("--count", type=int, required=True, help="messages to store")
    parser.add_argument("--batch", type=int, default=50_000, help="messages per batch")
    parser.add_argument("--rules", type=Path, default=RULES, help="rules folder [maild's own]")
    args = parser.parse_args(argv)
    try:
        result = fill(args.url, args.count, batch=args.batch, rules=args.rules)
    except (FillError, MaildError) as exc:  # MaildError: a bad URL or rules folder
        print(f"fill: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
