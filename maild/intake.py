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
5. Page: whether on-call is paged for it (escalation.plan_trigger); the page
   row commits with the ticket or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from maild import addresses
from maild.addresses import Address
from maild.enums import InboundStatus, ParticipantRole, Priority, TicketStatus
from maild.escalation import EscalationPolicy, plan_trigger
from maild.models import (
    Attachment,
    Blob,
    Inbound,
    Message,
    Page,
    Participant,
    Ticket,
    as_utc,
    utcnow,
)
from maild.parsing import ParsedMessage, message_id_hash
from maild.rules import Route, RuleTable, best_route, resolve_all

SUBJECT_TAG = re.compile(r"\[#(\d{1,18})\]")
REOPENS = frozenset({TicketStatus.PENDING, TicketStatus.SOLVED, TicketStatus.CLOSED})


class ProcessingError(Exception):
    """A delivery cannot be filed as it stands; it is kept as failed with this text."""


@dataclass(frozen=True)
class Filed:
    """What happened to one delivery."""

    inbound_id: int
    outcome: str  # created | threaded | duplicate | failed
    ticket_id: int | None = None
    route: str | None = None
    threaded_by: str | None = None  # in-reply-to | references | subject-tag
    error: str | None = None
    page_id: int | None = None
    page_status: str | None = None  # pending | withheld
    page_reason: str | None = None  # why it was withheld
    ticket_type: str | None = None  # of a created ticket
    ticket_priority: str | None = None
    latency: float | None = None  # seconds from the 250 to filing


def _with_page(filed: Filed, page: Page | None) -> Filed:
    if page is None:
        return filed
    return replace(filed, page_id=page.id, page_status=page.status, page_reason=page.reason)


def _insert_ignore(session: Session, model: Any, values: dict[str, Any]) -> None:
    """INSERT that does nothing when the row exists (content-addressed blobs)."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(model).values(**values).on_conflict_do_nothing())


def _thread_by_ids(session: Session, ids: Sequence[str]) -> int | None:
    if not ids:
        return None
    hashes = [message_id_hash(i) for i in ids]
    rows = session.exec(
        select(Message.message_id_hash, Message.ticket_id).where(
            col(Message.message_id_hash).in_(hashes)
        )
    ).all()
    found = dict(rows)
    for digest in hashes:
        if digest in found:
            return found[digest]
    return None


def is_participant(session: Session, ticket_id: int, email: str) -> bool:
    return (
        session.exec(
            select(Participant.id).where(
                Participant.ticket_id == ticket_id, Participant.email == email.lower()
            )
        ).first()
        is not None
    )


def find_thread(
    session: Session, parsed: ParsedMessage, sender: str
) -> tuple[Ticket | None, str | None]:
    """The ticket this message answers and how we know, or (None, None)."""
    ticket_id = _thread_by_ids(session, parsed.in_reply_to)
    how = "in-reply-to"
    if ticket_id is None:
        ticket_id = _thread_by_ids(session, list(reversed(parsed.references)))
        how = "references"
    if ticket_id is not None:
        return session.get(Ticket, ticket_id), how
    if sender:
        for match in SUBJECT_TAG.finditer(parsed.subject):
            candidate = int(match.group(1))
            if is_participant(session, candidate, sender):
                return session.get(Ticket, candidate), "subject-tag"
    return None, None


def _sender(parsed: ParsedMessage, mail_from: str) -> Address | None:
    if parsed.from_ is not None:
        return parsed.from_
    if mail_from and "@" in mail_from:
        return Address(name="", email=addresses.normalize(mail_from))
    return None


def _add_participants(
    session: Session,
    ticket: Ticket,
    people: Iterable[tuple[Address, ParticipantRole]],
    table: RuleTable,
) -> None:
    assert ticket.id is not None
    known = set(
        session.exec(select(Participant.email).where(Participant.ticket_id == ticket.id)).all()
    )
    for person, role in people:
        email = person.email.lower()
        if not email or email in known or table.is_ours(email):
            continue
        known.add(email)
        session.add(Participant(ticket_id=ticket.id, email=email, name=person.name, role=role))


def _store_message(
    session: Session,
    ticket: Ticket,
    inbound: Inbound,
    parsed: ParsedMessage,
    route: Route,
    now: datetime,
) -> Message:
    assert ticket.id is not None
    message = Message(
        ticket_id=ticket.id,
        inbound_id=inbound.id,
        message_id=parsed.message_id,
        message_id_hash=message_id_hash(parsed.message_id),
        message_id_synthesized=parsed.message_id_synthesized,
        in_reply_to=parsed.in_reply_to,
        references=parsed.references,
        from_email=parsed.from_.email if parsed.from_ else "",
        from_name=parsed.from_.name if parsed.from_ else "",
        to=[a.as_dict() for a in parsed.to],
        cc=[a.as_dict() for a in parsed.cc],
        subject=parsed.subject,
        date=parsed.date,
        text=parsed.text,
        rule=route.name,
        defects=parsed.defects,
        created_at=now,
    )
    session.add(message)
    session.flush()  # the unique Message-ID hash is checked here, inside the savepoint
    assert message.id is not None
    for attachment in parsed.attachments:
        _insert_ignore(
            session,
            Blob,
            {"sha256": attachment.sha256, "size": attachment.size, "data": attachment.data},
        )
        session.add(
            Attachment(
                message_pk=message.id,
                filename=attachment.filename,
                content_type=attachment.content_type,
                size=attachment.size,
                sha256=attachment.sha256,
            )
        )
    return message


def _raise_priority(ticket: Ticket, route: Route) -> None:
    if route.priority.rank > Priority(ticket.priority).rank:
        ticket.priority = route.priority.value


def file_message(
    session: Session,
    table: RuleTable,
    inbound: Inbound,
    parsed: ParsedMessage,
    policy: EscalationPolicy | None = None,
) -> Filed:
    """File one delivery; raises ProcessingError (or anything) to have it marked failed."""
    assert inbound.id is not None
    now = utcnow()
    routes, unrouted = resolve_all(table, inbound.rcpt_tos)
    existing = session.exec(
        select(Message.ticket_id).where(
            Message.message_id_hash == message_id_hash(parsed.message_id)
        )
    ).first()
    sender = _sender(parsed, inbound.mail_from)
    if existing is not None:
        ticket = session.get(Ticket, existing)
        assert ticket is not None
        if routes:
            _raise_priority(ticket, best_route(routes))
        inbound.status = InboundStatus.DUPLICATE.value
        inbound.ticket_id = ticket.id
        inbound.processed_at = now
        inbound.error = None
        page = None
        if policy is not None:  # the same message reached sysops@ in a second delivery
            page = plan_trigger(
                session,
                policy,
                ticket,
                routes=routes,
                created=False,
                reopened=False,
                sender=sender,
                inbound=inbound,
                parsed=parsed,
                now=now,
            )
        return _with_page(Filed(inbound.id, "duplicate", ticket.id), page)
    if not routes:
        raise ProcessingError(
            f"no route for {', '.join(unrouted) or 'any recipient'} in the current rules "
            "(they changed after the message was accepted); fix the rules, then "
            "`maild reprocess`"
        )
    route = best_route(routes)
    ticket, how = find_thread(session, parsed, sender.email if sender else "")
    others = [(a, ParticipantRole.CC) for a in [*parsed.to, *parsed.cc]]
    if ticket is None:
        ticket = Ticket(
            type=route.type.value,
            priority=route.priority.value,
            status=TicketStatus.OPEN.value,
            subject=parsed.subject,
            requester_email=sender.email if sender else "",
            requester_name=sender.name if sender else "",
            rule=route.name,
            rules_version=table.version,
            created_at=now,
            updated_at=now,
        )
        session.add(ticket)
        session.flush()
        outcome = "created"
        reopened = False
        people = ([(sender, ParticipantRole.REQUESTER)] if sender else []) + others
    else:
        reopened = TicketStatus(ticket.status) in REOPENS
        if reopened:
            ticket.status = TicketStatus.OPEN.value
        _raise_priority(ticket, route)
        ticket.updated_at = now
        session.add(ticket)
        outcome = "threaded"
        people = ([(sender, ParticipantRole.CC)] if sender else []) + others
    _add_participants(session, ticket, people, table)
    _store_message(session, ticket, inbound, parsed, route, now)
    inbound.status = InboundStatus.PROCESSED.value
    inbound.ticket_id = ticket.id
    inbound.processed_at = now
    inbound.error = None
    page = None
    if policy is not None:
        page = plan_trigger(
            session,
            policy,
            ticket,
            routes=routes,
            created=outcome == "created",
            reopened=reopened,
            sender=sender,
            inbound=inbound,
            parsed=parsed,
            now=now,
        )
    filed = Filed(
        inbound.id,
        outcome,
        ticket.id,
        route.name,
        how,
        ticket_type=ticket.type,
        ticket_priority=ticket.priority,
        latency=(now - as_utc(inbound.received_at)).total_seconds(),
    )
    return _with_page(filed, page)


def _mark_failed(inbound: Inbound, error: str) -> Filed:
    assert inbound.id is not None
    inbound.status = InboundStatus.FAILED.value
    inbound.error = error[:4000]
    inbound.processed_at = utcnow()
    return Filed(inbound.id, "failed", error=inbound.error)


def file_batch(
    session: Session,
    table: RuleTable,
    items: Sequence[tuple[int, ParsedMessage | BaseException]],
    policy: EscalationPolicy | None = None,
) -> list[Filed]:
    """File many deliveries in one transaction, each in its own savepoint.

    One delivery that fails is marked failed with its error and the rest go on.
    Each delivery's row is locked first, so two filers never file one delivery.
    A unique-index race on the Message-ID (another instance filed the same
    message a moment ago) is retried once, and then files as a duplicate.
    """
    results = []
    for inbound_id, parsed in items:
        # FOR UPDATE on PostgreSQL: a second filer of the same delivery (the daemon
        # and `maild ingest`, or two instances) waits here, then sees it is done.
        # SQLite's BEGIN IMMEDIATE already serialises writers.
        inbound = session.get(Inbound, inbound_id, with_for_update=True, populate_existing=True)
        if inbound is None or inbound.status not in (InboundStatus.RECEIVED, InboundStatus.FAILED):
            continue  # already handled (by reprocess, or by another instance)
        inbound.attempts += 1
        if isinstance(parsed, BaseException):
            results.append(_mark_failed(inbound, f"parse: {type(parsed).__name__}: {parsed}"))
            continue
        for attempt in (1, 2):
            try:
                with session.begin_nested():
                    results.append(file_message(session, table, inbound, parsed, policy))
                break
            except IntegrityError as exc:
                if attempt == 2:
                    results.append(_mark_failed(inbound, f"store: {exc.orig}"))
            except Exception as exc:
                results.append(_mark_failed(inbound, f"{type(exc).__name__}: {exc}"))
                break
        session.add(inbound)
    return results
