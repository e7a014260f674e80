"""Filing a parsed message: dedup, route, thread, store. Runs inside one transaction.

The order of decisions, for one accepted delivery:

1. Dedup: a Message-ID already stored (hash of the normalised id) files
   nothing new; the delivery is marked `duplicate` of that message's ticket
   (an MTA retry, or one message that reached two of our addresses separately).
   If it came through a higher-priority route, the ticket's priority rises.
2. Route: the envelope recipients through the rules table; the highest
   priority wins, ties to the first route in the table.
3. Thread: In-Reply-To, then References (newest first), against every stored
   Message-ID; else a `[#123]` subject tag, but only when the sender already
   takes part in ticket 123 (guessing a number never joins a stranger's ticket).
4. Store: a new ticket, or the message added to the thread's ticket (which
   reopens when pending, solved or closed).
5. Page: whether on-call is paged for it (paging.plan_trigger); the page
   row commits with the ticket or not at all.
6. Acknowledge: a new ticket from a person gets an acknowledgement
   (acks.plan_ack), also committed with the ticket.
7. Correspond (outbound/correspondence.py): a person's follow-up is copied to
   the other participants who were not among its To and Cc; the route's
   `notify` addresses hear of a person's new ticket or follow-up; a verified
   agent's mail is sent on to the participants it did not reach. Also
   committed with the ticket.

Agents (`[desk] agents`): mail whose From is an agent's and that threads into
a ticket is an agent reply only when verified (the worker checked it before
this transaction, processing._authenticated): stored as kind `agent`, it
never reopens the ticket and never makes the agent (or an agent in its To/Cc)
a participant. Unverified, it is filed as a customer's message with the reason
in its defects, and causes no mail and no page.

Before all of this, hygiene decides what kind of mail it is:

- our own outgoing mail coming back (loop header, our Message-ID) is
  dropped: kept as `dropped` with the reason, never filed;
- a delivery status notification (a bounce) is attached to the ticket of the
  message it reports on and marks the failed addresses undeliverable; it
  never opens a ticket, and one about no message of ours is dropped;
- auto-generated mail (out-of-office, lists, monitoring) is filed like a
  person's, flagged with its reasons, but never acknowledged and never reopens
  a ticket. A valid `+token` reply address joins its ticket whoever sends it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, func, insert, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from maild.enums import (
    Direction,
    InboundStatus,
    MessageKind,
    OutboxStatus,
    Outcome,
    ParticipantRole,
    Priority,
    RecipientState,
    TicketField,
    TicketStatus,
)
from maild.mail import addresses, hygiene
from maild.mail.addresses import Address
from maild.mail.dsn import DeliveryReport
from maild.mail.message_ids import message_id_hash
from maild.mail.parsing import SYNTHETIC_DOMAIN, ParsedMessage, sender_of
from maild.outbound.acks import AckPolicy, plan_ack
from maild.outbound.correspondence import (
    DeskPolicy,
    Planned,
    plan_copy,
    plan_notify,
    plan_reply,
)
from maild.outbound.outgoing import DEFAULT_MAX_RECIPIENTS, mark_undeliverable
from maild.outbound.paging import EscalationPolicy, plan_trigger
from maild.outbound.webhook_events import (
    BY_MAILD,
    MESSAGE_CREATED,
    TICKET_CREATED,
    TICKET_UPDATED,
    Webhooks,
    change_data,
    insert_rows,
    message_data,
    ticket_data,
)
from maild.routing.rules import Decision, MessageContext, RuleTable, best_decision
from maild.store import ratelimit
from maild.store.models import (
    Attachment,
    Blob,
    Envelope,
    Inbound,
    Message,
    Outmail,
    OutmailRecipient,
    Page,
    Participant,
    Ticket,
    TicketEvent,
    as_utc,
    from_row,
    table_of,
    utcnow,
)

log = structlog.get_logger("maild.intake")
SUBJECT_TAG = re.compile(r"\[#(\d{1,18})\]")
REOPENS = frozenset({TicketStatus.PENDING, TicketStatus.SOLVED, TicketStatus.CLOSED})
CLOSED_STATUSES = frozenset({TicketStatus.SOLVED, TicketStatus.CLOSED})


class ProcessingError(Exception):
    """A delivery cannot be filed as it stands; it is kept as failed with this text."""


@dataclass(frozen=True)
class Filed:
    """What happened to one delivery."""

    inbound_id: int
    outcome: Outcome
    ticket_id: int | None = None
    route: str | None = None
    threaded_by: str | None = None  # reply-address | in-reply-to | references | subject-tag
    error: str | None = None
    page_id: int | None = None
    page_status: str | None = None  # pending | withheld
    page_reason: str | None = None  # why it was withheld
    ticket_type: str | None = None  # of a created ticket
    ticket_priority: str | None = None
    latency: float | None = None  # seconds from the 250 to filing
    kind: str = MessageKind.HUMAN.value  # human | auto | bounce
    auto_reasons: tuple[str, ...] = ()
    ack_id: int | None = None
    ack_status: str | None = None  # pending | withheld
    ack_reason: str | None = None
    mail: tuple[Queued, ...] = ()  # the desk's mail it caused (copies, notifications)


@dataclass(frozen=True)
class Queued:
    """One outgoing mail filing queued besides the acknowledgement."""

    kind: str  # copy | notify | agent
    outmail_id: int | None
    status: str  # pending | withheld
    reason: str | None = None


@dataclass(frozen=True)
class FilingContext:
    """What filing needs besides the mail, fixed for a batch: the routing table, the
    paging policy (None: no pages), the acknowledgement policy (None: none sent) and the
    desk's correspondence policy (None: no copies, notifications or agent replies)."""

    table: RuleTable
    policy: EscalationPolicy | None = None
    acks: AckPolicy | None = None
    desk: DeskPolicy | None = None


def _with_page(filed: Filed, page: Page | None) -> Filed:
    if page is None:
        return filed
    return replace(filed, page_id=page.id, page_status=page.status, page_reason=page.reason)


def _with_ack(filed: Filed, outmail: Outmail | None) -> Filed:
    if outmail is None:
        return filed
    return replace(filed, ack_id=outmail.id, ack_status=outmail.status, ack_reason=outmail.reason)


def _insert_ignore(session: Session, model: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT that does nothing when the row exists (content-addressed blobs)."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(model).on_conflict_do_nothing(), rows)


# Filing works on the tables with plain Core statements built once, never through the
# ORM's unit of work: with it, the flushes it ran before every query (and building a
# statement per call) cost more than all the rest of filing.
_TICKET = table_of(Ticket)
_MESSAGE = table_of(Message)
_PARTICIPANT = table_of(Participant)
_INBOUND = table_of(Inbound)
_INSERT_TICKET = insert(_TICKET).returning(_TICKET.c.id)
_INSERT_TICKETS = insert(_TICKET)  # with their ids, allocated by _Filing on SQLite
_MAX_TICKET_ID = core_select(func.max(_TICKET.c.id))
_INSERT_PARTICIPANT = insert(_PARTICIPANT)
_INSERT_MESSAGE = insert(_MESSAGE).returning(_MESSAGE.c.id, sort_by_parameter_order=True)
_INSERT_ATTACHMENT = insert(table_of(Attachment))
_INSERT_HISTORY = insert(table_of(TicketEvent))
# A ticket is read locked (FOR NO KEY UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE
# already serialises writers) and written from that copy at the end of the batch: a
# second filer, or `maild tickets close` (solve, reopen), waits and then sees what this one wrote,
# rather than writing back a status or priority it read before. NO KEY: the rows that
# point at the ticket (messages, participants) take KEY SHARE, which this does not block.
_LOCK_TICKET = (
    core_select(_TICKET).where(_TICKET.c.id == bindparam("id")).with_for_update(key_share=True)
)
_SELECT_PEOPLE = core_select(_PARTICIPANT.c.email).where(
    _PARTICIPANT.c.ticket_id == bindparam("id")
)
_SELECT_HASHES = core_select(
    _MESSAGE.c.message_id_hash, _MESSAGE.c.ticket_id, _MESSAGE.c.fingerprint
).where(_MESSAGE.c.message_id_hash.in_(bindparam("digests", expanding=True)))


def _update_by_id(table: Any, *columns: str) -> Any:
    """UPDATE table SET each column WHERE id = :row_id, for executemany with dicts of
    those columns and `row_id` (SQLAlchemy keeps the columns' own names for SET)."""
    return (
        update(table)
        .where(table.c.id == bindparam("row_id"))
        .values({name: bindparam(name) for name in columns})
    )


_UPDATE_TICKET = _update_by_id(_TICKET, "status", "priority", "updated_at")
_UPDATE_INBOUND = _update_by_id(
    _INBOUND, "status", "error", "attempts", "processed_at", "ticket_id", "dropped_by_route"
)
_LOCK_INBOUND = (
    core_select(
        _INBOUND.c.id,
        _INBOUND.c.protocol,
        _INBOUND.c.mail_from,
        _INBOUND.c.rcpt_tos,
        _INBOUND.c.received_at,
        _INBOUND.c.status,
        _INBOUND.c.attempts,
    )
    .where(_INBOUND.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_INBOUND.c.id)
    .with_for_update()
)
_IN_LIST = 500  # values per IN (…): well under every database's parameter limit


class _Filing:
    """What one transaction (or one savepoint) has read and has still to write.

    Lookups are cached: the ticket of each Message-ID hash (None: stored nowhere
    yet), tickets, and the addresses on each ticket. Rows every message writes
    (participants, messages, ticket changes) wait here and go in together at
    `flush`, one statement each; what the transaction adds updates the caches, so
    a reply filed after its parent in the same batch finds it. A new ticket goes
    in first, at `flush`, on SQLite (its id counted here); on PostgreSQL at once, for
    its id. Anything that reads the tables itself (a
    bounce, an acknowledgement) flushes first.

    Webhook events (`hooks`, None when no `[[webhook]]` is configured: nothing is
    built) wait here too, in the order they happened, and go in after the messages,
    whose ids a `message.created` carries.
    """

    def __init__(self, session: Session, hooks: Webhooks | None = None) -> None:
        self.session = session
        self.hooks = hooks
        # On SQLite, new tickets wait for `flush` like the other rows, their ids counted
        # from the largest stored: its writers take turns (BEGIN IMMEDIATE), so no other
        # can take one meanwhile, and these are the ids SQLite itself would give. One
        # INSERT per ticket (for its id) was half of filing's statements (issue 21).
        # PostgreSQL's ids come from a sequence others draw on: one INSERT each, there.
        self._counted = session.get_bind().dialect.name == "sqlite"
        self._next_ticket_id: int | None = None
        self._new_tickets: list[dict[str, Any]] = []
        # each event's rows, and the message row whose id its data is to carry
        self._events: list[tuple[list[dict[str, Any]], dict[str, Any] | None]] = []
        self._ticket_of: dict[str, int | None] = {}
        self._fingerprint_of: dict[str, str | None] = {}  # of each stored Message-ID hash
        self._tickets: dict[int, Ticket] = {}
        self._people: dict[int, set[str]] = {}
        self._changed: dict[int, Ticket] = {}
        self._participants: list[dict[str, Any]] = []
        self._messages: list[tuple[dict[str, Any], Sequence[Any]]] = []
        self._history: list[dict[str, Any]] = []  # ticket_event rows

    def learn(self, digests: Iterable[str]) -> None:
        """Look up the tickets of these Message-ID hashes, those not known yet."""
        wanted = list(dict.fromkeys(d for d in digests if d not in self._ticket_of))
        for start in range(0, len(wanted), _IN_LIST):
            part = wanted[start : start + _IN_LIST]
            found = {
                digest: (ticket_id, fingerprint)
                for digest, ticket_id, fingerprint in self.session.execute(
                    _SELECT_HASHES, {"digests": part}
                ).all()
            }
            for digest in part:
                self._ticket_of[digest], self._fingerprint_of[digest] = found.get(
                    digest, (None, None)
                )

    def ticket_of(self, digest: str) -> int | None:
        """The ticket holding the message with this Message-ID hash, or None."""
        if digest not in self._ticket_of:
            self.learn([digest])
        return self._ticket_of[digest]

    def stored(self, digest: str) -> tuple[int, str | None] | None:
        """(ticket, fingerprint) of the stored message with this Message-ID hash, or None."""
        ticket_id = self.ticket_of(digest)
        return None if ticket_id is None else (ticket_id, self._fingerprint_of.get(digest))

    def ticket(self, ticket_id: int) -> Ticket | None:
        """The ticket, read (and locked) once per transaction; changes go through
        `changed`."""
        if ticket_id not in self._tickets:
            row = self.session.execute(_LOCK_TICKET, {"id": ticket_id}).first()
            if row is None:
                return None
            self._tickets[ticket_id] = from_row(Ticket, row._asdict())
        return self._tickets[ticket_id]

    def changed(self, ticket: Ticket) -> None:
        assert ticket.id is not None
        self._changed[ticket.id] = ticket

    def new_ticket(self, values: dict[str, Any]) -> Ticket:
        if self._counted:
            if self._next_ticket_id is None:
                self._next_ticket_id = (self.session.execute(_MAX_TICKET_ID).scalar() or 0) + 1
            ticket_id = self._next_ticket_id
            self._next_ticket_id += 1
            self._new_tickets.append({**values, "id": ticket_id})
        else:
            ticket_id = self.session.execute(_INSERT_TICKET, values).scalar_one()
        ticket = from_row(Ticket, {**values, "id": ticket_id})
        self._tickets[ticket_id] = ticket
        self._people[ticket_id] = set()
        return ticket

    def insert_tickets(self) -> None:
        """Write the new tickets that wait (SQLite): before any row that points at one is
        written outside `flush` (a page's)."""
        if self._new_tickets:
            self.session.execute(_INSERT_TICKETS, self._new_tickets)
            self._new_tickets = []

    def people(self, ticket_id: int) -> set[str]:
        """The addresses on the ticket, stored or added in this transaction."""
        if ticket_id not in self._people:
            rows = self.session.execute(_SELECT_PEOPLE, {"id": ticket_id}).scalars()
            self._people[ticket_id] = set(rows)
        return self._people[ticket_id]

    def history(
        self, ticket: Ticket, field: TicketField, old: str, new: str, by: str, now: datetime
    ) -> None:
        """A change filing made to the ticket (a customer's mail reopened it, a route
        raised it), in its history beside the desk's own changes."""
        self._history.append(
            dict(ticket_id=ticket.id, field=field.value, old=old, new=new, by=by, created_at=now)
        )

    def add_participant(self, row: dict[str, Any]) -> None:
        self.people(row["ticket_id"]).add(row["email"])
        self._participants.append(row)

    def add_message(self, row: dict[str, Any], attachments: Sequence[Any] = ()) -> None:
        self._ticket_of[row["message_id_hash"]] = row["ticket_id"]
        self._fingerprint_of[row["message_id_hash"]] = row["fingerprint"]
        self._messages.append((row, attachments))

    def event(
        self,
        event: str,
        ticket: Ticket,
        now: datetime,
        message: tuple[dict[str, Any], Sequence[Any]] | None = None,
        **data: Any,
    ) -> None:
        """A webhook event about `ticket` (the ticket as it stands now, and `data`), or
        about a `message` (its row and attachments) added by add_message; nothing when
        no webhook subscribes to it."""
        hooks = self.hooks
        if hooks is None or not hooks.wants(event):
            return
        assert ticket.id is not None
        payload = {"ticket": ticket_data(ticket, hooks.link(ticket.id)), **data}
        row = None
        if message is not None:
            row, attachments = message
            payload["message"] = message_data(row, attachments)
        self._events.append((hooks.rows(event, ticket.id, payload, now), row))

    def flush(self) -> None:
        """Write what waits: ticket changes, participants, messages and their attachments.
        A Message-ID stored meanwhile by another filer raises IntegrityError here."""
        session = self.session
        self.insert_tickets()  # first: every other row points at its ticket
        if self._changed:
            session.execute(
                _UPDATE_TICKET,
                [
                    {
                        "row_id": t.id,
                        "status": t.status,
                        "priority": t.priority,
                        "updated_at": t.updated_at,
                    }
                    for t in self._changed.values()
                ],
            )
            self._changed.clear()
        if self._history:
            session.execute(_INSERT_HISTORY, self._history)
            self._history = []
        if self._participants:
            session.execute(_INSERT_PARTICIPANT, self._participants)
            self._participants = []
        if self._messages:
            rows = [row for row, _ in self._messages]
            ids = session.execute(_INSERT_MESSAGE, rows).scalars().all()
            blobs: dict[str, dict[str, Any]] = {}
            files = []
            for message_pk, (_, attachments) in zip(ids, self._messages, strict=True):
                for attachment in attachments:
                    blobs.setdefault(
                        attachment.sha256,
                        {
                            "sha256": attachment.sha256,
                            "size": attachment.size,
                            "data": attachment.data,
                        },
                    )
                    files.append(
                        {
                            "message_pk": message_pk,
                            "filename": attachment.filename,
                            "content_type": attachment.content_type,
                            "size": attachment.size,
                            "sha256": attachment.sha256,
                        }
                    )
            for message_pk, (row, _) in zip(ids, self._messages, strict=True):
                row["id"] = message_pk  # for its message.created, below
            self._messages = []
            if blobs:
                _insert_ignore(session, Blob, list(blobs.values()))
                session.execute(_INSERT_ATTACHMENT, files)
        if self._events:
            rows = []
            for event_rows, message in self._events:
                if message is not None:
                    for event_row in event_rows:  # one data dict, shared by its rows
                        event_row["payload"]["message"]["id"] = message["id"]
                        break
                rows += event_rows
            self._events = []
            insert_rows(session, rows)


def _thread_by_ids(filing: _Filing, ids: Sequence[str]) -> int | None:
    for message_id in ids:
        ticket_id = filing.ticket_of(message_id_hash(message_id))
        if ticket_id is not None:
            return ticket_id
    return None


def find_thread(
    filing: _Filing,
    parsed: ParsedMessage,
    sender: str,
    recipients: Sequence[str] = (),
    acks: AckPolicy | None = None,
    agent: bool = False,
) -> tuple[Ticket | None, str | None]:
    """The ticket this message answers and how we know, or (None, None).

    A valid `+token` reply address comes first (it names the ticket, whoever
    writes); an invalid one is plain mail to the base address. A `[#id]` tag
    counts when the sender takes part in the ticket, or is a verified `agent`.
    """
    if acks is not None:
        by_token = acks.ticket_for(list(recipients))
        ticket = filing.ticket(by_token) if by_token is not None else None
        if ticket is not None:
            return ticket, "reply-address"
    ticket_id = _thread_by_ids(filing, parsed.in_reply_to)
    how = "in-reply-to"
    if ticket_id is None:
        ticket_id = _thread_by_ids(filing, list(reversed(parsed.references)))
        how = "references"
    if ticket_id is not None:
        return filing.ticket(ticket_id), how
    if sender:
        for match in SUBJECT_TAG.finditer(parsed.subject):
            candidate = int(match.group(1))
            if agent or sender.lower() in filing.people(candidate):
                ticket = filing.ticket(candidate)
                if ticket is not None:
                    return ticket, "subject-tag"
    return None, None


DROPPED_BY_ROUTE = "dropped by route "  # and its name (also in inbound.dropped_by_route)


def _add_participants(
    filing: _Filing,
    ticket: Ticket,
    people: Iterable[tuple[Address, ParticipantRole]],
    table: RuleTable,
    now: datetime,
    limit: int,
) -> int:
    """Add the people not yet on the ticket, at most `limit` of them (the sender first);
    how many more there were, kept on the message but not added."""
    assert ticket.id is not None
    known = filing.people(ticket.id)
    added = left_out = 0
    for person, role in people:
        email = person.email.lower()
        if not email or email in known or table.is_ours(email):
            continue
        if added >= limit:
            left_out += 1
            continue
        added += 1
        filing.add_participant(
            {
                "ticket_id": ticket.id,
                "email": email,
                "name": person.name,
                "role": role.value,
                "created_at": now,
            }
        )
    return left_out


def _fingerprint(sender: Address | None, parsed: ParsedMessage) -> str:
    """What makes two copies of one Message-ID the same message: the sender and the body."""
    who = sender.email.lower() if sender else ""
    return hashlib.sha256(f"{who}\n{parsed.body_sha256}".encode()).hexdigest()


def _own_message_id(parsed: ParsedMessage, ticket_id: int, fingerprint: str) -> ParsedMessage:
    """The message with a Message-ID of its own: its id already names another message
    (a stranger reusing it, or several alerts sharing one). Stable for retries of it."""
    reused = parsed.message_id
    unique = hashlib.sha256(f"{reused}\n{fingerprint}".encode("utf-8", "surrogatepass"))
    own = f"reused-{unique.hexdigest()}@{SYNTHETIC_DOMAIN}"
    defect = (
        f"ReusedMessageId: <{reused}> already names another message (ticket #{ticket_id}, "
        f"another sender or body); filed as <{own}>"
    )
    return replace(
        parsed,
        message_id=own,
        message_id_synthesized=True,
        defects=[*parsed.defects, defect],
    )


def _store_message(
    filing: _Filing,
    ticket: Ticket,
    inbound: Envelope,
    parsed: ParsedMessage,
    route: Decision | None,
    now: datetime,
    kind: MessageKind = MessageKind.HUMAN,
    auto_reasons: Sequence[str] = (),
    report: DeliveryReport | None = None,
    fingerprint: str | None = None,
    notes: Sequence[str] = (),
    rules_version: str = "",
) -> None:
    """Queue the message (and its attachments) for the transaction's flush, and its
    message.created; `notes` are what filing found, stored with the parser's defects."""
    assert ticket.id is not None
    row = dict(
        ticket_id=ticket.id,
        inbound_id=inbound.id,
        message_id=parsed.message_id,
        message_id_hash=message_id_hash(parsed.message_id),
        message_id_synthesized=parsed.message_id_synthesized,
        fingerprint=fingerprint,
        in_reply_to=parsed.in_reply_to,
        references=parsed.references,
        from_email=parsed.from_.email if parsed.from_ else "",
        from_name=parsed.from_.name if parsed.from_ else "",
        to=[a.as_dict() for a in parsed.to],
        cc=[a.as_dict() for a in parsed.cc],
        subject=parsed.subject,
        date=parsed.date,
        text=parsed.text,
        rule=route.name if route else "",
        rules_version=rules_version if route else "",
        defects=[*parsed.defects, *notes],
        direction=Direction.INBOUND.value,
        kind=kind.value,
        auto_reasons=list(auto_reasons),
        report=report.as_dict() if report else None,
        created_at=now,
    )
    filing.add_message(row, parsed.attachments)
    filing.event(MESSAGE_CREATED, ticket, now, message=(row, parsed.attachments))


def _raise_priority(
    filing: _Filing, ticket: Ticket, route: Decision, by: str, now: datetime
) -> None:
    if route.priority.rank > Priority(ticket.priority).rank:
        filing.history(ticket, TicketField.PRIORITY, ticket.priority, route.priority.value, by, now)
        ticket.priority = route.priority.value
        filing.changed(ticket)


def _envelope_sender(inbound: Envelope) -> str | None:
    """MAIL FROM ("" is `<>`), or None when a pipe delivery passed no sender."""
    if inbound.protocol == "pipe" and not inbound.mail_from:
        return None
    return inbound.mail_from


def _mark(inbound: Envelope, status: InboundStatus, now: datetime, ticket_id: int | None) -> None:
    inbound.status = status.value
    inbound.ticket_id = ticket_id
    inbound.processed_at = now
    inbound.error = None
    inbound.dropped_by_route = None


def _drop(inbound: Envelope, reason: str, now: datetime, kind: MessageKind) -> Filed:
    """Keep the delivery, file nothing: the reason is its error text."""
    _mark(inbound, InboundStatus.DROPPED, now, None)
    inbound.error = reason[:4000]
    return Filed(inbound.id, Outcome.DROPPED, error=inbound.error, kind=kind.value)


def _file_bounce(
    filing: _Filing,
    inbound: Envelope,
    parsed: ParsedMessage,
    report: DeliveryReport,
    reasons: list[str],
    acks: AckPolicy | None,
    now: datetime,
    fingerprint: str,
) -> Filed:
    """Attach a DSN to the ticket of the message it reports on; never a new ticket."""
    filing.flush()  # what follows reads participants, messages and outmail itself
    session = filing.session
    original: Message | None = None
    if report.original_message_id:
        original = session.exec(
            select(Message).where(
                Message.message_id_hash == message_id_hash(report.original_message_id)
            )
        ).first()
    ticket = filing.ticket(original.ticket_id) if original else None
    if ticket is None and acks is not None:  # the report left out the original: its address
        by_token = acks.ticket_for(list(inbound.rcpt_tos))
        ticket = filing.ticket(by_token) if by_token is not None else None
    if ticket is None:
        about = report.original_message_id or "none given"
        return _drop(
            inbound,
            f"bounce about a message that is in no ticket (original Message-ID <{about}>)",
            now,
            MessageKind.BOUNCE,
        )
    assert ticket.id is not None
    outmail = None
    if original is not None and original.direction == Direction.OUTBOUND:
        outmail = session.exec(select(Outmail).where(Outmail.message_pk == original.id)).first()
    for failed in report.failed:
        why = f"bounced: {failed.status} {failed.diagnostic}".strip()
        mark_undeliverable(session, ticket.id, failed.address, why, now)
        if outmail is not None:
            for row in session.exec(
                select(OutmailRecipient).where(
                    OutmailRecipient.outmail_id == outmail.id,
                    OutmailRecipient.email == failed.address,
                )
            ).all():
                row.status = RecipientState.BOUNCED.value
                row.error = why[:1000]
                session.add(row)
    _store_message(
        filing,
        ticket,
        inbound,
        parsed,
        None,
        now,
        kind=MessageKind.BOUNCE,
        auto_reasons=reasons,
        report=report,
        fingerprint=fingerprint,
    )
    _mark(inbound, InboundStatus.PROCESSED, now, ticket.id)
    return Filed(
        inbound.id,
        Outcome.BOUNCE,
        ticket.id,
        kind=MessageKind.BOUNCE.value,
        auto_reasons=tuple(reasons),
    )


@dataclass
class _Delivery:
    """One delivery as its filing steps share it."""

    inbound: Envelope
    parsed: ParsedMessage
    sender: Address | None
    routes: list[Decision]
    unrouted: list[str]
    fingerprint: str
    now: datetime


def file_message(
    filing: _Filing, context: FilingContext, inbound: Envelope, parsed: ParsedMessage
) -> Filed:
    """File one delivery; raises ProcessingError (or anything) to have it marked failed.

    The steps, in order: our own mail come back (dropped), a copy of a message already
    stored (a duplicate), a bounce (attached to its ticket), a route that drops it;
    else its ticket (new, or the one it threads into), participants and message, then
    the page and the acknowledgement it may call for."""
    now = utcnow()
    loop = _our_own_mail(parsed, context.acks)
    if loop is not None:
        return _drop(inbound, f"loop: {loop}; our own mail came back", now, MessageKind.AUTO)
    delivery, stored = _look_up(filing, context, inbound, parsed, now)
    if stored is not None:
        return _file_duplicate(filing, context, delivery, stored)
    parsed = delivery.parsed
    reasons = hygiene.auto_reasons(
        parsed.headers,
        envelope_sender=_envelope_sender(inbound),
        from_email=parsed.from_.email if parsed.from_ else "",
    )
    if parsed.report is not None:
        reasons = ["delivery status notification", *reasons]
        return _file_bounce(
            filing, inbound, parsed, parsed.report, reasons, context.acks, now, delivery.fingerprint
        )
    kind = MessageKind.AUTO if reasons else MessageKind.HUMAN
    route = _route(delivery)
    if route.drop:
        dropped = _drop(inbound, DROPPED_BY_ROUTE + route.name, now, kind)
        inbound.dropped_by_route = route.name
        return dropped
    claim = _agent_claim(context, delivery, kind)
    ticket, outcome, reopened, how = _ticket_for(
        filing, context, delivery, route, kind, agent=claim.verified
    )
    created = outcome is Outcome.CREATED
    assert ticket.id is not None
    notes = []
    if not created and claim.verified:
        kind = MessageKind.AGENT
    # a person's mail that claims an agent's From it cannot prove: filed, sent on to nobody
    unverified = not created and claim.claimed and kind == MessageKind.HUMAN
    if unverified:
        notes.append(claim.note())
    # a follow-up's writer already on the ticket (its copies go to the others)
    was_participant = not created and _sender_on(filing, ticket.id, delivery.sender)
    _store(filing, context, delivery, ticket, route, kind, reasons, outcome, notes)
    _mark(inbound, InboundStatus.PROCESSED, now, ticket.id)
    follow_up = not created and kind == MessageKind.HUMAN and not unverified
    page = _page(filing, context, delivery, ticket, created, reopened, follow_up)
    outmail = None
    if created and kind == MessageKind.HUMAN:
        outmail = _acknowledge(filing, context, delivery, ticket, route, page)
    mail: list[Queued] = []
    if kind == MessageKind.HUMAN and not unverified:
        mail += _correspond(filing, context, delivery, ticket, route, created, was_participant)
    elif kind == MessageKind.AGENT:
        mail += _relay(filing, context, delivery, ticket)
    filed = Filed(
        inbound.id,
        outcome,
        ticket.id,
        route.name,
        how,
        ticket_type=ticket.type,
        ticket_priority=ticket.priority,
        latency=(now - as_utc(inbound.received_at)).total_seconds(),
        kind=kind.value,
        auto_reasons=tuple(reasons),
        mail=tuple(mail),
    )
    return _with_ack(_with_page(filed, page), outmail)


def _our_own_mail(parsed: ParsedMessage, acks: AckPolicy | None) -> str | None:
    """Why this is maild's own mail come back (a loop), or None."""
    if acks is None:
        return None
    return hygiene.loop_reason(
        parsed.headers,
        parsed.message_id,
        our_loop_id=acks.loop_id,
        message_id_domain=acks.message_id_domain,
    )


def _look_up(
    filing: _Filing,
    context: FilingContext,
    inbound: Envelope,
    parsed: ParsedMessage,
    now: datetime,
) -> tuple[_Delivery, tuple[int, str | None] | None]:
    """The delivery routed, and the stored message it is a copy of (its ticket and
    fingerprint), if any. The same Message-ID with another sender or body is not the same
    message: it gets an id of its own and threads by its own headers, like any other."""
    sender = sender_of(parsed, inbound.mail_from)
    routes, unrouted = context.table.decide_all(inbound.rcpt_tos, MessageContext.of(parsed, sender))
    fingerprint = _fingerprint(sender, parsed)
    stored = filing.stored(message_id_hash(parsed.message_id))
    if stored is not None and stored[1] is not None and stored[1] != fingerprint:
        parsed = _own_message_id(parsed, stored[0], fingerprint)
        stored = filing.stored(message_id_hash(parsed.message_id))  # a retry of this one
    return _Delivery(inbound, parsed, sender, routes, unrouted, fingerprint, now), stored


def _file_duplicate(
    filing: _Filing,
    context: FilingContext,
    delivery: _Delivery,
    stored: tuple[int, str | None],
) -> Filed:
    """A copy of a stored message: nothing new is stored, but a route may raise its
    ticket's priority, and a copy that reached sysops@ pages (unless the desk has solved
    or closed the ticket since: nothing would explain the page then)."""
    ticket = filing.ticket(stored[0])
    assert ticket is not None
    if delivery.routes:
        before = (ticket.status, ticket.priority)
        by = delivery.sender.email if delivery.sender else ""
        _raise_priority(filing, ticket, best_decision(delivery.routes), by, delivery.now)
        _updated(filing, ticket, before, delivery.now)
    _mark(delivery.inbound, InboundStatus.DUPLICATE, delivery.now, ticket.id)
    page = None
    if TicketStatus(ticket.status) not in CLOSED_STATUSES:
        page = _page(filing, context, delivery, ticket, created=False, reopened=False)
    return _with_page(Filed(delivery.inbound.id, Outcome.DUPLICATE, ticket.id), page)


def _route(delivery: _Delivery) -> Decision:
    """The decision for the delivery's recipients; ProcessingError when the table no
    longer routes any of them."""
    if not delivery.routes:
        raise ProcessingError(
            f"no route for {', '.join(delivery.unrouted) or 'any recipient'} in the current "
            "rules (they changed after the message was accepted); fix the rules, then "
            "`maild reprocess`"
        )
    return best_decision(delivery.routes)


def _ticket_for(
    filing: _Filing,
    context: FilingContext,
    delivery: _Delivery,
    route: Decision,
    kind: MessageKind,
    agent: bool = False,
) -> tuple[Ticket, Outcome, bool, str | None]:
    """The ticket the message threads into (reopened when a person writes to a pending,
    solved or closed one; automatic mail and a verified `agent`'s never reopen), else a
    new one: (ticket, outcome, reopened, how it threaded)."""
    parsed, sender, now = delivery.parsed, delivery.sender, delivery.now
    ticket, how = find_thread(
        filing,
        parsed,
        sender.email if sender else "",
        delivery.inbound.rcpt_tos,
        context.acks,
        agent=agent,
    )
    if ticket is None:
        ticket = filing.new_ticket(
            dict(
                type=route.type.value,
                priority=route.priority.value,
                status=TicketStatus.OPEN.value,
                subject=parsed.subject,
                requester_email=sender.email if sender else "",
                requester_name=sender.name if sender else "",
                rule=route.name,
                rules_version=context.table.version,
                application=route.application,
                tags=list(route.tags),
                desk_address=addresses.route_key(route.recipient),
                created_at=now,
                updated_at=now,
            )
        )
        filing.event(TICKET_CREATED, ticket, now)
        return ticket, Outcome.CREATED, False, how
    before = (ticket.status, ticket.priority)
    reopened = kind == MessageKind.HUMAN and not agent and TicketStatus(ticket.status) in REOPENS
    by = sender.email if sender else ""
    if reopened:
        filing.history(ticket, TicketField.STATUS, ticket.status, TicketStatus.OPEN.value, by, now)
        ticket.status = TicketStatus.OPEN.value
    _raise_priority(filing, ticket, route, by, now)
    ticket.updated_at = now
    filing.changed(ticket)
    _updated(filing, ticket, before, now)
    return ticket, Outcome.THREADED, reopened, how


def _updated(filing: _Filing, ticket: Ticket, before: tuple[str, str], now: datetime) -> None:
    """The ticket.updated filing's own changes make (a reply reopening the ticket, a
    route raising its priority), by "maild"."""
    if filing.hooks is None:
        return
    changes = [
        change_data(name, old, new)
        for name, old, new in zip(
            ("status", "priority"), before, (ticket.status, ticket.priority), strict=True
        )
        if old != new
    ]
    if changes:
        filing.event(TICKET_UPDATED, ticket, now, changes=changes, by=BY_MAILD)


def _store(
    filing: _Filing,
    context: FilingContext,
    delivery: _Delivery,
    ticket: Ticket,
    route: Decision,
    kind: MessageKind,
    reasons: list[str],
    outcome: Outcome,
    notes: list[str] | None = None,
) -> None:
    """The sender and the addresses in To and Cc as participants (the sender is the
    requester of a new ticket; at most max_recipients are added), and the message. An
    agent's reply adds neither the agent nor any agent in its To and Cc."""
    parsed, sender = delivery.parsed, delivery.sender
    role = ParticipantRole.REQUESTER if outcome is Outcome.CREATED else ParticipantRole.CC
    others = [(a, ParticipantRole.CC) for a in [*parsed.to, *parsed.cc]]
    people = ([(sender, role)] if sender else []) + others
    desk = context.desk
    if kind == MessageKind.AGENT and desk is not None:
        people = [(a, r) for a, r in others if not desk.is_agent(a.email)]
    acks = context.acks
    limit = acks.limits.max_recipients if acks is not None else DEFAULT_MAX_RECIPIENTS
    left_out = _add_participants(filing, ticket, people, context.table, delivery.now, limit)
    notes = list(notes or [])
    if left_out:
        notes.append(
            f"TooManyAddresses: {left_out} more addresses in From, To and Cc were not added "
            f"as participants ([outbound] max_recipients = {limit})"
        )
    _store_message(
        filing,
        ticket,
        delivery.inbound,
        parsed,
        route,
        delivery.now,
        kind=kind,
        auto_reasons=reasons,
        fingerprint=delivery.fingerprint,
        notes=notes,
        rules_version=context.table.version,
    )


def _page(
    filing: _Filing,
    context: FilingContext,
    delivery: _Delivery,
    ticket: Ticket,
    created: bool,
    reopened: bool,
    follow_up: bool = False,
) -> Page | None:
    """The page this delivery calls for, if paging is on (paging.plan_trigger); a
    customer's `follow_up` to a ticket whose incident is open pages under its key."""
    if context.policy is None:
        return None
    filing.insert_tickets()  # the page row points at the ticket
    return plan_trigger(
        filing.session,
        context.policy,
        ticket,
        routes=delivery.routes,
        created=created,
        reopened=reopened,
        sender=delivery.sender,
        inbound=delivery.inbound,
        parsed=delivery.parsed,
        now=delivery.now,
        follow_up=follow_up,
    )


def _acknowledge(
    filing: _Filing,
    context: FilingContext,
    delivery: _Delivery,
    ticket: Ticket,
    route: Decision,
    page: Page | None,
) -> Outmail | None:
    """The acknowledgement of a person's new ticket, when the route asks for one; a
    problem writing it is logged and never costs the ticket."""
    acks = context.acks
    if acks is None or not acks.enabled or not route.ack:
        return None
    filing.flush()  # the acknowledgement reads the ticket's participants
    parsed = delivery.parsed
    try:
        with filing.session.begin_nested():
            return plan_ack(
                filing.session,
                acks,
                ticket,
                route=route.name,
                desk_address=addresses.route_key(route.recipient),
                in_reply_to="" if parsed.message_id_synthesized else parsed.message_id,
                now=delivery.now,
                paged=page is not None and page.status == OutboxStatus.PENDING,
            )
    except Exception:
        log.exception("acknowledgement not written; the ticket is filed", ticket=ticket.id)
        return None


@dataclass(frozen=True)
class _Claim:
    """Whether a message's From is one of `[desk] agents`, and whether that is proven."""

    claimed: bool = False
    verified: bool = False
    email: str = ""
    why: str = ""  # how it was verified, or why not

    def note(self) -> str:
        """What filing records on an unverified agent's message (its defects)."""
        return (
            f"UnverifiedAgent: From {self.email} is one of [desk] agents, but the mail is "
            f"not verified ({self.why}); filed as a customer's message, sent on to nobody"
        )


def _agent_claim(context: FilingContext, delivery: _Delivery, kind: MessageKind) -> _Claim:
    """An agent's From and its verdict (computed by the worker before this transaction);
    automatic mail from an agent's address (an out-of-office reply) is never a reply."""
    desk, parsed = context.desk, delivery.parsed
    if desk is None or parsed.from_ is None or not desk.is_agent(parsed.from_.email):
        return _Claim()
    email = parsed.from_.email.lower()
    verdict = parsed.authenticity
    if kind != MessageKind.HUMAN:
        return _Claim(True, False, email, "automatic mail")
    if verdict is None:
        return _Claim(True, False, email, "not checked")
    return _Claim(
        True, verdict.verified, email, verdict.how if verdict.verified else verdict.reason
    )


def _relay(
    filing: _Filing, context: FilingContext, delivery: _Delivery, ticket: Ticket
) -> list[Queued]:
    """A verified agent's mail sent on (template `reply`) to the requester and the
    participants it did not reach itself, with its attachments up to
    `[desk] copy_attachments_max`; in a savepoint, a problem logged, never fatal."""
    desk, sender = context.desk, delivery.sender
    if desk is None or not desk.sending or sender is None:
        return []
    assert ticket.id is not None
    parsed = delivery.parsed
    reached = {a.email.lower() for a in [*parsed.to, *parsed.cc]}
    if not filing.people(ticket.id) - reached - {sender.email.lower()}:
        return []
    filing.flush()  # the plan reads the ticket's participants and messages
    try:
        with filing.session.begin_nested():
            planned = plan_reply(
                filing.session,
                desk,
                ticket,
                agent=sender,
                text=parsed.text,
                attachments=parsed.attachments,
                leave_out=reached,
                attachment_limit=desk.copy_attachments_max,
                ours=context.table.is_ours,
                always=False,
                now=delivery.now,
            )
    except Exception:
        log.exception("agent reply not sent on; the message is filed", ticket=ticket.id)
        return []
    if planned is None:
        return []
    row = planned.outmail
    return [Queued(MessageKind.AGENT.value, row.id, row.status, row.reason)]


def _sender_on(filing: _Filing, ticket_id: int, sender: Address | None) -> bool:
    return sender is not None and sender.email.lower() in filing.people(ticket_id)


def _correspond(
    filing: _Filing,
    context: FilingContext,
    delivery: _Delivery,
    ticket: Ticket,
    route: Decision,
    created: bool,
    was_participant: bool,
) -> list[Queued]:
    """The desk's mail about a person's message: copies of a participant's follow-up to
    the participants it did not reach, and the route's notification. Each is written in a
    savepoint of its own; a problem is logged and never costs the ticket."""
    desk = context.desk
    sender = delivery.sender
    if desk is None or not desk.sending or sender is None:
        return []
    assert ticket.id is not None
    parsed, now = delivery.parsed, delivery.now
    reached = {a.email.lower() for a in [*parsed.to, *parsed.cc]}
    plans: list[tuple[str, Callable[[], Planned | None]]] = []
    copies_wanted = (
        not created
        and was_participant
        and desk.copies_on(route.copy_participants)
        and bool(filing.people(ticket.id) - reached - {sender.email.lower()})
    )
    if copies_wanted:
        plans.append(
            (
                MessageKind.COPY.value,
                lambda: plan_copy(
                    filing.session,
                    desk,
                    ticket,
                    writer=sender,
                    subject=parsed.subject,
                    text=parsed.text,
                    attachments=parsed.attachments,
                    leave_out=reached,
                    ours=context.table.is_ours,
                    now=now,
                ),
            )
        )
    if route.notify:
        plans.append(
            (
                MessageKind.NOTIFY.value,
                lambda: plan_notify(
                    filing.session,
                    desk,
                    ticket,
                    notify=route.notify,
                    writer=sender,
                    text=parsed.text,
                    attachments=parsed.attachments,
                    created=created,
                    ours=context.table.is_ours,
                    now=now,
                ),
            )
        )
    if not plans:
        return []
    filing.flush()  # the plans read the ticket's participants and messages
    queued = []
    for kind, plan in plans:
        try:
            with filing.session.begin_nested():
                planned = plan()
        except Exception:
            log.exception(
                "desk mail not written; the message is filed", ticket=ticket.id, kind=kind
            )
            continue
        if planned is not None:
            row = planned.outmail
            queued.append(Queued(kind, row.id, row.status, row.reason))
    return queued


def _mark_failed(inbound: Envelope, error: str) -> Filed:
    inbound.status = InboundStatus.FAILED.value
    inbound.error = error[:4000]
    inbound.processed_at = utcnow()
    inbound.ticket_id = None
    inbound.dropped_by_route = None
    return Filed(inbound.id, Outcome.FAILED, error=inbound.error)


def _digests(parsed: ParsedMessage) -> list[str]:
    """The Message-ID hashes filing this message may look up."""
    return [
        message_id_hash(i) for i in [parsed.message_id, *parsed.in_reply_to, *parsed.references]
    ]


def file_batch(
    session: Session,
    context: FilingContext,
    items: Sequence[tuple[int, ParsedMessage | BaseException]],
) -> list[Filed]:
    """File many deliveries in one transaction.

    One delivery that fails is marked failed with its error and the rest go on.
    Each delivery's row is locked first, so two filers never file one delivery.
    A unique-index race on the Message-ID (another instance filed the same
    message a moment ago) is retried once, and then files as a duplicate.

    The whole batch is first filed in one savepoint, its Message-ID lookups made
    in one query and its rows written together (_Filing). Only when something in
    it raises is that savepoint rolled back and the batch filed again, each
    delivery in a savepoint of its own with nothing cached, so that the failure
    stays with its delivery. Every delivery's outcome is then written in one
    UPDATE.
    """
    # FOR UPDATE on PostgreSQL, in id order: a second filer of the same deliveries (the
    # daemon and `maild ingest`, or two instances) waits here, then sees they are done.
    # SQLite's BEGIN IMMEDIATE already serialises writers. The raw bytes stay unread:
    # filing works from the parsed message.
    rows = session.execute(_LOCK_INBOUND, {"ids": [inbound_id for inbound_id, _ in items]}).all()
    by_id = {row.id: Envelope(**row._mapping) for row in rows}
    todo: list[tuple[Envelope, ParsedMessage | BaseException]] = []
    for inbound_id, parsed in items:
        inbound = by_id.get(inbound_id)
        if inbound is None or inbound.status not in (InboundStatus.RECEIVED, InboundStatus.FAILED):
            continue  # already handled (by reprocess, or by another instance)
        inbound.attempts += 1
        todo.append((inbound, parsed))
    # Before anything counts toward a per-address limit: serialise those counts with
    # every other filer (PostgreSQL; SQLite's writers take turns anyway).
    ratelimit.lock(session, _limit_keys(todo, context.policy, context.acks))
    try:
        results = _file_in_savepoint(session, context, todo)
    except Exception:  # filed again one by one, to find which
        results = [_file_alone(session, context, *item) for item in todo]
    if todo:
        session.execute(
            _UPDATE_INBOUND,
            [
                {
                    "row_id": e.id,
                    "status": e.status,
                    "error": e.error,
                    "attempts": e.attempts,
                    "processed_at": e.processed_at,
                    "ticket_id": e.ticket_id,
                    "dropped_by_route": e.dropped_by_route,
                }
                for e, _ in todo
            ],
        )
    return results


def _limit_keys(
    todo: Sequence[tuple[Envelope, ParsedMessage | BaseException]],
    policy: EscalationPolicy | None,
    acks: AckPolicy | None,
) -> set[str]:
    """Every address filing these deliveries may count toward a per-address limit that is
    on: each sender (pages and acknowledgements), and the people an acknowledgement may
    go to (the first max_recipients of To and Cc, the ones filing adds as participants)."""
    keys: set[str] = set()
    paged = policy is not None and policy.enabled and policy.max_per_hour > 0
    acked = acks is not None and acks.enabled and acks.limits.max_per_hour > 0
    for inbound, parsed in todo:
        if isinstance(parsed, BaseException):
            continue
        sender = sender_of(parsed, inbound.mail_from)
        if sender is not None and (paged or acked):
            keys.add(ratelimit.limit_key(sender.email))
        if acked and acks is not None:
            others = [*parsed.to, *parsed.cc][: acks.limits.max_recipients]
            keys.update(ratelimit.limit_key(a.email) for a in others)
    return keys


def _file_in_savepoint(
    session: Session,
    context: FilingContext,
    todo: Sequence[tuple[Envelope, ParsedMessage | BaseException]],
) -> list[Filed]:
    """These deliveries in one savepoint, their lookups and writes made together.
    Raises, with nothing written, when filing any of them raises."""
    with session.begin_nested():
        filing = _Filing(session, context.desk.webhooks if context.desk else None)
        filing.learn(d for _, p in todo if not isinstance(p, BaseException) for d in _digests(p))
        results = [_file_or_fail(filing, context, inbound, parsed) for inbound, parsed in todo]
        filing.flush()
    return results


def _file_alone(
    session: Session,
    context: FilingContext,
    inbound: Envelope,
    parsed: ParsedMessage | BaseException,
) -> Filed:
    """One delivery in a savepoint of its own; a failure is marked on it, not raised."""
    for attempt in (1, 2):
        try:
            (filed,) = _file_in_savepoint(session, context, [(inbound, parsed)])
            return filed
        except IntegrityError as exc:  # another filer stored the Message-ID meanwhile
            if attempt == 2:
                return _mark_failed(inbound, f"store: {exc.orig}")
        except Exception as exc:
            return _mark_failed(inbound, f"{type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")


def _file_or_fail(
    filing: _Filing,
    context: FilingContext,
    inbound: Envelope,
    parsed: ParsedMessage | BaseException,
) -> Filed:
    """One delivery: a parse failure is marked failed here; a filing failure raises."""
    if isinstance(parsed, BaseException):
        return _mark_failed(inbound, f"parse: {type(parsed).__name__}: {parsed}")
    return file_message(filing, context, inbound, parsed)
