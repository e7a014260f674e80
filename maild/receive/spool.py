"""The durable spool: accepted deliveries committed before the sender hears 250.

Group commit: deliveries that arrive while a commit is in flight wait in a list
and are committed together by the next one (one transaction, one fsync, many
messages), like an MTA queue. `put` returns the delivery's row id only after its
transaction committed; any failure raises StorageUnavailable (the SMTP handler
answers 451 4.3.0 and the sender retries). So does a commit that has not
finished within [database] busy_timeout (StorageTimeout): a database that hangs
(a frozen server, a stalled disk, a lock held by another process) must not hold
every sender until it recovers. A delivery whose put timed out is dropped
(before its INSERT, or deleted again before its COMMIT); only one whose put timed
out during the COMMIT itself may still be stored, and the sender's retry is then a
duplicate that filing recognises (same Message-ID, sender and body).

The spool remembers how its last write went (`Storage`), for /healthz and
/readyz: whether mail can be stored now, not only whether the database answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection
from sqlmodel import Session

from maild.errors import StorageTimeout, StorageUnavailable
from maild.store.database import Database
from maild.store.models import Inbound, StorageProbe, table_of, utcnow

log = structlog.get_logger("maild.spool")

MAX_BATCH_MESSAGES = 256
MAX_BATCH_BYTES = 16 * 1024 * 1024  # SQLite copies every blob it binds: large mail commits alone


@dataclass
class Delivery:
    """One accepted message: its envelope and its bytes, exactly as received."""

    protocol: str  # smtp | lmtp | pipe
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    peer: str = ""
    helo: str = ""
    session_id: str = ""
    received_at: datetime = field(default_factory=utcnow)
    urgent: bool = False  # a recipient's route pages: processed before the queue (not stored)

    def to_row(self) -> dict[str, Any]:
        """The inbound row's values; status, attempts and the rest take the model's
        column defaults (a `received` row, never attempted)."""
        return {
            "received_at": self.received_at,
            "protocol": self.protocol,
            "peer": self.peer[:255],
            "helo": self.helo,
            "session_id": self.session_id,
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "size": len(self.raw),
            "sha256": hashlib.sha256(self.raw).hexdigest(),
            "raw": self.raw,
        }


# A Core INSERT built once: the ORM's unit of work cost more than the commit itself.
_INBOUND = table_of(Inbound)
_INSERT_INBOUND = insert(_INBOUND).returning(
    _INBOUND.c.id,
    sort_by_parameter_order=True,
)


def insert_deliveries(session: Session | Connection, deliveries: Sequence[Delivery]) -> list[int]:
    """Add the deliveries as `received` rows; their ids, in the same order."""
    if not deliveries:
        return []
    result = session.execute(_INSERT_INBOUND, [d.to_row() for d in deliveries])
    return [int(i) for i in result.scalars().all()]


@dataclass
class Storage:
    """How the last write of the spool (a commit, or a health probe) went."""

    ok: bool = True
    at: float = 0.0  # loop time; 0: nothing written yet
    error: str = ""

    def record(self, ok: bool, at: float, error: str = "") -> None:
        self.ok, self.at, self.error = ok, at, error


_PROBE = table_of(StorageProbe)


def write_probe(connection: Connection) -> None:
    """One small committed write: this host's row in `storage_probe` gets the time."""
    host, now = socket.gethostname()[:255], utcnow()
    changed = connection.execute(
        update(_PROBE).where(_PROBE.c.host == host).values(checked_at=now)
    ).rowcount
    if not changed:
        connection.execute(insert(_PROBE).values(host=host, checked_at=now))


def _insert_live(
    connection: Connection, batch: list[tuple[Delivery, asyncio.Future[int]]]
) -> tuple[list[tuple[Delivery, asyncio.Future[int]]], list[int]]:
    """On the writer thread, once it holds the write lock: insert the deliveries whose
    senders still wait, and return those with their ids.

    A `put` that timed out has answered 451, so its delivery must not commit: it is
    left out when it timed out before the INSERT, and deleted again, in the same
    transaction, when it timed out while the INSERT waited (for a PostgreSQL lock,
    say). Only a put timing out during the COMMIT itself can still be stored."""
    live = [(delivery, future) for delivery, future in batch if not future.done()]
    ids = insert_deliveries(connection, [delivery for delivery, _ in live])
    gone = {i for (_, future), i in zip(live, ids, strict=True) if future.done()}
    if not gone:
        return live, ids
    connection.execute(delete(_INBOUND).where(_INBOUND.c.id.in_(sorted(gone))))
    kept = [(pair, i) for pair, i in zip(live, ids, strict=True) if i not in gone]
    return [pair for pair, _ in kept], [i for _, i in kept]


class Spool:
    """Commits deliveries in groups on the database writer thread."""

    def __init__(
        self,
        database: Database,
        on_stored: Callable[[list[int], list[int]], None],
        timeout: float | None = None,
    ) -> None:
        """`on_stored(ids, urgent_ids)` runs after each commit; `timeout` (default the
        database's busy_timeout) bounds how long `put` waits for its commit."""
        self._database = database
        self._on_stored = on_stored
        self._timeout = database.busy_timeout if timeout is None else timeout
        self._pending: list[tuple[Delivery, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.storage = Storage()

    async def put(self, delivery: Delivery) -> int:
        """Commit one delivery durably; its inbound id. Raises StorageUnavailable, and
        StorageTimeout when the commit has not finished within the timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((delivery, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="maild-spool-flush")
        try:
            # On timeout the future is cancelled: _take_batch and _insert_live drop the
            # delivery (only a COMMIT already under way can still store it).
            async with asyncio.timeout(self._timeout):  # lighter than wait_for, per message
                return await future
        except TimeoutError:
            self.storage.record(False, loop.time(), "a commit took longer than busy_timeout")
            log.error(
                "spool commit did not finish within busy_timeout; answering 451",
                busy_timeout=self._timeout,
                size=len(delivery.raw),
                waiting=len(self._pending),
            )
            raise StorageTimeout(
                f"the database did not commit within {self._timeout:g} s ([database] busy_timeout)"
            ) from None

    async def probe(self) -> None:
        """A small write through the spool's own writer, for the health checks: raises
        when it fails or does not finish within the timeout; the outcome is recorded."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._database.write_core(write_probe), self._timeout)
        except Exception as exc:
            error = (
                f"a write took longer than {self._timeout:g} s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"[:300]
            )
            self.storage.record(False, loop.time(), error)
            raise
        self.storage.record(True, loop.time())

    def _take_batch(self) -> list[tuple[Delivery, asyncio.Future[int]]]:
        batch: list[tuple[Delivery, asyncio.Future[int]]] = []
        size = 0
        while self._pending and len(batch) < MAX_BATCH_MESSAGES:
            delivery, future = self._pending[0]
            if batch and size + len(delivery.raw) > MAX_BATCH_BYTES:
                break
            self._pending.pop(0)
            if future.cancelled():  # the client went away before we even started
                continue
            batch.append((delivery, future))
            size += len(delivery.raw)
        return batch

    async def _flush(self) -> None:
        while self._pending:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                batch, ids = await self._database.write_core(partial(_insert_live, batch=batch))
            except Exception as exc:
                self.storage.record(
                    False, asyncio.get_running_loop().time(), f"{type(exc).__name__}: {exc}"[:300]
                )
                log.error(
                    "spool commit failed; answering 451",
                    error=str(exc)[:500],
                    error_type=type(exc).__name__,
                    messages=len(batch),
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StorageUnavailable(str(exc)))
                continue
            self.storage.record(True, asyncio.get_running_loop().time())
            urgent = []
            for (delivery, future), inbound_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(inbound_id)
                if delivery.urgent:
                    urgent.append(inbound_id)
            self._on_stored(ids, urgent)

    async def drain(self) -> None:
        """Wait until every delivery handed in so far is committed or refused."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
