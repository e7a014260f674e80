"""When an accepted message becomes visible as filed, seen from outside maild.

`TicketWatch` polls the inbound table every 5 ms from its own connection, for
the rows the client was told were queued ("250 ... queued as N"), and notes the
moment each one leaves `received` (processed: filed in a ticket, or duplicate,
dropped, failed). That is when a reader of the database, such as the support
dashboard, can see it: the filing transaction has committed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy import create_engine

POLL_SECONDS = 0.005


class TicketWatch:
    """Accept → filed, per inbound id; a context manager running the poller."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url)
        # The driver's own connection in autocommit: each poll is one cheap statement.
        # The pool's proxy is kept: dropping it would hand the connection back to the pool.
        self._proxy = self._engine.raw_connection()
        self._connection: Any = self._proxy.driver_connection
        if self._engine.dialect.name == "sqlite":
            self._connection.isolation_level = None
            marker = "?"
        else:
            self._connection.autocommit = True
            marker = "%s"
        self._query = (
            f"SELECT id, status FROM inbound WHERE id BETWEEN {marker} AND {marker} "  # noqa: S608
            "AND status <> 'received'"
        )
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}  # inbound id → accepted at
        self.filed: dict[int, tuple[float, float]] = {}  # id → (accepted at, visible at)
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticket-watch", daemon=True)

    def expect(self, inbound_id: int, accepted_at: float) -> None:
        with self._lock:
            self._pending[inbound_id] = accepted_at

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def take_outcomes(self) -> dict[str, int]:
        """The statuses counted since the last call (one row's), and start again."""
        with self._lock:
            taken = dict(self.outcomes)
            self.outcomes.clear()
        return taken

    def _poll(self) -> None:
        with self._lock:
            if not self._pending:
                return
            low, high = min(self._pending), max(self._pending)
        cursor = self._connection.cursor()
        cursor.execute(self._query, (low, high))
        rows = cursor.fetchall()
        cursor.close()
        now = time.time()
        with self._lock:
            for inbound_id, status in rows:
                accepted = self._pending.pop(inbound_id, None)
                if accepted is not None:
                    self.filed[inbound_id] = (accepted, now)
                    self.outcomes[status] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(POLL_SECONDS)

    def wait_drained(self, timeout: float) -> bool:
        """Until every expected row is filed; False when `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.pending

    def __enter__(self) -> TicketWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._proxy.close()
        self._engine.dispose()
