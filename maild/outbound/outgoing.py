"""The one door every mail maild sends goes through: who it may reach, and its rows.

Every kind of outgoing mail (acknowledgements; agents' replies, copies,
notifications and solved notices, outbound/correspondence.py) is planned in the
transaction that makes it necessary:

1. `choose_recipients` decides each candidate's fate. Candidates are taken in
   order (the requester first) and deduplicated; only the first
   `[outbound] max_recipients` are addressed at all, so one inbound mail with
   4,000 addresses in Cc can never turn maild into a spammer. Of those, an
   address a bounce marked undeliverable, a robot address (`noreply@`,
   `mailer-daemon@`, any `+tag`) and an address that already received
   `max_per_hour` mails of the limit's kinds (`counted_kinds`: acknowledgements
   for theirs; copies, notifications and solved notices for the desk's) from
   maild in the last hour are withheld, with the reason recorded.
2. The caller renders the mail with the addressed recipients in its headers.
3. `queue_mail` writes its `message` (direction outbound), its `outmail` and
   one `outmail_rcpt` per addressed recipient, and refuses a plan with more
   pending recipients than the cap. The mailer checks the cap again before it
   sends (maild/mailer.py).

The hourly count and the insert that it allows are serialised per address:
filing takes `ratelimit.lock` on every address it may count, before it counts
(maild/intake.py), so two workers (or hosts) cannot both see 4 of 5 sent. The
recipients of a copy or a notification (the ticket's other participants, a
route's notify list) are not known before filing and are counted without that
lock: on PostgreSQL two filers at the same moment may each send one past it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from maild.enums import Direction, MailStatus, RecipientState
from maild.mail import hygiene
from maild.mail.addresses import Address
from maild.mail.text import one_line
from maild.store import ratelimit
from maild.store.models import Message, Outmail, OutmailRecipient, Participant

DEFAULT_MAX_RECIPIENTS = 20
# What log lines call each kind of mail (Outmail.kind).
NOUNS = {
    "ack": "acknowledgement",
    "agent": "reply",
    "copy": "copy",
    "notify": "notification",
    "solved": "solved notice",
}
STRANGER_NAME_CHARS = 40
STRANGER_SUBJECT_CHARS = 100
_WRAPPING = "\"'()<>[]{},;:!?"


def _linkish(word: str) -> bool:
    """Whether a mail client would make a link of this word: a URL, a `www.` name, an
    address, or a host name ending in a top-level domain of letters (evil.example,
    shop.com/buy, пример.рф). Plain string tests, linear in the word: no regex to
    backtrack (one took 2.8 s on an 8 KiB subject)."""
    word = word.strip(_WRAPPING).lower()
    if "://" in word or "@" in word or word.startswith("www."):
        return True
    labels = word.split("/", 1)[0].rstrip(".").split(".")
    return (
        len(labels) >= 2
        and all(label and all(c.isalnum() or c == "-" for c in label) for label in labels)
        and labels[-1].isalpha()
        and 2 <= len(labels[-1]) <= 63
    )


@dataclass(frozen=True)
class OutboundLimits:
    """What any one outgoing mail may do, from [outbound]."""

    max_recipients: int = DEFAULT_MAX_RECIPIENTS  # addresses one mail reaches, at most
    max_per_hour: int = 0  # mails one address receives from maild per hour; 0: no limit
    # the kinds of mail (Outmail.kind) that hourly count counts; empty: every kind
    counted_kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipient:
    """One addressed recipient of a planned mail and its fate."""

    person: Address
    state: RecipientState  # pending, or withheld
    reason: str | None = None


def echo(text: str, limit: int) -> str:
    """A stranger's words as maild may repeat them: one line, without anything a mail
    client would make a link of, at most `limit` characters. Only the first 8 x `limit`
    characters are read: the rest could never be shown."""
    words = one_line(text[: 8 * limit], controls=True).split()
    kept = " ".join(word for word in words if not _linkish(word))
    return kept if len(kept) <= limit else kept[: limit - 1].rstrip() + "…"


def is_known(session: Session, email: str, *, besides_ticket: int | None = None) -> bool:
    """Whether the address takes part in a ticket (other than `besides_ticket`): a
    correspondent of the desk, not a stranger."""
    query = select(Participant.id).where(Participant.email == email.lower())
    if besides_ticket is not None:
        query = query.where(Participant.ticket_id != besides_ticket)
    return session.exec(query.limit(1)).first() is not None


def mark_undeliverable(
    session: Session, ticket_id: int, email: str, reason: str, now: datetime
) -> None:
    """A bounce or the smarthost said mail to `email` cannot be delivered: the ticket's
    participant is marked, and no later mail of maild goes to it."""
    participant = session.exec(
        select(Participant).where(Participant.ticket_id == ticket_id, Participant.email == email)
    ).first()
    if participant is not None:
        participant.undeliverable_at = now
        participant.undeliverable_reason = reason[:1000]
        session.add(participant)


def undeliverable(session: Session, emails: list[str]) -> set[str]:
    """The addresses a bounce (or a 5xx from the smarthost) marked undeliverable, anywhere."""
    if not emails:
        return set()
    rows = session.exec(
        select(Participant.email).where(
            col(Participant.email).in_(emails), col(Participant.undeliverable_at).is_not(None)
        )
    ).all()
    return set(rows)


def recent_mail(session: Session, address: str, now: datetime, kinds: Sequence[str] = ()) -> int:
    """Mails queued to this address (any `+tag`, any case) in the last hour that count:
    pending, sent or bounced, not withheld; only mail of these `kinds`, when given."""
    counted = (RecipientState.PENDING, RecipientState.SENT, RecipientState.BOUNCED)
    query = select(func.count(col(OutmailRecipient.id))).where(
        OutmailRecipient.address_key == ratelimit.limit_key(address),
        col(OutmailRecipient.status).in_([s.value for s in counted]),
        OutmailRecipient.created_at >= now - timedelta(hours=1),
    )
    if kinds:
        query = query.join(Outmail, col(Outmail.id) == col(OutmailRecipient.outmail_id)).where(
            col(Outmail.kind).in_(list(kinds))
        )
    return session.exec(query).one()


def choose_recipients(
    session: Session,
    limits: OutboundLimits,
    candidates: Iterable[Address],
    now: datetime,
    *,
    per_hour_setting: str = "[outbound] max_acks_per_sender_per_hour",
) -> tuple[list[Recipient], int]:
    """The addressed recipients (the first max_recipients distinct candidates) with their
    fate, and how many candidates were left out beyond the cap."""
    chosen: dict[str, Address] = {}
    left_out = 0
    for person in candidates:
        email = person.email.lower()
        if not email or email in chosen:
            continue
        if len(chosen) >= limits.max_recipients:
            left_out += 1
            continue
        chosen[email] = Address(person.name, email)
    bad = undeliverable(session, list(chosen))
    result = []
    for email, person in chosen.items():
        reason: str | None = None
        if email in bad:
            reason = "undeliverable (a bounce said so)"
        elif hygiene.robot_address(email):
            reason = "an automatic address"
        elif (
            limits.max_per_hour
            and recent_mail(session, email, now, limits.counted_kinds) >= limits.max_per_hour
        ):
            reason = (
                f"already sent {limits.max_per_hour} mails in the last hour "
                f"({per_hour_setting} = {limits.max_per_hour})"
            )
        state = RecipientState.WITHHELD if reason else RecipientState.PENDING
        result.append(Recipient(person, state, reason))
    return result, left_out


class TooManyRecipients(ValueError):
    """A planned mail would reach more addresses than [outbound] max_recipients."""


def queue_mail(
    session: Session,
    limits: OutboundLimits,
    *,
    ticket_id: int,
    kind: str,
    message: Message,
    raw: bytes,
    mail_from: str,
    recipients: Sequence[Recipient],
    now: datetime,
    left_out: int = 0,
) -> Outmail:
    """Write the mail's stored copy (`message`, outbound), its outmail row and one row per
    addressed recipient; pending when anyone is to get it, else withheld with the reasons."""
    sending = [r for r in recipients if r.state == RecipientState.PENDING]
    if len(sending) > limits.max_recipients:
        raise TooManyRecipients(
            f"{len(sending)} recipients, more than [outbound] max_recipients = "
            f"{limits.max_recipients}"
        )
    message.direction = Direction.OUTBOUND.value
    session.add(message)
    session.flush()
    assert message.id is not None
    reasons = sorted({r.reason for r in recipients if r.reason})
    if left_out:
        reasons.append(
            f"{left_out} more addresses not sent to ([outbound] max_recipients = "
            f"{limits.max_recipients})"
        )
    outmail = Outmail(
        ticket_id=ticket_id,
        message_pk=message.id,
        kind=kind,
        status=MailStatus.PENDING.value if sending else MailStatus.WITHHELD.value,
        reason=None if sending else "; ".join(reasons) or "nobody to send it to",
        mail_from=mail_from,
        raw=raw,
        next_attempt_at=now,
        queued_at=now,
        created_at=now,
    )
    session.add(outmail)
    session.flush()
    assert outmail.id is not None
    for recipient in recipients:
        session.add(
            OutmailRecipient(
                outmail_id=outmail.id,
                email=recipient.person.email,
                address_key=ratelimit.limit_key(recipient.person.email),
                status=recipient.state.value,
                error=recipient.reason,
                created_at=now,
            )
        )
    session.flush()
    return outmail
