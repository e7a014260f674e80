"""Reading tickets for the CLI; the JSON shapes of the contract live here.

Changing them is the desk's (desk/actions.py), which writes each change as an event.

Attachments are numbered 1..N per ticket, as `tickets show` lists them: by message (in
the order stored), then by attachment within the message (in the order stored).
`tickets attachment ID N` takes the same numbers (attachment_bytes).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from maild.enums import TicketStatus
from maild.mail import addresses
from maild.store.models import (
    Attachment,
    Blob,
    Inbound,
    Message,
    Participant,
    Ticket,
    TicketEvent,
)
from maild.store.outboxes import list_outmail, list_pages, ticket_pages

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


def _participants(session: Session, ticket_ids: list[int]) -> dict[int, list[dict[str, str]]]:
    result: dict[int, list[dict[str, str]]] = defaultdict(list)
    if not ticket_ids:
        return result
    rows = session.exec(
        select(Participant)
        .where(col(Participant.ticket_id).in_(ticket_ids))
        .order_by(col(Participant.id))
    ).all()
    for person in rows:
        entry = {"email": person.email, "name": person.name, "role": person.role}
        if person.undeliverable_at is not None:  # a bounce or the smarthost said so
            entry["undeliverable"] = person.undeliverable_reason or "undeliverable"
        result[person.ticket_id].append(entry)
    return result


def _message_counts(session: Session, ticket_ids: list[int]) -> dict[int, int]:
    if not ticket_ids:
        return {}
    rows = session.exec(
        select(Message.ticket_id, func.count(col(Message.id)))
        .where(col(Message.ticket_id).in_(ticket_ids))
        .group_by(col(Message.ticket_id))
    ).all()
    return {ticket_id: count for ticket_id, count in rows}


def ticket_view(
    ticket: Ticket,
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


def list_tickets(
    session: Session,
    *,
    status: str = "open",
    type_: str | None = None,
    priority: str | None = None,
    search: str | None = None,
    limit: int | None = None,
    assignee: str | None = None,
    unassigned: bool = False,
) -> list[dict[str, Any]]:
    """Tickets, most recently updated first. status: open (open+pending), closed
    (solved+closed), all, or one exact status; assignee: only this agent's (compared
    lower-case); unassigned: only those nobody is assigned."""
    query = select(Ticket)
    if status == "open":
        query = query.where(col(Ticket.status).in_(OPEN_STATUSES))
    elif status == "closed":
        query = query.where(
            col(Ticket.status).in_((TicketStatus.SOLVED.value, TicketStatus.CLOSED.value))
        )
    elif status != "all":
        query = query.where(Ticket.status == status)
    if type_:
        query = query.where(Ticket.type == type_)
    if priority:
        query = query.where(Ticket.priority == priority)
    if assignee:
        query = query.where(Ticket.assignee == addresses.normalize(assignee))
    if unassigned:
        query = query.where(col(Ticket.assignee).is_(None))
    if search:
        escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"

        def like(column: Any) -> Any:
            return func.lower(column).like(pattern, escape="\\")

        in_messages = select(Message.ticket_id).where(
            or_(like(Message.subject), like(Message.text))
        )
        query = query.where(
            or_(
                like(Ticket.subject),
                like(Ticket.requester_email),
                like(Ticket.requester_name),
                col(Ticket.id).in_(in_messages),
            )
        )
    query = query.order_by(col(Ticket.updated_at).desc(), col(Ticket.id).desc())
    if limit:
        query = query.limit(limit)
    tickets = session.exec(query).all()
    ids = [t.id for t in tickets if t.id is not None]
    people = _participants(session, ids)
    counts = _message_counts(session, ids)
    pages = ticket_pages(session, ids)
    return [
        ticket_view(t, people.get(t.id or 0, []), counts.get(t.id or 0, 0), pages.get(t.id or 0))
        for t in tickets
    ]


def _address(name: str, email: str) -> dict[str, str]:
    return {"name": name, "email": email}


def show_ticket(session: Session, ticket_id: int) -> dict[str, Any]:
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise TicketNotFound(ticket_id)
    messages = session.exec(
        select(Message).where(Message.ticket_id == ticket_id).order_by(col(Message.id))
    ).all()
    attachments: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for number, att in enumerate(_attachments(session, ticket_id), start=1):
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


def _attachments(session: Session, ticket_id: int) -> list[Attachment]:
    """The ticket's attachments in their numbered order: by message, then attachment id."""
    return list(
        session.exec(
            select(Attachment)
            .join(Message, col(Message.id) == col(Attachment.message_pk))
            .where(Message.ticket_id == ticket_id)
            .order_by(col(Message.id), col(Attachment.id))
        ).all()
    )


def attachment_bytes(session: Session, ticket_id: int, number: int) -> tuple[Attachment, bytes]:
    """The ticket's attachment number `number` (1-based, as `tickets show` numbers them) and
    its exact bytes. TicketNotFound, or AttachmentNotFound saying how many there are."""
    if session.get(Ticket, ticket_id) is None:
        raise TicketNotFound(ticket_id)
    found = _attachments(session, ticket_id)
    if not 1 <= number <= len(found):
        raise AttachmentNotFound(ticket_id, number, len(found))
    attachment = found[number - 1]
    blob = session.get(Blob, attachment.sha256)
    if blob is None:  # a foreign key makes this impossible; say so rather than write nothing
        raise LookupError(f"the bytes of attachment {number} (sha256 {attachment.sha256}) are gone")
    return attachment, blob.data
