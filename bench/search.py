"""`python -m bench.search`: `tickets list --search` and `--participant` at N stored messages,
and what the search index costs filing.

    python -m bench.search [--stored N] [--database-url URL] [--repeat R] [--filing M]
                           [--rounds K]

For each database (SQLite; PostgreSQL too with --database-url or
MAILD_BENCH_DATABASE_URL, in a scratch database made next to it), the
database is filled with N messages (bench.fill: 1,000,000 by default) and each
search below runs R times after one unmeasured run, through the code behind
`maild tickets list --status all --json` (list_tickets, the JSON views
included; not the process start):

- a selective word: a ticket's number, which only that ticket's messages have;
- a common word (`again`, in every follow-up: three messages in four) with
  `--limit 50`;
- two common words (`cache again`, in one message) with `--limit 50`;
- a participant: a requester's address (two or three tickets);
- an application no ticket has (the ticket index's lookup; the shipped rules
  give support@ mail none).

Then, with --filing M (default 3,000; 0 skips it), bench.floor's filing step
(M 4 KiB messages into an empty database, 16 to a transaction, in this process)
with the schema at head and at the revision before the search index,
alternately, K times each (2 by default): the CPU (and wall time, which on PostgreSQL includes
the server's work) per message the index adds.

Prints one JSON line per database and the markdown table of docs/benchmarks.md.
bench/run.py calls `time_searches` after each of its fills, for the "Searches"
table of `python -m bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import fill as filler
from bench import floor
from maild.store.database import Database
from maild.store.schema import previous_revision
from maild.store.tickets import list_tickets

SEARCH_REVISION = "0009"  # the migration that makes the index


def searches(stored: int) -> list[tuple[str, dict[str, Any]]]:
    """(what, list_tickets filters) of each timed search, for a database of `stored`
    messages filled by bench.fill."""
    tickets = filler.tickets_for(stored)
    chosen = max(1, tickets - 7)  # above the customers' numbers at 1M: in no other ticket
    return [
        ("selective word", {"search": str(chosen)}),
        ("common word, --limit 50", {"search": "again", "limit": 50}),
        ("two common words, --limit 50", {"search": "cache again", "limit": 50}),
        ("participant", {"participant": filler.sender(max(1, stored // 2))}),
        ("application (none has it)", {"application": "shop-production"}),
    ]


def time_searches(url: str, stored: int, repeat: int = 5) -> list[dict[str, Any]]:
    """Each search of `searches(stored)`: tickets found, median and slowest of `repeat` runs."""
    database = Database(url)
    results = []
    try:
        for what, filters in searches(stored):

            def run(filters: dict[str, Any] = filters) -> int:
                return len(database.run_read(lambda s: list_tickets(s, status="all", **filters)))

            found = run()  # unmeasured: the first run reads the pages from disk
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                run()
                times.append((time.perf_counter() - started) * 1000)
            results.append(
                {
                    "search": what,
                    "filters": filters,
                    "tickets": found,
                    "median_ms": round(statistics.median(times), 2),
                    "max_ms": round(max(times), 2),
                }
            )
    finally:
        database.close()
    return results


def filing_cost(url_for: Callable[[str], str], messages: int, rounds: int = 2) -> dict[str, Any]:
    """bench.floor's filing step with and without the index, alternately; `url_for(name)`
    gives a new empty database's URL."""
    before = previous_revision(SEARCH_REVISION)
    runs: dict[str, list[dict[str, Any]]] = {"head": [], before: []}
    for n in range(rounds):
        for revision in ("head", before) if n % 2 == 0 else (before, "head"):
            runs[revision].append(floor.measure(url_for(f"{revision}_{n}"), messages, revision))

    def median(revision: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[revision]), 3)

    return {
        "messages": messages,
        "rounds": rounds,
        "without_revision": before,
        "file_ms": {"with": median("head", "file_ms"), "without": median(before, "file_ms")},
        "file_wall_ms": {
            "with": median("head", "file_wall_ms"),
            "without": median(before, "file_wall_ms"),
        },
    }


def table(report: dict[str, Any]) -> str:
    """The markdown table of docs/benchmarks.md ("Searches"), databases side by side."""
    databases = list(report["databases"])
    lines = [
        "| search | " + " | ".join(f"{d}: tickets, median / max ms" for d in databases) + " |",
        "|" + "---|" * (len(databases) + 1),
    ]
    rows = report["databases"][databases[0]]["searches"] if databases else []
    for index, row in enumerate(rows):
        cells = []
        for database in databases:
            result = report["databases"][database]["searches"][index]
            cells.append(f"{result['tickets']}, {result['median_ms']} / {result['max_ms']}")
        lines.append(f"| {row['search']} | " + " | ".join(cells) + " |")
    for database in databases:
        entry = report["databases"][database]
        line = f"\n{database}: {entry['stored']:,} messages filled in {entry['fill_seconds']} s."
        cost = entry.get("filing")
        if cost:
            line += (
                f" Filing {cost['messages']} messages, per message, with / without the index "
                f"(revision {cost['without_revision']}): CPU {cost['file_ms']['with']} / "
                f"{cost['file_ms']['without']} ms, wall {cost['file_wall_ms']['with']} / "
                f"{cost['file_wall_ms']['without']} ms."
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from bench.run import scratch_database  # bench.run imports this module

    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__)
    parser.add_argument("--stored", type=int, default=1_000_000, help="messages to fill")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("MAILD_BENCH_DATABASE_URL", ""),
        help="PostgreSQL server for the PostgreSQL figures (a scratch database is made)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each search")
    parser.add_argument("--filing", type=int, default=3000, help="messages filed (0: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="filing rounds with and without")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"stored": args.stored, "databases": {}}
    with tempfile.TemporaryDirectory(prefix="maild-bench-search-") as folder:
        for base in ["", *([args.database_url] if args.database_url else [])]:
            kind = "postgresql" if base else "sqlite"
            entry: dict[str, Any] = {"stored": args.stored}
            with scratch_database(base or None, Path(folder), f"search_{kind}") as url:
                entry["fill_seconds"] = filler.fill(url, args.stored)["seconds"]
                entry["searches"] = time_searches(url, args.stored, args.repeat)
            if args.filing:
                with ExitStack() as databases:

                    def url_for(name: str, base: str = base) -> str:
                        scratch = scratch_database(base or None, Path(folder), f"filing_{name}")
                        return databases.enter_context(scratch)

                    entry["filing"] = filing_cost(url_for, args.filing, args.rounds)
            report["databases"][kind] = entry
            print(json.dumps({kind: entry}), flush=True)
    print(table(report))


if __name__ == "__main__":
    main()
