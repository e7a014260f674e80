"""`python -m bench.profile`: where each process of maild spends its CPU per message.

    python -m bench.profile [--seconds S] [--connections C] [--per-connection M]
                            [--size BYTES] [--database-url URL] [--out DIR]

maild serve (the bench's config, bench/servers.py) takes the bench's closed-loop
load (20 connections × 10 messages of 4 KiB by default) for S seconds after a
warm-up that starts its workers. Meanwhile py-spy records every process of its tree
at 250 Hz, non-blocking, GIL samples only (`--gil`: a sample is taken only from the
thread holding the interpreter lock, so waiting in epoll, fsync, flock or SQLite's C
code is not counted as Python's work). /proc gives each process's CPU over the load.

For each process: its CPU per message accepted (ms), and its GIL samples sorted into
categories by the first rule whose module appears anywhere in the sample's stack
(MAIN_RULES for the daemon, WORKER_RULES for its parse-and-file workers); each
category's ms per message is its share of the samples times the process's CPU per
message (the CPU not under the GIL, a few percent, spread in proportion). The raw
stacks (py-spy's "raw" format, one line per stack and count) are kept in DIR for a
flame graph. Measured, never asserted; docs/benchmarks.md shows a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.client import Corpus, Sent, run_load
from bench.run import scratch_database
from bench.servers import REPO, Server, descendants
from bench.watch import TicketWatch
from tests.fake_events import FakeEvents

MAIN_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("logs (structlog)", ("structlog", "/logging/", "maild/logs.py")),
    ("metrics", ("prometheus_client", "maild/metrics.py")),
    ("pager: the Events API over HTTPS", ("maild/outbound/pager.py",)),
    ("mailer and webhooks", ("maild/outbound/mailer.py", "maild/outbound/webhooks.py")),
    ("spool: the accepted message's insert and commit", ("maild/receive/spool.py",)),
    (
        "processor: claims, results, the hand-off to workers",
        ("maild/filing/processing.py", "concurrent/futures/process.py", "multiprocessing/"),
    ),
    ("outboxes: polls, claims, outcomes", ("maild/outbound/outbox.py",)),
    ("SMTP: aiosmtpd and maild's handler", ("aiosmtpd/", "maild/receive/smtp.py")),
    ("database threads (commits, the writer lock)", ("maild/store/database.py",)),
    ("event loop", ("asyncio/", "selectors.py")),
]
WORKER_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("parse: mail-parser", ("mailparser/",)),
    ("parse: maild's parsing", ("maild/mail/",)),
    ("paging: the page planned", ("maild/outbound/paging.py",)),
    ("acks, copies, webhook events planned", ("maild/outbound/",)),
    ("search index", ("maild/store/search.py",)),
    ("filing: SQLAlchemy (statements, flush, commit)", ("sqlalchemy/", "sqlmodel/")),
    ("filing: maild's own steps", ("maild/filing/intake.py", "maild/routing/", "maild/store/")),
    ("the batch's hand-off (pickling, the pool)", ("maild/filing/processing.py",)),
]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def classify(stacks: Path, rules: list[tuple[str, tuple[str, ...]]]) -> tuple[int, Counter[str]]:
    """(samples, samples per category) of a py-spy raw file."""
    counts: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        for label, modules in rules:
            if any(module in frame for frame in frames for module in modules):
                counts[label] += samples
                break
        else:
            counts["other"] += samples
    return total, counts


def profile(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    events = FakeEvents(folder / "events", keep_alive=True).start()
    try:
        with scratch_database(args.database_url or None, folder, "profile") as url:
            server = Server.maild(folder, url, events.url, events.ca_file)
            with server, TicketWatch(url) as watch:
                warm = Corpus(args.size, "warm")
                asyncio.run(run_load(server.port, 5, 5, 2, warm))
                watch.wait_drained(timeout=120)
                time.sleep(1)  # the warm-up's pages and mail settle
                commands = {p: command_of(p) for p in descendants(server.pid)}
                pids = [p for p, command in commands.items() if command]
                before = {p: process_cpu(p) for p in pids}
                spies = []
                for pid in pids:
                    raw = args.out / f"stacks-{pid}.txt"
                    command = [spy, "record", "--pid", str(pid), "--duration"]
                    command += [str(int(args.seconds) + 5), "--rate", "250"]
                    command += ["--nonblocking", "--gil", "--format", "raw", "--output", str(raw)]
                    spies.append(
                        (
                            pid,
                            raw,
                            subprocess.Popen(
                                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                            ),
                        )
                    )
                time.sleep(1.0)  # py-spy attached

                def sent(message: Sent) -> None:
                    if message.inbound_id is not None:
                        watch.expect(message.inbound_id, message.accepted_at)

                corpus = Corpus(args.size, "profile")
                result = asyncio.run(
                    run_load(
                        server.port,
                        args.connections,
                        args.per_connection,
                        args.seconds,
                        corpus,
                        sent,
                    )
                )
                watch.wait_drained(timeout=300)
                after = {p: process_cpu(p) for p in pids}
                for _, _, recorder in spies:
                    recorder.wait()
    finally:
        events.stop()
    messages = len(result.sent)
    report: dict[str, Any] = {
        "messages": messages,
        "seconds": args.seconds,
        "load": f"{args.connections} x {args.per_connection}, {args.size} bytes",
        "database": "postgresql" if args.database_url else "sqlite",
        "processes": [],
    }
    for pid, raw, _ in spies:
        cpu_ms = (after[pid] - before[pid]) * 1000 / max(messages, 1)
        rules = MAIN_RULES if pid == pids[0] else WORKER_RULES  # the daemon, then its tree
        total, counts = classify(raw, rules) if raw.exists() else (0, Counter())
        report["processes"].append(
            {
                "pid": pid,
                "role": "daemon" if rules is MAIN_RULES else "worker",
                "cpu_ms_per_message": round(cpu_ms, 3),
                "gil_samples": total,
                "categories": [
                    {
                        "category": label,
                        "share": round(n / total, 3),
                        "ms_per_message": round(n / total * cpu_ms, 3),
                    }
                    for label, n in counts.most_common()
                ]
                if total
                else [],
            }
        )
    return report


def table(report: dict[str, Any]) -> str:
    lines = []
    for entry in report["processes"]:
        if not entry["gil_samples"]:
            continue
        lines += [
            "",
            f"{entry['role']} (pid {entry['pid']}): {entry['cpu_ms_per_message']} ms of CPU per "
            f"message, {entry['gil_samples']} GIL samples",
            "",
            "| category | share of GIL samples | ms per message |",
            "|---|---|---|",
        ]
        lines += [
            f"| {c['category']} | {c['share'] * 100:.1f} % | {c['ms_per_message']:.3f} |"
            for c in entry["categories"]
        ]
    return "\n".join(lines).lstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--per-connection", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--database-url", default="", help="PostgreSQL (a scratch database)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "profile")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="maild-profile-") as folder:
        report = profile(args, Path(folder))
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "processes"}))
    print(table(report))


if __name__ == "__main__":
    main()
