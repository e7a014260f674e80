"""Hostile input over real SMTP: every message ends stored, and none steers maild.

A raw socket client sends the bytes exactly (smtplib rewrites bare LF and CR,
so it cannot send the header-injection cases). Run this file as a script,
`python -m tests.test_hostile`, to print the time and peak memory of
parse_message for each large case (performance is measured, not asserted).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import re
import socket
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from maild.config import load_settings
from maild.mail.parsing import BARE_LINE_BREAK_DEFECT, MAX_TEXT_CHARS, parse_message
from maild.store.models import Blob, Inbound, Message
from tests.conftest import RunningMaild, mail

MIB = 1024 * 1024
PARSE_TIMEOUT = 20.0  # a hang or a quadratic blow-up shows as a failed row, not a stuck test


# Building hostile messages


def head(tag: str, subject: bytes, *extra: bytes) -> bytes:
    """Ordinary top-level headers with a unique Message-ID, then `extra` lines."""
    lines = [
        b"From: Mallory <mallory@attacker.example>",
        b"To: support@altis-dxp.com",
        b"Subject: " + subject,
        b"Message-ID: <" + tag.encode() + b"@attacker.example>",
        b"MIME-Version: 1.0",
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n"


def nested(depth: int) -> bytes:
    """`depth` multiparts, each the only part of the one above, a text part inside."""
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return (
        head(f"nested-{depth}", b"nested %d" % depth)
        + opening
        + b"Content-Type: text/plain\r\n\r\ninnermost"
        + closing
    )


def many_parts(count: int) -> bytes:
    """A multipart/mixed of `count` small text parts."""
    parts = b"".join(
        b"--B\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(count)
    )
    return (
        head(f"parts-{count}", b"%d parts" % count, b'Content-Type: multipart/mixed; boundary="B"')
        + b"\r\n"
        + parts
        + b"--B--\r\n"
    )


def gzip_bomb(size: int) -> bytes:
    """`size` bytes of valid gzip (members of 10 MiB of zeros each) that inflate ~1000-fold."""
    member = gzip.compress(b"\0" * (10 * MIB), mtime=0)
    return member * (size // len(member))


def with_attachment(tag: str, filename: str, data: bytes) -> bytes:
    """A short text and one base64 attachment."""
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        head(tag, tag.encode(), b'Content-Type: multipart/mixed; boundary="B"')
        + b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        + b"--B\r\nContent-Type: application/gzip\r\n"
        + b'Content-Disposition: attachment; filename="'
        + filename.encode()
        + b'"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + encoded
        + b"--B--\r\n"
    )


def long_line(size: int) -> bytes:
    """A body that is one line of `size` bytes."""
    return head("long-line", b"one long line") + b"\r\n" + b"x" * size + b"\r\n"


def html_body(tag: str, html: bytes) -> bytes:
    """An HTML-only message."""
    return (
        head(tag, tag.encode(), b"Content-Type: text/html; charset=utf-8")
        + b"\r\n"
        + html
        + b"\r\n"
    )


def big_cc(count: int) -> bytes:
    """A Cc header folded over `count` addresses."""
    addresses = b",\r\n ".join(b"User %d <u%d@x.example>" % (i, i) for i in range(count))
    return head("big-cc", b"big cc", b"Cc: " + addresses) + b"\r\nbody\r\n"


# What each case must give (subject and a check of the text), and the cases.


def text_is(expected: str) -> Callable[[str], bool]:
    return lambda text: text == expected


def text_starts(expected: str) -> Callable[[str], bool]:
    return lambda text: text.startswith(expected)


CASES: dict[str, tuple[Callable[[], bytes], str, Callable[[str], bool]]] = {
    "nested-500": (lambda: nested(500), "nested 500", text_is("innermost")),
    # beyond the parser's recursion limit: the fallback keeps the headers and the body
    "nested-5000": (lambda: nested(5000), "nested 5000", text_starts("--b0\n")),
    "parts-10000": (lambda: many_parts(10_000), "10000 parts", text_starts("part 0\n\npart 1\n")),
    "nul-bytes": (
        lambda: head("nul", b"nul\x00here", b"X-Null: a\x00b") + b"\r\nbody\x00text\r\n",
        "nul\ufffdhere",
        text_is("body\ufffdtext"),
    ),
    "unknown-content-charset": (
        lambda: (
            head("charset", b"cs", b'Content-Type: text/plain; charset="x-klingon"')
            + b"\r\nbody \xe9t\xe9\r\n"
        ),
        "cs",
        text_starts("body "),
    ),
    "unknown-encoded-word-charset": (
        lambda: head("word", b"=?x-klingon?q?caf=C3=A9?= ok") + b"\r\nbody\r\n",
        "café ok",
        text_is("body"),
    ),
    "nul-in-charset-names": (
        lambda: (
            head(
                "nulcharset",
                b"=?ut\x00f-8?q?abc?=",
                b"In-Reply-To: =?ut\x00f-8?q?x?=",
                b'Content-Type: text/plain; charset="utf\x00-8"',
            )
            + b"\r\nbody\r\n"
        ),
        "abc",
        text_is("body"),
    ),
    "truncated-multipart": (
        lambda: (
            head("trunc", b"cut", b'Content-Type: multipart/mixed; boundary="B"')
            + b'\r\n--B\r\nContent-Type: multipart/alternative; boundary="C"\r\n\r\n'
            + b"--C\r\nContent-Type: text/plain\r\n\r\nhello wor\r\n"
        ),
        "cut",
        text_is("hello wor"),
    ),
    "missing-boundary": (
        lambda: (
            head("noboundary", b"no boundary", b"Content-Type: multipart/mixed")
            + b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\n"
        ),
        "no boundary",
        lambda text: "hello" in text,
    ),
    # html.parser rescans the rest for every unclosed "<": 13 s for 100 KB of "<a"
    "html-unclosed-tags": (
        lambda: html_body("html-lt", b"<p>before</p>" + b"<a" * 200_000),
        "html-lt",
        text_is("before"),
    ),
    # mail-parser parsed every address of every header twice: 300,000 took over 20 s
    "big-cc": (lambda: big_cc(300_000), "big cc", text_is("body")),
}


# A raw SMTP client


def dot_stuffed(data: bytes) -> bytes:
    """`data` with a dot doubled at the start of each CRLF line (RFC 5321 4.5.2)."""
    return re.sub(rb"(^|\r\n)\.", rb"\1..", data)


def send_raw(port: int, data: bytes, rcpt: str = "support@altis-dxp.com") -> bytes:
    """Send `data` as one message over a plain socket, unchanged but for dot-stuffing.

    Returns the reply to the end of DATA. `data` must end with CRLF.
    """
    assert data.endswith(b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            return line

        assert reply().startswith(b"220")
        for command, expected in (
            (b"EHLO client.attacker.example\r\n", b"250"),
            (b"MAIL FROM:<mallory@attacker.example>\r\n", b"250"),
            (b"RCPT TO:<" + rcpt.encode() + b">\r\n", b"250"),
            (b"DATA\r\n", b"354"),
        ):
            sock.sendall(command)
            answer = reply()
            assert answer.startswith(expected), answer
        sock.sendall(dot_stuffed(data) + b".\r\n")
        final = reply()
        sock.sendall(b"QUIT\r\n")
        reply()
        reader.close()
    return final


@contextlib.contextmanager
def running(make_config: Callable[..., Path], max_message_size: int = 0) -> Iterator[RunningMaild]:
    """maild with a [processing] parse_timeout short enough to catch a hang in a test."""
    settings = load_settings(make_config())
    smtp = settings.smtp
    if max_message_size:
        smtp = smtp.model_copy(update={"max_message_size": max_message_size})
    processing = settings.processing.model_copy(update={"parse_timeout": PARSE_TIMEOUT})
    settings = settings.model_copy(update={"smtp": smtp, "processing": processing})
    with RunningMaild(settings) as maild:
        yield maild


def inbound(maild: RunningMaild) -> list[Inbound]:
    return maild.service.database.run_read(
        lambda s: list(s.exec(select(Inbound).order_by(Inbound.id)).all())
    )


def messages(maild: RunningMaild) -> list[Message]:
    return maild.service.database.run_read(
        lambda s: list(s.exec(select(Message).order_by(Message.id)).all())
    )


def filed(maild: RunningMaild, raw: bytes) -> tuple[Inbound, dict[str, Any]]:
    """Send `raw`, wait for processing; its inbound row and its ticket."""
    assert send_raw(maild.smtp_port, raw).startswith(b"250 ")
    maild.settle(timeout=PARSE_TIMEOUT * 3)
    [row] = [r for r in inbound(maild) if r.raw == raw]
    assert (row.status, row.error) == ("processed", None)
    assert row.ticket_id is not None
    return row, maild.ticket(row.ticket_id)


def still_answers(maild: RunningMaild) -> None:
    """An ordinary message sent after the hostile one becomes its own ticket."""
    maild.send(mail("Still here"), ["support@altis-dxp.com"])
    maild.settle()
    assert "Still here" in [t["subject"] for t in maild.tickets()]


# Every hostile message ends stored as a ticket


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_message_becomes_a_ticket_and_maild_keeps_answering(
    make_config: Callable[..., Path], case: str
) -> None:
    """Each hostile message is stored, files as a ticket within parse_timeout, and maild goes on."""
    build, subject, text_ok = CASES[case]
    raw = build()
    with running(make_config) as maild:
        row, ticket = filed(maild, raw)
        assert subject == ticket["subject"]
        [message] = ticket["messages"]
        assert text_ok(message["text"]), message["text"][:200]
        assert hashlib.sha256(raw).hexdigest() == row.sha256
        still_answers(maild)


def test_gzip_bomb_attachment_is_stored_once_and_never_inflated(
    make_config: Callable[..., Path],
) -> None:
    """A 20 MiB base64 attachment of 15 MiB of gzip (15 GiB inflated) is stored as sent, once."""
    bomb = gzip_bomb(15 * MIB)
    raw = with_attachment("gzip-bomb", "logs.tar.gz", bomb)
    assert len(raw) > 20 * MIB
    with running(make_config) as maild:
        _, ticket = filed(maild, raw)
        [message] = ticket["messages"]
        assert message["text"] == "see attached"
        expected = [
            {
                "number": 1,
                "filename": "logs.tar.gz",
                "content_type": "application/gzip",
                "size": len(bomb),
                "sha256": hashlib.sha256(bomb).hexdigest(),
            }
        ]
        assert expected == message["attachments"]
        blobs = maild.service.database.run_read(lambda s: list(s.exec(select(Blob)).all()))
        assert [(hashlib.sha256(bomb).hexdigest(), len(bomb))] == [
            (b.sha256, b.size) for b in blobs
        ]
        assert blobs[0].data == bomb
        still_answers(maild)


def test_a_25_mib_single_line_is_filed_with_its_text_capped(
    make_config: Callable[..., Path],
) -> None:
    """A 25 MiB body on one line is accepted under a 40 MiB limit and filed, its text capped."""
    raw = long_line(25 * MIB)
    with running(make_config, max_message_size=40 * MIB) as maild:
        row, ticket = filed(maild, raw)
        assert row.size == len(raw)
        [message] = ticket["messages"]
        more = 25 * MIB - MAX_TEXT_CHARS
        expected = "x" * MAX_TEXT_CHARS + f"\n[... {more} more characters; the raw message is kept]"
        assert expected == message["text"]
        still_answers(maild)


# Bare LF and bare CR inside header lines


INJECTIONS = [
    pytest.param(b"\n", b"X-Priority: 1", id="lf-x-priority"),
    pytest.param(b"\r", b"X-Priority: 1", id="cr-x-priority"),
    pytest.param(b"\n", b"Auto-Submitted: auto-replied", id="lf-auto-submitted"),
    pytest.param(b"\r", b"Auto-Submitted: auto-replied", id="cr-auto-submitted"),
    pytest.param(b"\n", b"Bcc: victim@altis-dxp.com", id="lf-bcc"),
    pytest.param(b"\n\n", b"Precedence: bulk", id="lf-lf-precedence"),
    pytest.param(b"\n\r", b"X-Autoreply: yes", id="lf-cr-x-autoreply"),
]


@pytest.mark.parametrize(("breaker", "injected"), INJECTIONS)
def test_bare_line_break_in_subject_cannot_add_a_header(
    make_config: Callable[..., Path], breaker: bytes, injected: bytes
) -> None:
    """A bare LF or CR in a Subject sent over SMTP stays in the Subject; no header appears."""
    raw = (
        b"From: Form <form@customer.example>\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: hello" + breaker + injected + b"\r\n"
        b"Message-ID: <inject@customer.example>\r\n\r\nThe body.\r\n"
    )
    with running(make_config) as maild:
        row, ticket = filed(maild, raw)
        assert raw == row.raw  # stored exactly as received
        expected_subject = "hello " + injected.decode()
        assert expected_subject == ticket["subject"]
        [message] = ticket["messages"]
        assert BARE_LINE_BREAK_DEFECT in message["defects"]
        assert message["text"] == "The body."
        names = [name.lower() for name, _ in parse_message(row.raw).headers]
        assert names == ["from", "to", "subject", "message-id"]
        assert ticket["priority"] == "normal"


def test_bare_lf_cannot_thread_a_message_into_another_customers_ticket(
    make_config: Callable[..., Path],
) -> None:
    """An In-Reply-To smuggled into a Subject with a bare LF does not join the other ticket."""
    victim = mail("Victim's ticket", frm="Victor <victor@victim.example>")
    victim_id = victim["Message-ID"].strip("<>")
    raw = (
        b"From: Mallory <mallory@attacker.example>\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: hi\nIn-Reply-To: <" + victim_id.encode() + b">\r\n"
        b"Message-ID: <thread-inject@attacker.example>\r\n\r\nLet me in.\r\n"
    )
    with running(make_config) as maild:
        maild.send(victim, ["support@altis-dxp.com"], sender="victor@victim.example")
        maild.settle()
        row, ticket = filed(maild, raw)
        assert raw == row.raw
        assert ticket["subject"] == f"hi In-Reply-To: <{victim_id}>"
        assert ticket["requester"] == "mallory@attacker.example"
        assert [t["message_count"] for t in maild.tickets()] == [1, 1]
        assert [m.in_reply_to for m in messages(maild)] == [[], []]


# Memory of parse_message on the large cases (deterministic enough to bound)

LARGE = {
    "nested-5000": lambda: nested(5000),
    "parts-10000": lambda: many_parts(10_000),
    "gzip-bomb-20MiB": lambda: with_attachment("gzip-bomb", "logs.gz", gzip_bomb(15 * MIB)),
    "zeros-20MiB": lambda: with_attachment("zeros", "zeros.bin", b"\0" * (15 * MIB)),
    "line-25MiB": lambda: long_line(25 * MIB),
}


def parse_peak(raw: bytes) -> int:
    """The peak of memory allocated while parse_message(raw) runs, in bytes."""
    tracemalloc.start()
    try:
        parse_message(raw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("case", ["gzip-bomb-20MiB", "line-25MiB"])
def test_parse_memory_stays_within_ten_times_the_message(case: str) -> None:
    """parse_message of a 20-25 MiB message allocates at most ten times its size at peak."""
    raw = LARGE[case]()
    assert parse_peak(raw) < 10 * len(raw)


def measure() -> None:
    """Print, per large case, its size, parse CPU time and tracemalloc peak."""
    cases = {**LARGE, **{f"smtp:{name}": build for name, (build, _, _) in CASES.items()}}
    for name, build in cases.items():
        raw = build()
        started = time.process_time()
        parse_message(raw)
        cpu = time.process_time() - started
        peak = parse_peak(raw)
        print(
            f"{name:34} {len(raw) / 1024:9.1f} KiB  {cpu:6.2f} s CPU  "
            f"tracemalloc peak {peak / MIB:7.1f} MiB ({peak / len(raw):5.1f}x)"
        )


if __name__ == "__main__":
    measure()
    sys.exit(0)
