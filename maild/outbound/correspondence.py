"""The desk's correspondence: agents' replies, copies to participants, notifications to
the team, the solved notice. What each says and who it goes to.

Four kinds of mail, each planned in the transaction that makes it necessary and
sent by the mailer through the durable outbox (outgoing.queue_mail: one
`message`, one `outmail`, one `outmail_rcpt` per recipient):

- `agent` (template `reply`): an agent's public answer, from `maild tickets
  reply` or relayed from the agent's own verified mail, to the requester and
  every other participant (not to those the agent's mail already reached).
- `copy`: a participant's mail to the ticket, copied to the other participants
  who were not among its own To and Cc; the attachments go along up to
  `[desk] copy_attachments_max` in total, else the copy lists them.
- `notify`: a route's `notify` addresses hear of each new ticket and each
  customer follow-up: the text shortened, a link to the ticket.
- `solved`: the requester hears that the ticket is solved (a reply reopens it).

Headers of every desk mail:

- From: "<writer> via <desk name>" <the desk address the ticket came in
  through (or `[outbound] from`'s)>: never the customer's or the agent's own
  address, which would fail DMARC at the recipients' servers. Display names are
  one line, control characters removed: nothing can be injected through them.
- Reply-To and envelope sender: the ticket's reply address (`+token`), so an
  answer, or a bounce, finds the ticket whoever sends it.
- Subject `[#ID] subject`, In-Reply-To the latest message of the ticket,
  References the thread (its first message and the latest ones, at most
  REFERENCES_MAX), our own Message-ID form and the loop header, so that our own
  mail coming back is dropped as a loop.
- RFC 3834: an agent's answer is a person's mail, so it carries no
  Auto-Submitted (an out-of-office reply to it is legitimate and threads as
  automatic mail). Copies, notifications and the solved notice are sent by a
  program, not in answer to their recipients, so they carry `Auto-Submitted:
  auto-generated` (not `auto-replied`: they do not go back to the sender of the
  mail that caused them), `X-Auto-Response-Suppress: All` and `Precedence:
  bulk`, so that auto-responders leave them alone.

Limits: at most `[outbound] max_recipients` addresses per mail; undeliverable and
robot addresses withheld (outgoing.choose_recipients). Copies, notifications
and solved notices to one address count against `[desk]
max_copies_per_address_per_hour` together; an agent's answer is not limited.
"""

from __future__ import annotations

import email.utils
import hashlib
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime
from typing import Protocol

from sqlmodel import Session, col, select

from maild.config import Settings
from maild.enums import MessageKind, ParticipantRole, RecipientState
from maild.mail import addresses, hygiene
from maild.mail.addresses import Address, sender_matches
from maild.mail.authenticity import AuthPolicy
from maild.mail.message_ids import message_id_hash
from maild.mail.text import one_line
from maild.outbound.acks import (
    AckPolicy,
    Rendered,
    ack_subject,
    header_address,
    make_token,
    reply_address,
)
from maild.outbound.outgoing import OutboundLimits, choose_recipients, queue_mail
from maild.outbound.webhook_events import Webhooks
from maild.store.models import Message, Outmail, Participant, Ticket

REFERENCES_MAX = 20  # message ids in References: the thread's first and its latest
MESSAGE_ID_CHARS = 250  # a longer stored Message-ID is not repeated in our headers
WRITER_NAME_CHARS = 64  # of a writer's name in "<name> via <desk>"
NOTIFY_LINES = 40  # of the text a notification repeats
NOTIFY_CHARS = 4000
# Mail a program sends to people who did not write to it (RFC 3834 "auto-generated").
AUTOMATIC = frozenset({MessageKind.COPY, MessageKind.NOTIFY, MessageKind.SOLVED})
LIMITED_KINDS = tuple(k.value for k in (MessageKind.COPY, MessageKind.NOTIFY, MessageKind.SOLVED))
TEMPLATE_OF = {
    MessageKind.AGENT: "reply",
    MessageKind.COPY: "copy",
    MessageKind.NOTIFY: "notify",
    MessageKind.SOLVED: "solved",
}
NEW_TICKET = "New ticket"
FOLLOW_UP = "Follow-up to ticket"


class FileLike(Protocol):
    """An attachment as mail carries it (a parsed one, or a file an agent attaches)."""

    @property
    def filename(self) -> str: ...
    @property
    def content_type(self) -> str: ...
    @property
    def data(self) -> bytes: ...


@dataclass(frozen=True)
class FileData:
    """A file an agent attaches to a reply: its safe name (no folders), type and bytes."""

    filename: str
    content_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _desk_name(settings: Settings) -> str:
    outbound = settings.outbound
    name, address = email.utils.parseaddr(outbound.from_)
    return (
        one_line(settings.desk.name, controls=True)
        or one_line(name, controls=True)
        or addresses.domain_of(address)
        or "the desk"
    )


@dataclass(frozen=True)
class DeskPolicy:
    """What the settings say about the desk's correspondence, in the form filing and the
    CLI need. `acks` carries the sender, secret, Message-ID domain, loop id, templates
    and `[outbound] max_recipients`; `webhooks`, the `[[webhook]]`s told of the desk's
    events (None: none configured), goes wherever the desk's policy goes: filing, the
    desk's changes and replies, from the daemon, the CLI and the API alike."""

    acks: AckPolicy
    agents: tuple[str, ...] = ()
    name: str = "the desk"
    ticket_url: str = ""
    copy_participants: bool = True
    copy_attachments_max: int = 10 * 1024 * 1024
    max_per_hour: int = 20  # copies, notifications and solved notices per address
    max_attachment_size: int = 25 * 1024 * 1024  # what an agent may attach, in total
    auth: AuthPolicy = field(default_factory=AuthPolicy)  # how an agent's mail is verified
    webhooks: Webhooks | None = None  # who hears of tickets, messages and pages

    @classmethod
    def from_settings(cls, settings: Settings, acks: AckPolicy | None = None) -> DeskPolicy:
        """Raises ConfigError naming a template file and line at fault (when `acks` is not
        given, the templates are loaded here)."""
        desk = settings.desk
        return cls(
            acks=acks or AckPolicy.from_settings(settings.outbound),
            agents=tuple(desk.agents),
            name=_desk_name(settings),
            ticket_url=desk.ticket_url or settings.pagerduty.ticket_url,
            copy_participants=desk.copy_participants,
            copy_attachments_max=desk.copy_attachments_max,
            max_per_hour=desk.max_copies_per_address_per_hour,
            max_attachment_size=settings.smtp.max_message_size,
            auth=AuthPolicy(
                trusted_authserv_id=desk.trusted_authserv_id,
                verify_dkim=desk.verify_dkim,
                dns_resolver=desk.dns_resolver,
                dns_timeout=desk.dns_timeout,
            ),
            webhooks=Webhooks.from_settings(settings),
        )

    @property
    def sending(self) -> bool:
        """Whether desk mail can be sent at all: a smarthost, a sender and a secret."""
        return self.acks.enabled

    def is_agent(self, email: str) -> bool:
        return bool(email) and any(sender_matches(p, email) for p in self.agents)

    def link(self, ticket_id: int) -> str:
        return self.ticket_url.format(id=ticket_id) if self.ticket_url else ""

    def copies_on(self, route_setting: bool | None) -> bool:
        """A route's `copy_participants`, else `[desk] copy_participants`."""
        return self.copy_participants if route_setting is None else route_setting

    @property
    def copy_limits(self) -> OutboundLimits:
        return OutboundLimits(
            max_recipients=self.acks.limits.max_recipients,
            max_per_hour=self.max_per_hour,
            counted_kinds=LIMITED_KINDS,
        )

    @property
    def reply_limits(self) -> OutboundLimits:
        """An agent's answer: the recipient cap, no hourly limit (a person wrote it)."""
        return OutboundLimits(max_recipients=self.acks.limits.max_recipients)

    def desk_address(self, ticket: Ticket) -> str:
        """The address desk mail about this ticket comes from: the one it came in through."""
        return (
            addresses.route_key(ticket.desk_address)
            if ticket.desk_address
            else (self.acks.from_address)
        )

    def reply_to(self, ticket: Ticket) -> str:
        assert ticket.id is not None
        return reply_address(self.desk_address(ticket), make_token(self.acks.secret, ticket.id))

    def is_ours(self, email: str, ticket: Ticket) -> bool:
        """The desk's own sending addresses (and any +token of them)."""
        key = addresses.route_key(email)
        return key in (addresses.route_key(self.acks.from_address), self.desk_address(ticket))


PER_HOUR_SETTING = "[desk] max_copies_per_address_per_hour"


# Reading the thread.


@dataclass(frozen=True)
class Thread:
    """The Message-IDs desk mail threads under: the latest message, and References."""

    in_reply_to: str = ""
    references: tuple[str, ...] = ()


def thread_of(session: Session, ticket_id: int) -> Thread:
    """The ticket's first message and its latest ones (real Message-IDs only: not those
    maild made up for mail that had none, nor unusable ones), at most REFERENCES_MAX,
    oldest first."""
    real = (Message.ticket_id == ticket_id, col(Message.message_id_synthesized).is_(False))
    first = session.exec(
        select(Message.message_id).where(*real).order_by(col(Message.id)).limit(1)
    ).first()
    latest = list(
        session.exec(
            select(Message.message_id)
            .where(*real)
            .order_by(col(Message.id).desc())
            .limit(REFERENCES_MAX - 1)
        ).all()
    )
    ids = [i for i in reversed(latest) if _usable_id(i)]
    if first is not None and _usable_id(first) and first not in ids:
        ids.insert(0, first)
    return Thread(in_reply_to=ids[-1] if ids else "", references=tuple(ids))


def _usable_id(message_id: str) -> bool:
    """A stored Message-ID we may write into In-Reply-To and References: a stranger's id
    with spaces, controls or brackets in it (or of any length) is left out."""
    return (
        0 < len(message_id) <= MESSAGE_ID_CHARS
        and message_id.isprintable()
        and not any(c.isspace() or c in "<>" for c in message_id)
    )


def participants(session: Session, ticket_id: int) -> list[Participant]:
    """The ticket's participants, the requester first, then in the order they joined."""
    people = list(
        session.exec(
            select(Participant)
            .where(Participant.ticket_id == ticket_id)
            .order_by(col(Participant.id))
        ).all()
    )
    return sorted(people, key=lambda p: p.role != ParticipantRole.REQUESTER)


# Rendering.


def writer_label(person: Address | None) -> str:
    """Who wrote it, as "<this> via <desk>" shows it: the name, else the address."""
    if person is None:
        return ""
    return one_line(person.name, WRITER_NAME_CHARS, controls=True) or person.email


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.0f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"


def attachment_list(files: Sequence[FileLike]) -> str:
    return ", ".join(
        f"{one_line(f.filename, 255, controls=True)} ({_size(len(f.data))})" for f in files
    )


def attachments_within(
    files: Sequence[FileLike], limit: int, where: str = "they are on the ticket"
) -> tuple[list[FileLike], str]:
    """The files a mail carries (all, when their total is within `limit`) and the note that
    lists those it leaves out."""
    if not files:
        return [], ""
    if sum(len(f.data) for f in files) <= limit:
        return list(files), ""
    return [], (
        f"\nAttachments not included (over {_size(limit)} in all; {where}): "
        f"{attachment_list(files)}\n"
    )


def shortened(text: str, lines: int = NOTIFY_LINES, chars: int = NOTIFY_CHARS) -> str:
    kept = text.strip().splitlines()[:lines]
    body = "\n".join(kept)
    cut = len(kept) < len(text.strip().splitlines())
    if len(body) > chars:
        body, cut = body[: chars - 1].rstrip(), True
    return body + ("\n[…]" if cut else "")


def template_fields(
    policy: DeskPolicy,
    ticket: Ticket,
    *,
    writer: Address | None = None,
    body: str = "",
    attachments_note: str = "",
    event: str = "",
) -> dict[str, str]:
    """Every placeholder a desk template may use (templates.KIND_PLACEHOLDERS)."""
    assert ticket.id is not None
    requester_name = one_line(ticket.requester_name, controls=True)
    return {
        "ticket_id": str(ticket.id),
        "subject": one_line(ticket.subject, controls=True) or "(no subject)",
        "ticket_type": ticket.type,
        "priority": ticket.priority,
        "status": ticket.status,
        "reply_address": policy.reply_to(ticket),
        "desk_address": policy.desk_address(ticket),
        "desk_name": policy.name,
        "ticket_url": policy.link(ticket.id),
        "greeting_name": requester_name or ticket.requester_email,
        "requester_name": requester_name,
        "requester_email": ticket.requester_email,
        "author_name": writer_label(writer),
        "author_email": writer.email if writer else "",
        "body": body.rstrip(),  # the template sets the spacing around it
        "attachments_note": attachments_note,
        "event": event,
        "route": ticket.rule,
    }


_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$&^_.+-")  # RFC 6838 names


def _content_type(value: str) -> tuple[str, str]:
    """(maintype, subtype) of a stored content type; application/octet-stream when it is
    not a plain type name (nothing of it can reach another header), or when it is a
    message or multipart type, which RFC 2046 does not allow in base64."""
    maintype, _, subtype = value.strip().lower().partition("/")
    if (
        maintype
        and subtype
        and maintype not in ("message", "multipart")
        and _TYPE_CHARS.issuperset(maintype + subtype)
    ):
        return maintype, subtype
    return "application", "octet-stream"


@dataclass(frozen=True)
class Sender:
    """The From of a desk mail: "<writer> via <desk>" <desk address>."""

    name: str
    email: str


def from_of(policy: DeskPolicy, ticket: Ticket, writer: Address | None) -> Sender:
    label = writer_label(writer)
    return Sender(
        f"{label} via {policy.name}" if label else policy.name, policy.desk_address(ticket)
    )


def render(
    policy: DeskPolicy,
    kind: MessageKind,
    *,
    ticket: Ticket,
    sender: Sender,
    to: Sequence[Address],
    subject: str,
    body: str,
    thread: Thread,
    attachments: Sequence[FileLike] = (),
    now: datetime,
) -> Rendered:
    """A desk mail's bytes. Every header value is one line: nothing a customer or an
    agent wrote can start another header."""
    assert ticket.id is not None
    reply_to = policy.reply_to(ticket)
    everyone = [p.email for p in to] + [sender.email, reply_to]
    smtputf8 = not all(a.isascii() for a in everyone)
    message = EmailMessage(policy=SMTPUTF8 if smtputf8 else SMTP)
    unique = f"{kind.value}.{ticket.id}.{secrets.token_hex(8)}"
    message_id = f"{hygiene.OUR_MESSAGE_ID_PREFIX}{unique}@{policy.acks.message_id_domain}"
    message["From"] = header_address(Address(sender.name, sender.email))
    if to:
        message["To"] = header_address(to[0])
    if len(to) > 1:
        message["Cc"] = [header_address(p) for p in to[1:]]
    message["Reply-To"] = reply_to
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = f"<{message_id}>"
    if thread.in_reply_to:
        message["In-Reply-To"] = f"<{thread.in_reply_to}>"
    if thread.references:
        message["References"] = " ".join(f"<{i}>" for i in thread.references)
    if kind in AUTOMATIC:
        message["Auto-Submitted"] = "auto-generated"
        message["X-Auto-Response-Suppress"] = "All"
        message["Precedence"] = "bulk"
    message[hygiene.LOOP_HEADER] = policy.acks.loop_id
    message["X-Maild-Ticket"] = str(ticket.id)
    message.set_content(body, cte="quoted-printable")
    for item in attachments:
        maintype, subtype = _content_type(item.content_type)
        name = one_line(item.filename, 255, controls=True) or "attachment"
        message.add_attachment(item.data, maintype=maintype, subtype=subtype, filename=name)
    return Rendered(message_id=message_id, raw=message.as_bytes(), subject=subject, body=body)


# Planning: who gets what, written to the outbox.


@dataclass(frozen=True)
class Planned:
    """A desk mail queued: its stored message and its outbox row."""

    message: Message
    outmail: Outmail


def _queue(
    session: Session,
    policy: DeskPolicy,
    kind: MessageKind,
    *,
    ticket: Ticket,
    writer: Address | None,
    candidates: Sequence[Address],
    fields: dict[str, str],
    subject: str = "",
    text: str = "",
    attachments: Sequence[FileLike] = (),
    now: datetime,
) -> Planned:
    """Choose the recipients, render the kind's template, and write message, outmail and
    recipients. An agent's answer is stored as the agent's message (their address and
    `text`) and is not limited per hour; the desk's own mail (copy, notify, solved) is
    stored as sent, From the desk, and counts toward the hourly limit."""
    assert ticket.id is not None
    agent = kind == MessageKind.AGENT
    limits = policy.reply_limits if agent else policy.copy_limits
    chosen, left_out = choose_recipients(
        session, limits, candidates, now, per_hour_setting=PER_HOUR_SETTING
    )
    sending = [r.person for r in chosen if r.state == RecipientState.PENDING]
    body = policy.acks.templates.get(TEMPLATE_OF[kind], ticket.rule).substitute(fields)
    thread = thread_of(session, ticket.id)
    sender = from_of(policy, ticket, writer)
    rendered = render(
        policy,
        kind,
        ticket=ticket,
        sender=sender,
        to=sending or [r.person for r in chosen],
        subject=ack_subject(ticket.id, subject or ticket.subject),
        body=body,
        thread=thread,
        attachments=attachments,
        now=now,
    )
    stored = writer if agent and writer is not None else Address(sender.name, sender.email)
    message = Message(
        ticket_id=ticket.id,
        message_id=rendered.message_id,
        message_id_hash=message_id_hash(rendered.message_id),
        in_reply_to=[thread.in_reply_to] if thread.in_reply_to else [],
        references=list(thread.references),
        from_email=stored.email,
        from_name=stored.name,
        to=[r.person.as_dict() for r in chosen[:1]],
        cc=[r.person.as_dict() for r in chosen[1:]],
        subject=rendered.subject,
        date=now,
        text=text if agent else body,
        rule=ticket.rule,
        kind=kind.value,
        created_at=now,
    )
    outmail = queue_mail(
        session,
        limits,
        ticket_id=ticket.id,
        kind=kind.value,
        message=message,
        raw=rendered.raw,
        mail_from=policy.reply_to(ticket),
        recipients=chosen,
        now=now,
        left_out=left_out,
    )
    return Planned(message, outmail)


def _people(
    session: Session,
    ticket: Ticket,
    *,
    leave_out: Collection[str],
    ours: Callable[[str], bool],
    policy: DeskPolicy,
) -> list[Address]:
    """The ticket's participants (requester first) but those left out and the desk's own."""
    assert ticket.id is not None
    skip = {a.lower() for a in leave_out}
    return [
        Address(p.name, p.email)
        for p in participants(session, ticket.id)
        if p.email.lower() not in skip and not ours(p.email) and not policy.is_ours(p.email, ticket)
    ]


def _never(_: str) -> bool:
    return False


def plan_reply(
    session: Session,
    policy: DeskPolicy,
    ticket: Ticket,
    *,
    agent: Address,
    text: str,
    attachments: Sequence[FileLike] = (),
    leave_out: Collection[str] = (),
    attachment_limit: int | None = None,
    ours: Callable[[str], bool] = _never,
    always: bool = True,
    now: datetime,
) -> Planned | None:
    """An agent's answer (kind agent, template `reply`) to the requester and every other
    participant but the agent and `leave_out` (those the agent's own mail reached). With
    `always` (the CLI's reply, which is the agent's stored message) it is written even
    with nobody to send to, its outbox row withheld and saying so; else None then. With
    an `attachment_limit`, attachments over it in total are listed instead of sent."""
    assert ticket.id is not None
    sent, note = list(attachments), ""
    if attachment_limit is not None:
        sent, note = attachments_within(attachments, attachment_limit)
    candidates = _people(
        session, ticket, leave_out={agent.email, *leave_out}, ours=ours, policy=policy
    )
    if not candidates and not always:
        return None
    return _queue(
        session,
        policy,
        MessageKind.AGENT,
        ticket=ticket,
        writer=agent,
        candidates=candidates,
        fields=template_fields(policy, ticket, writer=agent, body=text, attachments_note=note),
        text=text,
        attachments=sent,
        now=now,
    )


def plan_copy(
    session: Session,
    policy: DeskPolicy,
    ticket: Ticket,
    *,
    writer: Address,
    subject: str,
    text: str,
    attachments: Sequence[FileLike] = (),
    leave_out: Collection[str] = (),
    ours: Callable[[str], bool] = _never,
    now: datetime,
) -> Planned | None:
    """A participant's mail copied to the other participants who were not among its To
    and Cc (`leave_out`); None when there is nobody to copy."""
    assert ticket.id is not None
    candidates = _people(
        session, ticket, leave_out={writer.email, *leave_out}, ours=ours, policy=policy
    )
    if not candidates:
        return None
    sent, note = attachments_within(attachments, policy.copy_attachments_max)
    return _queue(
        session,
        policy,
        MessageKind.COPY,
        ticket=ticket,
        writer=writer,
        candidates=candidates,
        fields=template_fields(policy, ticket, writer=writer, body=text, attachments_note=note),
        subject=subject,
        attachments=sent,
        now=now,
    )


def plan_notify(
    session: Session,
    policy: DeskPolicy,
    ticket: Ticket,
    *,
    notify: Sequence[str],
    writer: Address | None,
    text: str,
    attachments: Sequence[FileLike] = (),
    created: bool,
    ours: Callable[[str], bool] = _never,
    now: datetime,
) -> Planned | None:
    """The route's `notify` addresses told of a new ticket or a customer's follow-up: the
    text shortened, attachments listed, the link; None when the route notifies nobody.
    A desk address is never notified (it would come straight back in)."""
    assert ticket.id is not None
    candidates = [Address("", a) for a in notify if not ours(a) and not policy.is_ours(a, ticket)]
    if not candidates:
        return None
    note = f"\nAttachments: {attachment_list(attachments)}\n" if attachments else ""
    fields = template_fields(
        policy,
        ticket,
        writer=writer,
        body=shortened(text),
        attachments_note=note,
        event=NEW_TICKET if created else FOLLOW_UP,
    )
    return _queue(
        session,
        policy,
        MessageKind.NOTIFY,
        ticket=ticket,
        writer=writer,
        candidates=candidates,
        fields=fields,
        now=now,
    )


def plan_solved_notice(
    session: Session, policy: DeskPolicy, ticket: Ticket, now: datetime
) -> Planned | None:
    """The requester told that the ticket is solved and that a reply reopens it; None when
    desk mail is off, the ticket has no requester address, or a program opened it (a
    monitoring alert's sender is told nothing)."""
    assert ticket.id is not None
    if not policy.sending:
        return None
    opened_by = session.exec(
        select(Message.kind).where(Message.ticket_id == ticket.id).order_by(col(Message.id))
    ).first()
    if opened_by != MessageKind.HUMAN.value:
        return None
    requester = next(
        (
            Address(p.name, p.email)
            for p in participants(session, ticket.id)
            if p.role == ParticipantRole.REQUESTER
        ),
        None,
    )
    if requester is None:
        if not ticket.requester_email:
            return None
        requester = Address(ticket.requester_name, ticket.requester_email)
    if policy.is_ours(requester.email, ticket):
        return None
    return _queue(
        session,
        policy,
        MessageKind.SOLVED,
        ticket=ticket,
        writer=None,
        candidates=[requester],
        fields=template_fields(policy, ticket),
        now=now,
    )
