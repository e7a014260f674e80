"""Acknowledgements: one mail per new ticket from a person, with the ticket number.

The decision and the rendered mail are made inside the filing transaction
(intake.file_message): the acknowledgement's `message` row (direction
outbound, kind ack, its own Message-ID), its `outmail` row (bytes and
envelope) and one `outmail_rcpt` row per recipient commit with the ticket or
not at all. The mailer (maild/mailer.py) sends them later, like the pager.

What goes out (through maild/outgoing.py, the door all outgoing mail takes):

- To the requester, Cc the other participants (people in To and Cc of the
  customer's mail, never the desk's own addresses), at most `[outbound]
  max_recipients` addresses in all, except addresses a bounce marked
  undeliverable and addresses that already received `[outbound]
  max_acks_per_sender_per_hour` mails in the last hour (those are recorded as
  withheld).
- A requester who is a stranger (a participant of no other ticket) is
  acknowledged alone: the first mail of an unknown sender never makes maild
  write to the addresses it copied. The stranger's display name and subject are
  echoed shortened and without links (`outgoing.echo`).
- Subject `[#ID] original subject`; body from the route's template.
- `Reply-To` and envelope sender: the desk address the customer wrote to with
  a `+token` subaddress, `<token>` = ticket id and an HMAC under
  `[outbound] secret`, so a reply (and a bounce) finds the ticket whoever sends it.
- RFC 3834 headers: `Auto-Submitted: auto-replied`,
  `X-Auto-Response-Suppress: All`, `Precedence: bulk`, and our loop header.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime

from sqlmodel import Session, col, select

from maild.config import OutboundSettings
from maild.enums import MessageKind, ParticipantRole
from maild.mail import addresses, hygiene
from maild.mail.addresses import Address
from maild.mail.message_ids import message_id_hash
from maild.mail.text import one_line
from maild.outbound.outgoing import (
    STRANGER_NAME_CHARS,
    STRANGER_SUBJECT_CHARS,
    OutboundLimits,
    choose_recipients,
    echo,
    is_known,
    queue_mail,
)
from maild.outbound.templates import Templates, load_templates
from maild.store.models import Message, Outmail, Participant, Ticket

TOKEN_MAC_HEX = 16  # 64 bits of HMAC-SHA256: guessing one is hopeless at SMTP speed
_TOKEN = re.compile(rf"^(\d{{1,18}})-([0-9a-f]{{{TOKEN_MAC_HEX}}})$")
PAGED_NOTE = "Our on-call engineers have been paged."
SUBJECT_CHARS = 900


# Reply-address tokens.


def make_token(secret: bytes, ticket_id: int) -> str:
    mac = hmac.new(secret, f"maild-ticket:{ticket_id}".encode(), hashlib.sha256).hexdigest()
    return f"{ticket_id}-{mac[:TOKEN_MAC_HEX]}"


def read_token(secret: bytes, token: str) -> int | None:
    """The ticket id a `+token` subaddress names, or None when it is not a valid token of ours."""
    match = _TOKEN.match(token.strip().lower())
    if match is None:
        return None
    ticket_id = int(match.group(1))
    if not hmac.compare_digest(make_token(secret, ticket_id), match.group(0)):
        return None
    return ticket_id


def reply_address(desk_address: str, token: str) -> str:
    local, domain = addresses.split(addresses.route_key(desk_address))
    return f"{local}+{token}@{domain}"


# What the filing transaction needs.


@dataclass(frozen=True)
class AckPolicy:
    """What the settings say about acknowledgements, in the form filing needs."""

    enabled: bool
    secret: bytes
    from_header: str
    from_address: str
    message_id_domain: str
    loop_id: str
    templates: Templates
    limits: OutboundLimits = field(default_factory=OutboundLimits)

    @classmethod
    def from_settings(cls, settings: OutboundSettings) -> AckPolicy:
        """Raises ConfigError naming the template file and line at fault."""
        secret = settings.secret.get_secret_value().encode() if settings.secret else b""
        from_address = settings.from_address()
        domain = settings.message_id_domain or addresses.domain_of(from_address) or "maild.invalid"
        return cls(
            enabled=settings.enabled and bool(secret),
            secret=secret,
            from_header=settings.from_,
            from_address=from_address,
            message_id_domain=domain,
            loop_id=hygiene.loop_id(domain),
            templates=load_templates(settings.templates),
            limits=OutboundLimits(
                max_recipients=settings.max_recipients,
                max_per_hour=settings.max_acks_per_sender_per_hour,
                counted_kinds=(MessageKind.ACK.value,),
            ),
        )

    def ticket_for(self, recipients: list[str]) -> int | None:
        """The ticket a valid `+token` recipient names (the first), or None."""
        if not self.secret:
            return None
        for recipient in recipients:
            token = addresses.subaddress(recipient)
            if token:
                ticket_id = read_token(self.secret, token)
                if ticket_id is not None:
                    return ticket_id
        return None


def ack_subject(ticket_id: int, subject: str) -> str:
    subject = one_line(subject, controls=True)[:SUBJECT_CHARS]
    tag = f"[#{ticket_id}]"
    if tag in subject:
        return subject
    return f"{tag} {subject or '(no subject)'}"


def header_address(person: Address) -> HeaderAddress | str:
    """A header's address: the display name on one line (nothing injected through it)."""
    try:
        return HeaderAddress(
            display_name=one_line(person.name, controls=True), addr_spec=person.email
        )
    except (ValueError, IndexError, TypeError):
        return person.email


@dataclass(frozen=True)
class Rendered:
    message_id: str
    raw: bytes
    subject: str
    body: str


def render_ack(
    policy: AckPolicy,
    *,
    ticket: Ticket,
    route: str,
    desk_address: str,
    reply_to: str,
    to: Address,
    cc: list[Address],
    in_reply_to: str,
    now: datetime,
    paged: bool = False,
    stranger: bool = False,
) -> Rendered:
    """The acknowledgement's bytes. Header values are one line: no injection through names.
    A stranger's name and subject are echoed shortened and without links."""
    assert ticket.id is not None
    if stranger:
        said = echo(ticket.subject, STRANGER_SUBJECT_CHARS)
        to = Address(echo(to.name, STRANGER_NAME_CHARS), to.email)
    else:
        said = one_line(ticket.subject, controls=True)
    subject = ack_subject(ticket.id, said)
    body = policy.templates.for_route(route).substitute(
        ticket_id=ticket.id,
        subject=said or "(no subject)",
        ticket_type=ticket.type,
        priority=ticket.priority,
        greeting_name=one_line(to.name, controls=True) or to.email,
        requester_name=one_line(to.name, controls=True),
        requester_email=to.email,
        reply_address=reply_to,
        desk_address=desk_address,
        paging_note=PAGED_NOTE if paged else "",
    )
    everyone = [to.email, *(p.email for p in cc), reply_to, policy.from_address]
    smtputf8 = not all(a.isascii() for a in everyone)
    message = EmailMessage(policy=SMTPUTF8 if smtputf8 else SMTP)
    unique = f"ack.{ticket.id}.{secrets.token_hex(8)}"
    message_id = f"{hygiene.OUR_MESSAGE_ID_PREFIX}{unique}@{policy.message_id_domain}"
    message["From"] = policy.from_header
    message["To"] = header_address(to)
    if cc:
        message["Cc"] = [header_address(p) for p in cc]
    message["Reply-To"] = reply_to
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = f"<{message_id}>"
    if in_reply_to:
        message["In-Reply-To"] = f"<{in_reply_to}>"
        message["References"] = f"<{in_reply_to}>"
    message["Auto-Submitted"] = "auto-replied"
    message["X-Auto-Response-Suppress"] = "All"
    message["Precedence"] = "bulk"
    message[hygiene.LOOP_HEADER] = policy.loop_id
    message["X-Maild-Ticket"] = str(ticket.id)
    message.set_content(body, cte="quoted-printable")
    return Rendered(
        message_id=message_id,
        raw=message.as_bytes(),
        subject=subject,
        body=body,
    )


def plan_ack(
    session: Session,
    policy: AckPolicy,
    ticket: Ticket,
    *,
    route: str,
    desk_address: str,
    in_reply_to: str,
    now: datetime,
    paged: bool = False,
) -> Outmail | None:
    """The acknowledgement of a new ticket (pending or withheld), added to the session.

    None when there is nobody to send it to (no requester address).
    """
    assert ticket.id is not None
    people = session.exec(
        select(Participant).where(Participant.ticket_id == ticket.id).order_by(col(Participant.id))
    ).all()
    requester = next((p for p in people if p.role == ParticipantRole.REQUESTER), None)
    if requester is None:
        return None
    known = is_known(session, requester.email, besides_ticket=ticket.id)
    candidates = [requester] + ([p for p in people if p is not requester] if known else [])
    recipients, left_out = choose_recipients(
        session, policy.limits, [Address(p.name, p.email) for p in candidates], now
    )
    to, cc = recipients[0].person, [r.person for r in recipients[1:]]
    reply_to = reply_address(desk_address, make_token(policy.secret, ticket.id))
    rendered = render_ack(
        policy,
        ticket=ticket,
        route=route,
        desk_address=addresses.route_key(desk_address),
        reply_to=reply_to,
        to=to,
        cc=cc,
        in_reply_to=in_reply_to,
        now=now,
        paged=paged,
        stranger=not known,
    )
    message = Message(
        ticket_id=ticket.id,
        message_id=rendered.message_id,
        message_id_hash=message_id_hash(rendered.message_id),
        from_email=policy.from_address,
        to=[to.as_dict()],
        cc=[p.as_dict() for p in cc],
        subject=rendered.subject,
        date=now,
        text=rendered.body,
        rule=route,
        kind=MessageKind.ACK.value,
        created_at=now,
    )
    return queue_mail(
        session,
        policy.limits,
        ticket_id=ticket.id,
        kind=MessageKind.ACK.value,
        message=message,
        raw=rendered.raw,
        mail_from=reply_to,
        recipients=recipients,
        now=now,
        left_out=left_out,
    )
