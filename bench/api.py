"""The HTTP API's rows of `python -m bench`: reads timed at N stored messages, and a
steady API load beside the SMTP load.

- `time_reads`: `GET /api/v1/tickets` against the running daemon, over HTTP with one
  keep-alive connection (httpx), each query `repeat` times after one unmeasured run:
  a filter (a requester's address: `participant=`), the open queue's first page (the
  dashboard's front page), a search for a selective word and for a common one (`q=`).
  p50 and p99 of the request's wall time as the client sees it: routing, the token's
  check, the query, the JSON, the socket.
- `ApiLoad`: a process that sends `rate` requests per second on a fixed schedule (open
  loop: a slow answer does not lower the rate it tries), alternating the open queue's
  first page and one of its tickets in full (messages, participants, events); bench/run.py
  runs it during an SMTP row, to compare that row's accept rate with the same row without it.

Measured, never asserted (tests/test_bench.py runs it with --quick).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.queues
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench import fill as filler
from bench.stats import percentile


def create_token(config: Path, name: str) -> str:
    """A read token made with `maild tokens create`, as an operator would."""
    command = ["tokens", "create", name, "--scope", "read", "--json", "--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "maild", *command],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(json.loads(done.stdout)["token"])


def wait_ready(base_url: str, timeout: float = 60) -> None:
    """Until the daemon's /readyz answers 200 (its SMTP port may open first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}/readyz not ready in {timeout} s")
        time.sleep(0.05)


CONSOLE_AGENT = "bench@altis-dxp.com"
CONSOLE_PASSWORD = "a bench password, long enough"  # noqa: S105 (a scratch database's)


def console_client(base_url: str, config: Path) -> httpx.Client:
    """An agent (made with `maild agents add`) signed in to the console: a client with its
    session cookie."""
    secret = config.parent / "agent-password"
    secret.write_text(CONSOLE_PASSWORD + "\n")
    command = ["agents", "add", CONSOLE_AGENT, "--password-file", str(secret)]
    subprocess.run(
        [sys.executable, "-m", "maild", *command, "--config", str(config)],
        capture_output=True,
        check=True,
    )
    client = httpx.Client(base_url=base_url, timeout=60)
    form = client.get("/console/sign-in").text
    token = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    signed = client.post(
        "/console/sign-in",
        data={"email": CONSOLE_AGENT, "password": CONSOLE_PASSWORD, "csrf": token, "next": ""},
    )
    if signed.status_code != 303:
        raise RuntimeError(f"the bench agent could not sign in: {signed.status_code}")
    return client


def console_pages(stored: int) -> list[tuple[str, str]]:
    """(what, path) of each timed console page, for a database filled by bench.fill."""
    tickets = filler.tickets_for(stored)
    chosen = max(1, tickets - 7)
    requester = filler.sender(max(1, stored // 2))
    return [
        ("queue, open + pending (50 and the counts)", "/console/tickets"),
        ("queue, all, a search", f"/console/tickets?status=all&q={chosen}"),
        ("queue, a requester", f"/console/tickets?status=all&requester={requester}"),
        ("a ticket", f"/console/tickets/{chosen}"),
        ("rules", "/console/rules?address=sysops%40altis-dxp.com"),
    ]


def time_console(
    base_url: str, config: Path, stored: int, repeat: int = 50
) -> list[dict[str, Any]]:
    """Each page of `console_pages(stored)`: p50 and p99 of `repeat` loads (the HTML, over
    one keep-alive connection: the server's time and the socket's)."""
    results = []
    client = console_client(base_url, config)
    try:
        for what, path in console_pages(stored):
            first = client.get(path)
            if first.status_code != 200:
                raise RuntimeError(f"{path}: {first.status_code}")
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
            results.append(
                {
                    "page": what,
                    "path": path,
                    "bytes": len(first.content),
                    "requests": repeat,
                    "p50_ms": round(statistics.median(times), 2),
                    "p99_ms": round(percentile(times, 0.99), 2),
                }
            )
    finally:
        client.close()
    return results


def console_table(pages: dict[str, Any]) -> str:
    """The markdown table of docs/benchmarks.md ("Console pages"), databases side by side."""
    databases = list(pages)
    lines = [
        "| console page | " + " | ".join(f"{d}: p50 / p99 ms" for d in databases) + " |",
        "|" + "---|" * (len(databases) + 1),
    ]
    rows = pages[databases[0]]["pages"] if databases else []
    for index, row in enumerate(rows):
        cells = [
            f"{pages[d]['pages'][index]['p50_ms']} / {pages[d]['pages'][index]['p99_ms']}"
            for d in databases
        ]
        lines.append(f"| {row['page']} (`{row['path']}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def queries(stored: int) -> list[tuple[str, dict[str, str]]]:
    """(what, query string) of each timed read, for a database filled by bench.fill."""
    tickets = filler.tickets_for(stored)
    chosen = max(1, tickets - 7)  # as bench.search: a number only that ticket's messages have
    return [
        ("participant (a requester)", {"participant": filler.sender(max(1, stored // 2))}),
        ("open queue, first page", {"status": "open"}),
        ("q, a selective word", {"q": str(chosen)}),
        ("q, a common word", {"q": "again", "limit": "50"}),
    ]


def time_reads(base_url: str, token: str, stored: int, repeat: int = 200) -> list[dict[str, Any]]:
    """Each read of `queries(stored)`: tickets on the page, p50 and p99 of `repeat` requests."""
    results = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for what, params in queries(stored):
            first = client.get("/api/v1/tickets", params=params)
            first.raise_for_status()
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                client.get("/api/v1/tickets", params=params).raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
            results.append(
                {
                    "read": what,
                    "params": params,
                    "tickets": len(first.json()["tickets"]),
                    "requests": repeat,
                    "p50_ms": round(statistics.median(times), 2),
                    "p99_ms": round(percentile(times, 0.99), 2),
                }
            )
    return results


class ApiLoad:
    """`rate` requests per second against the API, until stopped; a context manager.

    Open loop: request n is sent at start + n / rate whatever the earlier ones are
    doing (up to `connections` at once, each on its own keep-alive connection), and its
    latency runs from that due time, so a slow server shows as latency, not as a lower
    rate. Alternately the open queue's first page and one of its tickets in full
    (messages, participants, events). `summary()` tells what was sent, answered and
    how fast."""

    def __init__(
        self, base_url: str, token: str, rate: float = 50.0, connections: int = 16
    ) -> None:
        self.base_url = base_url
        self.token = token
        self.rate = rate
        self.connections = connections
        self.times: list[float] = []
        self.errors: dict[str, int] = {}
        self.started = 0.0
        self.stopped = 0.0
        # In a process of its own: a thread would take the GIL from the SMTP load client
        # in this process and slow the very load it is compared against.
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._ready = context.Event()  # set by the process once its client is made
        self._results: multiprocessing.queues.Queue[dict[str, Any]] = context.Queue()
        self._process = context.Process(
            target=_run_load,
            args=(base_url, token, rate, connections, self._stop, self._ready, self._results),
            name="api-load",
            daemon=True,
        )

    def _run(self) -> None:
        asyncio.run(self._load())
        self._results.put(
            {
                "times": self.times,
                "errors": self.errors,
                "started": self.started,
                "stopped": self.stopped,
                "sent": self.sent,
            }
        )

    async def _load(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        limits = httpx.Limits(max_connections=self.connections)
        ticket_ids: list[int] = []
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=30, limits=limits
        ) as client:
            self._ready.set()

            async def one(n: int, due: float) -> None:
                if n % 2 == 0 or not ticket_ids:
                    path, params = "/api/v1/tickets", {"status": "open", "limit": "25"}
                else:
                    path, params = f"/api/v1/tickets/{ticket_ids[n % len(ticket_ids)]}", {}
                try:
                    answer = await client.get(path, params=params)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    self.errors[key] = self.errors.get(key, 0) + 1
                    return
                self.times.append((time.monotonic() - due) * 1000)
                if answer.status_code != 200:
                    key = str(answer.status_code)
                    self.errors[key] = self.errors.get(key, 0) + 1
                elif path == "/api/v1/tickets":
                    ticket_ids[:] = [t["id"] for t in answer.json()["tickets"]] or ticket_ids

            tasks = set()
            n = 0
            self.started = time.monotonic()
            while not self._stop.is_set():
                due = self.started + n / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(one(n, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            self.sent = n
            if tasks:
                await asyncio.wait(tasks)
            self.stopped = time.monotonic()

    sent = 0

    def __enter__(self) -> ApiLoad:
        self._process.start()
        if not self._ready.wait(60):
            raise RuntimeError("the API load process did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        found = self._results.get(timeout=120)
        self._process.join(30)
        self.times, self.errors = found["times"], found["errors"]
        self.started, self.stopped, self.sent = found["started"], found["stopped"], found["sent"]

    def summary(self) -> dict[str, Any]:
        seconds = max(self.stopped - self.started, 1e-9)
        return {
            "target_per_s": self.rate,
            "sent": self.sent,
            "requests": len(self.times),
            "per_s": round(len(self.times) / seconds, 1),
            "p50_ms": round(statistics.median(self.times), 1) if self.times else None,
            "p99_ms": round(percentile(self.times, 0.99), 1) if self.times else None,
            "errors": dict(self.errors),
        }


def _run_load(
    base_url: str,
    token: str,
    rate: float,
    connections: int,
    stop: Any,
    ready: Any,
    results: multiprocessing.queues.Queue[dict[str, Any]],
) -> None:
    """The load process: an ApiLoad whose stop event and results queue are the parent's."""
    load = object.__new__(ApiLoad)
    load.base_url, load.token, load.rate, load.connections = base_url, token, rate, connections
    load.times, load.errors, load.started, load.stopped = [], {}, 0.0, 0.0
    load._stop, load._ready, load._results = stop, ready, results
    load._run()


def table(reads: dict[str, Any]) -> str:
    """The markdown table of docs/benchmarks.md ("API reads"), databases side by side."""
    databases = list(reads)
    lines = [
        "| GET /api/v1/tickets | "
        + " | ".join(f"{d}: tickets, p50 / p99 ms" for d in databases)
        + " |",
        "|" + "---|" * (len(databases) + 1),
    ]
    rows = reads[databases[0]]["reads"] if databases else []
    for index, row in enumerate(rows):
        query = "&".join(f"{k}={v}" for k, v in row["params"].items())
        cells = []
        for database in databases:
            result = reads[database]["reads"][index]
            cells.append(f"{result['tickets']}, {result['p50_ms']} / {result['p99_ms']}")
        lines.append(f"| {row['read']} (`{query}`) | " + " | ".join(cells) + " |")
    for database in databases:
        entry = reads[database]
        lines.append(
            f"\n{database}: {entry['stored']:,} messages stored; "
            f"{entry['reads'][0]['requests']} requests per read over one keep-alive connection."
        )
    return "\n".join(lines) + "\n"
