"""Per-address limits that hold under concurrency: the key they count, and the lock.

maild limits pages per sender (`[escalation] max_pages_per_sender_per_hour`)
and mail per recipient (`[outbound] max_acks_per_sender_per_hour`). Each limit
is a count of recent rows followed by an insert; two filers counting at once
(two workers, or two hosts) both see room and both insert. So the count and the
insert are serialised per address:

- on PostgreSQL, filing takes a transaction-level advisory lock on each address
  it may count before it counts (`lock`), all in one statement and in one
  global order, so that two transactions never wait for each other in a cycle;
  the locks are held until the filing transaction commits;
- on SQLite every write transaction already holds the database's one write lock
  (BEGIN IMMEDIATE), so the count always sees every committed row.

Addresses are counted by `limit_key`: lower-case, `+tag` removed, so
`Ops+1@X.example` and `ops+2@x.example` share one hourly budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT
from sqlmodel import Session

from maild.mail import addresses

# One statement for every lock, taken in the order of the (sorted) array.
_LOCK = text(
    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k"
).bindparams(bindparam("keys", type_=ARRAY(BIGINT)))


def limit_key(address: str) -> str:
    """The form a per-address limit counts: lower-case, without its `+tag`."""
    return addresses.route_key(address)


def lock_id(key: str) -> int:
    """A signed 64-bit advisory lock id for a limit key (a collision only serialises more)."""
    digest = hashlib.sha256(b"maild-limit:" + key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock(session: Session, keys: Iterable[str]) -> int:
    """Serialise the limits of these keys with every other transaction until this one ends
    (PostgreSQL; nothing to do on SQLite). Returns how many locks were taken."""
    if session.get_bind().dialect.name != "postgresql":
        return 0
    ids = sorted({lock_id(key) for key in keys if key})
    if ids:
        session.execute(_LOCK, {"keys": ids})
    return len(ids)
