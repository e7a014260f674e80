"""`python -m bench.floor`: the CPU each step of maild's work costs alone, per message.

Each round measures, one after the other on a quiet machine:

- the reference (aiosmtpd answering 250, nothing kept) under the bench's
  20 × 10 load of 4 KiB mail for a few seconds: its rate, its server CPU per
  message (the SMTP dialogue alone) and the client's CPU per message;
- in this process, the steps maild adds after the dialogue, each alone: the
  spool's commit (in groups of 8, as under load), mail-parser's parse, and
  filing (claim, read, dedup, route, thread, store, commit, 16 to a
  transaction, as the workers do), with the bench's corpus and rules.

From these it prints the CPU the goals of docs/benchmarks.md leave maild per
message on this machine's cores, beside the sum of those steps: a floor under
maild's CPU per message that leaves out logging, paging, handing work between
processes and everything the daemon does besides. Rounds are interleaved
because this machine's speed drifts by tens of percent over minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from bench.client import Corpus, run_load
from bench.servers import Server, cpu_seconds
from maild.filing.intake import FilingContext
from maild.filing.processing import FILE_CHUNK, _file_ids
from maild.mail.parsing import parse_message
from maild.outbound.paging import EscalationPolicy
from maild.receive.spool import Delivery, insert_deliveries
from maild.routing.rules import load_rules
from maild.store.database import Database
from maild.store.schema import upgrade

REPO = Path(__file__).resolve().parent.parent
SPOOL_GROUP = 8  # deliveries per spool commit: the mean under the 20 × 10 load


# Paging as the bench configures it: enabled, every sysops@ message pages.
POLICY = EscalationPolicy(
    enabled=True, allowed_senders=(), max_per_hour=0, source="bench.invalid", ticket_url=""
)


def measure(
    url: str, count: int, revision: str = "head", context: FilingContext | None = None
) -> dict[str, Any]:
    """The steps' CPU per message in this process (and filing's wall time, which on
    PostgreSQL includes the server's work), with the schema at `revision`, filed with
    `context` (default: the shipped rules and the bench's paging policy)."""
    database = Database(url)
    upgrade(database.write_engine, revision)
    try:
        table = load_rules(REPO / "rules")
        corpus = Corpus(4096, "floor")
        mails = [corpus.next() for _ in range(count)]
        deliveries = [
            Delivery("smtp", m.mail_from, [m.rcpt], m.data, session_id=f"s{n}")
            for n, m in enumerate(mails)
        ]
        started = time.process_time()
        ids: list[int] = []
        for first in range(0, count, SPOOL_GROUP):
            group = deliveries[first : first + SPOOL_GROUP]
            ids += database.run_write_core(partial(insert_deliveries, deliveries=group))
        spool = time.process_time() - started

        started = time.process_time()
        for mail in mails:
            parse_message(mail.data)
        parse = time.process_time() - started

        step = FILE_CHUNK.get(database.write_engine.dialect.name, 16)
        started, clock = time.process_time(), time.perf_counter()
        context = context or FilingContext(table, POLICY)
        filed = _file_ids(database, ids, step, parse_message, context)
        file_and_parse = time.process_time() - started
        file_wall = time.perf_counter() - clock
    finally:
        database.close()
    per = 1000 / count
    return {
        "database": database.write_engine.dialect.name,
        "messages": count,
        "outcomes": dict(Counter(f.outcome for f in filed)),
        "spool_ms": round(spool * per, 3),
        "parse_ms": round(parse * per, 3),
        "file_ms": round((file_and_parse - parse) * per, 3),
        "file_wall_ms": round((file_wall - parse) * per, 3),
    }


def reference(folder: Path, seconds: float) -> dict[str, float]:
    """The reference under 20 connections × 10 messages of 4 KiB: msg/s and CPU ms/msg."""
    with Server.reference(folder) as server:
        before = cpu_seconds(server.pid)
        result = asyncio.run(run_load(server.port, 20, 10, seconds, Corpus(4096, "floor-ref")))
        server_cpu = cpu_seconds(server.pid) - before
    count = len(result.sent)
    last = max(s.accepted_at for s in result.sent)
    return {
        "rate": round(count / (last - result.started), 1),
        "server_ms": round(1000 * server_cpu / count, 3),
        "client_ms": round(1000 * result.client_cpu / count, 3),
    }


def budget(ref: dict[str, float], steps: dict[str, Any], cores: int) -> dict[str, float]:
    """What the accept goal (70 % of the reference) leaves maild per message, and the floor."""
    target = 0.7 * ref["rate"]
    left = cores * 1000 - target * ref["client_ms"]  # CPU ms per second, the client's taken
    floor = ref["server_ms"] + steps["spool_ms"] + steps["parse_ms"] + steps["file_ms"]
    return {
        "accept_goal_per_s": round(target, 1),
        "maild_budget_ms": round(left / target, 3),
        "floor_ms": round(floor, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000, help="per round, for the steps")
    parser.add_argument("--seconds", type=float, default=5.0, help="reference load per round")
    parser.add_argument("--database-url", default="", help="PostgreSQL (default: SQLite)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    rounds = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="maild-floor-") as folder:
            ref = reference(Path(folder), args.seconds)
            url = args.database_url or f"sqlite:///{folder}/maild.db"
            steps = measure(url, args.messages)
        rounds.append({"reference": ref, "steps": steps, **budget(ref, steps, cores)})
        print(json.dumps(rounds[-1]), flush=True)
        if args.database_url and n + 1 < args.rounds:
            print("--database-url: one round only (the tables exist now)", file=sys.stderr)
            break
    summary = {
        key: statistics.median(r[key] for r in rounds)
        for key in ("accept_goal_per_s", "maild_budget_ms", "floor_ms")
    }
    print(json.dumps({"cores": cores, "rounds": len(rounds), "median": summary}))


if __name__ == "__main__":
    main()
