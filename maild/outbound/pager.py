"""The pager: sends the page outbox to PagerDuty's Events API v2.

It claims due `pending` rows (claim_due, below), sends each with the
`pagerduty` package's EventsApiV2Client in a worker thread (the client is
synchronous; the event loop never waits on it), and records the outcome.

Retries are ours, not the client's: its own loop sleeps in `time.sleep` and
retries 429 without limit, so it is switched off (one HTTP attempt per call)
and tenacity retries instead — 429, 5xx, timeouts and network errors with
exponential backoff and jitter, each attempt bounded by `[pagerduty] timeout`,
until `[pagerduty] give_up_after` has passed since the page was queued.
Every failed attempt is written to the row (attempts, last error, next attempt
time) before the wait, so a restart resumes where the last run stopped. Any
other 4xx (400: invalid event or routing key) is permanent: the page is
marked failed at once and PagerDuty's message logged at error level.

A page whose send succeeded but whose `sent` mark was lost to a crash is sent
again after the restart; the dedup key makes PagerDuty fold it into the same
incident.

The webhooks subscribed to `page.sent` or `page.failed` hear of the outcome in the
transaction that records it (the ticket's row locked first, as filing and the desk
lock it, so that a ticket's events are numbered in the order they commit).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

import httpx2
import pagerduty
import structlog
from sqlalchemy import bindparam, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlmodel import Session

from maild import metrics
from maild.config import PagerDutySettings
from maild.enums import OutboxStatus, PageAction, PageStatus
from maild.errors import SendDeferred, SendRefused
from maild.outbound import webhook_events
from maild.outbound.outbox import (
    POLL_SECONDS,
    Delivery,
    OutboxWorker,
    due_in_order,
    lease,
    reopen,
    tls_context,
)
from maild.outbound.webhook_events import Webhooks
from maild.store.database import Database
from maild.store.models import Page, Ticket, as_utc, table_of, utcnow

log = structlog.get_logger("maild.pager")


CLOSED_BEFORE_SENT = "the ticket was closed before the page was sent"

# The outbox rows.


@dataclass(frozen=True)
class PageJob:
    """A claimed page, detached from its session (the pager sends it outside any transaction)."""

    id: int
    ticket_id: int
    action: str
    dedup_key: str
    event: dict[str, Any]
    attempts: int
    queued_at: datetime
    created_at: datetime


_PAGE = table_of(Page)
_DUE = due_in_order(
    _PAGE,
    [
        "id",
        "ticket_id",
        "action",
        "dedup_key",
        "event",
        "attempts",
        "queued_at",
        "created_at",
        "claimed_by",
    ],
    order_by=["dedup_key"],
)
_PENDING_RESOLVES = (
    core_select(_PAGE.c.id, _PAGE.c.dedup_key)
    .where(
        _PAGE.c.dedup_key.in_(bindparam("keys", expanding=True)),
        _PAGE.c.action == PageAction.RESOLVE.value,
        _PAGE.c.status == PageStatus.PENDING.value,
    )
    .order_by(_PAGE.c.id)
)
_LEASE = lease(_PAGE)
_TICKET = table_of(Ticket)
_SELECT_TICKET = core_select(_TICKET).where(_TICKET.c.id == bindparam("id"))
_LOCK_TICKET = _SELECT_TICKET.with_for_update(key_share=True)
_PAGE_EVENTS = {
    OutboxStatus.SENT: webhook_events.PAGE_SENT,
    OutboxStatus.FAILED: webhook_events.PAGE_FAILED,
}
_WITHHOLD_CLOSED = (
    update(_PAGE)
    .where(_PAGE.c.id.in_(bindparam("ids", expanding=True)))
    .values(status=PageStatus.WITHHELD.value, reason=CLOSED_BEFORE_SENT)
)


def claim_due(
    session: Session, now: datetime, limit: int, lease: float, claimer: str = ""
) -> list[PageJob]:
    """Pending pages that are due, oldest first, leased for `lease` seconds.

    A page waits while an earlier page under the same dedup key is pending, so
    a resolve never overtakes its trigger. A trigger never claimed (so never
    sent) whose ticket was closed meanwhile is withheld together with its
    resolve: nobody is woken for a ticket that is already closed. On PostgreSQL rows are taken
    FOR UPDATE SKIP LOCKED, so several daemons share the outbox. Three statements
    at most, however many pages are due: it runs for nearly every batch sysops@
    mail is filed in.
    """
    query = _DUE
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=_PAGE)
    rows = session.execute(query, {"now": now, "limit": limit}).all()
    # Never claimed, so never sent (a claimed one may have reached PagerDuty before a
    # crash, even with no attempt recorded): withheld if its resolve is queued already.
    fresh = [r for r in rows if r.action == PageAction.TRIGGER and not r.claimed_by]
    resolves: dict[str, list[int]] = {}
    if fresh:
        keys = list({r.dedup_key for r in fresh})
        for resolve_id, key in session.execute(_PENDING_RESOLVES, {"keys": keys}).all():
            resolves.setdefault(key, []).append(resolve_id)
    withheld: list[int] = []
    jobs = []
    for row in rows:
        if row.action == PageAction.TRIGGER and not row.claimed_by:
            resolve = next((i for i in resolves.get(row.dedup_key, []) if i > row.id), None)
            if resolve is not None:
                withheld += [row.id, resolve]
                continue
        jobs.append(
            PageJob(
                id=row.id,
                ticket_id=row.ticket_id,
                action=row.action,
                dedup_key=row.dedup_key,
                event=dict(row.event),
                attempts=row.attempts,
                queued_at=as_utc(row.queued_at),
                created_at=as_utc(row.created_at),
            )
        )
    if withheld:
        session.execute(_WITHHOLD_CLOSED, {"ids": withheld})
    if jobs:
        until = now + timedelta(seconds=lease)
        session.execute(_LEASE, {"ids": [j.id for j in jobs], "until": until, "claimer": claimer})
    return jobs


def retry_page(session: Session, page_id: int, now: datetime) -> Page:
    """Send a failed or withheld page again (or a pending one now), with a new give-up window."""
    page: Page = reopen(session, Page, page_id, now)
    return page


# Sending.


class _OneShotEventsClient(pagerduty.EventsApiV2Client):
    """EventsApiV2Client making exactly one HTTP attempt per event.

    `retry = {}` drops its 5xx retries, `max_network_attempts = 0` its network
    retries, and `postprocess` (its per-response hook) raises on any non-2xx
    before its unlimited 429 loop can sleep.
    """

    max_network_attempts = 0

    def __init__(self, routing_key: str, **kwargs: Any) -> None:
        super().__init__(routing_key, **kwargs)
        self.retry = {}

    def postprocess(self, response: httpx2.Response) -> None:
        if not response.is_success:
            raise pagerduty.HttpError(_describe_response(response), response)


def _describe_response(response: httpx2.Response) -> str:
    """PagerDuty's own words: `message` and `errors` from the JSON body, else the text."""
    text = response.text[:1000]
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        parts = [str(body.get("message") or body.get("status") or "")]
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            parts.append("; ".join(str(e) for e in errors))
        text = ": ".join(p for p in parts if p)
    return f"HTTP {response.status_code}: {text or response.reason_phrase}"


class EventsClient:
    """Sends one event per call, classifying every failure as transient or permanent."""

    def __init__(self, settings: PagerDutySettings) -> None:
        key = settings.key()
        if not key:
            raise ValueError("no [pagerduty] routing key")
        self._client = _OneShotEventsClient(
            key, base_url=settings.events_url, verify=tls_context(settings.ca_file)
        )
        self._client.timeout = settings.timeout  # type: ignore[assignment]  # any httpx timeout

    def send(self, event: dict[str, Any]) -> str:
        """POST one event (routing key added here); PagerDuty's dedup key on 202."""
        body = dict(event)
        action = body.pop("event_action")
        dedup_key = body.pop("dedup_key", None)
        try:
            return str(self._client.send_event(action, dedup_key=dedup_key, **body))
        except pagerduty.HttpError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            message = exc.msg if isinstance(exc.msg, str) else str(exc)
            if status in (0, 408, 429) or status >= 500:
                raise SendDeferred(message, status) from None
            raise SendRefused(message, status) from None
        except pagerduty.Error as exc:  # no response: network, TLS, timeout
            cause = exc.__cause__
            detail = f"{type(cause).__name__}: {cause}" if cause else str(exc)
            if isinstance(cause, httpx2.ReadTimeout | httpx2.RemoteProtocolError):
                # The event was sent and no answer came: the retry carries the same
                # dedup key, so PagerDuty folds it into the alert it may have opened.
                detail += "; possibly delivered"
            raise SendDeferred(detail) from None
        except OSError as exc:
            raise SendDeferred(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self._client.close()


class Pager(OutboxWorker[PageJob]):
    """The background task that delivers the page outbox."""

    noun = "pages"
    thing = "page"
    give_up_key = "[pagerduty] give_up_after"
    urgent = True
    model = Page
    unrecorded_attempt = "could not record a page attempt"
    unrecorded: ClassVar[Mapping[OutboxStatus, str]] = {
        OutboxStatus.FAILED: "could not record a page's outcome; it will be sent again"
    }

    def __init__(
        self,
        database: Database,
        client: EventsClient,
        settings: PagerDutySettings,
        claimer: str,
        poll_interval: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        webhooks: Webhooks | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        # A claimed page is not claimed again until this long after (an attempt
        # can take `timeout`); a crash mid-attempt delays it by at most this much.
        super().__init__(
            database, claimer, poll_interval, settings.timeout * 2 + 5, settings, clock
        )
        self._client = client
        self._webhooks = webhooks
        self._on_event = on_event  # called on the loop once a page.* event is written

    def write_outcome(
        self,
        connection: Connection,
        delivery: Delivery[PageJob],
        status: OutboxStatus,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> bool:
        """The outcome, and the page.sent or page.failed it makes, in one transaction."""
        event = _PAGE_EVENTS.get(status) if next_attempt_at is None else None
        hooks = self._webhooks
        if event is None or hooks is None or not hooks.wants(event):
            return super().write_outcome(connection, delivery, status, error, next_attempt_at)
        job = delivery.job
        # the ticket's lock first, as filing and the desk take it: its events are then
        # numbered in the order they commit (on SQLite, BEGIN IMMEDIATE holds the one lock)
        lock = _LOCK_TICKET if connection.dialect.name == "postgresql" else _SELECT_TICKET
        row = connection.execute(lock, {"id": job.ticket_id}).first()
        if not super().write_outcome(connection, delivery, status, error, next_attempt_at):
            return False
        if row is not None:
            now = utcnow()
            page = {
                "id": job.id,
                "action": job.action,
                "status": status.value,
                "dedup_key": job.dedup_key,
                "summary": (job.event.get("payload") or {}).get("summary", ""),
                "attempts": delivery.attempts,
                "error": error,
                "created_at": job.created_at.isoformat(),
                "sent_at": now.isoformat() if status == OutboxStatus.SENT else None,
            }
            webhook_events.queue(connection, hooks, event, Ticket(**row._asdict()), now, page=page)
        return True

    def _told(self, status: OutboxStatus) -> None:
        """On the loop, once an outcome is recorded: wake the webhooks' sender for it."""
        event = _PAGE_EVENTS.get(status)
        hooks = self._webhooks
        if event and hooks is not None and hooks.wants(event) and self._on_event is not None:
            self._on_event()

    def claim(self, session: Session, now: datetime, limit: int) -> list[PageJob]:
        return claim_due(session, now, limit, self._lease, self._claimer)

    def job_name(self, job: PageJob) -> str:
        return f"maild-page-{job.id}"

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    def fields(self, job: PageJob) -> dict[str, Any]:
        return {"page": job.id, "ticket": job.ticket_id, "action": job.action}

    async def attempt(self, delivery: Delivery[PageJob]) -> None:
        await asyncio.to_thread(self._client.send, delivery.job.event)

    def retried(
        self, delivery: Delivery[PageJob], error: BaseException | None, wait: float
    ) -> None:
        metrics.PAGES.labels(delivery.job.action, "retried").inc()
        log.warning(
            "page attempt failed; will retry",
            **self.fields(delivery.job),
            attempts=delivery.attempts,
            error=str(error),
            retry_in=round(wait, 1),
        )

    def failed(
        self, delivery: Delivery[PageJob], error: SendDeferred | SendRefused, reason: str
    ) -> None:
        metrics.PAGES.labels(delivery.job.action, "failed").inc()
        self._told(OutboxStatus.FAILED)
        log.error(
            "page failed: PagerDuty refused it"
            if isinstance(error, SendRefused)
            else "page failed: gave up",
            **self.fields(delivery.job),
            attempts=delivery.attempts,
            status=error.status,
            error=str(error),
        )

    def done(self, delivery: Delivery[PageJob], status: OutboxStatus) -> None:
        job = delivery.job
        metrics.PAGES.labels(job.action, "sent").inc()
        self._told(status)
        log.info(
            "page sent",
            **self.fields(job),
            dedup_key=job.dedup_key,
            attempts=delivery.attempts,
            send_ms=round((self._clock() - delivery.started) * 1000),
            since_queued_ms=round((utcnow() - job.created_at).total_seconds() * 1000),
        )
