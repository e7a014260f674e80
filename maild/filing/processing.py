"""After the 250: received deliveries become ticket messages.

The processor claims `received` rows (oldest first, bounded by count and
bytes; ids only) and hands the batch to a process pool. A pool worker reads the
raw bytes, parses each message (mail-parser is CPU-bound) under its own
`parse_timeout`, and files them 16 to a transaction (32 on PostgreSQL;
intake.file_batch) on its own database engine, made once per worker. Parsing
and filing are the CPU-heavy part of maild; in the pool they run on the other
cores, and the daemon's process keeps its core for SMTP and the spool. The
worker returns what became of each delivery; the daemon logs it, counts it and
wakes the outboxes. A delivery that fails is marked `failed` with its error; the
others go on. Nothing is deleted: the raw bytes stay, and `maild reprocess`
files failed ones again.

It wakes when the spool stores something, and every `poll_interval` anyway, so
rows left `received` by a crash, by `maild ingest` or by `maild reprocess`
are picked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

import structlog
from sqlalchemy import bindparam
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from maild import metrics
from maild.enums import InboundStatus, OutboxStatus, Outcome
from maild.filing.intake import Filed, FilingContext, Queued, file_batch
from maild.logs import configure_logging
from maild.mail import addresses
from maild.mail.authenticity import verify_sender
from maild.mail.parsing import ParsedMessage, parse_message
from maild.outbound.acks import AckPolicy
from maild.outbound.correspondence import DeskPolicy
from maild.outbound.outgoing import NOUNS
from maild.outbound.paging import EscalationPolicy
from maild.routing.rules import RuleTable
from maild.store.database import Database, LockTurn
from maild.store.models import Inbound, table_of
from maild.tuning import tune_malloc

log = structlog.get_logger("maild.processing")

MAX_BATCH_MESSAGES = 32
MAX_BATCH_BYTES = 16 * 1024 * 1024  # a message larger than this is a batch of its own
POISON_ATTEMPTS = 3
# Messages filed per transaction in a worker, by database. On SQLite every writer
# takes turns (the spool's commit, so the sender's 250, waits while a filing
# transaction holds the lock), so filing commits in smaller steps and parses each
# step before it takes the lock. PostgreSQL has no such lock, and fewer commits
# leave more CPU. Measured with 20 connections of 4 KiB mail (accepted/s, filed/s):
# SQLite 16: 258, 253; 32: 154, 152; 8: 223, 193. PostgreSQL 32: 333, 229; 16: 260, 179.
FILE_CHUNK = {"sqlite": 16, "postgresql": 32}
# Mail that pages goes to the urgent lane (a worker of its own) when it comes while the
# queue's batch in hand holds at least this many bytes; else it is first in the queue's
# next batch. A batch of small mail is parsed and filed in tens of milliseconds, and a
# message filed alone costs several times its share of a batch (a transaction, a
# round trip to a worker): with one page in ten 4 KiB messages, the lane for every page
# cost 0.4 ms of CPU per message (issue 21). A batch of 1 MiB messages takes seconds.
URGENT_LANE_BYTES = 1024 * 1024


class ParseTimeout(Exception):
    """mail-parser took longer than [processing] parse_timeout on one message."""


_INBOUND = table_of(Inbound)
_OLDEST_RECEIVED = (
    core_select(_INBOUND.c.id, _INBOUND.c.size)
    .where(_INBOUND.c.status == InboundStatus.RECEIVED.value)
    .order_by(_INBOUND.c.id)
    .limit(bindparam("limit"))
)
_THESE = (
    core_select(_INBOUND.c.id, _INBOUND.c.size)
    .where(_INBOUND.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_INBOUND.c.id)
    .limit(bindparam("limit"))
)
# Urgent ids still waiting: one the other lane filed meanwhile is not claimed again.
_THESE_RECEIVED = _THESE.where(_INBOUND.c.status == InboundStatus.RECEIVED.value)


def claim_ids(
    session: Session | Connection,
    limit: int,
    byte_budget: int = MAX_BATCH_BYTES,
    ids: Sequence[int] | None = None,
) -> list[int]:
    """The oldest `received` rows (or these `ids`), within `limit` rows and `byte_budget`
    bytes; their ids."""
    return [inbound_id for inbound_id, _ in claim_sized(session, limit, byte_budget, ids)]


def claim_sized(
    session: Session | Connection,
    limit: int,
    byte_budget: int = MAX_BATCH_BYTES,
    ids: Sequence[int] | None = None,
    received_only: bool = False,
) -> list[tuple[int, int]]:
    """As claim_ids, with each row's size: (id, size); of `ids`, only those still
    `received` when `received_only` (reprocessing claims failed rows by id too)."""
    if ids is None:
        rows = session.execute(_OLDEST_RECEIVED, {"limit": limit}).all()
    else:
        query = _THESE_RECEIVED if received_only else _THESE
        rows = session.execute(query, {"ids": list(ids), "limit": limit}).all()
    chosen: list[tuple[int, int]] = []
    total = 0
    for inbound_id, size in rows:
        if chosen and total + size > byte_budget:
            break
        if inbound_id is not None:
            chosen.append((inbound_id, size))
        total += size
    return chosen


def claim_received(
    session: Session,
    limit: int,
    byte_budget: int = MAX_BATCH_BYTES,
    ids: Sequence[int] | None = None,
) -> list[tuple[int, bytes]]:
    """As claim_ids, with each row's raw bytes: (id, raw)."""
    chosen = claim_ids(session, limit, byte_budget, ids)
    if not chosen:
        return []
    raws = session.exec(select(Inbound.id, Inbound.raw).where(col(Inbound.id).in_(chosen))).all()
    by_id = dict(raws)
    return [(i, by_id[i]) for i in chosen]


def log_results(results: Sequence[Filed]) -> None:
    """Count and log what became of each delivery (also for the HTTP API's, filed at once)."""
    for filed in results:
        metrics.PROCESSED.labels(filed.outcome).inc()
        if filed.outcome is Outcome.CREATED and filed.ticket_type and filed.ticket_priority:
            metrics.TICKETS.labels(filed.ticket_type, filed.ticket_priority).inc()
        if filed.latency is not None:
            metrics.PROCESSING_SECONDS.observe(max(0.0, filed.latency))
        if filed.page_status == "withheld":
            metrics.PAGES.labels("trigger", "withheld").inc()
        for mail in _mail_of(filed):
            queued = "queued" if mail.status == OutboxStatus.PENDING else "withheld"
            if mail.kind == "ack":
                metrics.ACKS.labels(queued).inc()
            metrics.MAIL.labels(mail.kind, queued).inc()
        if filed.outcome is Outcome.DROPPED:
            metrics.HYGIENE.labels("loop" if filed.kind == "auto" else filed.kind).inc()
        elif filed.kind not in ("human", "agent"):  # an agent is a person too
            metrics.HYGIENE.labels(filed.kind).inc()
        if filed.outcome is Outcome.DROPPED:
            log.warning(
                "message dropped; kept, not filed", inbound=filed.inbound_id, reason=filed.error
            )
        elif filed.outcome is Outcome.FAILED:
            log.error(
                "message failed processing; kept for `maild reprocess`",
                inbound=filed.inbound_id,
                error=filed.error,
            )
        else:
            log.info(
                "message filed",
                inbound=filed.inbound_id,
                outcome=filed.outcome,
                ticket=filed.ticket_id,
                route=filed.route,
                threaded_by=filed.threaded_by,
                page=filed.page_id,
                kind=filed.kind,
                auto_reasons=list(filed.auto_reasons) or None,
                ack=filed.ack_id,
                mail={m.kind: m.outmail_id for m in filed.mail} or None,
            )
        if filed.page_status == "withheld":
            log.warning(
                "page withheld",
                page=filed.page_id,
                ticket=filed.ticket_id,
                reason=filed.page_reason,
            )
        for mail in _mail_of(filed):
            if mail.status == "withheld":
                log.info(
                    f"{NOUNS.get(mail.kind, mail.kind)} withheld",
                    outmail=mail.outmail_id,
                    ticket=filed.ticket_id,
                    reason=mail.reason,
                )


def _queued(results: Sequence[Filed], desk: DeskPolicy | None) -> bool:
    """Whether filing these queued something to send: a page or mail pending, or (with
    webhooks) anything filed into a ticket, which may have written webhook events."""
    hooks = desk is not None and desk.webhooks is not None
    return any(
        OutboxStatus.PENDING in (f.page_status, f.ack_status, *(m.status for m in f.mail))
        or (hooks and f.ticket_id is not None)
        for f in results
    )


def _mail_of(filed: Filed) -> list[Queued]:
    """The mail filing queued for a delivery: its acknowledgement, then the desk's mail."""
    ack = []
    if filed.ack_status is not None:
        ack = [Queued("ack", filed.ack_id, filed.ack_status, filed.ack_reason)]
    return ack + list(filed.mail)


def process_now(database: Database, context: FilingContext, ids: Sequence[int]) -> list[Filed]:
    """Parse and file the given deliveries in this process, synchronously (CLI use)."""
    parse = partial(parse_message, wanted_headers=context.table.header_names)
    results = _file_ids(database, ids, MAX_BATCH_MESSAGES, parse, context)
    log_results(results)
    return results


def _file_ids(
    database: Database,
    ids: Sequence[int],
    step: int,
    parse: Callable[[bytes], ParsedMessage | BaseException],
    context: FilingContext,
) -> list[Filed]:
    """Read, parse and file these deliveries, `step` to a transaction. Each step is
    parsed before its transaction begins: on SQLite the write lock is held only
    for filing."""
    results: list[Filed] = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        claimed = database.run_read(partial(claim_received, limit=len(chunk), ids=chunk))
        items = [
            (inbound_id, _authenticated(parse(raw), raw, context)) for inbound_id, raw in claimed
        ]
        del claimed
        results.extend(database.run_write(partial(file_batch, context=context, items=items)))
    return results


def _authenticated(
    parsed: ParsedMessage | BaseException, raw: bytes, context: FilingContext
) -> ParsedMessage | BaseException:
    """The parsed message with its sender's verdict, when its From is one of `[desk]
    agents` (mail.authenticity: a DKIM check with a DNS lookup, or the trusted MTA's
    Authentication-Results). Here, between the parse and the filing transaction: the
    lookup blocks, and never inside a transaction that holds locks."""
    desk = context.desk
    if desk is None or isinstance(parsed, BaseException) or parsed.from_ is None:
        return parsed
    if not desk.is_agent(parsed.from_.email):
        return parsed
    parsed.authenticity = verify_sender(raw, addresses.domain_of(parsed.from_.email), desk.auth)
    return parsed


# The pool worker's side. Each worker process opens the database once (its own
# engines) and keeps it for its life: no per-batch engine or session set-up.
_worker_database: Database | None = None


def _worker_start(
    daemon: int,
    url: str,
    busy_timeout: float,
    log_format: str,
    log_level: str,
    roster: Any,
    turn: LockTurn = LockTurn.NORMAL,
) -> None:
    global _worker_database
    configure_logging(log_format, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    threading.Thread(target=_exit_with, args=(daemon,), name="maild-orphan", daemon=True).start()
    tune_malloc()  # large messages' buffers mapped, and given back when freed
    _worker_database = Database(url, busy_timeout, turn=turn)
    roster.put((os.getpid(), os.getppid()))  # so the daemon can kill this worker if stuck


def _exit_with(daemon: int) -> None:
    """End this worker when the daemon is gone (kill -9 leaves no one to tell it).

    A pool worker holds both ends of its task pipe, so it never sees the daemon's
    end close, and its parent is the forkserver, so no parent-death signal helps.
    It watches the forkserver's parent instead: when the daemon exits, the
    forkserver is handed to another parent at once, even while the daemon is a
    zombie not yet reaped (which `kill(pid, 0)` would still find)."""
    server = os.getppid()
    while True:
        time.sleep(1.0)
        parent = _parent_of(server)
        if parent is None:  # no /proc to read: the daemon's pid is the best we have
            try:
                os.kill(daemon, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # the pid now belongs to someone else
                os._exit(0)
        elif os.getppid() != server or parent != daemon:
            os._exit(0)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class _Alarm(BaseException):
    """The parse timer rang. A BaseException, so that no `except Exception` on the way
    (mail-parser's, or parse_message's fallback to a degraded parse) swallows it."""


def _on_alarm(_signum: int, _frame: object) -> None:
    raise _Alarm


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _Alarm in this (the worker's main) thread after `seconds`."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_within(
    raw: bytes, timeout: float, wanted_headers: frozenset[str] = frozenset()
) -> ParsedMessage | BaseException:
    """Parse one message, or the exception that stopped it (ParseTimeout past `timeout`)."""
    try:
        with _deadline(timeout):
            return parse_message(raw, wanted_headers)
    except _Alarm:
        return ParseTimeout(f"parsing took longer than {timeout:g} s")
    except Exception as exc:  # parse_message never raises; this is a bug's safety net
        return exc


def process_batch(ids: Sequence[int], context: FilingContext, parse_timeout: float) -> list[Filed]:
    """In a pool worker: read, parse (each message under `parse_timeout`) and file these
    deliveries, FILE_CHUNK of them to a transaction."""
    database = _worker_database
    assert database is not None, "the pool initializer opens the database"
    step = FILE_CHUNK.get(database.write_engine.dialect.name, 16)
    parse = partial(parse_within, timeout=parse_timeout, wanted_headers=context.table.header_names)
    return _file_ids(database, ids, step, parse, context)


class _Roster:
    """A pool's worker processes, as each announces itself at start: (pid, parent). The
    pool keeps its processes private; a stuck parse or filing holds its worker, and
    only killing it frees the slot."""

    def __init__(self, context: Any) -> None:
        self.queue = context.SimpleQueue()
        self.known: set[tuple[int, int]] = set()

    def kill(self) -> None:
        while not self.queue.empty():
            self.known.add(self.queue.get())
        for pid, parent in self.known:
            if _parent_of(pid) == parent:  # still that worker: a reused pid has another parent
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Its pool is shut down: no worker will announce itself any more."""
        self.queue.close()


def _make_pool(
    workers: int, database: Database, log: tuple[str, str], turn: LockTurn
) -> tuple[ProcessPoolExecutor, _Roster]:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["maild.filing.processing"])
    roster = _Roster(context)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_worker_start,
        initargs=(os.getpid(), database.url, database.busy_timeout, *log, roster.queue, turn),
    )
    return pool, roster


class _Pool:
    """A process pool and its roster, made when first needed and made again when broken."""

    def __init__(
        self, workers: int, database: Database, log: tuple[str, str], turn: LockTurn
    ) -> None:
        self.workers = workers
        self._database = database
        self._log = log
        self._turn = turn  # how its workers' filing takes SQLite's writer lock
        self.pool: ProcessPoolExecutor | None = None
        self.roster: _Roster | None = None

    def get(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool, self.roster = _make_pool(self.workers, self._database, self._log, self._turn)
        return self.pool

    def restart(self, broken: ProcessPoolExecutor) -> None:
        """A new pool in place of `broken` (its workers killed), unless that was done."""
        if self.pool is not broken:
            return
        old, old_roster = self.pool, self.roster
        self.pool, self.roster = None, None
        self.get()
        if old_roster is not None:
            old_roster.kill()
        old.shutdown(wait=False, cancel_futures=True)
        if old_roster is not None:
            old_roster.close()

    def kill(self) -> None:
        if self.roster is not None:
            self.roster.kill()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.roster is not None:
            self.roster.close()


class Processor:
    """The background task that turns received deliveries into tickets."""

    def __init__(
        self,
        database: Database,
        rules: Callable[[], RuleTable],
        workers: int,
        parse_timeout: float,
        poll_interval: float,
        policy: EscalationPolicy | None = None,
        on_filed: Callable[[Sequence[Filed]], None] | None = None,
        acks: Callable[[], AckPolicy | None] | None = None,
        log: tuple[str, str] = ("json", "info"),
        desk: Callable[[], DeskPolicy | None] | None = None,
    ) -> None:
        self._database = database
        self._policy = policy
        self._acks = acks or (lambda: None)
        self._desk = desk or (lambda: None)
        self._on_filed = on_filed
        self._rules = rules
        self._parse_timeout = parse_timeout
        self._poll_interval = poll_interval
        self._log = log
        self._pools = _Pool(workers, database, log, LockTurn.NORMAL)
        # Mail that pages has a worker of its own, made when the first such message
        # comes: it never waits behind a batch of large mail in the other workers, and
        # its filing goes first at SQLite's writer lock.
        self._urgent_pool = _Pool(1, database, log, LockTurn.URGENT)
        self._wake = asyncio.Event()
        self._urgent_wake = asyncio.Event()
        self._stopped = asyncio.Event()  # set by stop(): cuts the wait between retries short
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._urgent_task: asyncio.Task[None] | None = None
        self._batch_limit = MAX_BATCH_MESSAGES
        self._failures: dict[int, int] = {}
        # Ids of stored mail that pages, filed by the urgent lane ahead of the queue. Kept
        # in memory only: after a restart such mail is filed in arrival order, like the rest.
        self._urgent: deque[int] = deque()
        # Ids a lane has claimed and not yet finished: the other lane leaves them alone.
        # Read and changed only on the event loop's thread.
        self._in_hand: set[int] = set()
        self._batch_bytes = 0  # of the queue's batch in hand

    @property
    def busy(self) -> bool:
        """A batch is in hand (claimed, not yet logged), in either lane."""
        return bool(self._in_hand)

    @property
    def _pool(self) -> ProcessPoolExecutor | None:
        return self._pools.pool

    @property
    def _roster(self) -> _Roster | None:
        return self._pools.roster

    def start(self) -> None:
        self._pools.get()
        self._task = asyncio.create_task(self._run(), name="maild-processor")
        self._urgent_task = asyncio.create_task(self._run_urgent(), name="maild-processor-urgent")

    def notify(self, _ids: Sequence[int] = (), urgent: Sequence[int] = ()) -> None:
        """New deliveries were stored: look now rather than at the next poll. `urgent`
        ones (mail that pages) are filed first: in the queue's next batch, or by the
        urgent lane beside it when the batch in hand, or the rest of the next, is large
        enough to keep them waiting (URGENT_LANE_BYTES)."""
        if urgent:
            self._urgent.extend(urgent)
            if self._batch_bytes >= URGENT_LANE_BYTES:
                self._urgent_wake.set()
        self._wake.set()

    def _claim(self, session: Connection) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The next batch: the urgent ids still received, and the oldest received rows
        besides them; (id, size) each."""
        limit = self._batch_limit
        urgent = self._pop_urgent(limit)
        chosen = claim_sized(session, len(urgent), ids=urgent, received_only=True) if urgent else []
        rest: list[tuple[int, int]] = []
        if len(chosen) < limit:
            taken = {i for i, _ in chosen}
            oldest = claim_sized(session, limit)
            rest = [row for row in oldest if row[0] not in taken][: limit - len(chosen)]
        return chosen, rest

    def _batch(
        self, urgent: list[tuple[int, int]], rest: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """The queue's batch from a claim. Urgent mail is its first, unless the rest of
        it is large enough to keep that mail waiting (URGENT_LANE_BYTES): then the
        urgent lane files it beside the batch. (A batch is split across the workers and
        each part filed in id order: a page's message, the newest, is filed last of its
        part, after a parse of everything older in it.)"""
        if urgent and sum(size for _, size in rest) >= URGENT_LANE_BYTES:
            self._urgent.extendleft(reversed([i for i, _ in urgent]))
            self._urgent_wake.set()
            return rest
        return urgent + rest

    def _pop_urgent(self, limit: int) -> list[int]:
        """Up to `limit` urgent ids, oldest first (the queue's claim takes them in a
        database thread, the urgent lane on the loop: each popleft is atomic)."""
        taken: list[int] = []
        while len(taken) < limit:
            try:
                taken.append(self._urgent.popleft())
            except IndexError:
                break
        return taken

    def _take(self, ids: Sequence[int]) -> list[int]:
        """Of the ids a lane's claim read, those no lane has in hand; now in this one's."""
        mine = [i for i in ids if i not in self._in_hand]
        self._in_hand.update(mine)
        return mine

    async def stop(self, grace: float | None = None) -> None:
        """Finish the batch in hand (within `grace` seconds, when given), then stop;
        unstarted rows stay `received`, and so do those of a batch cut at the grace (its
        transaction never commits), to be filed after the restart."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        self._urgent_wake.set()
        tasks = [t for t in (self._task, self._urgent_task) if t is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                log.warning("processing batch cut at shutdown; it is filed after restart")
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
                self._pools.kill()
                self._urgent_pool.kill()
        self._pools.shutdown()
        self._urgent_pool.shutdown()

    async def _count_failure(self, inbound_id: int, exc: Exception) -> None:
        """A message that alone fails its batch three times is set aside as failed."""
        self._failures[inbound_id] = self._failures.get(inbound_id, 0) + 1
        if self._failures[inbound_id] < POISON_ATTEMPTS:
            return
        error = f"set aside after {POISON_ATTEMPTS} failed attempts: {type(exc).__name__}: {exc}"

        def mark(session: Session) -> None:
            row = session.get(Inbound, inbound_id)
            if row is not None and row.status == InboundStatus.RECEIVED:
                row.status = InboundStatus.FAILED.value
                row.error = error[:4000]
                session.add(row)

        try:
            await self._database.write(mark)
            self._failures.pop(inbound_id, None)
            log.error(
                "message failed processing; kept for `maild reprocess`",
                inbound=inbound_id,
                error=error,
            )
        except Exception as inner:  # the database itself is down: keep retrying all
            log.warning(
                "could not set a failing message aside", inbound=inbound_id, error=str(inner)[:500]
            )

    async def _process(self, ids: list[int], pools: _Pool | None = None) -> list[Filed]:
        """One batch through a pool (the queue's, unless given): split across its
        workers, each part its own transaction. A worker that dies or hangs past
        every parse's timeout (a parse stuck where the timer cannot reach it) takes
        the pool down: it is restarted and the batch fails, to be retried one
        message at a time."""
        loop = asyncio.get_running_loop()
        pools = pools or self._pools
        context = FilingContext(self._rules(), self._policy, self._acks(), self._desk())
        parts = [ids[i :: pools.workers] for i in range(min(pools.workers, len(ids)))]
        # A parse that overruns is interrupted in the worker; this is the outer bound.
        limit = self._parse_timeout * max(len(part) for part in parts) + 60
        for attempt in (1, 2):
            pool = pools.get()
            try:
                done = await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            loop.run_in_executor(
                                pool,
                                process_batch,
                                sorted(part),
                                context,
                                self._parse_timeout,
                            )
                            for part in parts
                        )
                    ),
                    limit,
                )
                return [filed for part in done for filed in part]
            except TimeoutError:
                pools.restart(pool)
                raise ParseTimeout(f"a worker took longer than {limit:g} s") from None
            except BrokenProcessPool:
                # a worker died (killed, or out of memory): restart and try once more
                pools.restart(pool)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            self._wake.clear()
            ids: list[int] = []
            try:
                claimed = self._batch(*await self._database.read_core(self._claim))
                ids = self._take([i for i, _ in claimed])
                if not ids:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                    continue
                mine = set(ids)
                self._batch_bytes = sum(size for i, size in claimed if i in mine)
                if self._urgent and self._batch_bytes >= URGENT_LANE_BYTES:
                    self._urgent_wake.set()  # came while the claim was being read
                try:
                    results = await self._process(ids)
                finally:
                    self._batch_bytes = 0
            except Exception as exc:
                self._in_hand.difference_update(ids)
                log.error(
                    "processing batch failed; will retry",
                    error=str(exc)[:500],
                    error_type=type(exc).__name__,
                    retry_in=backoff,
                )
                if self._batch_limit == 1 and ids:
                    await self._count_failure(ids[0], exc)
                self._batch_limit = 1  # if one message is to blame, it must not hold the rest
                with contextlib.suppress(TimeoutError):  # stop() ends the wait at once
                    await asyncio.wait_for(self._stopped.wait(), backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._failures.clear()
            backoff = 0.5
            self._batch_limit = MAX_BATCH_MESSAGES
            self._finish(ids, results)

    async def _run_urgent(self) -> None:
        """The urgent lane: mail that pages, filed as it comes in a worker of its own.
        A batch that fails here is left `received` for the queue, which retries it
        and sets a poisonous message aside."""
        while not self._stopping:
            await self._urgent_wake.wait()
            self._urgent_wake.clear()
            while self._urgent and not self._stopping:
                wanted = self._pop_urgent(MAX_BATCH_MESSAGES)
                ids: list[int] = []
                try:
                    claim = partial(
                        claim_sized, limit=MAX_BATCH_MESSAGES, ids=wanted, received_only=True
                    )
                    ids = self._take([i for i, _ in await self._database.read_core(claim)])
                    if not ids:
                        continue
                    results = await self._process(ids, self._urgent_pool)
                except Exception as exc:
                    self._in_hand.difference_update(ids)
                    log.error(
                        "urgent batch failed; the queue files it",
                        error=str(exc)[:500],
                        error_type=type(exc).__name__,
                        inbound=ids or wanted,
                    )
                    self._wake.set()
                    continue
                self._finish(ids, results)
                self._wake.set()  # the queue may have passed these by while they were in hand

    def _finish(self, ids: Sequence[int], results: Sequence[Filed]) -> None:
        """A lane's batch is filed: log and count it, wake the outboxes, let its ids go."""
        try:
            log_results(results)
            if self._on_filed is not None and _queued(results, self._desk()):
                self._on_filed(results)
        finally:
            self._in_hand.difference_update(ids)
