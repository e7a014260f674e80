"""The daemon as ops run it: signals and the rules table it serves."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BILLING, wait_until
from tests.daemon import Daemon

pytestmark = pytest.mark.slow


def rcpt_code(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@customer.example")
        code, _ = client.rcpt(address)
    return code


def test_sighup_reloads_the_rules_and_a_broken_table_keeps_the_old_one(
    make_config: Callable[..., Path], rules_dir: Path, tmp_path: Path
) -> None:
    """A good table takes effect on SIGHUP; a broken one is logged with file:line and ignored."""
    with Daemon(make_config(), tmp_path / "maild.log") as daemon:
        assert daemon.process is not None
        assert rcpt_code(daemon.smtp_port, "billing@altis-dxp.com") == 550
        (rules_dir / "billing.toml").write_text(BILLING)
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: any(e["event"] == "rules reloaded" for e in daemon.events()), 10, "the reload"
        )
        assert rcpt_code(daemon.smtp_port, "billing@altis-dxp.com") == 250

        broken = rules_dir / "broken.toml"
        broken.write_text(
            '[[route]]\nname = "x"\nrecipients = ["x@altis-dxp.com"]\n'
            'type = "incidnet"\npriority = "low"\n'
        )
        daemon.process.send_signal(signal.SIGHUP)
        failure = wait_until(
            lambda: next(
                (e for e in daemon.events() if e["event"].startswith("rules reload failed")), None
            ),
            10,
            "the failed reload",
        )
        assert failure["problems"] == [
            f"{broken}:4: type must be one of question, incident, problem, task, not 'incidnet'"
        ]
        assert rcpt_code(daemon.smtp_port, "billing@altis-dxp.com") == 250
        assert rcpt_code(daemon.smtp_port, "x@altis-dxp.com") == 550
        assert daemon.terminate() == 0


def test_serve_exits_with_a_clear_message_when_the_port_is_taken(
    make_config: Callable[..., Path],
) -> None:
    """A listen address already in use stops `maild serve` with exit 1 and says why."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config()
        config.write_text(config.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"', 1))
        result = subprocess.run(
            [sys.executable, "-m", "maild", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "maild: cannot start:" in result.stderr
    assert "address already in use" in result.stderr
