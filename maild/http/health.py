"""A blocking check for the probes, run off the event loop, bounded and cached.

`/readyz` and `/healthz` ask whether the database answers. Asking it on every
probe would let a scraping storm hammer the database, and a hung connection
would pile up threads. `CachedCheck` runs the check in its own single thread
with a timeout, shares the one run in flight among concurrent callers, keeps
the answer for `ttl` seconds (1 s), and never starts a second run while the
first still hangs (the answer then says how long it has hung).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class CachedCheck:
    """`await check()` → "ok", or why not (an error's type and text, or a timeout)."""

    def __init__(
        self, check: Callable[[], object], timeout: float, ttl: float = 1.0, name: str = "check"
    ) -> None:
        self._check = check
        self.timeout = timeout
        self.ttl = ttl
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maild-{name}")
        self._answer: tuple[float, str] | None = None  # (loop time, answer)
        self._running: asyncio.Future[str] | None = None
        self._thread: asyncio.Future[object] | None = None
        self._started = 0.0

    async def __call__(self) -> str:
        loop = asyncio.get_running_loop()
        if self._answer is not None and loop.time() - self._answer[0] < self.ttl:
            return self._answer[1]
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._running)

    async def _run(self) -> str:
        loop = asyncio.get_running_loop()
        if self._thread is None or self._thread.done():
            self._started = loop.time()
            self._thread = loop.run_in_executor(self._executor, self._check)
        try:
            await asyncio.wait_for(asyncio.shield(self._thread), self.timeout)
            answer = "ok"
        except TimeoutError:
            answer = f"no answer for {loop.time() - self._started:.0f} s"
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}"[:300]
        self._answer = (loop.time(), answer)
        return answer

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
