"""The durable spool: accepted deliveries committed before the sender hears 250.

Group commit: deliveries that arrive while a commit is in flight wait in a list
and are committed together by the next one (one transaction, one fsync, many
messages), like an MTA queue. `put` returns the delivery's row id only after its
transaction committed; any failure raises StorageUnavailable (the SMTP handler
answers 451 4.3.0 and the sender retries).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlmodel import Session

from maild.database import Database
from maild.errors import StorageUnavailable
from maild.models import Inbound, utcnow

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
_INSERT_INBOUND = insert(Inbound.__table__).returning(  # type: ignore[attr-defined]
    Inbound.__table__.c.id,  # type: ignore[attr-defined]
    sort_by_parameter_order=True,
)


def insert_deliveries(session: Session | Connection, deliveries: Sequence[Delivery]) -> list[int]:
    """Add the deliveries as `received` rows; their ids, in the same order."""
    if not deliveries:
        return []
    result = session.execute(_INSERT_INBOUND, [d.to_row() for d in deliveries])
    return [int(i) for i in result.scalars().all()]


class Spool:
    """Commits deliveries in groups on the database writer thread."""

    def __init__(
        self, database: Database, on_stored: Callable[[list[int], list[int]], None]
    ) -> None:
        """`on_stored(ids, urgent_ids)` runs after each commit."""
        self._database = database
        self._on_stored = on_stored
        self._pending: list[tuple[Delivery, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def put(self, delivery: Delivery) -> int:
        """Commit one delivery durably; its inbound id. Raises StorageUnavailable."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((delivery, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="maild-spool-flush")
        return await future

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
                ids = await self._database.write_core(
                    partial(insert_deliveries, deliveries=[d for d, _ in batch])
                )
            except Exception as exc:
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
