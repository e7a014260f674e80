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
6. Acknowledge: a new ticket from a person gets an acknowledgement
   (acks.plan_ack), also committed with the ticket.

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

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from maild import addresses, hygiene
from maild.acks import AckPolicy, plan_ack
from maild.addresses import Address
from maild.dsn import DeliveryReport
from maild.enums import (
    Direction,
    InboundStatus,
    MessageKind,
    ParticipantRole,
    Priority,
    RecipientState,
    TicketStatus,
)
from maild.escalation import EscalationPolicy, plan_trigger
from maild.mailer import mark_undeliverable
from maild.models import (
    Attachment,
    Blob,
    Inbound,
    Message,
    Outmail,
    OutmailRecipient,
    Page,
    Participant,
    Ticket,
    as_utc,
    utcnow,
)
from maild.parsing import MAX_ADDRESS, ParsedMessage, message_id_hash
from maild.rules import Decision, MessageContext, RuleTable, best_decision

log = structlog.get_logger("maild.intake")
SUBJECT_TAG = re.compile(r"\[#(\d{1,18})\]")
REOPENS = frozenset({TicketStatus.PENDING, TicketStatus.SOLVED, TicketStatus.CLOSED})


class ProcessingError(Exception):
    """A delivery cannot be filed as it stands; it is kept as failed with this text."""


@dataclass(frozen=True)
class Filed:
    """What happened to one delivery."""

    inbound_id: int
    outcome: str  # created | threaded | duplicate | bounce | dropped | failed
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


def _with_page(filed: Filed, page: Page | None) -> Filed:
    if page is None:
        return filed
    return replace(filed, page_id=page.id, page_status=page.status, page_reason=page.reason)


def _with_ack(filed: Filed, outmail: Outmail | None) -> Filed:
    if outmail is None:
        return filed
    return replace(filed, ack_id=outmail.id, ack_status=outmail.status, ack_reason=outmail.reason)


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
    session: Session,
    parsed: ParsedMessage,
    sender: str,
    recipients: Sequence[str] = (),
    acks: AckPolicy | None = None,
) -> tuple[Ticket | None, str | None]:
    """The ticket this message answers and how we know, or (None, None).

    A valid `+token` reply address comes first (it names the ticket, whoever
    writes); an invalid one is plain mail to the base address.
    """
    if acks is not None:
        by_token = acks.ticket_for(list(recipients))
        ticket = session.get(Ticket, by_token) if by_token is not None else None
        if ticket is not None:
            return ticket, "reply-address"
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


DROPPED_BY_ROUTE = "dropped by route "  # and its name: the reason `rules replay` reads back


def _sender(parsed: ParsedMessage, mail_from: str) -> Address | None:
    """From, else the envelope sender; None when neither is a usable address."""
    if parsed.from_ is not None:
        return parsed.from_
    # MAIL FROM is not parsed as headers are: the same length rule applies here.
    if mail_from and "@" in mail_from and len(mail_from) <= MAX_ADDRESS:
        return Address(name="", email=addresses.normalize(mail_from))
    return None


# The rows every message writes go in as plain Core INSERTs on the tables, built once:
# the ORM's unit of work (and building a statement per call) cost more than all the
# rest of filing.
_INSERT_PARTICIPANT = insert(Participant.__table__)  # type: ignore[attr-defined]
_INSERT_MESSAGE = insert(Message.__table__).returning(  # type: ignore[attr-defined]
    Message.__table__.c.id  # type: ignore[attr-defined]
)
_INSERT_ATTACHMENT = insert(Attachment.__table__)  # type: ignore[attr-defined]
_TICKET_OF_MESSAGE = select(Message.ticket_id).where(Message.message_id_hash == bindparam("digest"))


def _add_participants(
    session: Session,
    ticket: Ticket,
    people: Iterable[tuple[Address, ParticipantRole]],
    table: RuleTable,
    now: datetime,
    new_ticket: bool = False,
) -> None:
    assert ticket.id is not None
    known: set[str] = set()
    if not new_ticket:  # a ticket made a moment ago has no one yet
        known.update(
            session.exec(select(Participant.email).where(Participant.ticket_id == ticket.id)).all()
        )
    rows = []
    for person, role in people:
        email = person.email.lower()
        if not email or email in known or table.is_ours(email):
            continue
        known.add(email)
        rows.append(
            {
                "ticket_id": ticket.id,
                "email": email,
                "name": person.name,
                "role": role.value,
                "created_at": now,
            }
        )
    if rows:  # one INSERT for all of them, past the ORM's unit of work (the hot path)
        session.execute(_INSERT_PARTICIPANT, rows)


def _store_message(
    session: Session,
    ticket: Ticket,
    inbound: Inbound,
    parsed: ParsedMessage,
    route: Decision | None,
    now: datetime,
    kind: MessageKind = MessageKind.HUMAN,
    auto_reasons: Sequence[str] = (),
    report: DeliveryReport | None = None,
) -> int:
    """Insert the message (and its attachments); its primary key.

    A plain INSERT … RETURNING rather than an ORM object: this runs for every
    message, and the unit of work costs more than the rest of filing. The unique
    Message-ID hash is checked here, inside the caller's savepoint."""
    assert ticket.id is not None
    message_pk: int = session.execute(
        _INSERT_MESSAGE,
        dict(
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
            rule=route.name if route else "",
            defects=parsed.defects,
            direction=Direction.INBOUND.value,
            kind=kind.value,
            auto_reasons=list(auto_reasons),
            report=report.as_dict() if report else None,
            created_at=now,
        ),
    ).scalar_one()
    for attachment in parsed.attachments:
        _insert_ignore(
            session,
            Blob,
            {"sha256": attachment.sha256, "size": attachment.size, "data": attachment.data},
        )
        session.execute(
            _INSERT_ATTACHMENT,
            dict(
                message_pk=message_pk,
                filename=attachment.filename,
                content_type=attachment.content_type,
                size=attachment.size,
                sha256=attachment.sha256,
            ),
        )
    return message_pk


def _raise_priority(ticket: Ticket, route: Decision) -> None:
    if route.priority.rank > Priority(ticket.priority).rank:
        ticket.priority = route.priority.value


def _envelope_sender(inbound: Inbound) -> str | None:
    """MAIL FROM ("" is `<>`), or None when a pipe delivery passed no sender."""
    if inbound.protocol == "pipe" and not inbound.mail_from:
        return None
    return inbound.mail_from


def _mark(inbound: Inbound, status: InboundStatus, now: datetime, ticket_id: int | None) -> None:
    inbound.status = status.value
    inbound.ticket_id = ticket_id
    inbound.processed_at = now
    inbound.error = None


def _drop(inbound: Inbound, reason: str, now: datetime, kind: MessageKind) -> Filed:
    """Keep the delivery, file nothing: the reason is its error text."""
    assert inbound.id is not None
    _mark(inbound, InboundStatus.DROPPED, now, None)
    inbound.error = reason[:4000]
    return Filed(inbound.id, "dropped", error=inbound.error, kind=kind.value)


def _file_bounce(
    session: Session,
    inbound: Inbound,
    parsed: ParsedMessage,
    report: DeliveryReport,
    reasons: list[str],
    acks: AckPolicy | None,
    now: datetime,
) -> Filed:
    """Attach a DSN to the ticket of the message it reports on; never a new ticket."""
    assert inbound.id is not None
    original: Message | None = None
    if report.original_message_id:
        original = session.exec(
            select(Message).where(
                Message.message_id_hash == message_id_hash(report.original_message_id)
            )
        ).first()
    ticket: Ticket | None = session.get(Ticket, original.ticket_id) if original else None
    if ticket is None and acks is not None:  # the report left out the original: its address
        by_token = acks.ticket_for(list(inbound.rcpt_tos))
        ticket = session.get(Ticket, by_token) if by_token is not None else None
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
        session,
        ticket,
        inbound,
        parsed,
        None,
        now,
        kind=MessageKind.BOUNCE,
        auto_reasons=reasons,
        report=report,
    )
    _mark(inbound, InboundStatus.PROCESSED, now, ticket.id)
    return Filed(
        inbound.id,
        "bounce",
        ticket.id,
        kind=MessageKind.BOUNCE.value,
        auto_reasons=tuple(reasons),
    )


def file_message(
    session: Session,
    table: RuleTable,
    inbound: Inbound,
    parsed: ParsedMessage,
    policy: EscalationPolicy | None = None,
    acks: AckPolicy | None = None,
) -> Filed:
    """File one delivery; raises ProcessingError (or anything) to have it marked failed."""
    assert inbound.id is not None
    now = utcnow()
    if acks is not None:
        loop = hygiene.loop_reason(
            parsed.headers,
            parsed.message_id,
            our_loop_id=acks.loop_id,
            message_id_domain=acks.message_id_domain,
        )
        if loop is not None:
            return _drop(inbound, f"loop: {loop}; our own mail came back", now, MessageKind.AUTO)
    sender = _sender(parsed, inbound.mail_from)
    context = MessageContext(
        sender=sender.email if sender else "",
        subject=parsed.subject,
        headers=tuple(parsed.headers),
    )
    routes, unrouted = table.decide_all(inbound.rcpt_tos, context)
    existing = session.exec(
        _TICKET_OF_MESSAGE, params={"digest": message_id_hash(parsed.message_id)}
    ).first()
    if existing is not None:
        ticket = session.get(Ticket, existing)
        assert ticket is not None
        if routes:
            _raise_priority(ticket, best_decision(routes))
        _mark(inbound, InboundStatus.DUPLICATE, now, ticket.id)
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
    reasons = hygiene.auto_reasons(
        parsed.headers,
        envelope_sender=_envelope_sender(inbound),
        from_email=parsed.from_.email if parsed.from_ else "",
    )
    if parsed.report is not None:
        reasons = ["delivery status notification", *reasons]
        return _file_bounce(session, inbound, parsed, parsed.report, reasons, acks, now)
    kind = MessageKind.AUTO if reasons else MessageKind.HUMAN
    if not routes:
        raise ProcessingError(
            f"no route for {', '.join(unrouted) or 'any recipient'} in the current rules "
            "(they changed after the message was accepted); fix the rules, then "
            "`maild reprocess`"
        )
    route = best_decision(routes)
    if route.drop:
        return _drop(inbound, DROPPED_BY_ROUTE + route.name, now, kind)
    ticket, how = find_thread(
        session, parsed, sender.email if sender else "", inbound.rcpt_tos, acks
    )
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
            application=route.application,
            tags=list(route.tags),
            created_at=now,
            updated_at=now,
        )
        session.add(ticket)
        session.flush()
        outcome = "created"
        reopened = False
        people = ([(sender, ParticipantRole.REQUESTER)] if sender else []) + others
    else:
        # Automatic mail (an out-of-office reply) lands in its ticket but never reopens it.
        reopened = kind == MessageKind.HUMAN and TicketStatus(ticket.status) in REOPENS
        if reopened:
            ticket.status = TicketStatus.OPEN.value
        _raise_priority(ticket, route)
        ticket.updated_at = now
        session.add(ticket)
        outcome = "threaded"
        people = ([(sender, ParticipantRole.CC)] if sender else []) + others
    _add_participants(session, ticket, people, table, now, new_ticket=outcome == "created")
    _store_message(session, ticket, inbound, parsed, route, now, kind=kind, auto_reasons=reasons)
    _mark(inbound, InboundStatus.PROCESSED, now, ticket.id)
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
    outmail = None
    if (
        outcome == "created"
        and kind == MessageKind.HUMAN
        and acks is not None
        and acks.enabled
        and route.ack
    ):
        try:
            with session.begin_nested():  # an acknowledgement problem never costs the ticket
                outmail = plan_ack(
                    session,
                    acks,
                    ticket,
                    route=route.name,
                    desk_address=addresses.route_key(route.recipient),
                    in_reply_to="" if parsed.message_id_synthesized else parsed.message_id,
                    now=now,
                    paged=page is not None and page.status == "pending",
                )
        except Exception:
            log.exception("acknowledgement not written; the ticket is filed", ticket=ticket.id)
            outmail = None
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
    )
    return _with_ack(_with_page(filed, page), outmail)


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
    acks: AckPolicy | None = None,
) -> list[Filed]:
    """File many deliveries in one transaction.

    One delivery that fails is marked failed with its error and the rest go on.
    Each delivery's row is locked first, so two filers never file one delivery.
    A unique-index race on the Message-ID (another instance filed the same
    message a moment ago) is retried once, and then files as a duplicate.

    The whole batch is first filed in one savepoint. Only when something in it
    raises is that savepoint rolled back and the batch filed again, each delivery
    in a savepoint of its own, so that the failure stays with its delivery: a
    savepoint per message costs more than the rest of filing a reply.
    """
    # FOR UPDATE on PostgreSQL, in id order: a second filer of the same deliveries (the
    # daemon and `maild ingest`, or two instances) waits here, then sees they are done.
    # SQLite's BEGIN IMMEDIATE already serialises writers. The raw bytes stay unread:
    # filing works from the parsed message.
    rows = session.exec(
        select(Inbound)
        .where(col(Inbound.id).in_([inbound_id for inbound_id, _ in items]))
        .order_by(col(Inbound.id))
        .options(defer(Inbound.raw))  # type: ignore[arg-type]
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    by_id = {row.id: row for row in rows}
    todo: list[tuple[Inbound, ParsedMessage | BaseException]] = []
    for inbound_id, parsed in items:
        inbound = by_id.get(inbound_id)
        if inbound is None or inbound.status not in (InboundStatus.RECEIVED, InboundStatus.FAILED):
            continue  # already handled (by reprocess, or by another instance)
        inbound.attempts += 1
        session.add(inbound)
        todo.append((inbound, parsed))
    try:
        with session.begin_nested():
            return [
                _file_or_fail(session, table, inbound, parsed, policy, acks)
                for inbound, parsed in todo
            ]
    except Exception:  # noqa: S110 (filed again below, one savepoint each, to find which)
        pass
    results = []
    for inbound, parsed in todo:
        for attempt in (1, 2):
            try:
                with session.begin_nested():
                    results.append(_file_or_fail(session, table, inbound, parsed, policy, acks))
                break
            except IntegrityError as exc:
                if attempt == 2:
                    results.append(_mark_failed(inbound, f"store: {exc.orig}"))
            except Exception as exc:
                results.append(_mark_failed(inbound, f"{type(exc).__name__}: {exc}"))
                break
    return results


def _file_or_fail(
    session: Session,
    table: RuleTable,
    inbound: Inbound,
    parsed: ParsedMessage | BaseException,
    policy: EscalationPolicy | None,
    acks: AckPolicy | None,
) -> Filed:
    """One delivery: a parse failure is marked failed here; a filing failure raises."""
    if isinstance(parsed, BaseException):
        return _mark_failed(inbound, f"parse: {type(parsed).__name__}: {parsed}")
    return file_message(session, table, inbound, parsed, policy, acks)
