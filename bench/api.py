"""The HTTP API's rows of `python -m bench`: reads timed at N stored messages, and a
steady API load beside the SMTP load.

- `time_reads`: `GET /api/v1/tickets` against the running daemon, over HTTP with one
  keep-alive connection (httpx), each query `repeat` times after one unmeasured run:
  a filter (a requester's address: `participant=`), the open queue's first page (the
  dashboard's front page), a search for a selective word and for a common one (`q=`).
  p50 and p99 of the request's wall time as the client sees it: routing, the token's
  check, the query, the JSON, the socket.
- `ApiLoad`: a thread that sends `rate` requests per second on a fixed schedule (open
  loop: a slow answer does not lower the rate it tries), alternating the open queue's
  first page and one of its tickets in full (messages, participants, events); bench/run.py
  runs it during an SMTP row, to compare that row's accept rate with the same row without it.

Measured, never asserted (tests/test_bench.py runs it with --quick).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
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
    """`rate` requests per second against the API from a thread, until stopped; a
    context manager. `summary()` tells what was sent, answered and how fast."""

    def __init__(self, base_url: str, token: str, rate: float = 50.0) -> None:
        self.base_url = base_url
        self.token = token
        self.rate = rate
        self.times: list[float] = []
        self.errors: dict[str, int] = {}
        self.started = 0.0
        self.stopped = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-load", daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=30) as client:
            ticket_ids: list[int] = []
            n = 0
            self.started = time.monotonic()
            while not self._stop.is_set():
                due = self.started + n / self.rate
                wait = due - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
                if n % 2 == 0 or not ticket_ids:
                    path, params = "/api/v1/tickets", {"status": "open", "limit": "25"}
                else:
                    path, params = f"/api/v1/tickets/{ticket_ids[n % len(ticket_ids)]}", {}
                n += 1
                began = time.perf_counter()
                try:
                    answer = client.get(path, params=params)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    self.errors[key] = self.errors.get(key, 0) + 1
                    continue
                self.times.append((time.perf_counter() - began) * 1000)
                if answer.status_code != 200:
                    key = str(answer.status_code)
                    self.errors[key] = self.errors.get(key, 0) + 1
                elif path == "/api/v1/tickets":
                    ticket_ids = [t["id"] for t in answer.json()["tickets"]] or ticket_ids
            self.stopped = time.monotonic()

    def __enter__(self) -> ApiLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        seconds = max(self.stopped - self.started, 1e-9)
        return {
            "target_per_s": self.rate,
            "requests": len(self.times),
            "per_s": round(len(self.times) / seconds, 1),
            "p50_ms": round(statistics.median(self.times), 1) if self.times else None,
            "p99_ms": round(percentile(self.times, 0.99), 1) if self.times else None,
            "errors": dict(self.errors),
        }


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
