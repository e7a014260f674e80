"""`python -m bench --quick` works: every server ran, every message was answered,
filed and (for sysops@) paged. It asserts no timing: figures belong in
docs/benchmarks.md, not in a test that a slow CI machine would fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.api import console_pages
from bench.search import searches

REPO = Path(__file__).resolve().parent.parent


def run_module(*argv: str) -> str:
    """`python -m <argv>` from the repository; its stdout, once it exited 0."""
    result = subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_quick_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    run_module("bench", "--quick", "--database-url", "", "--out", str(tmp_path))
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["rows"]
    assert {(r["server"], r["database"], r["stored"]) for r in rows} == {
        ("reference", "", 0),
        ("maild", "sqlite", 0),
        ("maild", "sqlite", report["fills"]["sqlite_20000"]["count"]),
        ("maild, 50 API req/s", "sqlite", 0),
        ("maild, again", "sqlite", 0),
    }
    for row in rows:
        assert row["messages"] > 0, row
        assert row["errors"] == {}, row
        assert row["rate"] > 0, row
        assert row["ratio"] is not None, row
    for row in (r for r in rows if r["server"].startswith("maild")):
        # every accepted message was filed (none failed, none left behind)
        assert sum(row["outcomes"].values()) == row["messages"], row
        assert set(row["outcomes"]) <= {"processed"}, row
        assert row["ticket_p50_ms"] is not None, row
    # every tenth message goes to sysops@; each of those reached the Events API stand-in
    paged = [r for r in rows if r["server"].startswith("maild") and r["messages"] >= 10]
    assert paged
    for row in paged:
        assert row["page_count"] == row["messages"] // 10, row
    # the reference ran twice, first and last; ratios are against the mean of the two
    references = [r for r in rows if r["server"] == "reference"]
    assert len(references) == 2 * len(report["reference_passes"])
    for shape, rates in report["reference_passes"].items():
        assert len(rates) == 2, shape
    first = references[0]
    key = f"{first['connections']} × {first['per_connection']}, {first['size']}"
    mean = sum(report["reference_passes"][key]) / 2
    assert first["ratio"] == round(first["rate"] / mean, 3)
    memory = report["memory"]
    assert memory["messages"] == 5
    assert memory["outcomes"] == {"processed": 5}
    assert memory["peak_rss_mib"] > memory["idle_rss_mib"] > 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| maild |") == len([r for r in rows if r["server"] == "maild"])
    # the searches were timed in the filled database
    timed = report["searches"]["databases"]["sqlite"]["searches"]
    assert [t["search"] for t in timed] == [what for what, _ in searches(20_000)]
    assert "Searches (bench/search.py)" in table
    # the API: reads over HTTP in the filled database, and a load beside one SMTP row
    reads = report["api_reads"]["sqlite"]["reads"]
    assert [(r["read"], r["tickets"]) for r in reads] == [
        ("participant (a requester)", 1),
        ("open queue, first page", 50),
        ("q, a selective word", 1),
        ("q, a common word", 50),
    ]
    (loaded,) = [r for r in rows if r["api_load"]]
    assert loaded["server"] == "maild, 50 API req/s"
    assert loaded["api_load"]["requests"] == loaded["api_load"]["sent"] > 0
    assert loaded["api_load"]["errors"] == {}
    assert "API reads (bench/api.py)" in table
    # the console's pages, signed in as an agent made with `maild agents add`
    pages = report["console_pages"]["sqlite"]["pages"]
    assert [p["page"] for p in pages] == [what for what, _ in console_pages(20_000)]
    assert all(p["bytes"] > 1000 for p in pages)
    assert "Console pages (bench/api.py)" in table


def test_search_bench_times_every_search_and_the_filing_cost() -> None:
    """`python -m bench.search` fills a database, runs every search (each finds what the
    fill put there) and files with and without the index; no figure is asserted."""
    output = run_module(
        "bench.search", "--stored", "2000", "--repeat", "1", "--filing", "40", "--database-url", ""
    )
    entry = json.loads(output.splitlines()[0])["sqlite"]
    assert [(t["search"], t["tickets"]) for t in entry["searches"]] == [
        ("selective word", 1),
        ("common word, --limit 50", 50),
        ("two common words, --limit 50", 50),
        ("participant", 1),
        ("application (none has it)", 0),
    ]
    assert set(entry["filing"]["file_ms"]) == {"with", "without"}
    assert "| selective word | 1, " in output


def test_floor_measures_every_step() -> None:
    """`python -m bench.floor` runs a round: the reference under load, then the spool,
    parse and filing steps alone, every message filed; it prints figures, and no
    figure is asserted."""
    output = run_module("bench.floor", "--rounds", "1", "--messages", "60", "--seconds", "0.5")
    round_, summary = [json.loads(line) for line in output.splitlines()]
    steps = round_["steps"]
    assert steps["messages"] == 60
    assert sum(steps["outcomes"].values()) == 60
    assert set(steps["outcomes"]) == {"created", "threaded"}
    assert round_["reference"]["rate"] > 0
    assert round_["floor_ms"] == round(
        round_["reference"]["server_ms"] + steps["spool_ms"] + steps["parse_ms"] + steps["file_ms"],
        3,
    )
    assert summary["rounds"] == 1
    assert summary["median"]["floor_ms"] == round_["floor_ms"]


def test_the_profile_samples_every_busy_process_and_sorts_its_time(tmp_path: Path) -> None:
    """`python -m bench.profile` attaches py-spy to the daemon and its workers under load and
    sorts each one's GIL samples into categories that add up to its CPU per message."""
    run_module(
        "bench.profile", "--seconds", "2", "--connections", "2", "--per-connection", "2",
        "--out", str(tmp_path),
    )  # fmt: skip
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["messages"] > 0
    busy = [p for p in report["processes"] if p["gil_samples"]]
    assert busy[0]["role"] == "daemon"
    assert "worker" in {p["role"] for p in busy}
    for entry in busy:
        shares = sum(c["share"] for c in entry["categories"])
        assert abs(shares - 1) < 0.01, entry
        spent = sum(c["ms_per_message"] for c in entry["categories"])
        assert abs(spent - entry["cpu_ms_per_message"]) < 0.02, entry
        assert (tmp_path / f"stacks-{entry['pid']}.txt").stat().st_size > 0
    daemon = busy[0]
    assert "SMTP: aiosmtpd and maild's handler" in {c["category"] for c in daemon["categories"]}
