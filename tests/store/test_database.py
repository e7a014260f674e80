"""SQLite writers queue on an flock beside the database (database.writer_lock)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import text

from maild.store.database import Database, writer_lock


@contextlib.contextmanager
def _lock_held(folder: Path) -> Iterator[list[str]]:
    """Another writer (a thread with its own open file, as another process would be)
    holds `<database>-writer.lock` until the block ends; what happened, in order."""
    order: list[str] = []
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with writer_lock(str(folder / "maild.db-writer.lock"), timeout=30):
            order.append("held")
            held.set()
            release.wait(30)
            order.append("released")

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        yield order
    finally:
        release.set()
        holder.join()


def _write(database: Database, order: list[str]) -> None:
    def work(session: object) -> None:
        order.append("written")

    database.run_write(work)  # type: ignore[arg-type]


def test_a_write_waits_for_the_writer_holding_the_lock(tmp_path: Path) -> None:
    """`run_write` takes `<database>-writer.lock` before its transaction: while another
    writer (here a thread with its own open file, as another process would be) holds
    it, the write waits, and runs once it is released."""
    database = Database(f"sqlite:///{tmp_path / 'maild.db'}", busy_timeout=30)
    try:
        with _lock_held(tmp_path) as order:
            writer = threading.Thread(target=_write, args=(database, order))
            writer.start()
            writer.join(0.3)
            assert writer.is_alive(), "the write did not wait for the lock"
        writer.join(10)
        assert order == ["held", "released", "written"]
    finally:
        database.close()


def test_past_the_busy_timeout_a_write_goes_on_without_the_lock(tmp_path: Path) -> None:
    """A writer that keeps the flock but not SQLite's lock (a stuck process) does not
    stop writes for ever: past `busy_timeout` the write goes on, and SQLite's own
    lock decides."""
    database = Database(f"sqlite:///{tmp_path / 'maild.db'}", busy_timeout=0.2)
    database.run_write(lambda s: s.execute(text("CREATE TABLE t (x INTEGER)")))
    try:
        with _lock_held(tmp_path) as order:
            database.run_write(lambda s: s.execute(text("INSERT INTO t VALUES (1)")))
            order.append("written")
        assert database.run_read(lambda s: s.execute(text("SELECT x FROM t")).scalar()) == 1
        assert order == ["held", "written", "released"]
    finally:
        database.close()


def test_an_urgent_writer_goes_ahead_of_one_that_yields(tmp_path: Path) -> None:
    """The writer lock is not a queue; a NORMAL writer (the spool, the queue's filing)
    does not try while an URGENT one (mail that pages, its page's claim) waits, so the
    urgent writer takes the lock next. Five rounds: without the yielding, the urgent
    writer would win each with even odds, and all five one time in 32."""
    from maild.store.database import urgent_waiting

    path = str(tmp_path / "maild.db-writer.lock")
    for _ in range(5):
        assert _who_goes_first(path) == ["urgent", "yields"]
        assert not urgent_waiting(path), "the urgent writer's mark outlived its write"


def _who_goes_first(path: str) -> list[str]:
    """A writer holds the lock; a normal writer, then an urgent one, wait for it; the
    order in which they got it once it was released."""
    import time

    from maild.store.database import LockTurn, urgent_waiting

    order: list[str] = []
    holder_in, release = threading.Event(), threading.Event()

    def hold() -> None:
        with writer_lock(path, 10):
            holder_in.set()
            release.wait(10)

    def write(name: str, turn: LockTurn) -> None:
        with writer_lock(path, 10, turn):
            order.append(name)
            time.sleep(0.05)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holder_in.wait(10)
    yielding = threading.Thread(target=write, args=("yields", LockTurn.NORMAL))
    yielding.start()
    time.sleep(0.05)  # the normal writer tries first
    urgent = threading.Thread(target=write, args=("urgent", LockTurn.URGENT))
    urgent.start()
    deadline = time.monotonic() + 10
    while not urgent_waiting(path):
        assert time.monotonic() < deadline, "the urgent writer never said it waits"
        time.sleep(0.001)
    # A normal writer that looked just before the mark was made may still try once
    # (in life it then goes first, once); its next look sees the mark.
    time.sleep(0.02)
    release.set()
    for thread in (holder, yielding, urgent):
        thread.join(10)
    return order


def test_a_yielding_writer_is_not_held_forever(tmp_path: Path) -> None:
    """An urgent writer that never lets go holds a normal writer only for the lock's
    timeout, as any other holder would: then it goes on, and SQLite's busy timeout
    decides. An urgent writer does not wait for another urgent one's mark."""
    import fcntl
    import os
    import time

    from maild.store.database import LockTurn, writer_lock

    path = str(tmp_path / "maild.db-writer.lock")
    intent = os.open(f"{path}.urgent", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(intent, fcntl.LOCK_SH)  # an urgent writer, waiting for good
    try:
        started = time.monotonic()
        with writer_lock(path, 0.3):
            waited = time.monotonic() - started
        assert 0.3 <= waited < 5
        started = time.monotonic()
        with writer_lock(path, 0.3, LockTurn.URGENT):
            assert time.monotonic() - started < 0.25
    finally:
        os.close(intent)


def test_a_mark_that_cannot_be_opened_orders_nothing(tmp_path: Path) -> None:
    """The `.urgent` mark only orders writers: where it cannot be opened (here a folder
    in its place; in life a file left owned by root) every writer still writes."""
    import time

    from maild.store.database import LockTurn, urgent_waiting, writer_lock

    path = str(tmp_path / "maild.db-writer.lock")
    (tmp_path / "maild.db-writer.lock.urgent").mkdir()
    assert not urgent_waiting(path)
    for turn in (LockTurn.NORMAL, LockTurn.URGENT):
        started = time.monotonic()
        with writer_lock(path, 5, turn):
            assert time.monotonic() - started < 1


def test_an_urgent_write_does_not_queue_behind_the_writer_thread(tmp_path: Path) -> None:
    """The pager's claims are urgent writes (Pager.urgent): they run on a thread of their
    own, so a page is claimed while the common writer thread is busy (in life with the
    spool's writes of large mail), and go first at the writer lock."""
    import asyncio
    import time

    from maild.outbound.pager import Pager

    assert Pager.urgent, "the pager's claims would queue behind the spool's writes"
    database = Database(f"sqlite:///{tmp_path / 'maild.db'}")
    database.create_schema()
    held = threading.Event()

    async def run() -> None:
        # The common writer thread busy (with no write lock held: only the thread).
        common = asyncio.get_running_loop().run_in_executor(database._writer, held.wait, 30)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        urgent = await asyncio.wait_for(
            database.write(lambda s: s.execute(text("SELECT 1")).scalar(), urgent=True), 10
        )
        assert urgent == 1
        assert time.monotonic() - started < 2, "the urgent write waited"
        assert not common.done(), "the common writer thread was free after all"
        held.set()
        await common

    try:
        asyncio.run(run())
    finally:
        held.set()
        database.close()
