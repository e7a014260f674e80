"""The outbox skeleton on its own: a sender that supplies only one attempt and its log
lines (as the next ones, copies, replies and webhooks, will) gets the whole delivery
loop: retries of SendDeferred until the give-up window, SendRefused failing at once,
an internal error kept for `retry`, every attempt recorded, stopping mid-wait."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session, select
from structlog.testing import capture_logs

from maild.enums import OutboxStatus
from maild.errors import SendDeferred, SendRefused
from maild.outbound.outbox import Delivery, OutboxWorker
from maild.outbound.pager import PageJob, claim_due
from maild.store.database import Database
from maild.store.models import Page, Ticket, as_utc, utcnow


@dataclass
class Policy:
    give_up_after: float = 30.0
    retry_initial: float = 0.01
    retry_max: float = 0.02


class ScriptedSender(OutboxWorker[PageJob]):
    """A sender in the fewest lines: each attempt plays the next step of a script."""

    noun = "tests"
    thing = "test"
    give_up_key = "[test] give_up_after"
    model = Page

    def __init__(self, database: Database, script: list[Any], policy: Policy) -> None:
        super().__init__(database, "test:here", 0.05, lease=60, policy=policy)
        self.script = script
        self.calls: list[int] = []  # the attempt number of every call
        self.log: list[tuple[str, Any]] = []
        self.waiting: asyncio.Event | None = None  # set when a retry's wait begins

    def claim(self, session: Session, now: datetime, limit: int) -> list[PageJob]:
        return claim_due(session, now, limit, self._lease, self._claimer)

    def job_name(self, job: PageJob) -> str:
        return f"test-{job.id}"

    def fields(self, job: PageJob) -> dict[str, Any]:
        return {"page": job.id}

    async def attempt(self, delivery: Delivery[PageJob]) -> None:
        self.calls.append(delivery.attempts)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step

    def retried(self, delivery: Delivery[PageJob], error: BaseException | None, wait: float):
        self.log.append(("retried", str(error)))
        if self.waiting is not None:
            self.waiting.set()

    def failed(self, delivery: Delivery[PageJob], error: Any, reason: str) -> None:
        self.log.append(("failed", reason))

    def done(self, delivery: Delivery[PageJob], status: OutboxStatus) -> None:
        self.log.append(("done", status))


def _page(database: Database, queued_at: datetime | None = None) -> int:
    def add(session: Session) -> int:
        ticket = Ticket(type="incident", priority="urgent", subject="Site down")
        session.add(ticket)
        session.flush()
        page = Page(ticket_id=ticket.id, action="trigger", dedup_key=f"k{ticket.id}")
        if queued_at is not None:
            page.queued_at = queued_at
        session.add(page)
        session.flush()
        assert page.id is not None
        return page.id

    return database.run_write(add)


def _row(database: Database, page_id: int) -> Page:
    return database.run_read(lambda s: s.exec(select(Page).where(Page.id == page_id)).one())


async def _deliver_one(sender: ScriptedSender, database: Database) -> None:
    (job,) = database.run_write(lambda s: sender.claim(s, utcnow(), 10))
    await sender.deliver(job)


@pytest.fixture
def database(database_url: str) -> Any:
    database = Database(database_url)
    database.create_schema()
    yield database
    database.close()


def test_deferred_attempts_are_retried_and_recorded_until_sent(database: Database) -> None:
    page_id = _page(database)
    sender = ScriptedSender(database, [SendDeferred("503"), SendDeferred("timeout")], Policy())
    asyncio.run(_deliver_one(sender, database))
    row = _row(database, page_id)
    assert (row.status, row.attempts, row.last_error) == ("sent", 3, None)
    assert sender.calls == [1, 2, 3]
    assert sender.log == [("retried", "503"), ("retried", "timeout"), ("done", "sent")]


def test_a_refusal_fails_the_row_at_once_with_the_far_ends_words(database: Database) -> None:
    page_id = _page(database)
    sender = ScriptedSender(database, [SendRefused("HTTP 400: invalid routing key", 400)], Policy())
    asyncio.run(_deliver_one(sender, database))
    row = _row(database, page_id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.reason == row.last_error == "HTTP 400: invalid routing key"
    assert sender.log == [("failed", "HTTP 400: invalid routing key")]


def test_past_the_window_it_gives_up_naming_the_setting(database: Database) -> None:
    page_id = _page(database, queued_at=utcnow() - timedelta(seconds=60))
    sender = ScriptedSender(database, [SendDeferred("503")] * 5, Policy(give_up_after=30))
    asyncio.run(_deliver_one(sender, database))
    row = _row(database, page_id)
    assert row.status == "failed"
    assert row.reason == "gave up after 1 attempts over 30 s ([test] give_up_after): 503"
    assert sender.calls == [1]


def test_an_error_of_ours_fails_the_row_for_retry_by_hand(database: Database) -> None:
    page_id = _page(database)
    sender = ScriptedSender(database, [KeyError("event")], Policy())
    asyncio.run(_deliver_one(sender, database))
    row = _row(database, page_id)
    assert (row.status, row.reason) == ("failed", "KeyError: 'event'")
    assert sender.log == []  # not the far end's doing: logged by the skeleton, not counted


def test_stopping_during_a_wait_leaves_the_row_pending_with_its_attempt(
    database: Database,
) -> None:
    page_id = _page(database)
    sender = ScriptedSender(
        database, [SendDeferred("503")], Policy(give_up_after=600, retry_initial=30, retry_max=30)
    )

    async def run() -> None:
        sender.waiting = asyncio.Event()
        delivery = asyncio.create_task(_deliver_one(sender, database))
        await asyncio.wait_for(sender.waiting.wait(), 5)
        sender._stopping.set()
        await asyncio.wait_for(delivery, 5)

    asyncio.run(run())
    row = _row(database, page_id)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, "503")
    assert as_utc(row.next_attempt_at) > utcnow() + timedelta(seconds=30)  # the wait + the lease


def test_an_outcome_that_cannot_be_written_leaves_the_row_pending_to_send_again(
    database: Database,
) -> None:
    """The send succeeds but the table is gone when the skeleton records it: the failure is
    logged, and the row stays pending (sent again later: a second copy, never none)."""
    page_id = _page(database)
    sender = ScriptedSender(database, [], Policy())

    async def run() -> list[dict[str, Any]]:
        (job,) = database.run_write(lambda s: sender.claim(s, utcnow(), 10))
        database.run_write(lambda s: s.execute(text("ALTER TABLE page RENAME TO page_away")))
        try:
            with capture_logs() as logs:
                await sender.deliver(job)
        finally:
            database.run_write(lambda s: s.execute(text("ALTER TABLE page_away RENAME TO page")))
        return logs

    logs = asyncio.run(run())
    row = _row(database, page_id)
    assert (row.status, row.attempts, row.sent_at) == ("pending", 0, None)
    assert sender.log == [("done", "sent")]  # the far end took it
    (entry,) = [e for e in logs if e["event"] == "could not record an outcome"]
    assert (entry["log_level"], entry["page"]) == ("error", page_id)
