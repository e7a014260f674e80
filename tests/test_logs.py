"""Logs: one JSON object per line, the SMTP session id on every line of its session."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from maild.logs import configure_logging
from tests.conftest import RunningMaild, mail


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """maild's logging pipeline writing JSON into a buffer; restored afterwards."""
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    yield stream
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_json_and_sessions_are_told_apart(
    log_stream: io.StringIO, maild: RunningMaild
) -> None:
    """Each session's lines, aiosmtpd's own included, carry that session's id and no other."""
    secret = "body-text-that-must-never-be-logged"
    for subject in ("first", "second"):
        with maild.smtp() as client:
            client.docmd("FOO")  # aiosmtpd's mail.log warns about unknown commands
            client.send_message(mail(subject, body=secret), to_addrs=["support@altis-dxp.com"])
    maild.settle()
    lines = events(log_stream)
    accepted = [e for e in lines if e["event"] == "message accepted"]
    warnings = [e for e in lines if e.get("logger") == "mail.log"]
    assert len(accepted) == 2
    assert len(warnings) == 2
    assert accepted[0]["session_id"] != accepted[1]["session_id"]
    assert [w["session_id"] for w in warnings] == [a["session_id"] for a in accepted]
    assert all(w["level"] == "warning" for w in warnings)
    assert secret not in log_stream.getvalue()


def test_mail_log_info_lines_stay_out_of_the_log(
    log_stream: io.StringIO, maild: RunningMaild
) -> None:
    """aiosmtpd logs every command at INFO; at maild's INFO level none of them appear."""
    with socket.create_connection(("127.0.0.1", maild.smtp_port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"HELO client.test\r\n")
        reader.readline()
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        reader.close()
    assert [e for e in events(log_stream) if e.get("logger") == "mail.log"] == []


def test_the_level_holds_for_maild_lines_and_library_lines() -> None:
    """`[log] level` filters maild's own lines (written by structlog directly) and the
    libraries' (through the standard library) alike: at `warning` no info line of
    either is written, and a warning of each is, with its level and logger."""
    stream = io.StringIO()
    configure_logging("json", "warning", stream=stream)
    try:
        log = structlog.get_logger("maild.test")
        log.info("maild info")
        log.warning("maild warning", inbound=7)
        logging.getLogger("alembic.runtime").info("library info")
        logging.getLogger("mail.log").warning("library warning")
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("maild error")
        lines = events(stream)
    finally:
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)
        structlog.reset_defaults()
    assert [(e["event"], e["level"], e["logger"]) for e in lines] == [
        ("maild warning", "warning", "maild.test"),
        ("library warning", "warning", "mail.log"),
        ("maild error", "error", "maild.test"),
    ]
    assert lines[0]["inbound"] == 7
    assert lines[2]["exception"][0]["exc_type"] == "ValueError"
