"""Engines, sessions and the single writer thread.

The sync SQLAlchemy engine blocks, so the event loop never touches it directly:
every write goes through `Database.write`, which runs it on one dedicated writer
thread (one writer is what SQLite allows anyway, and it serialises our own
writes without lock contention); reads run on the default thread pool.

SQLite is set up for a mail queue: WAL (readers never block the writer),
synchronous=FULL (a commit survives power loss), foreign keys on, a busy
timeout, and write transactions that take the write lock at BEGIN IMMEDIATE so
another process (the CLI) can never deadlock a writer half-way.

Several processes write one SQLite file: the daemon's spool and the pool
workers that file tickets (and the CLI). SQLite's own busy handler waits by
sleeping 1, 2, 5 … 100 ms and retrying, so a writer that finds the lock taken
often sleeps long after it was freed. Our writers queue instead on an flock(2)
on `<database>-writer.lock`, taken before BEGIN IMMEDIATE and released after
COMMIT: the next writer wakes the moment the lock is free. The busy timeout
still bounds the wait, and a writer that does not take the flock is only slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, create_engine

from maild.errors import ConfigError
from maild.store import models  # noqa: F401  (registers the tables)

T = TypeVar("T")


class DatabaseMissing(ConfigError):
    """The configured database does not exist (or has no maild tables): nothing was created."""


def describe(url_text: str) -> str:
    """The database as the operator should see it: a SQLite file's path, or the URL with
    its password hidden."""
    try:
        url = make_url(url_text)
    except Exception:
        return "(an unreadable [database] url)"
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def check_sqlite_path(path: Path, *, create: bool) -> None:
    """Raise ConfigError, one line naming the path, when SQLite could not use `path`.

    With `create`, missing folders are made; without, a missing file is
    DatabaseMissing (a read-only command must not create an empty desk)."""
    where = f"[database] url: {path}"
    for folder in [*reversed(path.parents)]:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{where}: {folder} is a file, not a folder")
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; name a file in it (…/maild.db)")
    if not path.exists():
        if not create:
            raise DatabaseMissing(f"there is no database at {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot create the folder {path.parent}: {exc.strerror or exc}"
            ) from None
    # WAL mode writes maild.db-wal and maild.db-shm beside the file, even to read.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{where}: the folder {path.parent} is not writable by this user (uid {os.getuid()}); "
            "SQLite keeps its -wal and -shm files beside the database"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{where}: the file is not readable and writable by uid {os.getuid()}")


def _sqlite_engine(url: URL, busy_timeout: float, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_timeout})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# A PostgreSQL server that vanishes (host down, network cut) is noticed within about a
# minute on an idle connection, and within TCP_USER_TIMEOUT when data is unacknowledged,
# rather than after the kernel's two hours. (A server that is only frozen still answers
# at the TCP level: the spool's own timeout answers the senders then; see spool.py.)
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms
}


def statement_timeout(busy_timeout: float) -> float:
    """The longest any statement of maild may run on PostgreSQL: 60 s, or 12 x
    busy_timeout when that is longer (migrations are exempt: schema.upgrade)."""
    return max(60.0, 12 * busy_timeout)


def make_engines(
    url_text: str, busy_timeout: float = 5.0, *, create: bool = True
) -> tuple[Engine, Engine]:
    """(write engine, read engine) for a database URL; the same engine on PostgreSQL.
    A SQLite path is checked first (check_sqlite_path)."""
    try:
        url = make_url(url_text)
    except Exception as exc:
        raise ConfigError(f"[database] url: {exc}") from None
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            check_sqlite_path(Path(url.database), create=create)
        return (
            _sqlite_engine(url, busy_timeout, immediate=True),
            _sqlite_engine(url, busy_timeout, immediate=False),
        )
    if url.get_backend_name() == "postgresql":
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        # A write waits busy_timeout for a lock, then fails (and SMTP answers 451); no
        # statement runs longer than statement_timeout(busy_timeout). Options already in
        # the URL (search_path, say) are kept.
        given = url.query.get("options", "")
        options = " ".join(
            [
                *(given if isinstance(given, tuple) else [given]),
                f"-c lock_timeout={int(busy_timeout * 1000)}",
                f"-c statement_timeout={int(statement_timeout(busy_timeout) * 1000)}",
                "-c timezone=UTC",  # timestamps are stored and compared as UTC
            ]
        ).strip()
        engine = create_engine(
            url.difference_update_query(["options"]),
            pool_pre_ping=True,
            pool_size=5,
            connect_args={
                "connect_timeout": max(1, int(busy_timeout)),
                "options": options,
                **KEEPALIVES,
                **({} if "application_name" in url.query else {"application_name": "maild"}),
            },
        )
        return engine, engine
    raise ConfigError(
        f"[database] url: unsupported database {url.get_backend_name()!r} "
        "(use sqlite:///path or postgresql+psycopg://...)"
    )


class LockTurn(enum.Enum):
    """How a writer takes its turn at the SQLite writer lock (see writer_lock)."""

    NORMAL = "normal"  # waits while an urgent writer waits
    URGENT = "urgent"  # filing mail that pages, claiming its page: ahead of the rest


def _urgent_path(path: str) -> str:
    return f"{path}.urgent"


def urgent_waiting(path: str) -> bool:
    """An urgent writer waits for (or holds) the writer lock at `path`: it holds a
    shared lock on the `.urgent` file beside it, so an exclusive try fails. A mark that
    cannot be read (none yet; left owned by root) says no: it only orders writers."""
    try:
        fd = os.open(_urgent_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock
    return False


def _open_mark(path: str) -> int | None:
    """The `.urgent` file beside the writer lock, made if need be; None when it cannot
    be opened (the writer then goes without a mark: later, not wrong)."""
    try:
        return os.open(_urgent_path(path), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None


@contextlib.contextmanager
def writer_lock(
    path: str | None, timeout: float, turn: LockTurn = LockTurn.NORMAL
) -> Iterator[None]:
    """Hold the exclusive flock on `path` (None: no lock) while the block runs.

    Each use opens its own file, so two threads of one process exclude each
    other too. Past `timeout` it goes on without the lock and leaves the
    waiting to SQLite's busy timeout (which then fails the write as locked).

    flock is not a queue: whoever tries first after a release wins. An URGENT writer
    (filing mail that pages, claiming its page) says it waits by a shared lock on the
    `.urgent` file beside `path`, and the others (the spool, the queue's filing, the
    CLI) do not try while one does: an urgent writer waits for the transaction in
    hand only, not for the queue's and the spool's next ones too (issue 21: 0.1–1.2 s
    of lock wait behind twenty 1 MiB senders). Urgent writes are few and short."""
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    intent = None
    try:
        if turn is LockTurn.URGENT:
            intent = _open_mark(path)
            if intent is not None:
                fcntl.flock(intent, fcntl.LOCK_SH)  # waits only while another writer looks
        deadline = time.monotonic() + timeout
        pause = 0.0002
        while True:
            try:
                if turn is not LockTurn.URGENT and urgent_waiting(path):
                    raise BlockingIOError
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
        yield
    finally:
        os.close(fd)  # closing releases the lock
        if intent is not None:
            os.close(intent)


class Database:
    """The engines plus the writer thread; one per process."""

    def __init__(
        self,
        url: str,
        busy_timeout: float = 5.0,
        *,
        create: bool = True,
        turn: LockTurn = LockTurn.NORMAL,
    ) -> None:
        """`create`: a missing SQLite file (and its folders) may be created; without it,
        DatabaseMissing. Either way a path SQLite cannot use is a one-line ConfigError.
        `turn`: how this process's writes take the SQLite writer lock (writer_lock)."""
        self.url = url
        self.busy_timeout = busy_timeout
        self.turn = turn
        self.write_engine, self.read_engine = make_engines(url, busy_timeout, create=create)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maild-db-writer")
        # Writes that must not queue behind the writer thread's (the pager's claims
        # behind the spool's): a thread of their own, URGENT at the writer lock.
        self._urgent_writer: ThreadPoolExecutor | None = None
        database = self.write_engine.url.database
        self._lock_path = (
            f"{database}-writer.lock"
            if self.is_sqlite and database and database != ":memory:"
            else None
        )

    @property
    def name(self) -> str:
        """Which database this is, for output and errors (no password)."""
        return describe(self.url)

    @property
    def file(self) -> Path | None:
        """The SQLite database's file; None on PostgreSQL (or an in-memory database)."""
        database = self.write_engine.url.database
        if self.is_sqlite and database and database != ":memory:":
            return Path(database)
        return None

    @property
    def is_sqlite(self) -> bool:
        return self.write_engine.dialect.name == "sqlite"

    def create_schema(self) -> None:
        """Bring the schema to this maild's version (Alembic migrations)."""
        from maild.store.schema import upgrade

        upgrade(self.write_engine)

    def ensure_schema(self, config_path: object, *, create: bool = True) -> None:
        """Refuse an out-of-date schema (SchemaError names the database and the fix);
        create the schema in an empty database only with `create`."""
        from maild.store.schema import ensure_current

        ensure_current(self.write_engine, str(config_path), create_if_empty=create, name=self.name)

    def check(self) -> None:
        """Raise if the database cannot be reached."""
        with self.read_engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def write_session(self) -> Session:
        return Session(self.write_engine, expire_on_commit=False)

    def read_session(self) -> Session:
        return Session(self.read_engine, expire_on_commit=False)

    def run_write(self, work: Callable[[Session], T], turn: LockTurn | None = None) -> T:
        """Run `work` in one transaction and commit it (on the calling thread)."""
        with (
            writer_lock(self._lock_path, self.busy_timeout, turn or self.turn),
            self.write_session() as session,
        ):
            result = work(session)
            session.commit()
            return result

    def run_read(self, work: Callable[[Session], T]) -> T:
        with self.read_session() as session:
            return work(session)

    # The daemon's hot statements (the spool's inserts, the processor's claims, the
    # outboxes' polls and outcomes) are all Core: on a plain connection they skip an ORM
    # session's set-up, which cost more than the statement (docs/benchmarks.md,
    # "Measured decisions").

    def run_write_core(self, work: Callable[[Connection], T], turn: LockTurn | None = None) -> T:
        """As run_write, on a connection rather than a session."""
        with (
            writer_lock(self._lock_path, self.busy_timeout, turn or self.turn),
            self.write_engine.begin() as conn,
        ):
            return work(conn)

    def run_read_core(self, work: Callable[[Connection], T]) -> T:
        with self.read_engine.connect() as connection:
            return work(connection)

    async def write_core(self, work: Callable[[Connection], T], *, urgent: bool = False) -> T:
        """As write, on a connection rather than a session."""
        turn = LockTurn.URGENT if urgent else None
        return await self._on_writer(partial(self.run_write_core, work, turn), urgent)

    async def read_core(self, work: Callable[[Connection], T]) -> T:
        return await asyncio.to_thread(self.run_read_core, work)

    async def write(self, work: Callable[[Session], T], *, urgent: bool = False) -> T:
        """Run `work` in one committed transaction on the writer thread. `urgent`: on a
        writer thread of its own, ahead of every other writer at the writer lock (the
        pager's claims must not queue behind the spool's writes: LockTurn.URGENT)."""
        turn = LockTurn.URGENT if urgent else None
        return await self._on_writer(partial(self.run_write, work, turn), urgent)

    async def _on_writer(self, call: Callable[[], T], urgent: bool) -> T:
        if urgent and self._urgent_writer is None:
            self._urgent_writer = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="maild-db-urgent-writer"
            )
        executor = self._urgent_writer if urgent else self._writer
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def read(self, work: Callable[[Session], T]) -> T:
        return await asyncio.to_thread(self.run_read, work)

    def adopt_files(self) -> None:
        """Give files root made beside a SQLite database to the folder's owner.

        An operator runs `maild db upgrade` (or any command) as root on the service's
        database in /var/lib/maild, which belongs to the service's user: a database
        file or writer lock left owned by root would lock the service out of its own
        database. (SQLite already does this for its -wal and -shm files.)"""
        path = self.file
        if path is None or os.geteuid() != 0:
            return
        try:
            folder = path.parent.stat()
        except OSError:
            return
        if folder.st_uid == 0:
            return
        for name in (
            path,
            Path(f"{path}-wal"),
            Path(f"{path}-shm"),
            Path(f"{path}-writer.lock"),
            Path(f"{path}-writer.lock.urgent"),
        ):
            with contextlib.suppress(OSError):
                if name.stat().st_uid == 0:
                    os.chown(name, folder.st_uid, folder.st_gid)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._urgent_writer is not None:
            self._urgent_writer.shutdown(wait=True)
        self.write_engine.dispose()
        self.read_engine.dispose()
        self.adopt_files()


__all__ = ["Database", "DatabaseMissing", "LockTurn", "SQLAlchemyError", "describe", "make_engines"]
