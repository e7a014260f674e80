"""One benchmark run: every server, every client shape, one table.

    python -m bench [--quick] [--database-url URL] [--out DIR] [--stored N]

Phases, each with a fresh server:
  1. the reference (aiosmtpd answering 250, storing nothing);
  2. maild on SQLite (a new file), then on PostgreSQL (a scratch database made
     from --database-url) when a URL is given;
  3. the same maild rows with N messages already stored (bench.fill), 4 KiB,
     after timing `tickets list --search` and `--participant` there (bench.search);
  4. the reference again: every ratio is against the mean of its two rates for
     the shape, since this machine's speed drifts over minutes (its own rows'
     ratios show by how much);
  5. memory: 5 concurrent 25 MiB messages into maild on SQLite.

Each row is a closed-loop load for a fixed time: C concurrent connections,
each sending M messages per connection and reconnecting. For maild, the row
then waits until every accepted message is filed and every page has reached the
HTTPS Events API stand-in, so rows do not overlap. Durability is as shipped:
SQLite WAL with synchronous=FULL, PostgreSQL with fsync and synchronous_commit
as the server has them (read and reported).

Writes DIR/results.json and DIR/table.md and prints the table. Nothing here
asserts a timing: tests/test_bench.py runs --quick and checks only that it works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from bench import api, search
from bench.client import Corpus, LoadResult, Sent, run_load
from bench.servers import (
    REPO,
    EventsProcess,
    MemoryWatch,
    Server,
    cpu_seconds,
    descendants,
    rss_bytes,
)
from bench.stats import percentile
from bench.watch import TicketWatch

KIB = 1024
MIB = 1024 * KIB
API_RATE = 50.0  # API requests/s beside the SMTP load (issue 19)


@dataclass(frozen=True)
class Shape:
    connections: int
    per_connection: int
    size: int

    @property
    def size_label(self) -> str:
        return "4 KiB" if self.size < MIB else f"{self.size // MIB} MiB + attachment"


@dataclass
class Row:
    server: str  # reference | maild
    database: str  # "" for the reference
    stored: int  # messages in the database before the row
    connections: int
    per_connection: int
    size: str
    messages: int = 0
    seconds: float = 0.0
    rate: float = 0.0  # messages/s answered 250
    ratio: float | None = None  # rate / the reference's mean rate for the same shape
    eod_p50_ms: float = 0.0
    eod_p99_ms: float = 0.0
    ticket_p50_ms: float | None = None
    ticket_p99_ms: float | None = None
    tickets_per_s: float | None = None  # filed / (last filed − first sent)
    backlog: int | None = None  # accepted but not yet filed when the load stopped
    page_count: int = 0
    page_p50_ms: float | None = None
    page_p99_ms: float | None = None
    peak_rss_mib: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    api_load: dict[str, Any] | None = None  # bench.api.ApiLoad's summary, when one ran


def shapes(quick: bool, small: bool = False, large: bool = False) -> list[Shape]:
    if small:  # --small: the 4 KiB rows alone, to compare two commits
        return [Shape(c, per, 4 * KIB) for c in (1, 20) for per in (1, 10)]
    if large:  # --large: the 1 MiB rows alone (paging behind large mail), then memory
        return [Shape(20, per, MIB) for per in (1, 10)]
    if quick:
        return [Shape(1, 1, 4 * KIB), Shape(20, 10, 4 * KIB), Shape(20, 1, MIB)]
    return [
        Shape(connections, per, size)
        for size in (4 * KIB, MIB)
        for connections in (1, 20)
        for per in (1, 10)
    ]


@contextmanager
def scratch_database(base_url: str | None, folder: Path, name: str) -> Iterator[str]:
    """A new empty database: a SQLite file in `folder`, or a PostgreSQL database made
    next to `base_url` and dropped afterwards."""
    if not base_url:
        path = folder / f"{name}.db"
        yield f"sqlite:///{path}"
        return
    url = make_url(base_url)
    database = f"maild_bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{database}"'))
    try:
        yield url.set(database=database).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()


def postgres_settings(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return {
                name: str(connection.execute(text(f"SHOW {name}")).scalar())
                for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes")
            }
    finally:
        engine.dispose()


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.folder = folder
        self.rows: list[Row] = []
        self.memory: dict[str, Any] = {}
        self.seconds = 1.0 if self.quick else args.seconds
        self.events = EventsProcess(folder / "events")
        self.run_id = uuid.uuid4().hex[:6]

    def close(self) -> None:
        self.events.stop()

    def log(self, text_: str) -> None:
        print(f"bench: {text_}", file=sys.stderr, flush=True)

    # One row.

    def measure(
        self,
        server: Server,
        row: Row,
        shape: Shape,
        watch: TicketWatch | None,
        reply_to: Callable[[random.Random], str] | None = None,
        seconds: float | None = None,
        max_messages: int = 10**9,
        pss: bool = False,
        api_rate: float = 0.0,
    ) -> Row:
        tag = f"{self.run_id}-{len(self.rows)}"
        corpus = Corpus(shape.size, tag, reply_to=reply_to)
        events_before = self.events.requests
        cpu_before = cpu_seconds(server.pid)

        def sent(message: Sent) -> None:
            if watch is not None and message.inbound_id is not None:
                watch.expect(message.inbound_id, message.accepted_at)

        load = api.ApiLoad(server.http_url, self.token, api_rate) if api_rate else None
        with MemoryWatch(server.pid, pss=pss) as memory, ExitStack() as running:
            if load is not None:
                running.enter_context(load)
            result = asyncio.run(
                run_load(
                    server.port,
                    shape.connections,
                    shape.per_connection,
                    seconds or self.seconds,
                    corpus,
                    sent,
                    max_messages,
                )
            )
            if watch is not None:
                row.backlog = watch.pending
                if not watch.wait_drained(timeout=600):
                    self.log(f"{watch.pending} messages still unfiled after 600 s")
                self._wait_pages(result, events_before)
        row.peak_rss_mib = round(memory.peak_mib, 1)
        self.peak_pss_mib = round(memory.peak_pss / MIB, 1)
        row.server_cpu_s = round(cpu_seconds(server.pid) - cpu_before, 2)
        if load is not None:
            row.api_load = load.summary()
        self._summarise(row, result, watch, events_before)
        self.rows.append(row)
        self.log(
            f"{row.server:9} {row.database or '-':10} stored={row.stored:<8} "
            f"{row.connections:>2}x{row.per_connection:<2} {row.size:20} "
            f"{row.messages:6} msgs {row.rate:8.1f}/s"
            + (f" API {json.dumps(row.api_load)}" if row.api_load else "")
        )
        return row

    def _wait_pages(self, result: LoadResult, events_before: int) -> None:
        wanted = sum(1 for s in result.sent if s.pages)
        try:
            self.events.wait_for_requests(events_before + wanted, timeout=60)
        except AssertionError:
            self.log(f"only {self.events.requests - events_before} of {wanted} pages arrived")

    def _summarise(
        self, row: Row, result: LoadResult, watch: TicketWatch | None, events_before: int
    ) -> None:
        sent = result.sent
        row.messages = len(sent)
        row.errors = dict(result.errors)
        row.client_cpu_s = round(result.client_cpu, 2)
        if not sent:
            return
        last = max(s.accepted_at for s in sent)
        row.seconds = round(last - result.started, 3)
        row.rate = round(len(sent) / max(row.seconds, 1e-9), 1)
        eod = [s.end_of_data * 1000 for s in sent]
        row.eod_p50_ms = round(statistics.median(eod), 2)
        row.eod_p99_ms = round(percentile(eod, 0.99), 2)
        if watch is not None:
            ids = {s.inbound_id for s in sent if s.inbound_id is not None}
            filed = [watch.filed[i] for i in ids if i in watch.filed]
            row.outcomes = watch.take_outcomes()
            if filed:
                delays = [(visible - accepted) * 1000 for accepted, visible in filed]
                row.ticket_p50_ms = round(statistics.median(delays), 1)
                row.ticket_p99_ms = round(percentile(delays, 0.99), 1)
                done = max(visible for _, visible in filed)
                row.tickets_per_s = round(len(filed) / max(done - result.started, 1e-9), 1)
            accepted = {s.message_id.strip("<>"): s.accepted_at for s in sent if s.pages}
            delays = []
            for arrived, body in self.events.arrivals[events_before:]:
                try:
                    message_id = str(body["payload"]["custom_details"]["message_id"])
                except (KeyError, TypeError):
                    continue
                when = accepted.get(message_id.strip("<>"))
                if when is not None:
                    delays.append((arrived - when) * 1000)
            row.page_count = len(delays)
            if delays:
                row.page_p50_ms = round(statistics.median(delays), 1)
                row.page_p99_ms = round(percentile(delays, 0.99), 1)

    # Phases.

    def reference(self) -> None:
        """The reference's rows: run first and again last, so that a ratio does not
        depend on where in the run the machine's speed drifted."""
        with Server.reference(self.folder) as server:
            for shape in shapes(self.quick, self.args.small, self.args.large):
                self.measure(server, self._row("reference", "", 0, shape), shape, None)

    def maild(
        self,
        base_url: str | None,
        stored: int,
        only: Callable[[Shape], bool] = lambda shape: True,
    ) -> None:
        kind = "postgresql" if base_url else "sqlite"
        name = f"{kind}_{stored}"
        with scratch_database(base_url, self.folder, name) as url:
            reply_to = None
            if stored:
                from bench import fill as filler

                started = time.monotonic()
                info = filler.fill(url, stored)
                took = time.monotonic() - started
                self.log(f"filled {kind} with {stored} messages in {took:.0f} s")
                self.fills[name] = info
                self.searches[kind] = {
                    "stored": stored,
                    "fill_seconds": info["seconds"],
                    "searches": search.time_searches(url, stored),
                }

                def reply_to(rng: random.Random) -> str:
                    return filler.message_id(rng.randrange(1, stored + 1))

            if kind == "postgresql":
                self.postgres = postgres_settings(url)
            folder = self.folder / name
            folder.mkdir()
            server = Server.maild(folder, url, self.events.url, self.events.ca_file)
            with server, TicketWatch(url) as watch:
                api.wait_ready(server.http_url)
                assert server.config is not None
                self.token = api.create_token(server.config, f"bench-{name}")
                if stored:
                    self.api_reads[kind] = {
                        "stored": stored,
                        "reads": api.time_reads(
                            server.http_url, self.token, stored, 20 if self.quick else 200
                        ),
                    }
                    self.console_pages[kind] = {
                        "stored": stored,
                        "pages": api.time_console(
                            server.http_url, server.config, stored, 5 if self.quick else 50
                        ),
                    }
                for shape in shapes(self.quick, self.args.small, self.args.large):
                    if only(shape):
                        row = self._row("maild", kind, stored, shape)
                        self.measure(server, row, shape, watch, reply_to)
                if not stored and not self.args.large:
                    self.with_api_load(server, kind, watch)

    def with_api_load(self, server: Server, kind: str, watch: TicketWatch) -> None:
        """The 20 x 10 4 KiB row again with API_RATE API requests/s running, then once
        more without: the two rows without show the noise the row with must be told from."""
        shape = Shape(20, 10, 4 * KIB)
        for rate in (API_RATE, 0.0):
            row = self._row("maild", kind, 0, shape)
            row.server = f"maild, {API_RATE:g} API req/s" if rate else "maild, again"
            self.measure(server, row, shape, watch, api_rate=rate)

    def memory_row(self, size: int) -> None:
        folder = self.folder / "memory"
        folder.mkdir()
        url = f"sqlite:///{folder / 'maild.db'}"
        server = Server.maild(folder, url, self.events.url, self.events.ca_file)
        with server, TicketWatch(url) as watch:
            time.sleep(1.0)
            # Before the first mail: the pool starts its workers on first use.
            idle = sum(rss_bytes(p) for p in descendants(server.pid)) / MIB
            shape = Shape(5, 1, size)
            row = self._row("maild", "sqlite", 0, shape)
            row.size = f"{size // MIB} MiB + attachment"
            self.measure(server, row, shape, watch, seconds=60, max_messages=5, pss=True)
            self.rows.remove(row)
            self.memory = {
                "messages": row.messages,
                "size_mib": size / MIB,
                "idle_rss_mib": round(idle, 1),
                "peak_rss_mib": row.peak_rss_mib,
                "peak_pss_mib": self.peak_pss_mib,
                "ticket_p50_ms": row.ticket_p50_ms,
                "eod_p99_ms": row.eod_p99_ms,
                "outcomes": row.outcomes,
                "errors": row.errors,
            }
            self.log(f"memory: {json.dumps(self.memory)}")

    def _row(self, server: str, database: str, stored: int, shape: Shape) -> Row:
        return Row(
            server=server,
            database=database,
            stored=stored,
            connections=shape.connections,
            per_connection=shape.per_connection,
            size=shape.size_label,
        )

    fills: dict[str, Any]
    searches: dict[str, Any]
    api_reads: dict[str, Any]
    console_pages: dict[str, Any]
    token: str = ""
    postgres: dict[str, str]
    peak_pss_mib: float = 0.0

    def run(self) -> dict[str, Any]:
        self.fills = {}
        self.searches = {}
        self.api_reads = {}
        self.console_pages = {}
        self.postgres = {}
        started = time.monotonic()
        stored = (
            self.args.stored
            if self.args.stored is not None
            else (0 if self.args.small or self.args.large else 20_000 if self.quick else 1_000_000)
        )
        self.reference()
        self.maild(None, 0)
        if self.args.database_url:
            self.maild(self.args.database_url, 0)
        if stored:
            small = lambda shape: shape.size < MIB  # noqa: E731
            self.maild(None, stored, small)
            if self.args.database_url:
                self.maild(self.args.database_url, stored, small)
        self.reference()
        if not self.args.small:
            self.memory_row(2 * MIB if self.quick else 25 * MIB)
        passes: dict[tuple[int, int, str], list[float]] = {}
        for r in self.rows:
            if r.server == "reference":
                passes.setdefault((r.connections, r.per_connection, r.size), []).append(r.rate)
        for row in self.rows:
            rates = passes.get((row.connections, row.per_connection, row.size))
            if rates and statistics.mean(rates) > 0:
                row.ratio = round(row.rate / statistics.mean(rates), 3)
        return {
            "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
            "quick": self.quick,
            "seconds_per_row": self.seconds,
            "total_seconds": round(time.monotonic() - started, 1),
            "machine": machine(),
            "postgresql": self.postgres,
            "fills": self.fills,
            "searches": {"databases": self.searches},
            "api_reads": self.api_reads,
            "console_pages": self.console_pages,
            "rows": [asdict(row) for row in self.rows],
            "reference_passes": {
                f"{c} × {m}, {size}": rates for (c, m, size), rates in passes.items()
            },
            "memory": self.memory,
        }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            info["memory_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    with suppress(OSError):
        info["disk"] = subprocess.run(
            ["df", "-h", "--output=source,fstype", str(REPO)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.splitlines()[-1]
    return info


def _ms(value: float | None) -> str:
    return "–" if value is None else (f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def table(report: dict[str, Any]) -> str:
    lines = [
        "| server | database | stored | conns × msgs/conn | size | messages | msg/s "
        "| × reference | end of DATA → 250 p50 / p99 ms | accept → ticket p50 / p99 ms "
        "| tickets/s | backlog | accept → page p50 / p99 ms (pages) | peak RSS MiB |",
        "|" + "---|" * 14,
    ]
    for row in report["rows"]:
        ticket = (
            "–"
            if row["ticket_p50_ms"] is None
            else f"{_ms(row['ticket_p50_ms'])} / {_ms(row['ticket_p99_ms'])}"
        )
        page = (
            "–"
            if row["page_p50_ms"] is None
            else f"{_ms(row['page_p50_ms'])} / {_ms(row['page_p99_ms'])} ({row['page_count']})"
        )
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}"
        tickets = "–" if row["tickets_per_s"] is None else f"{row['tickets_per_s']:.0f}"
        backlog = "–" if row["backlog"] is None else str(row["backlog"])
        stored = f"{row['stored']:,}" if row["stored"] else "0"
        lines.append(
            f"| {row['server']} | {row['database'] or '–'} | {stored} "
            f"| {row['connections']} × {row['per_connection']} | {row['size']} "
            f"| {row['messages']} | {row['rate']:.0f} | {ratio} "
            f"| {_ms(row['eod_p50_ms'])} / {_ms(row['eod_p99_ms'])} | {ticket} "
            f"| {tickets} | {backlog} | {page} | {row['peak_rss_mib']:.0f} |"
        )
    passes = report.get("reference_passes") or {}
    if passes:
        drift = ", ".join(
            f"{shape}: {' → '.join(f'{rate:.0f}' for rate in rates)}"
            for shape, rates in passes.items()
        )
        lines += [
            "",
            "The reference ran first and again last; × reference is against the mean of "
            f"its two rates (msg/s, first → last): {drift}.",
        ]
    searches = report.get("searches") or {}
    if searches.get("databases"):
        heading = "Searches (bench/search.py) in the filled databases:"
        lines += ["", heading, "", search.table(searches).rstrip("\n")]
    if report.get("api_reads"):
        heading = "API reads (bench/api.py) in the filled databases, over HTTP:"
        lines += ["", heading, "", api.table(report["api_reads"]).rstrip("\n")]
    if report.get("console_pages"):
        heading = "Console pages (bench/api.py) in the filled databases, over HTTP:"
        lines += ["", heading, "", api.console_table(report["console_pages"]).rstrip("\n")]
    loaded = [row for row in report["rows"] if row.get("api_load")]
    for row in loaded:
        load = row["api_load"]
        lines += [
            "",
            f"{row['server']} ({row['database']}): {load['requests']} API requests answered "
            f"of {load['sent']} sent, at "
            f"{load['per_s']}/s (target {load['target_per_s']:g}), p50 / p99 "
            f"{load['p50_ms']} / {load['p99_ms']} ms, errors {load['errors'] or 'none'}.",
        ]
    memory = report["memory"]
    if memory:
        lines += [
            "",
            f"Memory: {memory['messages']} concurrent messages of {memory['size_mib']:g} MiB "
            f"(an attachment each) into maild on SQLite: peak RSS {memory['peak_rss_mib']:.0f} MiB "
            f"for maild and its workers together ({memory['idle_rss_mib']:.0f} MiB before "
            "the first mail, when no worker has started); "
            f"peak PSS {memory['peak_pss_mib']:.0f} MiB (pages the processes share counted once).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run that only shows it works")
    parser.add_argument(
        "--small",
        action="store_true",
        help="the 4 KiB rows alone (no stored or memory rows): to compare two commits",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="the 20-connection 1 MiB rows and the memory row alone: paging behind large mail",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("MAILD_BENCH_DATABASE_URL", ""),
        help="PostgreSQL server to add maild-on-PostgreSQL rows (a scratch database is made)",
    )
    parser.add_argument("--stored", type=int, default=None, help="messages stored for scale rows")
    parser.add_argument("--seconds", type=float, default=5.0, help="load time per row")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="maild-bench-") as folder:
        bench = Bench(args, Path(folder))
        try:
            report = bench.run()
        finally:
            bench.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    rendered = table(report)
    (args.out / "table.md").write_text(rendered)
    print(rendered)
    print(f"bench: {report['total_seconds']} s; written to {args.out}", file=sys.stderr)
