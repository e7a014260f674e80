"""The loop every outbox sender shares (pages to PagerDuty, mail to the smarthost, events
to webhooks).

An outbox is a table of rows written in the transaction that made them
necessary. A worker claims due rows (leasing them by moving `next_attempt_at`
ahead, on PostgreSQL FOR UPDATE SKIP LOCKED so several daemons share the
work), delivers each in its own task, and writes the outcome back. It wakes
when told something was queued, when a delivery finishes, when the next row
falls due, and every poll interval (rows queued by another process).

At start it takes back the rows its previous run had claimed (a daemon is its
host and config file), so a restart sends them at once instead of after the
lease. On stop, deliveries in flight get `grace` seconds; waits between
retries are cut short (`sleep` raises `Stopping`) and the rows stay pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import structlog
from sqlalchemy import Select, Table, Update, bindparam, exists, func, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential_jitter,
)

from maild.enums import OutboxStatus
from maild.errors import SendDeferred, SendRefused
from maild.store.database import Database
from maild.store.models import as_utc, table_of, utcnow

log = structlog.get_logger("maild.outbox")

CLAIM_LIMIT = 32
POLL_SECONDS = 1.0  # rows queued by another process (`maild ingest`, the CLI, another host)


class OutboxJob(Protocol):
    """A claimed row, detached from its session (pager.PageJob, mailer.MailJob)."""

    @property
    def id(self) -> int: ...
    @property
    def attempts(self) -> int: ...  # made by earlier claims
    @property
    def queued_at(self) -> datetime: ...  # the give-up window starts here


Job = TypeVar("Job", bound=OutboxJob)


class Stopping(Exception):
    """The daemon is stopping: leave the row pending for the next run."""


class NotFound(LookupError):
    """No outbox row with that id."""


class NotRetryable(ValueError):
    """The row was already sent."""


class RetryPolicy(Protocol):
    """The settings an outbox retries by ([pagerduty] and [outbound] both have them)."""

    give_up_after: float
    retry_initial: float
    retry_max: float


@dataclass
class Delivery(Generic[Job]):
    """One row's delivery in progress: the job and the attempts made on it so far."""

    job: Job
    attempts: int
    started: float  # the worker's clock when this claim began


class OutboxWorker(Generic[Job]):
    """Claims due rows and delivers them; a sender subclass supplies one attempt.

    The loop and its bookkeeping are here, once: the give-up window, retries with
    backoff and jitter (only SendDeferred is retried), the row's pending record
    before each wait, stopping, permanent refusal vs giving up, an internal error
    (the row is failed for `retry` by hand), and the final record. The sender says
    how to claim, how to make one attempt, and what to log and count.
    """

    noun = "rows"  # for log lines: "pages", "acknowledgements"
    thing = "row"  # one of them: "page", "acknowledgement"
    # Claims on a writer thread of their own, ahead of the other writers at SQLite's
    # writer lock (Database.write's `urgent`): the pager's, so that a page does not wait
    # behind the spool's writes of large mail. Outcomes take the common writer thread:
    # the page is out by then, and on the urgent thread they held the next claim back
    # (four outcomes in a row delayed a claim by 1.4 s behind twenty 1 MiB senders).
    urgent = False
    give_up_key = ""  # the setting that bounds the retries, for the error text
    model: Any  # the outbox table: Page or Outmail
    # What is logged when an outcome cannot be written: after a failed attempt (the
    # retries go on; the lease keeps other workers off the row), after the last one.
    unrecorded_attempt = "could not record an attempt"
    unrecorded: ClassVar[Mapping[OutboxStatus, str]] = {
        OutboxStatus.FAILED: "could not record an outcome"
    }

    def __init__(
        self,
        database: Database,
        claimer: str,
        poll_interval: float,
        lease: float,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._database = database
        self._claimer = claimer
        self._poll = poll_interval
        # A claimed row is not claimed again until this long after: an attempt must fit in it.
        self._lease = lease
        self._policy = policy
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    # What a sender provides.

    def release(self, session: Session, claimer: str, now: datetime) -> int:
        return release_claims(session, self.model, claimer, now)

    def next_due(self, session: Session | Connection) -> datetime | None:
        return next_due(session, self.model)

    def claim(self, session: Session, now: datetime, limit: int) -> list[Job]:
        raise NotImplementedError

    def job_name(self, job: Job) -> str:
        raise NotImplementedError

    def begin(self, job: Job) -> Delivery[Job]:
        """The state of one delivery; a sender that keeps more per delivery extends it."""
        return Delivery(job, job.attempts, self._clock())

    async def attempt(self, delivery: Delivery[Job]) -> None:
        """One attempt: return when done, raise SendDeferred to retry, SendRefused to stop."""
        raise NotImplementedError

    def fields(self, job: Job) -> dict[str, Any]:
        """What names the row in log lines."""
        raise NotImplementedError

    def policy(self, job: Job) -> RetryPolicy:
        """The retry settings for this row (the webhooks have one per `[[webhook]]`)."""
        return self._policy

    def write_outcome(
        self,
        connection: Connection,
        delivery: Delivery[Job],
        status: OutboxStatus,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> bool:
        """Write an attempt's or the delivery's outcome in the transaction of `connection`
        (a sender may write more with it: the pager's webhook events); whether the row was
        still pending."""
        return record_outcome(
            connection,
            self.model,
            delivery.job.id,
            attempts=delivery.attempts,
            status=status,
            error=error,
            next_attempt_at=next_attempt_at,
        )

    def retried(self, delivery: Delivery[Job], error: BaseException | None, wait: float) -> None:
        """Log and count a failed attempt that will be retried in `wait` seconds."""
        raise NotImplementedError

    def failed(
        self, delivery: Delivery[Job], error: SendDeferred | SendRefused, reason: str
    ) -> None:
        """Log and count a row failed: refused, or given up on (`reason` is what is kept)."""
        raise NotImplementedError

    def outcome(self, delivery: Delivery[Job]) -> tuple[OutboxStatus, str | None]:
        """The row's status after the attempts succeeded (a sender may still call it failed)."""
        return OutboxStatus.SENT, None

    def done(self, delivery: Delivery[Job], status: OutboxStatus) -> None:
        """Log and count a row whose attempts succeeded."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the sender holds (a client, connections)."""

    # One delivery.

    async def deliver(self, job: Job) -> None:
        """Attempt until sent, refused, given up on or stopped; record each step."""
        delivery = self.begin(job)
        policy = self.policy(job)
        deadline = job.queued_at + timedelta(seconds=policy.give_up_after)

        async def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.upcoming_sleep
            await self._record(
                delivery,
                OutboxStatus.PENDING,
                str(error),
                next_attempt_at=utcnow() + timedelta(seconds=wait + self._lease),
            )
            self.retried(delivery, error, wait)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SendDeferred),
            stop=stop_before_delay(max(0.0, (deadline - utcnow()).total_seconds())),
            wait=wait_exponential_jitter(
                multiplier=policy.retry_initial, max=policy.retry_max, jitter=policy.retry_initial
            ),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    delivery.attempts += 1
                    await self.attempt(delivery)
        except Stopping:
            return
        except asyncio.CancelledError:
            raise
        except (SendDeferred, SendRefused) as exc:
            reason = (
                str(exc)
                if isinstance(exc, SendRefused)
                else f"gave up after {delivery.attempts} attempts over "
                f"{policy.give_up_after:g} s ({self.give_up_key}): {exc}"
            )
            await self._record(delivery, OutboxStatus.FAILED, reason)
            self.failed(delivery, exc, reason)
            return
        except Exception as exc:  # a bug of ours: keep the row for `maild ... retry`
            await self._record(delivery, OutboxStatus.FAILED, f"{type(exc).__name__}: {exc}")
            log.exception(f"{self.thing} failed: internal error", **self.fields(job))
            return
        status, error = self.outcome(delivery)
        await self._record(delivery, status, error)
        self.done(delivery, status)

    async def _record(
        self,
        delivery: Delivery[Job],
        status: OutboxStatus,
        error: str | None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        """Write an attempt's or the delivery's outcome. When the write fails the row stays
        pending: a last outcome lost means the row is sent again (same dedup key; a second
        copy of a mail), never lost."""
        try:
            await self._database.write_core(
                lambda c: self.write_outcome(c, delivery, status, error, next_attempt_at)
            )
        except Exception as exc:
            if next_attempt_at is not None:
                log.warning(
                    self.unrecorded_attempt, **self.fields(delivery.job), error=str(exc)[:500]
                )
            else:
                log.error(
                    self.unrecorded.get(status, self.unrecorded[OutboxStatus.FAILED]),
                    **self.fields(delivery.job),
                    error=str(exc)[:500],
                )

    # The loop.

    async def start(self) -> None:
        released = await self._database.write(lambda s: self.release(s, self._claimer, utcnow()))
        if released:
            log.info(f"{self.noun} the previous run left pending are due again", count=released)
        self._task = asyncio.create_task(self._run(), name=f"maild-{self.noun}")

    def notify(self, *_: object) -> None:
        """Something may have been queued: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Let deliveries in flight finish (up to `grace` seconds); the rest stay pending."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._inflight:
            _, late = await asyncio.wait(self._inflight, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                log.warning(
                    f"{self.noun} cut at shutdown; they are sent after restart", count=len(late)
                )
        await self.close()

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            self._wake.clear()
            wait = self._poll
            try:
                due = await self._database.read_core(self.next_due)  # no write lock when idle
                if due is not None and due <= utcnow():
                    jobs = await self._database.write(
                        lambda s: self.claim(s, utcnow(), CLAIM_LIMIT), urgent=self.urgent
                    )
                    for job in jobs:
                        task = asyncio.create_task(self.deliver(job), name=self.job_name(job))
                        self._inflight.add(task)
                        task.add_done_callback(self._finished)
                    if len(jobs) == CLAIM_LIMIT:
                        continue  # more are due
                    if jobs:
                        due = await self._database.read_core(self.next_due)
                    else:
                        due = None  # due but waiting behind an earlier row (or claimed elsewhere)
                if due is not None:
                    wait = min(wait, max(0.0, (due - utcnow()).total_seconds()))
            except Exception as exc:
                log.error(
                    f"could not read the {self.noun} outbox; will retry", error=str(exc)[:500]
                )
                wait = backoff
                backoff = min(backoff * 2, 30.0)
            else:
                backoff = 0.5
            await self._pause(wait)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a row waiting behind this one (a resolve after its trigger) may go

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def sleep(self, seconds: float) -> None:
        """tenacity's sleep between attempts; cut short when the daemon stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        if self._stopping.is_set():
            raise Stopping


def record_outcome(
    session: Session | Connection,
    model: Any,
    row_id: int,
    *,
    attempts: int,
    status: str,  # an OutboxStatus value
    error: str | None = None,
    next_attempt_at: datetime | None = None,
    now: datetime | None = None,
) -> bool:
    """The outcome of one or more attempts on an outbox row (a Page, an Outmail, a
    WebhookEvent): sent, failed, or pending until next_attempt_at. A row no longer pending
    (retried, withheld or sent meanwhile by another instance or the CLI) is left alone.
    One UPDATE, no read first; whether it changed the row."""
    values: dict[str, Any] = {"attempts": attempts, "status": status}
    if status == OutboxStatus.SENT:
        values.update(sent_at=now or utcnow(), last_error=None, reason=None)
    else:
        values["last_error"] = error[:4000] if error else None
        if status == OutboxStatus.FAILED:
            values["reason"] = values["last_error"]
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    table = table_of(model)
    result = session.execute(
        update(table)
        .where(table.c.id == row_id, table.c.status == OutboxStatus.PENDING)
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def release_claims(session: Session, model: Any, claimer: str, now: datetime) -> int:
    """At start: rows this daemon's previous run held (in flight, or waiting to retry) are
    due now. A daemon is its host and config file; two cannot run with the same pair."""
    rows = session.exec(
        select(model).where(
            model.status == OutboxStatus.PENDING,
            model.claimed_by == claimer,
            col(model.next_attempt_at) > now,
        )
    ).all()
    for row in rows:
        row.next_attempt_at = now
        session.add(row)
    return len(rows)


def due_in_order(table: Table, columns: Sequence[str], order_by: Sequence[str]) -> Select[Any]:
    """The claim's read: pending rows due at `:now`, oldest first, at most `:limit`; a row
    waits while an earlier row with the same `order_by` values is still pending (a resolve
    behind its trigger, a ticket's webhook event behind the one before)."""
    earlier = table.alias("earlier")
    return (
        core_select(*(table.c[name] for name in columns))
        .where(
            table.c.status == OutboxStatus.PENDING.value,
            table.c.next_attempt_at <= bindparam("now"),
            ~exists().where(
                *(earlier.c[name] == table.c[name] for name in order_by),
                earlier.c.id < table.c.id,
                earlier.c.status == OutboxStatus.PENDING.value,
            ),
        )
        .order_by(table.c.id)
        .limit(bindparam("limit"))
    )


def lease(table: Table) -> Update:
    """The claim's write: rows `:ids` leased `:until`, marked as `:claimer`'s."""
    return (
        update(table)
        .where(table.c.id.in_(bindparam("ids", expanding=True)))
        .values(next_attempt_at=bindparam("until"), claimed_by=bindparam("claimer"))
    )


def next_due(session: Session | Connection, model: Any) -> datetime | None:
    """When the earliest pending row falls due (a read: no write lock while idle)."""
    table = table_of(model)
    value = session.execute(
        core_select(func.min(table.c.next_attempt_at)).where(table.c.status == OutboxStatus.PENDING)
    ).scalar()
    return as_utc(value) if value is not None else None


def reopen(session: Session, model: Any, row_id: int, now: datetime) -> Any:
    """Make a failed or withheld row (or a pending one) due now, with a new give-up window."""
    row = session.get(model, row_id, with_for_update=True)
    if row is None:
        raise NotFound(row_id)
    if row.status == OutboxStatus.SENT:
        raise NotRetryable(f"{model.__tablename__} {row_id} was already sent at {row.sent_at}")
    row.status = OutboxStatus.PENDING.value
    row.reason = None
    row.next_attempt_at = now
    row.queued_at = now
    session.add(row)
    return row


def tls_context(ca_file: Any) -> ssl.SSLContext:
    """The system's trust store, plus an extra CA file when one is configured."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
