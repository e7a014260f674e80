"""Reading tickets for the CLI; the JSON shapes of the contract live here.

Changing them is the desk's (desk/actions.py), which writes each change as an event.

Attachments are numbered 1..N per ticket, as `tickets show` lists them: by message (in
the order stored), then by attachment within the message (in the order stored).
`tickets attachment ID N` takes the same numbers (attachment_bytes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, func, or_
from sqlalchemy import select as select_core
from sqlmodel import Session, col, select

from maild.enums import Direction, TicketStatus
from maild.mail import addresses
from maild.store.models import (
    Attachment,
    Blob,
    Inbound,
    Message,
    Participant,
    Ticket,
    TicketEvent,
    as_utc,
    table_of,
)
from maild.store.outboxes import list_outmail, list_pages, ticket_pages
from maild.store.search import has_customer, has_participant, has_words

OPEN_STATUSES = (TicketStatus.OPEN.value, TicketStatus.PENDING.value)


class TicketNotFound(LookupError):
    pass


class AttachmentNotFound(LookupError):
    """No attachment of that number; `count` is how many the ticket has."""

    def __init__(self, ticket_id: int, number: int, count: int) -> None:
        have = {0: "no attachments", 1: "1 attachment"}.get(count, f"{count} attachments")
        super().__init__(f"ticket {ticket_id} has {have}; there is no attachment {number}")
        self.count = count


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


_TICKET = table_of(Ticket)
_PARTICIPANT = table_of(Participant)


def _participants(session: Session, ticket_ids: list[int]) -> dict[int, list[dict[str, str]]]:
    result: dict[int, list[dict[str, str]]] = defaultdict(list)
    if not ticket_ids:
        return result
    # Core rows, not ORM objects: a list reads a few hundred of them per page
    rows = session.execute(
        select_core(_PARTICIPANT)
        .where(_PARTICIPANT.c.ticket_id.in_(ticket_ids))
        .order_by(_PARTICIPANT.c.id)
    ).all()
    for person in rows:
        entry = {"email": person.email, "name": person.name, "role": person.role}
        if person.undeliverable_at is not None:  # a bounce or the smarthost said so
            entry["undeliverable"] = person.undeliverable_reason or "undeliverable"
        result[person.ticket_id].append(entry)
    return result


def _message_counts(
    session: Session, ticket_ids: list[int], public_only: bool = False
) -> dict[int, int]:
    if not ticket_ids:
        return {}
    query = select(Message.ticket_id, func.count(col(Message.id))).where(
        col(Message.ticket_id).in_(ticket_ids)
    )
    if public_only:
        query = query.where(col(Message.direction) != Direction.INTERNAL.value)
    rows = session.exec(query.group_by(col(Message.ticket_id))).all()
    return {ticket_id: count for ticket_id, count in rows}


def ticket_view(
    ticket: Ticket | Row[Any],  # a model, or a Core row of the ticket table
    participants: list[dict[str, str]],
    count: int,
    page: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "type": ticket.type,
        "priority": ticket.priority,
        "status": ticket.status,
        "subject": ticket.subject,
        "requester": ticket.requester_email,
        "participants": participants,
        "rule": ticket.rule,
        "rules_version": ticket.rules_version,
        "application": ticket.application,
        "tags": ticket.tags,
        "assignee": ticket.assignee,  # the agent working it, or null
        "created_at": _iso(ticket.created_at),
        "updated_at": _iso(ticket.updated_at),
        "message_count": count,
        "page": page,  # the latest page (on-call) for it: status, and why when withheld
    }


@dataclass(frozen=True)
class Filters:
    """Which tickets to list. status: open (open+pending), closed (solved+closed), all, or
    one exact status; participant: an address on the ticket or that wrote to it, any
    case; application: exactly; search: words one message has, all of them
    (store/search.py; search.TooManyWords past search.MAX_WORDS); assignee: only this
    agent's (compared lower-case); unassigned: only those nobody is assigned; requester:
    exactly, any case; updated_since: updated at or after; customer: a token's pattern,
    only the tickets where a participant matches it (then internal notes are neither
    searched nor counted as a participant's messages)."""

    status: str = "open"
    type_: str | None = None
    priority: str | None = None
    participant: str | None = None
    application: str | None = None
    search: str | None = None
    assignee: str | None = None
    unassigned: bool = False
    requester: str | None = None
    updated_since: datetime | None = None
    customer: str | None = None

    def conditions(self, session: Session) -> list[ColumnElement[bool]]:
        """The WHERE conditions on ticket (a search reads its index here: has_words)."""
        public_only = self.customer is not None
        conditions: list[ColumnElement[bool]] = []
        if self.status == "open":
            conditions.append(col(Ticket.status).in_(OPEN_STATUSES))
        elif self.status == "closed":
            conditions.append(
                col(Ticket.status).in_((TicketStatus.SOLVED.value, TicketStatus.CLOSED.value))
            )
        elif self.status != "all":
            conditions.append(col(Ticket.status) == self.status)
        if self.type_:
            conditions.append(col(Ticket.type) == self.type_)
        if self.priority:
            conditions.append(col(Ticket.priority) == self.priority)
        if self.assignee:
            conditions.append(col(Ticket.assignee) == addresses.normalize(self.assignee))
        if self.unassigned:
            conditions.append(col(Ticket.assignee).is_(None))
        if self.requester is not None:
            conditions.append(col(Ticket.requester_email) == addresses.normalize(self.requester))
        if self.updated_since is not None:
            conditions.append(col(Ticket.updated_at) >= self.updated_since)
        if self.customer is not None:
            conditions.append(has_customer(self.customer))
        if self.participant is not None:
            conditions.append(has_participant(session, self.participant, public_only=public_only))
        if self.application is not None:
            conditions.append(col(Ticket.application) == self.application)
        if self.search is not None:
            conditions.append(has_words(session, self.search, public_only=public_only))
        return conditions


def _views(
    session: Session, tickets: Sequence[Ticket | Row[Any]], public_only: bool
) -> list[dict[str, Any]]:
    ids = [t.id for t in tickets if t.id is not None]
    people = _participants(session, ids)
    counts = _message_counts(session, ids, public_only)
    pages = ticket_pages(session, ids)
    return [
        ticket_view(t, people.get(t.id or 0, []), counts.get(t.id or 0, 0), pages.get(t.id or 0))
        for t in tickets
    ]


def list_tickets(
    session: Session,
    *,
    status: str = "open",
    type_: str | None = None,
    priority: str | None = None,
    participant: str | None = None,
    application: str | None = None,
    search: str | None = None,
    limit: int | None = None,
    assignee: str | None = None,
    unassigned: bool = False,
) -> list[dict[str, Any]]:
    """Tickets, most recently updated first (`tickets list`); the filters are Filters'."""
    filters = Filters(
        status, type_, priority, participant, application, search, assignee, unassigned
    )
    query = select_core(_TICKET).where(*filters.conditions(session))
    query = query.order_by(_TICKET.c.updated_at.desc(), _TICKET.c.id.desc())
    if limit:
        query = query.limit(limit)
    return _views(session, session.execute(query).all(), public_only=False)


Position = tuple[datetime, int]  # a ticket's place in the newest-first order: (updated_at, id)


def page_tickets(
    session: Session, filters: Filters, *, limit: int, after: Position | None = None
) -> tuple[list[dict[str, Any]], Position | None]:
    """One page of the tickets `filters` selects, most recently updated first (ties:
    higher id first), after the position `after`; and the position of its last ticket
    when more follow (None: this is the last page). A customer's filter is part of the
    query: a page is never filtered after it is read."""
    query = select_core(_TICKET).where(*filters.conditions(session))
    if after is not None:
        updated, ticket_id = after
        query = query.where(
            or_(
                _TICKET.c.updated_at < updated,
                and_(_TICKET.c.updated_at == updated, _TICKET.c.id < ticket_id),
            )
        )
    query = query.order_by(_TICKET.c.updated_at.desc(), _TICKET.c.id.desc()).limit(limit + 1)
    tickets = list(session.execute(query).all())
    more = len(tickets) > limit
    tickets = tickets[:limit]
    last = tickets[-1] if more else None
    position = (as_utc(last.updated_at), last.id) if last is not None and last.id else None
    return _views(session, tickets, public_only=filters.customer is not None), position


def _address(name: str, email: str) -> dict[str, str]:
    return {"name": name, "email": email}


def show_ticket(session: Session, ticket_id: int, *, public_only: bool = False) -> dict[str, Any]:
    """The ticket with its messages, participants, events, pages and outgoing mail.
    `public_only` (a customer's view) leaves out internal notes and their attachments;
    the attachments keep their numbers."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise TicketNotFound(ticket_id)
    query = select(Message).where(Message.ticket_id == ticket_id)
    if public_only:
        query = query.where(col(Message.direction) != Direction.INTERNAL.value)
    messages = session.exec(query.order_by(col(Message.id))).all()
    attachments: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for number, (att, _) in enumerate(_attachments(session, ticket_id), start=1):
        attachments[att.message_pk].append(
            {
                "number": number,  # what `tickets attachment ID N` takes
                "filename": att.filename,
                "content_type": att.content_type,
                "size": att.size,
                "sha256": att.sha256,
            }
        )
    received = dict(
        session.exec(
            select(Inbound.id, Inbound.received_at).where(
                col(Inbound.id).in_([m.inbound_id for m in messages if m.inbound_id])
            )
        ).all()
    )
    view = ticket_view(
        ticket,
        _participants(session, [ticket_id]).get(ticket_id, []),
        len(messages),
        ticket_pages(session, [ticket_id]).get(ticket_id),
    )
    view["events"] = ticket_events(session, ticket_id)
    view["pages"] = list(reversed(list_pages(session, ticket_id=ticket_id)))
    view["acknowledgements"] = list_outmail(session, ticket_id=ticket_id, oldest_first=True)
    view["messages"] = [
        {
            "message_id": f"<{m.message_id}>",
            "from": _address(m.from_name, m.from_email),
            "to": m.to,
            "cc": m.cc,
            "subject": m.subject,
            "date": _iso(m.date),
            "received_at": _iso(received.get(m.inbound_id)) if m.inbound_id else None,
            "rule": m.rule,
            "rules_version": m.rules_version,
            "text": m.text,
            "attachments": attachments.get(m.id or 0, []),
            "defects": m.defects,
            "direction": m.direction,
            "kind": m.kind,
            "auto_reasons": m.auto_reasons,
            **({"report": m.report} if m.report else {}),
        }
        for m in messages
    ]
    return view


def ticket_events(session: Session, ticket_id: int) -> list[dict[str, Any]]:
    """The ticket's history, oldest first: what changed, from what, to what, by whom, when."""
    rows = session.exec(
        select(TicketEvent)
        .where(TicketEvent.ticket_id == ticket_id)
        .order_by(col(TicketEvent.created_at), col(TicketEvent.id))
    ).all()
    return [
        {"field": e.field, "old": e.old, "new": e.new, "by": e.by, "at": _iso(e.created_at)}
        for e in rows
    ]


def participant_emails(session: Session, ticket_id: int) -> list[str]:
    """The addresses of the ticket's participants (who a customer's token must match);
    TicketNotFound."""
    if session.get(Ticket, ticket_id) is None:
        raise TicketNotFound(ticket_id)
    return list(
        session.exec(select(Participant.email).where(Participant.ticket_id == ticket_id)).all()
    )


def _attachments(session: Session, ticket_id: int) -> list[tuple[Attachment, str]]:
    """The ticket's attachments in their numbered order (by message, then attachment id),
    each with its message's direction."""
    rows = session.exec(
        select(Attachment, Message.direction)
        .join(Message, col(Message.id) == col(Attachment.message_pk))
        .where(Message.ticket_id == ticket_id)
        .order_by(col(Message.id), col(Attachment.id))
    ).all()
    return [(attachment, direction) for attachment, direction in rows]


def attachment_bytes(
    session: Session, ticket_id: int, number: int, *, public_only: bool = False
) -> tuple[Attachment, bytes]:
    """The ticket's attachment number `number` (1-based, as `tickets show` numbers them) and
    its exact bytes. TicketNotFound, or AttachmentNotFound saying how many there are (with
    `public_only`, an internal note's attachment is not found either)."""
    if session.get(Ticket, ticket_id) is None:
        raise TicketNotFound(ticket_id)
    found = _attachments(session, ticket_id)
    if not 1 <= number <= len(found):
        raise AttachmentNotFound(ticket_id, number, len(found))
    attachment, direction = found[number - 1]
    if public_only and direction == Direction.INTERNAL.value:
        raise AttachmentNotFound(ticket_id, number, len(found))
    blob = session.get(Blob, attachment.sha256)
    if blob is None:  # a foreign key makes this impossible; say so rather than write nothing
        raise LookupError(f"the bytes of attachment {number} (sha256 {attachment.sha256}) are gone")
    return attachment, blob.data
