"""An agent's answer to a ticket, public or internal: one function over a Session, used by
`maild tickets reply` and, next, by the HTTP API. No printing, no exit codes.

reply():

- checks the agent (an address `[desk] agents` matches), the body (not empty), the
  `cc` addresses (plain addresses, none of the desk's own) and the attachments (their
  total within `[smtp] max_message_size`); ReplyRefused says what is wrong.
- public: stores the answer as an outbound message of kind `agent` (From the agent,
  its text, its attachments kept like a customer's), adds the `cc` addresses as
  participants, and queues one mail (correspondence.plan_reply) to the requester
  and every other participant, at most `[outbound] max_recipients`, undeliverable
  and robot addresses withheld. The mailer sends it through the durable outbox,
  recipient by recipient: none is sent twice, none is lost.
- internal: stores a note (kind `note`, direction internal). It is never sent: no
  outbox row is written.
- either way, the webhooks subscribed to `message.created` hear of it in the same
  transaction (a note with `internal: true`).

The agent is never made a participant. Replying does not change the ticket's status
(an agent's answer to an open ticket leaves it open, and a reply to a solved one does
not reopen it: the desk sets the status with `tickets set`); it moves `updated_at`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parseaddr
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from maild.enums import Direction, MessageKind, ParticipantRole
from maild.mail import addresses, hygiene
from maild.mail.addresses import Address
from maild.mail.message_ids import message_id_hash
from maild.mail.parsing import safe_filename
from maild.mail.text import one_line
from maild.outbound import webhook_events
from maild.outbound.correspondence import DeskPolicy, FileData, plan_reply
from maild.routing.rules import RuleTable
from maild.store.models import (
    Attachment,
    Blob,
    Message,
    OutmailRecipient,
    Participant,
    Ticket,
    table_of,
)
from maild.store.tickets import TicketNotFound

__all__ = ["MailOff", "ReplyRefused", "ReplyResult", "TicketNotFound", "reply"]


class ReplyRefused(ValueError):
    """A reply the desk refuses as it stands; the message says why."""


class MailOff(ReplyRefused):
    """A public reply, but maild sends no mail (no smarthost, sender or secret)."""


@dataclass(frozen=True)
class ReplyResult:
    """What reply() stored and queued."""

    ticket_id: int
    message_pk: int
    message_id: str
    kind: str  # agent | note
    outmail_id: int | None = None  # None for a note
    status: str | None = None  # the outbox row's: pending, or withheld
    reason: str | None = None  # why it was withheld
    recipients: list[dict[str, str | None]] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # cc addresses made participants

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticket": self.ticket_id,
            "message": self.message_pk,
            "message_id": f"<{self.message_id}>",
            "kind": self.kind,
            "outmail": self.outmail_id,
            "status": self.status,
            "reason": self.reason,
            "recipients": self.recipients,
            "added_participants": self.added,
        }


def _address(text: str, what: str) -> Address:
    """One plain address, with an optional display name ("Jo <jo@x>"); lower-cased."""
    if any(c in text for c in "\r\n") or len(text) > 400:
        raise ReplyRefused(f"{what}: {text[:80]!r} is not an email address")
    name, raw = parseaddr(text)
    email = addresses.normalize(raw)
    local, domain = addresses.split(email)
    if not local or not addresses.is_domain(domain) or len(email.split()) != 1:
        raise ReplyRefused(f"{what}: {text!r} is not an email address")
    return Address(one_line(name, controls=True), email)


def check_agent(policy: DeskPolicy, text: str) -> Address:
    """The agent as the reply records it; ReplyRefused unless `[desk] agents` lists it."""
    agent = _address(text, "--from")
    if not policy.agents:
        raise ReplyRefused(
            f"--from: {agent.email} cannot reply: [desk] agents lists nobody (set it to the "
            'desk\'s staff, for example agents = ["*@example.com"])'
        )
    if not policy.is_agent(agent.email):
        raise ReplyRefused(
            f"--from: {agent.email} is not one of [desk] agents ({', '.join(policy.agents)})"
        )
    return agent


def _insert_ignore(session: Session, rows: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(table_of(Blob)).on_conflict_do_nothing(), rows)


def store_attachments(session: Session, message_pk: int, files: Sequence[FileData]) -> None:
    """The files as a message's attachments: bytes in `blob` (once per content), a row each."""
    if not files:
        return
    blobs = {f.sha256: {"sha256": f.sha256, "size": f.size, "data": f.data} for f in files}
    _insert_ignore(session, list(blobs.values()))
    for f in files:
        session.add(
            Attachment(
                message_pk=message_pk,
                filename=f.filename,
                content_type=f.content_type,
                size=f.size,
                sha256=f.sha256,
            )
        )


def _checked_files(policy: DeskPolicy, files: Sequence[FileData]) -> list[FileData]:
    total = sum(f.size for f in files)
    if total > policy.max_attachment_size:
        raise ReplyRefused(
            f"--attach: {total} bytes of attachments, more than a message may carry "
            f"([smtp] max_message_size = {policy.max_attachment_size})"
        )
    return [
        FileData(safe_filename(f.filename), one_line(f.content_type, 255, controls=True), f.data)
        for f in files
    ]


def reply(
    session: Session,
    ticket_id: int,
    *,
    agent: str,
    body: str,
    cc: Sequence[str] = (),
    attachments: Sequence[FileData] = (),
    internal: bool = False,
    policy: DeskPolicy,
    table: RuleTable,
    now: datetime,
) -> ReplyResult:
    """Store the agent's answer (or note) and queue its mail; the caller commits.

    ReplyRefused: not an agent, an empty body, a bad or desk `cc`, `cc` on a note, too
    many `cc`, attachments too large; MailOff: a public reply with mail off;
    TicketNotFound."""
    author = check_agent(policy, agent)
    if not body.strip():
        raise ReplyRefused("the reply is empty (--body-file gave no text)")
    files = _checked_files(policy, attachments)
    wanted = [_address(a, "--cc") for a in cc]
    if internal and wanted:
        raise ReplyRefused("--cc: an internal note is sent to nobody; leave out --cc")
    if not internal and not policy.sending:
        raise MailOff(
            "a public reply is mailed, and maild sends no mail: set [outbound] smarthost, "
            "from and secret (or store an --internal note)"
        )
    limit = policy.acks.limits.max_recipients
    if len({a.email for a in wanted}) > limit:
        raise ReplyRefused(f"--cc: more than [outbound] max_recipients = {limit} addresses")
    ticket = session.get(
        Ticket, ticket_id, with_for_update={"key_share": True}, populate_existing=True
    )
    if ticket is None:
        raise TicketNotFound(ticket_id)
    for person in wanted:
        if table.is_ours(person.email) or policy.is_ours(person.email, ticket):
            raise ReplyRefused(f"--cc: {person.email} is one of the desk's own addresses")
    added = _add_cc(session, ticket, wanted, author, now)
    ticket.updated_at = now
    session.add(ticket)
    if internal:
        note = _note(session, policy, ticket, author, body, now)
        store_attachments(session, _pk(note), files)
        session.flush()
        _tell(session, policy, ticket, note, files, now)
        return ReplyResult(
            ticket_id, _pk(note), note.message_id, MessageKind.NOTE.value, added=added
        )
    planned = plan_reply(
        session,
        policy,
        ticket,
        agent=author,
        text=body,
        attachments=files,
        ours=table.is_ours,
        now=now,
    )
    assert planned is not None  # always: the reply is stored whoever it reaches
    store_attachments(session, _pk(planned.message), files)
    session.flush()
    _tell(session, policy, ticket, planned.message, files, now)
    outmail = planned.outmail
    rows = session.exec(
        select(OutmailRecipient)
        .where(OutmailRecipient.outmail_id == outmail.id)
        .order_by(col(OutmailRecipient.id))
    ).all()
    return ReplyResult(
        ticket_id,
        _pk(planned.message),
        planned.message.message_id,
        MessageKind.AGENT.value,
        outmail_id=outmail.id,
        status=outmail.status,
        reason=outmail.reason,
        recipients=[{"email": r.email, "status": r.status, "error": r.error} for r in rows],
        added=added,
    )


def _tell(
    session: Session,
    policy: DeskPolicy,
    ticket: Ticket,
    message: Message,
    files: Sequence[FileData],
    now: datetime,
) -> None:
    """The reply's or the note's message.created, for the webhooks subscribed to it."""
    if policy.webhooks is None or not policy.webhooks.wants(webhook_events.MESSAGE_CREATED):
        return
    webhook_events.queue(
        session,
        policy.webhooks,
        webhook_events.MESSAGE_CREATED,
        ticket,
        now,
        message=webhook_events.message_data(message.model_dump(), files),
    )


def _pk(message: Message) -> int:
    assert message.id is not None
    return message.id


def _add_cc(
    session: Session, ticket: Ticket, wanted: list[Address], author: Address, now: datetime
) -> list[str]:
    """The `cc` addresses not yet on the ticket, added as participants (never the agent)."""
    assert ticket.id is not None
    known = set(
        session.exec(select(Participant.email).where(Participant.ticket_id == ticket.id)).all()
    )
    added = []
    for person in wanted:
        if person.email in known or person.email == author.email:
            continue
        known.add(person.email)
        added.append(person.email)
        session.add(
            Participant(
                ticket_id=ticket.id,
                email=person.email,
                name=person.name,
                role=ParticipantRole.CC.value,
                created_at=now,
            )
        )
    session.flush()
    return added


def _note(
    session: Session,
    policy: DeskPolicy,
    ticket: Ticket,
    author: Address,
    body: str,
    now: datetime,
) -> Message:
    """An internal note: stored with a Message-ID of ours, direction internal, never sent."""
    assert ticket.id is not None
    unique = f"note.{ticket.id}.{secrets.token_hex(8)}"
    message_id = f"{hygiene.OUR_MESSAGE_ID_PREFIX}{unique}@{policy.acks.message_id_domain}"
    note = Message(
        ticket_id=ticket.id,
        message_id=message_id,
        message_id_hash=message_id_hash(message_id),
        from_email=author.email,
        from_name=author.name,
        subject=one_line(ticket.subject, controls=True),
        date=now,
        text=body,
        rule=ticket.rule,
        direction=Direction.INTERNAL.value,
        kind=MessageKind.NOTE.value,
        created_at=now,
    )
    session.add(note)
    session.flush()
    return note
