"""No accepted message is ever lost: kill -9, restarts, failed processing, SIGTERM."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import col, select

from maild.config import load_settings
from maild.store.database import Database
from maild.store.models import Inbound
from maild.store.tickets import list_tickets
from tests.conftest import REPO, RunningMaild, mail, wait_until
from tests.daemon import Daemon

pytestmark = pytest.mark.slow


def inbound_statuses(config: Path) -> dict[str, str]:
    """Subject line → status of every stored delivery, read straight from the database."""
    database = Database(load_settings(config).database.url)
    try:
        rows = database.run_read(
            lambda s: s.exec(select(Inbound.raw, Inbound.status).order_by(col(Inbound.id))).all()
        )
    finally:
        database.close()
    result = {}
    for raw, status in rows:
        subject = next(
            line.split(b":", 1)[1].strip().decode()
            for line in raw.splitlines()
            if line.lower().startswith(b"subject:")
        )
        result[subject] = status
    return result


def ticket_subjects(config: Path) -> set[str]:
    database = Database(load_settings(config).database.url)
    try:
        return {t["subject"] for t in database.run_read(lambda s: list_tickets(s, status="all"))}
    finally:
        database.close()


def test_kill_9_right_after_250_loses_nothing(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Every message that got 250 is on disk at SIGKILL, and becomes a ticket after restart."""
    config = make_config()
    accepted = []
    daemon = Daemon(config, tmp_path / "first.log").start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            for number in range(5):
                message = mail(f"Before the crash {number}")
                if number == 4:  # large enough that parsing cannot be done by the kill
                    message.add_attachment(
                        os.urandom(8_000_000),
                        maintype="application",
                        subtype="gzip",
                        filename="core.gz",
                    )
                refused = client.send_message(message, to_addrs=["sysops@altis-dxp.com"])
                assert refused == {}
                accepted.append(message["Subject"])
            daemon.kill()
    finally:
        daemon.__exit__()
    stored = inbound_statuses(config)
    assert sorted(stored) == sorted(accepted)
    assert stored["Before the crash 4"] == "received"  # the kill came before processing

    with Daemon(config, tmp_path / "second.log"):
        wait_until(lambda: ticket_subjects(config) == set(accepted), 60, "tickets after restart")
    assert set(inbound_statuses(config).values()) == {"processed"}


def test_processing_failure_is_kept_and_reprocess_files_it(
    make_config: Callable[..., Path],
) -> None:
    """A message that fails processing stays stored as failed; `maild reprocess` files it."""
    config = make_config()
    settings = load_settings(config)
    settings = settings.model_copy(
        update={"processing": settings.processing.model_copy(update={"parse_timeout": 0.001})}
    )
    slow = mail("Too slow to parse")
    slow.add_alternative("<p>Our site is slow.</p>\n" * 50_000, subtype="html")  # > 1 ms
    with RunningMaild(settings) as maild:
        maild.send(slow, ["support@altis-dxp.com"])
        maild.settle()
        assert maild.tickets() == []
        (row,) = maild.service.database.run_read(lambda s: s.exec(select(Inbound)).all())
        assert row.status == "failed"
        assert "ParseTimeout" in (row.error or "")
    result = subprocess.run(
        [sys.executable, "-m", "maild", "reprocess", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"outcome": "created"' in result.stdout
    assert ticket_subjects(config) == {"Too slow to parse"}


def test_sigterm_lets_a_transaction_in_flight_finish(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """SIGTERM during DATA: the sender still gets 250, the daemon exits 0, nothing is lost."""
    config = make_config()
    daemon = Daemon(config, tmp_path / "maild.log").start()
    try:
        with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=30) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            for line in (
                b"EHLO client.test\r\n",
                b"MAIL FROM:<alice@customer.example>\r\n",
                b"RCPT TO:<support@altis-dxp.com>\r\n",
                b"DATA\r\n",
            ):
                sock.sendall(line)
                reply = reader.readline()
                while reply[3:4] == b"-":
                    reply = reader.readline()
            assert reply.startswith(b"354")
            sock.sendall(b"From: alice@customer.example\r\nSubject: In flight\r\n\r\nhalf")
            assert daemon.process is not None
            daemon.process.send_signal(15)
            wait_until(
                lambda: any(e.get("event") == "maild stopping" for e in daemon.events()),
                10,
                "the daemon to start stopping",
            )
            sock.sendall(b" and the rest\r\n.\r\n")
            assert reader.readline().startswith(b"250")
            reader.close()
        assert daemon.process.wait(30) == 0
    finally:
        daemon.__exit__()
    assert inbound_statuses(config) in ({"In flight": "processed"}, {"In flight": "received"})
    with Daemon(config, tmp_path / "again.log"):
        wait_until(lambda: ticket_subjects(config) == {"In flight"}, 30, "the ticket")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


ORPHAN_SCRIPT = """
import asyncio, os, sys
from pathlib import Path
from maild.store.database import Database
from maild.filing.processing import Processor
from maild.routing.rules import load_rules

async def main():
    database = Database(sys.argv[1])
    database.create_schema()
    table = load_rules(Path(sys.argv[2]))
    processor = Processor(database, lambda: table, workers=1, parse_timeout=10, poll_interval=1)
    processor.start()
    # the pool starts its worker on first use
    worker = await asyncio.get_running_loop().run_in_executor(processor._pool, os.getpid)
    print(worker, flush=True)
    os._exit(0)  # no cleanup of any kind, as after kill -9

asyncio.run(main())
"""


def test_pool_workers_end_when_their_daemon_dies(tmp_path: Path) -> None:
    """A daemon that dies without cleanup (kill -9, os._exit) leaves no worker behind:
    a worker's task pipe never reports the daemon gone, so each watches for it."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            ORPHAN_SCRIPT,
            f"sqlite:///{tmp_path / 'maild.db'}",
            str(REPO / "rules"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    workers = [int(pid) for pid in result.stdout.split()]
    assert workers
    wait_until(
        lambda: not any(_alive(pid) for pid in workers),
        15,
        f"workers {workers} to exit after their daemon died",
    )
