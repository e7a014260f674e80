"""Real-world mail (tests/samples) over real SMTP: each becomes the ticket a person expects.

expected.toml holds, per sample, what a person reading it sees (see
tests/samples/README.md). Bounces make no ticket, so for them only the parse
is checked: subject, sender and the Message-ID the report is about.
"""

from __future__ import annotations

import smtplib
import tomllib
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from maild.mail.parsing import parse_message
from maild.store.models import Inbound
from tests.conftest import RunningMaild

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
EXPECTED: dict[str, dict[str, Any]] = tomllib.loads(
    (SAMPLES / "expected.toml").read_text(encoding="utf-8")
)
NAMES = sorted(EXPECTED)


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def envelope_from(name: str) -> str:
    expected = EXPECTED[name]
    return str(expected.get("envelope_from", expected["from"]))


def send(maild: RunningMaild, name: str) -> None:
    """Send the sample's bytes as they are, declaring 8BITMIME and SMTPUTF8 when it needs them."""
    raw = sample(name)
    sender = envelope_from(name)
    options = [] if raw.isascii() else ["BODY=8BITMIME"]
    if not sender.isascii():
        options.append("SMTPUTF8")
    with smtplib.SMTP("127.0.0.1", maild.smtp_port, timeout=30) as client:
        client.ehlo("mx.sender.example")
        refused = client.sendmail(sender, [EXPECTED[name]["to"]], raw, mail_options=options)
    assert refused == {}


def test_there_are_at_least_twenty_samples_each_with_an_expectation() -> None:
    """Every .eml in tests/samples has an entry in expected.toml and the reverse."""
    files = sorted(path.name for path in SAMPLES.glob("*.eml"))
    assert files == NAMES
    assert len(files) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_sample_is_stored_with_crlf_line_endings(name: str) -> None:
    """Each sample's lines end with CRLF, as on the wire, with no bare CR or LF."""
    raw = sample(name)
    assert raw.endswith(b"\r\n")
    assert raw.count(b"\r\n") == raw.count(b"\n") == raw.count(b"\r")


@pytest.mark.parametrize("name", NAMES)
def test_sample_parses_to_what_a_reader_sees(name: str) -> None:
    """parse_message gives each sample's subject, sender, body words and attachment names."""
    expected = EXPECTED[name]
    parsed = parse_message(sample(name))
    assert expected["subject"] == parsed.subject
    assert parsed.from_ is not None
    assert expected["from"].lower() == parsed.from_.email
    if "body_contains" in expected:
        assert expected["body_contains"] in parsed.text
    if "attachments" in expected:
        assert expected["attachments"] == [a.filename for a in parsed.attachments]
    if expected["kind"] == "bounce":
        assert parsed.report is not None
        assert expected["original_message_id"] == parsed.report.original_message_id
    else:
        assert parsed.report is None


@pytest.mark.parametrize("name", NAMES)
def test_sample_over_smtp_is_stored_as_sent_and_files_as_expected(
    maild: RunningMaild, name: str
) -> None:
    """Each sample sent over SMTP is stored byte for byte; all but bounces make their ticket."""
    expected = EXPECTED[name]
    send(maild, name)
    maild.settle()
    rows = maild.service.database.run_read(lambda s: list(s.exec(select(Inbound)).all()))
    assert [sample(name)] == [row.raw for row in rows]
    if expected["kind"] == "bounce":
        return  # a bounce opens no ticket; its parse is checked above
    [ticket] = [t for t in maild.tickets() if t["subject"] == expected["subject"]]
    assert expected["from"].lower() == ticket["requester"]
    [message] = maild.ticket(ticket["id"])["messages"]
    assert expected["kind"] == message["kind"]
    if "body_contains" in expected:
        assert expected["body_contains"] in message["text"]
    if "attachments" in expected:
        assert expected["attachments"] == [a["filename"] for a in message["attachments"]]
