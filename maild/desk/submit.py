"""Tickets and customers' replies that come from outside mail (the HTTP API's dashboard
forms), filed through the same code as mail.

A submission becomes a real RFC 5322 message that maild writes: From the requester
(or the replying customer), To a desk address, Cc, Subject, the text, the attachments
(base64, so their bytes come back exact), a Message-ID of maild's (`api.…`, never the
`maild.…` form of its own outgoing mail, which filing drops as a loop) and an
`X-Maild-Via: api; token=NAME` header. It is stored as an inbound delivery (protocol
`api`, its bytes kept like any mail's) and filed at once by filing/intake.file_batch in
the caller's transaction, so that the answer can carry the ticket: routing, the
acknowledgement, paging (the requester is the sender for `[escalation]
allowed_senders` and the hourly limit), copies and notifications are filing's, never a
second copy of them. Nothing here reads the message back: it is parsed
(mail.parsing.parse_message) as mail is, off the event loop by the caller.

- A new ticket (`compose_ticket`, `file_ticket`) goes To the desk address of the first
  route, in table order, whose decision for this sender and subject makes the type and
  priority asked for (`route_for`; SubmitRefused naming `type` or `priority` when no
  route does). `application`, when given, replaces the route's on the new ticket, in
  the same transaction.
- A customer's reply (`thread_of`, `compose_reply`, `file_reply`) goes To the ticket's
  reply address (its desk address when maild sends no mail) with In-Reply-To its latest
  message that is not an internal note, as a mail reply would: it reopens the ticket
  and is copied to the other participants. The author and the `cc` addresses are made
  participants first (they did not receive the message, as a mail's Cc would have, so
  they are sent the copy rather than left out of it).

The caller commits; SubmitFailed (filing did not file it as asked) rolls it all back.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from sqlalchemy import update
from sqlmodel import Session, col, select

from maild.enums import Direction, Outcome, ParticipantRole, Priority, TicketType
from maild.errors import RecipientRefused
from maild.filing.intake import Filed, FilingContext, file_batch
from maild.mail.addresses import Address
from maild.mail.parsing import SYNTHETIC_DOMAIN, ParsedMessage, parse_message, safe_filename
from maild.mail.text import one_line
from maild.outbound.acks import header_address
from maild.outbound.correspondence import DeskPolicy, FileData
from maild.receive.spool import Delivery, insert_deliveries
from maild.routing.rules import Decision, MessageContext, RuleTable
from maild.store.models import Message, Participant, Ticket, table_of
from maild.store.tickets import TicketNotFound

__all__ = [
    "VIA_HEADER",
    "Composed",
    "CustomerReply",
    "NewTicket",
    "SubmitFailed",
    "SubmitRefused",
    "Thread",
    "Unroutable",
    "compose_reply",
    "compose_ticket",
    "file_reply",
    "file_ticket",
    "route_for",
    "thread_of",
]

VIA_HEADER = "X-Maild-Via"
PROTOCOL = "api"  # inbound.protocol of a submission
# MIME cannot carry these types as base64 leaves: such a file is attached as bytes.
_CONTAINERS = ("multipart", "message")
_TICKET = table_of(Ticket)


class SubmitRefused(ValueError):
    """A submission that cannot be filed as it stands; `field` names the part at fault
    (a dotted path, as the API's problem names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unroutable(RuntimeError):
    """The ticket's desk address has no route in the current rules: a reply to it could
    not be filed (the message says which address)."""


class SubmitFailed(RuntimeError):
    """Filing did not file the submission as asked (a bug, or rules changed meanwhile)."""


@dataclass(frozen=True)
class NewTicket:
    """The dashboard's form for a new ticket (addresses checked by the caller)."""

    requester: Address
    type: TicketType
    priority: Priority
    subject: str
    description: str
    application: str | None = None  # None: the route's
    cc: tuple[Address, ...] = ()
    attachments: tuple[FileData, ...] = ()


@dataclass(frozen=True)
class CustomerReply:
    """A customer's reply to a ticket from the dashboard."""

    author: Address
    body: str
    cc: tuple[Address, ...] = ()
    attachments: tuple[FileData, ...] = ()


@dataclass(frozen=True)
class Thread:
    """What a customer's reply to a ticket is addressed and threaded by."""

    ticket_id: int
    subject: str
    recipient: str  # the ticket's reply address, or its desk address when mail is off
    in_reply_to: str  # the latest message that is not an internal note ("" when none)
    references: tuple[str, ...]


@dataclass(frozen=True)
class Composed:
    """A submission as the message maild wrote for it: its delivery and its parse."""

    delivery: Delivery
    parsed: ParsedMessage

    @property
    def message_id(self) -> str:
        return self.parsed.message_id


# Choosing the desk address of a new ticket.


def _concrete(table: RuleTable) -> list[str]:
    """The desk addresses the table names exactly (no `*@` or `+*`), in table order."""
    seen: dict[str, None] = {}
    for route in table.routes:
        for pattern in route.patterns:
            if pattern.local != "*" and pattern.tag != "*":
                seen.setdefault(pattern.text)
    return list(seen)


def route_for(
    table: RuleTable,
    kind: TicketType,
    priority: Priority,
    context: Callable[[str], MessageContext],
) -> Decision:
    """The decision of the first desk address (in table order) whose route, for the
    message `context(address)` describes, makes a ticket of this type and priority.
    SubmitRefused naming `type` (no route makes that type) or `priority`."""
    made: dict[TicketType, dict[Priority, list[str]]] = {}
    for address in _concrete(table):
        try:
            decision = table.decide(address, context(address))
        except RecipientRefused:
            continue
        if decision.drop:
            continue
        if (decision.type, decision.priority) == (kind, priority):
            return decision
        made.setdefault(decision.type, {}).setdefault(decision.priority, []).append(address)
    if kind not in made:
        known = ", ".join(sorted(t.value for t in made)) or "none"
        raise SubmitRefused(
            "type", f"no route of the desk makes {kind.value} tickets (the routes make: {known})"
        )
    at = "; ".join(
        f"{p.value} ({', '.join(made[kind][p])})" for p in sorted(made[kind], key=lambda p: p.rank)
    )
    raise SubmitRefused(
        "priority",
        f"no route of the desk makes {kind.value} tickets at priority {priority.value}; "
        f"it makes them at {at}",
    )


# Writing the message.


def _message_id(context: FilingContext) -> str:
    domain = context.acks.message_id_domain if context.acks is not None else SYNTHETIC_DOMAIN
    return f"api.{secrets.token_hex(12)}@{domain}"


def _text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _compose(
    *,
    sender: Address,
    recipient: str,
    cc: Sequence[Address],
    subject: str,
    text: str,
    attachments: Sequence[FileData],
    message_id: str,
    via: str,
    now: datetime,
    in_reply_to: str = "",
    references: Sequence[str] = (),
) -> bytes:
    message = EmailMessage(policy=SMTP)
    message["From"] = header_address(sender)
    message["To"] = recipient
    if cc:
        message["Cc"] = [header_address(person) for person in cc]
    message["Subject"] = one_line(subject, controls=True)
    message["Date"] = format_datetime(now)
    message["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        message["In-Reply-To"] = f"<{in_reply_to}>"
    if references:
        message["References"] = " ".join(f"<{r}>" for r in references)
    message[VIA_HEADER] = via
    message.set_content(_text(text))
    for file in attachments:
        maintype, _, subtype = file.content_type.partition("/")
        if maintype in _CONTAINERS or not subtype:
            maintype, subtype = "application", "octet-stream"
        message.add_attachment(
            file.data, maintype=maintype, subtype=subtype, filename=safe_filename(file.filename)
        )
    return message.as_bytes()


def _context(sender: Address, subject: str, via: str) -> Callable[[str], MessageContext]:
    """What routing sees of the message maild will write, for each desk address tried."""

    def of(address: str) -> MessageContext:
        headers = (
            ("From", f"{sender.name} <{sender.email}>" if sender.name else sender.email),
            ("To", address),
            ("Subject", one_line(subject, controls=True)),
            (VIA_HEADER, via),
        )
        return MessageContext(sender=sender.email, subject=headers[2][1], headers=headers)

    return of


def compose_ticket(
    context: FilingContext, form: NewTicket, *, via: str, peer: str, now: datetime
) -> Composed:
    """The message for a new ticket, addressed to the route that makes its type and
    priority (SubmitRefused naming `type` or `priority`), and its parse. CPU work: run
    it off the event loop."""
    decision = route_for(
        context.table, form.type, form.priority, _context(form.requester, form.subject, via)
    )
    raw = _compose(
        sender=form.requester,
        recipient=decision.recipient,
        cc=form.cc,
        subject=form.subject,
        text=form.description,
        attachments=form.attachments,
        message_id=_message_id(context),
        via=via,
        now=now,
    )
    return _composed(context, raw, form.requester, decision.recipient, via, peer, now)


def _composed(
    context: FilingContext,
    raw: bytes,
    sender: Address,
    recipient: str,
    via: str,
    peer: str,
    now: datetime,
) -> Composed:
    delivery = Delivery(
        protocol=PROTOCOL,
        mail_from=sender.email,
        rcpt_tos=[recipient],
        raw=raw,
        peer=peer,
        session_id=via[:64],
        received_at=now,
    )
    return Composed(delivery, parse_message(raw, context.table.header_names))


def thread_of(session: Session, policy: DeskPolicy, table: RuleTable, ticket_id: int) -> Thread:
    """How a customer's reply to the ticket is addressed and threaded. TicketNotFound;
    Unroutable when the current rules route neither its reply address nor its desk
    address."""
    ticket = session.get(Ticket, ticket_id)
    if ticket is None:
        raise TicketNotFound(ticket_id)
    public = (
        select(Message.message_id)
        .where(Message.ticket_id == ticket_id)
        .where(col(Message.direction) != Direction.INTERNAL.value)
    )
    first = session.exec(public.order_by(col(Message.id)).limit(1)).first()
    latest = session.exec(public.order_by(col(Message.id).desc()).limit(1)).first()
    recipient = policy.reply_to(ticket) if policy.acks.secret else policy.desk_address(ticket)
    try:
        table.resolve(recipient)
    except RecipientRefused:
        raise Unroutable(
            f"ticket {ticket_id}'s desk address {policy.desk_address(ticket) or '(none)'} has "
            "no route in the current rules: a reply to it cannot be filed"
        ) from None
    references = tuple(dict.fromkeys(i for i in (first, latest) if i))
    subject = one_line(ticket.subject, controls=True)
    return Thread(
        ticket_id,
        subject if subject.lower().startswith("re:") else f"Re: {subject}".rstrip(),
        recipient,
        latest or "",
        references,
    )


def compose_reply(
    context: FilingContext,
    thread: Thread,
    form: CustomerReply,
    *,
    via: str,
    peer: str,
    now: datetime,
) -> Composed:
    """The message for a customer's reply to `thread`'s ticket, and its parse (CPU work:
    off the event loop). Its `cc` are made participants by file_reply, not written in
    its Cc (see the module's docstring)."""
    raw = _compose(
        sender=form.author,
        recipient=thread.recipient,
        cc=(),
        subject=thread.subject,
        text=form.body,
        attachments=form.attachments,
        message_id=_message_id(context),
        via=via,
        now=now,
        in_reply_to=thread.in_reply_to,
        references=thread.references,
    )
    return _composed(context, raw, form.author, thread.recipient, via, peer, now)


# Filing it.


def _file(session: Session, context: FilingContext, composed: Composed) -> Filed:
    (inbound_id,) = insert_deliveries(session, [composed.delivery])
    (filed,) = file_batch(session, context, [(inbound_id, composed.parsed)])
    return filed


def file_ticket(
    session: Session, context: FilingContext, composed: Composed, form: NewTicket
) -> Filed:
    """Store and file the new ticket's message in the caller's transaction; its
    application set when the form gives one. SubmitFailed when filing made no new
    ticket of the type and priority asked for."""
    filed = _file(session, context, composed)
    if filed.outcome is not Outcome.CREATED or filed.ticket_id is None:
        raise SubmitFailed(f"filing did not open a ticket: {filed.outcome} {filed.error or ''}")
    made = (filed.ticket_type, filed.ticket_priority)
    if made != (form.type.value, form.priority.value):
        raise SubmitFailed(
            f"filing made a {made[0]} {made[1]} ticket, not {form.type.value} "
            f"{form.priority.value} (the rules changed meanwhile?)"
        )
    if form.application is not None:
        session.execute(
            update(_TICKET)
            .where(_TICKET.c.id == filed.ticket_id)
            .values(application=form.application)
        )
    return filed


def file_reply(
    session: Session,
    context: FilingContext,
    composed: Composed,
    thread: Thread,
    form: CustomerReply,
    now: datetime,
) -> tuple[Filed, list[str]]:
    """Make the author and the `cc` participants (those not yet on the ticket), then
    store and file the reply in the caller's transaction: the filing and the
    participants it added. SubmitFailed when filing did not thread it into the ticket."""
    known = set(
        session.exec(
            select(Participant.email).where(Participant.ticket_id == thread.ticket_id)
        ).all()
    )
    added = []
    for person in (form.author, *form.cc):
        email = person.email.lower()
        if email in known:
            continue
        known.add(email)
        added.append(email)
        session.add(
            Participant(
                ticket_id=thread.ticket_id,
                email=email,
                name=person.name,
                role=ParticipantRole.CC.value,
                created_at=now,
            )
        )
    session.flush()
    filed = _file(session, context, composed)
    if filed.outcome is not Outcome.THREADED or filed.ticket_id != thread.ticket_id:
        raise SubmitFailed(
            f"filing did not add the reply to ticket {thread.ticket_id}: {filed.outcome} "
            f"ticket {filed.ticket_id} {filed.error or ''}"
        )
    return filed, added
