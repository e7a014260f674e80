"""Idempotency keys (store/idempotency.py): a write's answer recorded with it, the same
request answered from the record, another request refused, keys forgotten after a day,
and two transactions with one key at once doing the work once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from maild.store.database import Database
from maild.store.idempotency import (
    KEEP,
    Answer,
    KeyReused,
    recorded,
    request_hash,
    run_keyed,
)
from maild.store.models import IdempotencyKey, utcnow


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url, 5.0)
    db.create_schema()
    yield db
    db.close()


class Counted:
    """A write that counts how often it ran; its answer names the run."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, session: Session) -> Answer:
        self.runs += 1
        return Answer(201, {"run": self.runs})


def keyed(
    database: Database,
    work: Counted,
    key: str = "k",
    body: bytes = b"{}",
    when: datetime | None = None,
) -> Answer:
    digest = request_hash("POST", "/api/v1/tickets", body)
    now = when or utcnow()
    return database.run_write(lambda s: run_keyed(s, "portal", key, digest, work, now))


def test_the_same_request_gets_the_recorded_answer(database: Database) -> None:
    """The second run with one key and body does no work and answers the first's, marked
    as a replay; another key works again."""
    work = Counted()
    first = keyed(database, work)
    again = keyed(database, work)
    assert (first, again) == (Answer(201, {"run": 1}), Answer(201, {"run": 1}, replayed=True))
    assert keyed(database, work, key="other") == Answer(201, {"run": 2})
    assert work.runs == 2


def test_another_request_with_the_key_is_refused(database: Database) -> None:
    """Another body, method or path under a used key: KeyReused, nothing done."""
    work = Counted()
    keyed(database, work)
    with pytest.raises(KeyReused):
        keyed(database, work, body=b'{"x": 1}')
    digest = request_hash("PATCH", "/api/v1/tickets", b"{}")
    with pytest.raises(KeyReused):
        database.run_write(lambda s: run_keyed(s, "portal", "k", digest, work, utcnow()))
    assert work.runs == 1


def test_keys_belong_to_their_token(database: Database) -> None:
    """Another token's same key is a key of its own."""
    work = Counted()
    digest = request_hash("POST", "/p", b"")
    now = utcnow()
    for token in ("portal", "billing"):
        database.run_write(lambda s, t=token: run_keyed(s, t, "k", digest, work, now))
    assert work.runs == 2


def test_a_key_older_than_a_day_is_forgotten_and_old_ones_purged(database: Database) -> None:
    """After KEEP the same key works again (its old row replaced); other expired keys are
    deleted by later keyed writes."""
    work = Counted()
    start = utcnow()
    keyed(database, work, key="a", when=start)
    keyed(database, work, key="b", when=start)
    later = start + KEEP + timedelta(seconds=1)
    assert keyed(database, work, key="a", when=later) == Answer(201, {"run": 3})
    rows = database.run_read(lambda s: s.exec(select(IdempotencyKey.key)).all())
    assert rows == ["a"]


def test_a_failed_write_leaves_no_key(database: Database) -> None:
    """Work that raises rolls back with its key: the retry does the work."""

    def failing(session: Session) -> Answer:
        raise RuntimeError("no")

    digest = request_hash("POST", "/p", b"")
    with pytest.raises(RuntimeError):
        database.run_write(lambda s: run_keyed(s, "portal", "k", digest, failing, utcnow()))
    work = Counted()
    assert keyed(database, work) == Answer(201, {"run": 1})


def test_two_transactions_with_one_key_at_once_do_the_work_once(database: Database) -> None:
    """While one transaction holds a key's work open, a second with the same key waits
    (PostgreSQL: on the unique index, then IntegrityError; SQLite: for the write lock),
    and ends with the first's answer; the work ran once."""
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def slow(session: Session) -> Answer:
        runs.append(1)
        started.set()
        assert release.wait(10)
        return Answer(201, {"run": len(runs)})

    digest = request_hash("POST", "/p", b"")
    answers: dict[str, Answer] = {}

    def attempt(name: str) -> None:
        now = utcnow()
        try:
            answers[name] = database.run_write(
                lambda s: run_keyed(s, "portal", "k", digest, slow, now)
            )
        except IntegrityError:
            found = database.run_read(lambda s: recorded(s, "portal", "k", digest, now))
            assert found is not None
            answers[name] = found

    first = threading.Thread(target=attempt, args=("first",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=attempt, args=("second",))
    second.start()
    time.sleep(0.5)  # the second is waiting now
    assert runs == [1]
    release.set()
    first.join(10)
    second.join(10)
    assert runs == [1]
    assert answers["first"] == Answer(201, {"run": 1})
    assert answers["second"] == Answer(201, {"run": 1}, replayed=True)
