"""The mailer: sends the mail outbox (acknowledgements, agents' replies, copies,
notifications, solved notices) through the smarthost.

It claims due `pending` outmail rows and sends each with aiosmtplib to
`[outbound] smarthost` (STARTTLS or implicit TLS and login when configured),
one SMTP transaction per row, to the recipients still pending.

Replies decide what happens, per recipient:

- accepted → the recipient is `sent` (never sent to again, even when another
  recipient of the same mail is retried);
- 5xx to RCPT → `refused`, and the participant is marked undeliverable;
- 4xx to RCPT → stays pending, and the row is retried.

For the whole transaction: a network error, a timeout, a 4xx greeting,
MAIL, DATA or login failure is retried with exponential backoff and jitter
until `[outbound] give_up_after` has passed since it was queued (a login
failure is a configuration mistake an operator can fix meanwhile, so it is
retried too, and logged at error level); a 5xx to MAIL FROM or DATA fails the
row at once. Every failed attempt is written to the row before the wait.

A crash between the smarthost's 250 and our record sends the mail again after
restart: a customer may see a second copy of an acknowledgement, never none.

Logs and `maild_mail_total{kind,result}` name the kind of each mail (the
outmail row's `kind`); acknowledgements also count in
`maild_acknowledgements_total`, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import aiosmtplib
import structlog
from sqlmodel import Session, col, select

from maild import metrics
from maild.config import OutboundSettings, parse_hostport
from maild.enums import MailStatus, OutboxStatus, RecipientState
from maild.errors import SendDeferred, SendRefused
from maild.outbound.outbox import POLL_SECONDS, Delivery, OutboxWorker, reopen, tls_context
from maild.outbound.outgoing import NOUNS, mark_undeliverable
from maild.store.database import Database
from maild.store.models import Outmail, OutmailRecipient, as_utc, utcnow

log = structlog.get_logger("maild.mailer")


def _noun(job: MailJob) -> str:
    return NOUNS.get(job.kind, f"{job.kind} mail")


def _count(job: MailJob, result: str) -> None:
    if job.kind == "ack":
        metrics.ACKS.labels(result).inc()
    metrics.MAIL.labels(job.kind, result).inc()


@dataclass(frozen=True)
class MailJob:
    """A claimed outgoing mail, detached from its session."""

    id: int
    ticket_id: int
    mail_from: str
    recipients: tuple[str, ...]  # those still pending
    raw: bytes
    attempts: int
    queued_at: datetime
    created_at: datetime
    none_reached_before: bool = True  # no recipient was sent to by an earlier claim
    kind: str = "ack"  # Outmail.kind: ack, agent, copy, notify, solved

    @property
    def smtputf8(self) -> bool:
        return not (
            self.raw.isascii()
            and self.mail_from.isascii()
            and all(r.isascii() for r in self.recipients)
        )


@dataclass
class MailDelivery(Delivery[MailJob]):
    """A mail's delivery: the recipients not yet settled, and those refused so far."""

    pending: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


# The outbox rows.


def claim_due(
    session: Session, now: datetime, limit: int, lease: float, claimer: str
) -> list[MailJob]:
    """Pending mail that is due, oldest first, leased for `lease` seconds (SKIP LOCKED on PG)."""
    query = (
        select(Outmail)
        .where(Outmail.status == MailStatus.PENDING.value, col(Outmail.next_attempt_at) <= now)
        .order_by(col(Outmail.id))
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Outmail)
    jobs = []
    for outmail in session.exec(query).all():
        assert outmail.id is not None
        pending = session.exec(
            select(OutmailRecipient.email)
            .where(
                OutmailRecipient.outmail_id == outmail.id,
                OutmailRecipient.status == RecipientState.PENDING.value,
            )
            .order_by(col(OutmailRecipient.id))
        ).all()
        if not pending:  # every recipient was settled by an attempt whose final record was lost
            reached = session.exec(
                select(OutmailRecipient.id).where(
                    OutmailRecipient.outmail_id == outmail.id,
                    OutmailRecipient.status == RecipientState.SENT.value,
                )
            ).first()
            if reached is not None:
                outmail.status = MailStatus.SENT.value
                outmail.sent_at = outmail.sent_at or now
            else:
                outmail.status = MailStatus.FAILED.value
                outmail.reason = "every recipient was refused"
            session.add(outmail)
            continue
        reached_before = session.exec(
            select(OutmailRecipient.id).where(
                OutmailRecipient.outmail_id == outmail.id,
                OutmailRecipient.status == RecipientState.SENT.value,
            )
        ).first()
        outmail.next_attempt_at = now + timedelta(seconds=lease)
        outmail.claimed_by = claimer
        session.add(outmail)
        jobs.append(
            MailJob(
                id=outmail.id,
                ticket_id=outmail.ticket_id,
                mail_from=outmail.mail_from,
                recipients=tuple(pending),
                raw=outmail.raw,
                attempts=outmail.attempts,
                queued_at=as_utc(outmail.queued_at),
                created_at=as_utc(outmail.created_at),
                none_reached_before=reached_before is None,
                kind=outmail.kind,
            )
        )
    return jobs


def record_recipients(
    session: Session,
    outmail_id: int,
    results: dict[str, tuple[RecipientState, str | None]],
    now: datetime,
) -> None:
    """Settle recipients; a refused one is marked undeliverable on the ticket."""
    outmail = session.get(Outmail, outmail_id)
    if outmail is None:
        return
    rows = session.exec(
        select(OutmailRecipient).where(
            OutmailRecipient.outmail_id == outmail_id,
            col(OutmailRecipient.email).in_(list(results)),
            OutmailRecipient.status == RecipientState.PENDING.value,
        )
    ).all()
    for row in rows:
        state, error = results[row.email]
        row.status = state.value
        row.error = error[:1000] if error else None
        session.add(row)
        if state == RecipientState.REFUSED:
            mark_undeliverable(session, outmail.ticket_id, row.email, error or "refused", now)


def retry_outmail(session: Session, outmail_id: int, now: datetime) -> Outmail:
    """Send a failed or withheld mail again to its unsettled recipients, with a new window."""
    outmail: Outmail = reopen(session, Outmail, outmail_id, now)
    rows = session.exec(
        select(OutmailRecipient).where(
            OutmailRecipient.outmail_id == outmail_id,
            col(OutmailRecipient.status).in_(
                [RecipientState.WITHHELD.value, RecipientState.PENDING.value]
            ),
        )
    ).all()
    for row in rows:
        row.status = RecipientState.PENDING.value
        row.error = None
        session.add(row)
    return outmail


# Sending.


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(str(message).split())}"[:1000]


class SmtpClient:
    """One SMTP transaction per call to the smarthost; failures classified.

    Timeouts as RFC 5321 4.5.3.2 has them, kept apart from connecting: `[outbound]
    timeout` for the TCP connection, TLS and the greeting; `command_timeout` (5 min)
    for each reply to EHLO, STARTTLS, AUTH, MAIL and RCPT; `data_timeout` (10 min) for
    the reply to DATA and to the end of the message. A slow smarthost that takes 40 s
    to accept a message is waited for, not sent the message again. The whole attempt is
    bounded by `attempt_limit`, which the mailer's lease outlasts.

    No reply to the end of DATA (a timeout, a dropped connection) leaves the mail
    possibly delivered: the error says so, and the retry may be a second copy.
    """

    def __init__(self, settings: OutboundSettings, local_hostname: str | None = None) -> None:
        assert settings.smarthost is not None
        self._host, self._port = parse_hostport(settings.smarthost)
        self._settings = settings
        self._local_hostname = local_hostname
        self._context = tls_context(settings.ca_file) if settings.tls != "none" else None

    async def send(
        self, job: MailJob, recipients: list[str]
    ) -> dict[str, tuple[RecipientState, str | None]]:
        """Send to `recipients`; each one's outcome (sent, refused, or pending after a 4xx).
        More recipients than [outbound] max_recipients is refused unsent, whoever wrote
        the row (outgoing.queue_mail never does)."""
        settings = self._settings
        if len(recipients) > settings.max_recipients:
            raise SendRefused(
                f"not sent: {len(recipients)} recipients, more than [outbound] "
                f"max_recipients = {settings.max_recipients}"
            )
        password = settings.password.get_secret_value() if settings.password else None
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            local_hostname=self._local_hostname,
            timeout=settings.command_timeout,
            use_tls=settings.tls == "implicit",
            start_tls=settings.tls == "starttls",
            tls_context=self._context,
            username=settings.username,
            password=password,
        )
        stage = "connect"
        try:
            async with asyncio.timeout(settings.attempt_limit()):
                await client.connect(timeout=settings.timeout)
                stage = "envelope"
                outcome, accepted = await self._envelope(client, job, recipients)
                if accepted:
                    stage = "data"
                    await client.data(job.raw, timeout=settings.data_timeout)
                    outcome.update((a, (RecipientState.SENT, None)) for a in accepted)
            # The mail is the smarthost's now: a slow goodbye changes nothing.
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit(timeout=settings.timeout)
            return outcome
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise SendDeferred(
                f"login refused by {settings.smarthost} ({_reply(exc.code, exc.message)}); "
                "check [outbound] username and password"
            ) from None
        except aiosmtplib.SMTPNotSupported as exc:
            raise SendRefused(f"{settings.smarthost}: {exc}") from None
        except aiosmtplib.SMTPResponseException as exc:
            what = _reply(exc.code, exc.message)
            if 500 <= exc.code < 600:
                raise SendRefused(f"{settings.smarthost} refused the mail: {what}") from None
            raise SendDeferred(f"{settings.smarthost}: {what}") from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            if stage == "data":
                raise SendDeferred(
                    f"{settings.smarthost}: no reply to the end of DATA "
                    f"({type(exc).__name__}: {detail}); possibly delivered",
                    possibly_delivered=True,
                ) from None
            raise SendDeferred(f"{settings.smarthost}: {type(exc).__name__}: {detail}") from None
        finally:
            client.close()

    async def _envelope(
        self, client: aiosmtplib.SMTP, job: MailJob, recipients: list[str]
    ) -> tuple[dict[str, tuple[RecipientState, str | None]], list[str]]:
        """MAIL FROM and one RCPT each: the refused recipients' outcomes, and the accepted."""
        options = []
        encoding = "ascii"
        if job.smtputf8:
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if client.supports_extension("size"):
            options.insert(0, f"SIZE={len(job.raw)}")
        await client.mail(job.mail_from, options=options, encoding=encoding)
        outcome: dict[str, tuple[RecipientState, str | None]] = {}
        accepted = []
        for address in recipients:
            try:
                await client.rcpt(address, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as refused:
                outcome[address] = _rcpt_state(refused.code, refused.message)
            else:
                accepted.append(address)
        return outcome, accepted


def _rcpt_state(code: int, text: str) -> tuple[RecipientState, str | None]:
    reply = _reply(code, text)
    if 500 <= code < 600:
        return RecipientState.REFUSED, reply
    return RecipientState.PENDING, reply


class Mailer(OutboxWorker[MailJob]):
    """The background task that delivers the mail outbox."""

    noun = "acknowledgements"
    thing = "acknowledgement"
    give_up_key = "[outbound] give_up_after"
    model = Outmail
    unrecorded_attempt = "could not record an acknowledgement attempt"
    unrecorded: ClassVar[Mapping[OutboxStatus, str]] = {
        OutboxStatus.FAILED: "could not record a failed acknowledgement",
        OutboxStatus.SENT: "could not record a sent acknowledgement; it will be sent again",
    }

    def __init__(
        self,
        database: Database,
        client: SmtpClient,
        settings: OutboundSettings,
        claimer: str,
        poll_interval: float = POLL_SECONDS,
    ) -> None:
        # A claimed row is not claimed again until this long after: the longest attempt.
        super().__init__(database, claimer, poll_interval, settings.attempt_limit() + 60, settings)
        self._client = client

    def claim(self, session: Session, now: datetime, limit: int) -> list[MailJob]:
        return claim_due(session, now, limit, self._lease, self._claimer)

    def job_name(self, job: MailJob) -> str:
        return f"maild-mail-{job.id}"

    def fields(self, job: MailJob) -> dict[str, Any]:
        return {"outmail": job.id, "ticket": job.ticket_id, "kind": job.kind}

    def begin(self, job: MailJob) -> MailDelivery:
        return MailDelivery(job, job.attempts, self._clock(), list(job.recipients))

    async def attempt(self, delivery: Delivery[MailJob]) -> None:
        assert isinstance(delivery, MailDelivery)
        job = delivery.job
        outcome = await self._client.send(job, delivery.pending)
        settled = {a: r for a, r in outcome.items() if r[0] != RecipientState.PENDING}
        if settled:
            try:
                await self._database.write(
                    lambda s: record_recipients(s, job.id, settled, utcnow())
                )
            except Exception as exc:  # the row stays pending: it is sent again (a second copy)
                log.error(
                    f"could not record {_noun(job)} recipients",
                    outmail=job.id,
                    error=str(exc)[:500],
                )
            delivery.refused += [a for a, r in settled.items() if r[0] == RecipientState.REFUSED]
        delivery.pending = [a for a in delivery.pending if a not in settled]
        if delivery.pending:
            errors = "; ".join(f"{a}: {outcome[a][1]}" for a in delivery.pending)
            raise SendDeferred(f"recipients deferred: {errors}")

    def retried(
        self, delivery: Delivery[MailJob], error: BaseException | None, wait: float
    ) -> None:
        _count(delivery.job, "retried")
        noun = _noun(delivery.job)
        log.warning(
            f"{noun} possibly delivered; sending it again"
            if getattr(error, "possibly_delivered", False)
            else f"{noun} attempt failed; will retry",
            **self.fields(delivery.job),
            attempts=delivery.attempts,
            error=str(error),
            retry_in=round(wait, 1),
        )

    def failed(
        self, delivery: Delivery[MailJob], error: SendDeferred | SendRefused, reason: str
    ) -> None:
        _count(delivery.job, "failed")
        log.error(
            f"{_noun(delivery.job)} failed",
            **self.fields(delivery.job),
            attempts=delivery.attempts,
            error=reason,
        )

    def outcome(self, delivery: Delivery[MailJob]) -> tuple[OutboxStatus, str | None]:
        """Failed only when every recipient was refused and no earlier claim reached anyone."""
        assert isinstance(delivery, MailDelivery)
        if (
            len(delivery.refused) == len(delivery.job.recipients)
            and delivery.job.none_reached_before
        ):
            return OutboxStatus.FAILED, "every recipient was refused"
        return OutboxStatus.SENT, None

    def done(self, delivery: Delivery[MailJob], status: OutboxStatus) -> None:
        assert isinstance(delivery, MailDelivery)
        job = delivery.job
        _count(job, "sent" if status == OutboxStatus.SENT else "failed")
        noun = _noun(job)
        log.info(
            f"{noun} sent" if status == OutboxStatus.SENT else f"{noun} refused",
            **self.fields(job),
            recipients=len(job.recipients) - len(delivery.refused),
            refused=delivery.refused,
            attempts=delivery.attempts,
            since_queued_ms=round((utcnow() - job.created_at).total_seconds() * 1000),
        )
