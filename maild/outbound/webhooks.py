"""The webhooks' sender: posts the webhook outbox to each `[[webhook]]`, signed, in order
per ticket.

Rows are written with the change they report (outbound/webhook_events.py). This sender
claims due `pending` rows, posts each as JSON (or, for `format = "slack"`, as a Slack
incoming-webhook `{"text": ...}`), and records the outcome:

- 2xx: sent;
- 408, 429, 5xx, a timeout, a network or TLS error: retried with exponential backoff and
  jitter (`retry_initial` doubling up to `retry_max`), until `give_up_after` has passed
  since the event was queued; every failed attempt is written to the row before the wait;
- any other answer (3xx: redirects are not followed; 4xx): refused, failed at once.

In order per ticket: a row is claimed only when no earlier row of the same webhook and
ticket is still pending, so a receiver never sees event N+1 of a ticket before event N
was sent or failed. Different tickets (and different webhooks) go out concurrently.
Rows of one ticket are numbered in the order their transactions commit: every writer of
a ticket's events holds the ticket's row lock (filing, the desk, the pager).

At least once: a crash between the receiver's 2xx and our record of it sends the event
again after the restart, with the same `Maild-Delivery` id (the row's id); receivers
deduplicate on it, which makes it exactly once for them.

Every request carries:

- `Maild-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, signed
  at each attempt (receivers refuse signatures older than five minutes);
- `Maild-Event` (ticket.created, ...), `Maild-Delivery` (the row id);
- `Content-Type: application/json`, `User-Agent: maild/<version>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

import httpx2
import structlog
from sqlmodel import Session

from maild import __version__, metrics
from maild.config import WebhookSettings
from maild.enums import OutboxStatus
from maild.errors import SendDeferred, SendRefused
from maild.outbound.outbox import (
    POLL_SECONDS,
    Delivery,
    OutboxWorker,
    RetryPolicy,
    due_in_order,
    lease,
    reopen,
    tls_context,
)
from maild.outbound.webhook_events import (
    MESSAGE_CREATED,
    PAGE_FAILED,
    PAGE_SENT,
    TICKET_CREATED,
    TICKET_UPDATED,
)
from maild.store.database import Database
from maild.store.models import WebhookEvent, as_utc, table_of, utcnow

log = structlog.get_logger("maild.webhooks")

SIGNATURE_HEADER = "Maild-Signature"
EVENT_HEADER = "Maild-Event"
DELIVERY_HEADER = "Maild-Delivery"
TOLERANCE = 300  # seconds a receiver accepts a signature for (verify's default)
PAYLOAD_VERSION = 1
ANSWER_BYTES = 1024  # of a receiver's answer kept for the error text
SLACK_QUOTE_CHARS = 500  # of a message's text a Slack post quotes


# Signatures.


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The Maild-Signature header's value: `t=<timestamp>,v1=<hex HMAC-SHA256>` of
    `<timestamp>.<body>`, as Stripe signs its events."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: bytes,
    body: bytes,
    header: str,
    tolerance: float = TOLERANCE,
    now: float | None = None,
) -> bool:
    """A receiver's check (the README's snippet does the same): a `v1` signature of the
    body under `secret`, made within `tolerance` seconds of `now`."""
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for key, _, value in fields if key == "t"]
    signatures = [value.encode() for key, _, value in fields if key == "v1" and value.isascii()]
    # isascii: "²".isdigit() is true and int("²") raises; compare_digest refuses non-ASCII
    # str; at most 12 digits: a longer one overflows the float subtraction below
    stamp = stamps[0] if len(stamps) == 1 else ""
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12) or not signatures:
        return False
    timestamp = int(stamp)
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2].encode()
    return any(hmac.compare_digest(expected, s) for s in signatures)


# The outbox rows.


@dataclass(frozen=True)
class WebhookJob:
    """A claimed webhook event, detached from its session."""

    id: int
    webhook: str
    event: str
    ticket_id: int
    payload: dict[str, Any]
    attempts: int
    queued_at: datetime
    created_at: datetime


_EVENT = table_of(WebhookEvent)
_DUE = due_in_order(
    _EVENT,
    ["id", "webhook", "event", "ticket_id", "payload", "attempts", "queued_at", "created_at"],
    order_by=["webhook", "ticket_id"],
)
_LEASE = lease(_EVENT)


def claim_due(
    session: Session, now: datetime, limit: int, lease: float, claimer: str = ""
) -> list[WebhookJob]:
    """Pending events that are due, oldest first, leased for `lease` seconds: for each
    webhook and ticket only the oldest pending one (it may be in flight already, leased
    by an earlier claim: then none). FOR UPDATE SKIP LOCKED on PostgreSQL."""
    query = _DUE
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=_EVENT)
    rows = session.execute(query, {"now": now, "limit": limit}).all()
    jobs = [
        WebhookJob(
            id=row.id,
            webhook=row.webhook,
            event=row.event,
            ticket_id=row.ticket_id,
            payload=dict(row.payload),
            attempts=row.attempts,
            queued_at=as_utc(row.queued_at),
            created_at=as_utc(row.created_at),
        )
        for row in rows
    ]
    if jobs:
        until = now + timedelta(seconds=lease)
        session.execute(_LEASE, {"ids": [j.id for j in jobs], "until": until, "claimer": claimer})
    return jobs


def retry_webhook(session: Session, row_id: int, now: datetime) -> WebhookEvent:
    """Send a failed event again (or a pending one now), with a new give-up window. It
    goes before the ticket's later events still pending, after those already sent."""
    row: WebhookEvent = reopen(session, WebhookEvent, row_id, now)
    return row


# The bodies.


def body(job: WebhookJob, format: str) -> bytes:
    """What is posted: the event (format "maild") or a Slack incoming-webhook message."""
    if format == "slack":
        document: dict[str, Any] = {"text": slack_text(job.event, job.payload)}
    else:
        document = {
            "id": job.id,
            "type": job.event,
            "created_at": job.created_at.isoformat(),
            "version": PAYLOAD_VERSION,
            "data": job.payload,
        }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _slack(text: Any) -> str:
    """Text as Slack shows it literally: &, < and > escaped, one line."""
    return (
        " ".join(str(text or "").split())
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
    )


def _person(who: Mapping[str, Any]) -> str:
    name, email = _slack(who.get("name")), _slack(who.get("email"))
    return f"{name} ({email})" if name and email else name or email or "someone"


def slack_text(event: str, data: Mapping[str, Any]) -> str:
    """One Slack message (mrkdwn) for an event: the ticket's number (linked when
    `[desk] ticket_url` is set), its subject, and what happened."""
    ticket = data.get("ticket") or {}
    number = f"#{ticket.get('id')}"
    url = str(ticket.get("url") or "")
    link = f"<{url}|{number}>" if url and not any(c in url for c in "<>| ") else number
    subject = _slack(ticket.get("subject")) or "(no subject)"
    head = f"Ticket {link} *{subject}*"
    if event == TICKET_CREATED:
        requester = {"name": ticket.get("requester_name"), "email": ticket.get("requester")}
        return (
            f"New ticket {link} *{subject}* ({_slack(ticket.get('type'))}, "
            f"{_slack(ticket.get('priority'))}) from {_person(requester)}"
        )
    if event == TICKET_UPDATED:
        changes = ", ".join(
            f"{_slack(c.get('field'))}: {_slack(c.get('old')) or '(none)'} → "
            f"{_slack(c.get('new')) or '(none)'}"
            for c in data.get("changes") or []
        )
        return f"{head}: {changes} (by {_slack(data.get('by'))})"
    if event == MESSAGE_CREATED:
        message = data.get("message") or {}
        who = _person(message.get("from") or {})
        what = "internal note" if message.get("internal") else "message"
        text = str(message.get("text") or "").strip()
        quoted = ""
        if text:
            cut = text[:SLACK_QUOTE_CHARS] + ("…" if len(text) > SLACK_QUOTE_CHARS else "")
            quoted = "\n" + "\n".join(f"> {_slack(line)}" for line in cut.splitlines()[:10])
        return f"{head}: new {what} from {who}{quoted}"
    if event in (PAGE_SENT, PAGE_FAILED):
        page = data.get("page") or {}
        action = "on-call paged" if page.get("action") == "trigger" else "incident resolved"
        if event == PAGE_SENT:
            return f"{head}: {action} (PagerDuty {_slack(page.get('action'))} sent)"
        return (
            f"{head}: PagerDuty {_slack(page.get('action'))} failed: "
            f"{_slack(page.get('error'))[:300]}"
        )
    return f"{head}: {_slack(event)}"


# Sending.


def _answer_text(status: int, reason: str, head: bytes) -> str:
    text = " ".join(head.decode("utf-8", "replace").split())[:300]
    return f"HTTP {status}: {text or reason}"


class WebhookClient:
    """Posts to one `[[webhook]]`, one attempt per call, failures classified."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        # Built now, so that a bad ca_file stops the daemon at start (ValueError).
        try:
            self._tls: ssl.SSLContext = tls_context(settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"[[webhook]] {settings.name!r} ca_file: {settings.ca_file}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        self._client: httpx2.AsyncClient | None = None

    def _http(self) -> httpx2.AsyncClient:
        """The client, made on the event loop on first use (keep-alive across events)."""
        if self._client is None:
            self._client = httpx2.AsyncClient(
                verify=self._tls,
                timeout=self.settings.timeout,
                follow_redirects=False,
                trust_env=False,  # no proxy from the environment: the URL is what is reached
                headers={"User-Agent": f"maild/{__version__}"},
            )
        return self._client

    async def post(self, job: WebhookJob) -> None:
        """One POST; returns on 2xx, SendDeferred to retry, SendRefused to give up."""
        settings = self.settings
        data = body(job, settings.format)
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: job.event,
            DELIVERY_HEADER: str(job.id),
            SIGNATURE_HEADER: sign(settings.key(), data, int(time.time())),
        }
        status: int | None = None
        reason = ""
        head = b""
        try:
            async with (
                asyncio.timeout(settings.timeout),
                self._http().stream("POST", settings.url, content=data, headers=headers) as answer,
            ):
                status, reason = answer.status_code, answer.reason_phrase
                if 200 <= status < 300:
                    return
                with contextlib.suppress(httpx2.HTTPError):  # what it says, if it says it
                    async for chunk in answer.aiter_bytes():
                        head += chunk
                        if len(head) >= ANSWER_BYTES:
                            break
        except TimeoutError:  # the attempt's own bound, whatever was slow
            if status is None:
                raise SendDeferred(
                    f"no answer within {settings.timeout:g} s; possibly delivered",
                    possibly_delivered=True,
                ) from None
        except (httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            raise SendDeferred(f"{type(exc).__name__}: could not connect") from None
        except (httpx2.TimeoutException, httpx2.RemoteProtocolError) as exc:
            raise SendDeferred(
                f"{type(exc).__name__}: {exc or 'no answer'}; possibly delivered",
                possibly_delivered=True,
            ) from None
        except (httpx2.HTTPError, OSError, ssl.SSLError) as exc:
            raise SendDeferred(f"{type(exc).__name__}: {exc}") from None
        assert status is not None
        text = _answer_text(status, reason, head[:ANSWER_BYTES])
        if status in (408, 429) or status >= 500:
            raise SendDeferred(text, status)
        if 300 <= status < 400:
            raise SendRefused(f"{text} (redirects are not followed: fix [[webhook]] url)", status)
        raise SendRefused(text, status)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebhookSender(OutboxWorker[WebhookJob]):
    """The background task that delivers the webhook outbox."""

    noun = "webhook events"
    thing = "webhook event"
    give_up_key = "[[webhook]] give_up_after"
    model = WebhookEvent
    unrecorded_attempt = "could not record a webhook attempt"
    unrecorded: ClassVar[Mapping[OutboxStatus, str]] = {
        OutboxStatus.FAILED: "could not record a failed webhook event",
        OutboxStatus.SENT: "could not record a sent webhook event; it will be sent again",
    }

    def __init__(
        self,
        database: Database,
        webhooks: Sequence[WebhookSettings],
        claimer: str,
        poll_interval: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert webhooks, "no [[webhook]]: no sender"
        self._clients = {hook.name: WebhookClient(hook) for hook in webhooks}
        # A claimed row is not claimed again until this long after: an attempt must fit.
        lease = max(hook.timeout for hook in webhooks) * 2 + 5
        super().__init__(database, claimer, poll_interval, lease, webhooks[0], clock)

    def claim(self, session: Session, now: datetime, limit: int) -> list[WebhookJob]:
        return claim_due(session, now, limit, self._lease, self._claimer)

    def job_name(self, job: WebhookJob) -> str:
        return f"maild-webhook-{job.id}"

    def fields(self, job: WebhookJob) -> dict[str, Any]:
        return {
            "webhook_event": job.id,
            "webhook": job.webhook,
            "event_type": job.event,  # `event` is structlog's message
            "ticket": job.ticket_id,
        }

    def policy(self, job: WebhookJob) -> RetryPolicy:
        client = self._clients.get(job.webhook)
        return client.settings if client is not None else super().policy(job)

    async def attempt(self, delivery: Delivery[WebhookJob]) -> None:
        job = delivery.job
        client = self._clients.get(job.webhook)
        if client is None:
            raise SendRefused(
                f"no [[webhook]] named {job.webhook!r} in the config (removed or renamed); "
                f"add it back, then `maild webhooks retry {job.id}`"
            )
        await client.post(job)

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()

    def retried(
        self, delivery: Delivery[WebhookJob], error: BaseException | None, wait: float
    ) -> None:
        job = delivery.job
        metrics.WEBHOOKS.labels(job.webhook, job.event, "retried").inc()
        log.warning(
            "webhook event possibly delivered; sending it again"
            if getattr(error, "possibly_delivered", False)
            else "webhook attempt failed; will retry",
            **self.fields(job),
            attempts=delivery.attempts,
            error=str(error),
            retry_in=round(wait, 1),
        )

    def failed(
        self, delivery: Delivery[WebhookJob], error: SendDeferred | SendRefused, reason: str
    ) -> None:
        job = delivery.job
        metrics.WEBHOOKS.labels(job.webhook, job.event, "failed").inc()
        log.error(
            "webhook event failed: the receiver refused it"
            if isinstance(error, SendRefused)
            else "webhook event failed: gave up",
            **self.fields(job),
            attempts=delivery.attempts,
            status=error.status,
            error=reason,
        )

    def done(self, delivery: Delivery[WebhookJob], status: OutboxStatus) -> None:
        job = delivery.job
        metrics.WEBHOOKS.labels(job.webhook, job.event, "sent").inc()
        log.info(
            "webhook event sent",
            **self.fields(job),
            attempts=delivery.attempts,
            send_ms=round((self._clock() - delivery.started) * 1000),
            since_queued_ms=round((utcnow() - job.created_at).total_seconds() * 1000),
        )
