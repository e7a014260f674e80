"""Idempotency keys of the HTTP API's writes: a retried request gets the first answer.

A client that sends `Idempotency-Key: K` with a POST or PATCH and retries it (a timeout,
a dropped connection) must not make a second ticket or reply. `run_keyed` does the
write and records its answer in one transaction, under (token name, key):

- the same token and key again, with the same request (method, path and body bytes,
  hashed): the recorded answer, and nothing is done again;
- the same token and key with another request: KeyReused (the API answers 422);
- a key older than KEEP is forgotten (deleted when next used, and purged a few at a
  time by later keyed writes).

The key's row is inserted *before* the work: on PostgreSQL a second transaction with
the same key (another daemon) waits on the unique index until the first commits, then
fails with IntegrityError having done nothing (the API then reads the first answer).
On SQLite writers take turns, so the second finds the row. A write that fails (an
error answer) rolls back with its key: a retry does it again.

Keys belong to the token (by its name, never reused): two clients cannot see each
other's answers by guessing keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlmodel import Session

from maild.store.models import IdempotencyKey, table_of

KEEP = timedelta(hours=24)
MAX_KEY_LENGTH = 255
PURGE_BATCH = 100  # expired rows deleted per keyed write

_KEYS = table_of(IdempotencyKey)


class KeyReused(ValueError):
    """The key was used by this token for another request (method, path or body)."""


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as recorded: status, JSON body, and whether it is a replay."""

    status: int
    body: dict[str, Any]
    replayed: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def request_hash(method: str, path: str, body: bytes) -> str:
    """What makes two requests the same request: method, path and body bytes."""
    digest = hashlib.sha256(f"{method.upper()}\n{path}\n".encode("utf-8", "surrogateescape"))
    digest.update(body)
    return digest.hexdigest()


def recorded(session: Session, token: str, key: str, digest: str, now: datetime) -> Answer | None:
    """The answer recorded under this token and key (not expired), or None; KeyReused
    when it was for another request."""
    row = session.execute(
        select(_KEYS.c.request_hash, _KEYS.c.status, _KEYS.c.response).where(
            _KEYS.c.token == token, _KEYS.c.key == key, _KEYS.c.created_at >= now - KEEP
        )
    ).first()
    if row is None:
        return None
    if row.request_hash != digest:
        raise KeyReused(key)
    return Answer(row.status, dict(row.response or {}), replayed=True)


def run_keyed(
    session: Session,
    token: str,
    key: str,
    digest: str,
    work: Callable[[Session], Answer],
    now: datetime,
) -> Answer:
    """`work`'s answer, recorded under (token, key) in the caller's transaction; or the
    answer recorded before for the same request. KeyReused: the key was another
    request's. IntegrityError (PostgreSQL): another transaction recorded the key
    meanwhile; the caller reads its answer with `recorded` in a new transaction."""
    cutoff = now - KEEP
    session.execute(
        delete(_KEYS).where(_KEYS.c.token == token, _KEYS.c.key == key, _KEYS.c.created_at < cutoff)
    )
    stale = (
        select(_KEYS.c.id)
        .where(_KEYS.c.created_at < cutoff)
        .order_by(_KEYS.c.id)
        .limit(PURGE_BATCH)
        .with_for_update(skip_locked=True)  # PostgreSQL: never wait on another purge
    )
    session.execute(delete(_KEYS).where(_KEYS.c.id.in_(stale.scalar_subquery())))
    before = recorded(session, token, key, digest, now)
    if before is not None:
        return before
    row = IdempotencyKey(token=token, key=key, request_hash=digest, status=0, created_at=now)
    session.add(row)
    session.flush()  # a second writer of this key waits here (PostgreSQL), then fails
    answer = work(session)
    row.status, row.response = answer.status, answer.body
    session.add(row)
    session.flush()
    return answer
