"""How long from a sysops@ message's 250 to its trigger at PagerDuty.

Runs `maild serve` as a subprocess (SQLite, the default rules, paging on) against
the HTTPS Events API stand-in the tests use, sends N messages to
sysops@altis-dxp.com one after another, and for each measures the time from the
end of the SMTP transaction (250 received) to the event's arrival at the
stand-in. Prints the distribution in milliseconds.

    .venv/bin/python bench/page_latency.py [--messages 50] [--database-url URL]

The goal (docs/architecture.md): a sysops@ mail reaches PagerDuty in under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fake_events import FakeEvents  # noqa: E402

KEY = "0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"maild exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("maild did not open its port")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, FakeEvents(Path(folder)) as events:
        port = free_port()
        url = args.database_url or f"sqlite:///{folder}/maild.db"
        config = Path(folder) / "config.toml"
        config.write_text(
            f"""
[smtp]
listen = "127.0.0.1:{port}"
hostname = "bench.invalid"
[database]
url = "{url}"
[rules]
path = "{REPO / "rules"}"
[log]
format = "json"
level = "warning"
[pagerduty]
routing_key = "{KEY}"
events_url = "{events.url}"
ca_file = "{events.ca_file}"
[escalation]
max_pages_per_sender_per_hour = 0
"""
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "maild", "serve", "--config", str(config)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            wait_port(port, daemon)
            latencies = []
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                for number in range(1, args.messages + 1):
                    message = EmailMessage()
                    message["From"] = f"customer{number}@customer.example"
                    message["To"] = "sysops@altis-dxp.com"
                    message["Subject"] = f"Site down {number}"
                    message["Message-ID"] = make_msgid(domain="customer.example")
                    message.set_content("Our production site answers 502.")
                    client.send_message(message)
                    accepted = time.perf_counter()
                    events.wait_for(number, timeout=30)
                    latencies.append((time.perf_counter() - accepted) * 1000)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    latencies.sort()
    result = {
        "messages": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(latencies[int(len(latencies) * 0.95) - 1], 1),
        "max_ms": round(latencies[-1], 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
        "database": "postgresql" if args.database_url else "sqlite",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
