"""`python -m bench.webhooks`: what `[[webhook]]` costs filing, per message.

    python -m bench.webhooks [--messages M] [--rounds K] [--database-url URL]

bench.floor's filing step (M 4 KiB messages of the bench's corpus into an empty
database, 16 to a transaction on SQLite and 32 on PostgreSQL, in this process),
filed with the desk's policy as the daemon has it (no smarthost, no agents), once
without webhooks and once with one webhook subscribed to every event (each new ticket
then writes ticket.created and message.created, each follow-up message.created),
alternately, K times each (3 by default): the CPU, and the wall time (which on
PostgreSQL includes the server's work), per message, medians. SQLite, and PostgreSQL
too with --database-url or MAILD_BENCH_DATABASE_URL (a scratch database next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import floor
from maild.config import WEBHOOK_EVENTS, OutboundSettings
from maild.filing.intake import FilingContext
from maild.outbound.acks import AckPolicy
from maild.outbound.correspondence import DeskPolicy
from maild.outbound.webhook_events import Webhooks
from maild.routing.rules import load_rules

EVERY_EVENT = Webhooks({event: ("bench",) for event in WEBHOOK_EVENTS})


def contexts() -> dict[str, FilingContext]:
    table = load_rules(floor.REPO / "rules")
    acks = AckPolicy.from_settings(OutboundSettings(templates=floor.REPO / "templates"))
    return {
        name: FilingContext(table, floor.POLICY, acks, DeskPolicy(acks=acks, webhooks=hooks))
        for name, hooks in (("without", None), ("with", EVERY_EVENT))
    }


def cost(base: str, folder: Path, messages: int, rounds: int) -> dict[str, Any]:
    from bench.run import scratch_database  # bench.run imports bench modules

    runs: dict[str, list[dict[str, Any]]] = {"with": [], "without": []}
    with ExitStack() as databases:
        for n in range(rounds):
            for name, context in contexts().items():
                scratch = scratch_database(base or None, folder, f"webhooks_{name}_{n}")
                url = databases.enter_context(scratch)
                runs[name].append(floor.measure(url, messages, context=context))

    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 3)

    return {
        "messages": messages,
        "rounds": rounds,
        "file_ms": {name: median(name, "file_ms") for name in runs},
        "file_wall_ms": {name: median(name, "file_wall_ms") for name in runs},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__)
    parser.add_argument("--messages", type=int, default=3000, help="filed per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds with and without")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("MAILD_BENCH_DATABASE_URL", ""),
        help="PostgreSQL server for the PostgreSQL figures (a scratch database is made)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="maild-bench-webhooks-") as folder:
        for base in ["", *([args.database_url] if args.database_url else [])]:
            kind = "postgresql" if base else "sqlite"
            report = cost(base, Path(folder), args.messages, args.rounds)
            print(json.dumps({kind: report}), flush=True)


if __name__ == "__main__":
    main()
