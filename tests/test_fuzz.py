"""Hostile mail over real SMTP: maild never crashes, never refuses accepted data, loses nothing.

The fuzz test runs one `maild serve` for every generated example and checks storage
once at the end: after the processor has drained, each message that got 250 is one
inbound row with the same bytes, in a terminal state with a ticket or a recorded
error. The fixed-case test sends one message per generator category through the
same checks, so a regression reproduces without Hypothesis. What the fuzz found
(KNOWN_BUGS, and the slow-batch test at the end) is each a strict xfail until maild
is fixed.

The bytes go over a plain socket, not smtplib (which rewrites bare CR and LF), so
bare LF, bare CR, NUL and 8-bit bytes reach the server as generated; dot-stuffing is
done here (see `wire_data`).

Profiles: `maild-fuzz-ci` (the default: 2,000 derandomized examples, no example
database) and `maild-fuzz-explore` (random: use with --hypothesis-seed; failures are
kept in .hypothesis). Choose with MAILD_FUZZ_PROFILE, the count with MAILD_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy
from sqlmodel import col, select

from maild.config import load_settings
from maild.receive.spool import Delivery, insert_deliveries
from maild.store.database import Database
from maild.store.models import Inbound, Message
from tests.conftest import RunningMaild, wait_until
from tests.daemon import Daemon

_HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]
settings.register_profile(
    "maild-fuzz-ci",
    max_examples=int(os.environ.get("MAILD_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    derandomize=True,  # the same 2,000 messages on every CI run: a failure reproduces
    database=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
settings.register_profile(
    "maild-fuzz-explore",
    max_examples=int(os.environ.get("MAILD_FUZZ_EXAMPLES", "2000")),
    deadline=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
)
FUZZ_PROFILE = os.environ.get("MAILD_FUZZ_PROFILE", "maild-fuzz-ci")

DESKS = ("support@altis-dxp.com", "hosting@humanmade.com", "sysops@altis-dxp.com")
# The recipients the envelope strategy writes, all routed by the default rules.
DESKS_ANY_CASE = frozenset(
    variant for d in DESKS for variant in (d, d.upper(), d.replace("@", "+tag@"))
)
# Every generated Message-ID that should be unique carries this token; the harness
# replaces it with a serial number at send time, so no two examples share an id
# (Hypothesis replays and shrinks examples: a serial drawn from data could repeat).
SERIAL = b"fz-SERIAL-fz"


# --- the wire ------------------------------------------------------------------------

# aiosmtpd 1.4.5+ (the CVE-2024-27305 fix) reads DATA with readuntil(b"\r\n"): only
# CRLF ends a line, and only a line that is exactly b".\r\n" ends the data, so
# b"\n.\n", b"\r.\r" and b"\n.\r\n" are content to it. Before 1.4.5 it split DATA on
# LF and b"text\n.\r\n" ended the data (the smuggling hole its test_smtpsmuggling.py
# now covers); other MTAs and proxies each read these differently again. The
# generator stays out of that grey zone: a dot between a bare CR or LF and any CR or
# LF gets a space after it, so a lone-dot line exists only at the real end, for every
# reading, and this client can never desynchronise from the server.
_AMBIGUOUS_DOT = re.compile(rb"((?<!\r)\n|\r)\.(?=[\r\n])")


def wire_data(content: bytes) -> tuple[bytes, bytes]:
    """(the bytes to send after 354, ending in CRLF.CRLF; the bytes the server stores).

    The server stores the content up to and including the CRLF before the final
    dot, so content not ending in CRLF gains one. Lines are CRLF-delimited, as the
    server reads them; a line starting with "." gets another (RFC 5321 4.5.2).
    """
    stored = content if not content or content.endswith(b"\r\n") else content + b"\r\n"
    stored = _AMBIGUOUS_DOT.sub(rb"\1. ", stored)
    lines = stored.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return stuffed + b".\r\n", stored


class Closing(Exception):
    """maild said 421 before DATA (an abuse limit such as [smtp] max_errors): reconnect."""


class Deferred(Exception):
    """maild answered 451 at the end of DATA: it did not store the message, and the
    sender must retry. Only a storage stall may cause it here (see Harness.deliver)."""


class RawSMTP:
    """A minimal SMTP client on a plain socket: commands and data go out byte for byte."""

    def __init__(self, port: int, helo: str = "fuzz.client.example") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")
        self.errors = 0  # 5xx replies so far: maild closes a connection after [smtp] max_errors
        code, text = self.reply()
        assert code == 220, text
        code, text = self.command(f"EHLO {helo}".encode())
        assert code == 250, text

    def reply(self) -> tuple[int, bytes]:
        """The next (possibly multi-line) reply: its code and its last line."""
        while True:
            line = self.reader.readline(4096)
            if not line:
                raise ConnectionError("maild closed the connection")
            if line[3:4] != b"-":
                code = int(line[:3])
                self.errors += code >= 500
                return code, line.rstrip(b"\r\n")

    def command(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + b"\r\n")
        code, text = self.reply()
        if code == 421:
            raise Closing(text)
        return code, text

    def deliver(self, mail_from: str, params: list[str], rcpts: list[str], content: bytes) -> bytes:
        """One transaction; the bytes maild must have stored. Fails unless it ends in 250."""
        assert self.command(b"RSET")[0] == 250
        line = f"MAIL FROM:<{mail_from}>" + "".join(f" {p}" for p in params)
        code, text = self.command(line.encode())
        assert code == 250, f"MAIL FROM answered {text!r}"
        for rcpt in rcpts:
            code, text = self.command(f"RCPT TO:<{rcpt}>".encode())
            assert (code == 250) == (rcpt in DESKS_ANY_CASE), f"RCPT TO:<{rcpt}> answered {text!r}"
        code, text = self.command(b"DATA")
        assert code == 354, f"DATA answered {text!r}"
        data, stored = wire_data(content)
        self.sock.sendall(data)
        code, text = self.reply()  # any 4xx or 5xx here is a failure, 421 too
        if code == 451:
            raise Deferred(text.decode(errors="replace"))
        assert code == 250, f"end of DATA answered {text!r} for {len(stored)} bytes"
        return stored

    def close(self, polite: bool = True) -> None:
        try:
            if polite:
                self.command(b"QUIT")
        except (OSError, Closing):
            pass
        finally:
            self.reader.close()
            self.sock.close()


# --- checks --------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_answers(port: int) -> None:
    """The listener is up and answers EHLO and NOOP on a new connection."""
    client = RawSMTP(port, helo="after.fuzz.example")
    try:
        assert client.command(b"NOOP")[0] == 250
    finally:
        client.close()


def assert_all_stored(
    database: Database, accepted: Counter[str], timeout: float = 300
) -> Counter[str]:
    """Every accepted message is one inbound row, filed or set aside with a reason; by status.

    After the processor drains (no row `received`), a row must have a ticket, or a
    non-empty error: `failed`, and any status added later (dropped, bounce...) that
    records why. `processed` rows have their message stored; `duplicate` ones a ticket.
    """

    def waiting() -> int:
        return len(
            database.run_read(
                lambda s: s.exec(select(Inbound.id).where(Inbound.status == "received")).all()
            )
        )

    wait_until(lambda: waiting() == 0, timeout, "the processor to drain")
    rows = database.run_read(
        lambda s: s.exec(select(Inbound.id, Inbound.status, Inbound.ticket_id, Inbound.error)).all()
    )
    digests = database.run_read(lambda s: s.exec(select(Inbound.sha256)).all())
    filed = set(
        database.run_read(
            lambda s: s.exec(select(Message.inbound_id).where(col(Message.inbound_id).is_not(None)))
        ).all()
    )
    assert len(rows) == sum(accepted.values()), "not one inbound row per 250"
    assert Counter(digests) == accepted, "stored bytes differ from the 250'd ones"
    unstored = [
        (row_id, status, ticket_id, error)
        for row_id, status, ticket_id, error in rows
        if status == "received"
        or (ticket_id is None and not (error or "").strip())
        or (status == "failed" and not (error or "").strip())
        or (status == "duplicate" and ticket_id is None)
        or (status == "processed" and row_id not in filed)
    ]
    assert unstored == [], f"accepted but not stored (id, status, ticket, error): {unstored[:20]}"
    return Counter(row[1] for row in rows)


def set_aside(database: Database) -> list[tuple[str, str]]:
    """(status, error) of every inbound row that is neither processed nor a duplicate."""
    rows = database.run_read(
        lambda s: s.exec(
            select(Inbound.status, Inbound.error).where(
                col(Inbound.status).not_in(["processed", "duplicate"])
            )
        ).all()
    )
    return [(status, error or "") for status, error in rows]


def daemon_errors(events: list[dict[str, Any]]) -> list[str]:
    """maild's error-level log events, one line each, tracebacks included."""
    return [
        " ".join(f"{k}={v!r}"[:4000] for k, v in event.items() if k not in ("ts", "logger"))
        for event in events
        if event.get("level", event.get("log_level")) in ("error", "critical")
    ]


# --- generators ----------------------------------------------------------------------

CODECS = [
    "utf-8",
    "latin-1",
    "cp1252",
    "shift_jis",
    "euc-jp",
    "iso-2022-jp",
    "gb2312",
    "gb18030",
    "big5",
    "euc-kr",
    "koi8-r",
    "cp1251",
    "iso-8859-7",
    "iso-8859-8",
    "utf-16",
    "utf-16-be",
    "utf-32",
    "utf-7",
    "cp437",
    "mac-roman",
    "tis-620",
]
BOGUS_CHARSETS = [
    b"x-unknown",
    b"utf-8\x00",
    b"",
    b"utf-99",
    b"../../etc/passwd",
    b"unicode-1-1-utf-7",
    b"windows-9999",
    b"iso-2022-jp-3",
    b"x-mac-klingon",
    b"utf-8*en",
    b"\xff\xfe",
    b"us-ascii'en'",
    b"ks_c_5601-1987",
    b"cp65001",
    b"base64",
    b"=?",
    b"a" * 300,
]
SPECIALS = [
    b"\n",
    b"\r",
    b"\x00",
    b"\r\n",
    b"\r\n ",
    b"\n\t",
    b"\t",
    b"\x0b\x0c",
    b"\x7f",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"\x1b$B",
    b"\x1b(B",
    b"\xc3(",
    b"\xed\xa0\x80",
    b"=?",
    b"?=",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b"@",
    b'"',
    b"\\",
    b"(",
    b")",
    b"=",
    b"%",
    b"--",
]
KNOWN_HEADERS = [
    b"From",
    b"To",
    b"Cc",
    b"Bcc",
    b"Reply-To",
    b"Sender",
    b"Subject",
    b"In-Reply-To",
    b"References",
    b"Date",
    b"MIME-Version",
    b"Content-Type",
    b"Content-Transfer-Encoding",
    b"Content-Disposition",
    b"Content-ID",
    b"Return-Path",
    b"Received",
    b"Auto-Submitted",
    b"Precedence",
    b"X-Autoreply",
    b"X-Autorespond",
    b"X-Auto-Response-Suppress",
    b"X-Autogenerated",
    b"List-Id",
    b"List-Unsubscribe",
    b"X-Loop",
    b"X-Priority",
    b"Importance",
    b"Delivered-To",
    b"X-Failed-Recipients",
    b"DKIM-Signature",
    b"ARC-Seal",
    b"Thread-Topic",
    b"Thread-Index",
    b"Resent-From",
    b"Resent-Message-ID",
    b"X-Original-To",
]
GARBAGE_ADDRESSES = [
    b"<<<@@@>>>",
    b"@",
    b"<>",
    b"a@",
    b"@b",
    b'"unterminated <a@b.example',
    b"a@b@c",
    b"(comment (nested) <x@y.example>",
    b"undisclosed-recipients:;",
    b"group: a@b.example, c@d.example;",
    b'"\\"\\\\" <q@q.example>',
    b"<a@[127.0.0.1]>",
    b"<a@[IPv6:::1]>",
    b"a" * 300 + b"@example.com",
    b"=?utf-8?B?4pyT?= <x@y.example>",
    b"=?utf-8?B?LCwsPGV2aWxAeC5leGFtcGxlPg==?= <ok@y.example>",
    b"\xff\xfe@\x00",
    b"Mallory <support@altis-dxp.com>",
    b"MAILER-DAEMON@mx.example",
    b"postmaster@x.example",
    b"noreply@x.example",
    b"alice@customer.example <bob@evil.example>",
    b"J\xc3\xbcrgen <j\xc3\xbcrgen@b\xc3\xbccher.example>",
    b",,,;;;",
    b"<" * 100,
    b"a@b.example\x00c@d.example",
]
DATE_VALUES = [
    b"Mon, 1 Jan 2024 10:00:00 +0000",
    b"Thu, 01 Jan 1970 00:00:00 +0000",
    b"Fri, 31 Dec 9999 23:59:59 -2359",
    b"Sun, 0 Jan 0000 00:00:00 +9999",
    b"yesterday",
    b"",
    b"Mon, 32 Foo 2024 25:61:61 GMT",
    b"-1",
    b"9" * 400,
    b"Tue, 2 Jan 2024 10:00:00 (no zone)",
]
CTE_VALUES = [
    b"7bit",
    b"8bit",
    b"binary",
    b"base64",
    b"quoted-printable",
    b"BASE64",
    b"Quoted-Printable",
    b"x-uuencode",
    b"bogus-encoding",
    b"",
    b"base64; x=y",
]


# Strategies are built once, at import: building one inside a composite on every draw
# costs more than the draw. Helpers that take `draw` build bytes without new strategies.


def _join(parts: Iterable[bytes]) -> bytes:
    return b"".join(parts)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _encode(text: str, codec: str) -> bytes:
    return text.encode(codec, "replace")


BOOL = st.booleans()


def one_in(n: int) -> SearchStrategy[bool]:
    """True about once in `n` draws. Hypothesis favours the ends of an integer range,
    so the rare value is one in the middle, not 0."""
    return st.integers(0, n - 1).map((n // 2).__eq__)


ONE_IN_3 = one_in(3)
ONE_IN_5 = one_in(5)
ONE_IN_10 = one_in(10)
ONE_IN_15 = one_in(15)
ONE_IN_20 = one_in(20)
ONE_IN_30 = one_in(30)
TEXT_SHORT = st.text(max_size=20)
TEXT = st.text(max_size=200)
CODEC = st.sampled_from(CODECS)
SPECIAL = st.sampled_from(SPECIALS)
EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
PART_EOL = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
SEPARATOR = st.sampled_from([b": ", b": ", b":", b" : ", b":\t", b"::"])
# Short runs of bytes with bare CR/LF, NUL, 8-bit and MIME-significant characters.
# A fixed shape with few choices: every draw costs Hypothesis time, and 2,000 examples
# must fit in about a minute.
HOSTILE = st.tuples(
    st.binary(max_size=30), SPECIAL, TEXT_SHORT.map(_utf8), SPECIAL, st.binary(max_size=10)
).map(_join)
INSERTS = st.sampled_from([*SPECIALS, b"!", b"===", b"=ZZ", b"=4", b"*"])


@st.composite
def _encoded_text(draw: DrawFn) -> bytes:
    """Unicode text in one of many encodings, undeclared."""
    return _encode(draw(TEXT), draw(CODEC))


ENCODED_TEXT = _encoded_text()


def mutate(draw: DrawFn, data: bytes) -> bytes:
    """`data` with a few hostile bytes inserted, maybe cut short."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(INSERTS) + data[at:]
    if data and draw(BOOL):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def _encoded_word(draw: DrawFn) -> bytes:
    """An RFC 2047 word: real or bogus charset, B or Q or neither, payload valid or broken."""
    codec = draw(CODEC)
    real = draw(BOOL)
    charset = codec.encode() if real else draw(st.sampled_from(BOGUS_CHARSETS))
    kind = draw(st.sampled_from([b"B", b"Q", b"b", b"q", b"X", b""]))
    raw = _encode(draw(TEXT_SHORT), codec if real else "utf-8")
    b_encoded = kind in (b"B", b"b")
    payload = base64.b64encode(raw) if b_encoded else binascii.b2a_qp(raw, header=True)
    if draw(BOOL):
        payload = mutate(draw, payload)
    lang = draw(st.sampled_from([b"", b"", b"*en", b"*"]))
    close = draw(st.sampled_from([b"?=", b"?=", b"?=", b"", b"?"]))
    return b"=?" + charset + lang + b"?" + kind + b"?" + payload + close


ENCODED_WORD = _encoded_word()


@st.composite
def _one_address(draw: DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 3:
        return draw(st.sampled_from(GARBAGE_ADDRESSES))
    if kind == 4:
        return draw(HOSTILE)[:60]
    local = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=12))
    domain = draw(st.sampled_from(["customer.example", "b\u00fccher.example", "x.example"]))
    addr = f"{local}@{domain}".encode()
    if kind == 0:
        return addr
    if kind == 1:
        return draw(ENCODED_WORD) + b" <" + addr + b">"
    return b'"' + draw(ENCODED_TEXT)[:40] + b'" <' + addr + b">"


@st.composite
def _address_value(draw: DrawFn) -> bytes:
    """One to three addresses (plain, 8-bit or encoded names, garbage), maybe 60 times over."""
    addresses = draw(st.lists(_one_address(), min_size=1, max_size=2))
    return b", ".join(addresses * draw(st.sampled_from([1, 1, 1, 1, 20])))


ADDRESS = _address_value()
# A header value: text, 8-bit runs, encoded words, addresses, raw controls, folding.
HEADER_VALUE = st.lists(
    st.one_of(
        TEXT_SHORT.map(_utf8),
        ENCODED_TEXT,
        ENCODED_WORD,
        HOSTILE,
        ADDRESS,
        st.sampled_from([b"\r\n ", b"\r\n\t", b" "]),
    ),
    max_size=3,
).map(_join)
HEADER_NAME = st.one_of(
    st.sampled_from(
        [*KNOWN_HEADERS, *(h.lower() for h in KNOWN_HEADERS), *(h.upper() for h in KNOWN_HEADERS)]
    ),
    st.sampled_from([b"Subject ", b" From", b"", b"X-\x00", b"\xff\xfe", b"Content-Type\t"]),
    st.text("abcdefghijklmnopqrstuvwxyzXYZ0123456789-_.", min_size=1, max_size=30).map(_utf8),
    HOSTILE,
)


def header_line(draw: DrawFn, name: bytes, value: bytes) -> bytes:
    """`name: value` with a drawn separator and line ending (bare LF and CR too)."""
    return name + draw(SEPARATOR) + value + draw(EOL)


@st.composite
def _any_header_line(draw: DrawFn) -> bytes:
    return header_line(draw, draw(HEADER_NAME), draw(HEADER_VALUE))


HEADER_LINE = _any_header_line()


@st.composite
def _huge_value(draw: DrawFn) -> bytes:
    """A header value of 1 KB to 200 KB: a drawn chunk repeated, maybe folded."""
    chunk = draw(st.one_of(st.binary(min_size=1, max_size=50), ENCODED_WORD, ENCODED_TEXT))
    chunk = chunk or b"x"
    size = draw(st.integers(1_000, 200_000))
    value = chunk * (size // len(chunk) + 1)
    if draw(BOOL):  # folded every so often, as a well-behaved client would
        value = b"\r\n ".join(value[i : i + 998] for i in range(0, len(value), 998))
    return value[:size]


HUGE_VALUE = _huge_value()


@st.composite
def _message_id(draw: DrawFn) -> bytes:
    """A unique Message-ID (the SERIAL token), or one made of garbage around it.

    The token is always the first bracketed one in the field, whatever bare CR, LF
    or continuation line joins the next field to it: maild takes the first <...>
    as the id (an id without brackets is in KNOWN_BUGS instead).
    """
    garbage = draw(HOSTILE)[:40]
    for special in (b"<", b">", b"\r", b"\n"):  # so the token stays in the field and first
        garbage = garbage.replace(special, b"")
    return draw(
        st.sampled_from(
            [
                b"<" + SERIAL + b"@customer.example>",
                b"  <" + SERIAL + b"@customer.example>  (comment)",
                b"<" + SERIAL + b">",
                b"<" + SERIAL + b"@" + garbage + b">",
                garbage + b"<" + SERIAL + b"@after-garbage.example>",
                b"<" + SERIAL + b"@x.example> <second@x.example>",
            ]
        )
    )


MESSAGE_ID = _message_id()


@st.composite
def _thread_ids(draw: DrawFn) -> bytes:
    """In-Reply-To/References: ids that may or may not exist, folded, comma-separated."""
    ids = draw(
        st.lists(
            st.one_of(
                st.integers(0, 50).map(b"<%d@customer.example>".__mod__),
                st.sampled_from(
                    [b"<>", b"<<>>", b"<unterminated@x", b"bare@x.example", b"<a (c)>"]
                ),
                HOSTILE,
            ),
            max_size=4,
        )
    )
    ids *= draw(st.sampled_from([1, 1, 1, 50]))
    return draw(st.sampled_from([b" ", b",", b"\r\n ", b""])).join(ids)


THREAD_IDS = _thread_ids()
CTE = st.sampled_from(CTE_VALUES)


def encoded_body(draw: DrawFn, payload: bytes) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding value, body): encoded as declared, or broken."""
    cte = draw(CTE)
    low = cte.lower()
    if low.startswith(b"base64"):
        body = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    elif low == b"quoted-printable":
        body = binascii.b2a_qp(payload).replace(b"\n", b"\r\n")
    else:
        body = payload
    if draw(ONE_IN_3):
        body = mutate(draw, body)
    return cte, body


def charset_param(draw: DrawFn) -> tuple[bytes, str]:
    """(the charset parameter, the codec the text is really in): right, wrong, bogus or none."""
    codec = draw(CODEC)
    how = draw(st.integers(0, 4))
    if how == 0:
        return b"; charset=" + codec.encode(), codec
    if how == 1:
        return b'; charset="' + codec.encode() + b'"', codec
    if how == 2:
        return b"; charset=" + draw(CODEC).encode(), codec
    if how == 3:
        return b"; charset=" + draw(st.sampled_from(BOGUS_CHARSETS)), codec
    return b"", codec


HTML_NASTIES = [
    b"<script>alert(document.cookie)</script>",
    b"<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    b"<img src=x onerror=alert(1)>",
    b"<style>body{display:none}</style>",
    b"<a href='javascript:alert(1)'>click</a>",
    b"<!-- unterminated comment",
    b"<![CDATA[ ]]>",
    b"<iframe src=data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==>",
    b"&#x0; &#0; &#1114112; &amp &lt;&gt; &nbsp;",
    b"<div>" * 500,
    b"<table><tr><td>" * 50,
    b"<svg><script>alert(1)</script></svg>",
    b"<pre>\tkept\n  spacing</pre>",
    b"<meta http-equiv=refresh content='0;url=http://evil.example'>",
    b"</html></body></head><p>after the end",
]
HTML = st.lists(st.sampled_from(HTML_NASTIES), max_size=6).map(_join)
FILENAMES = st.one_of(
    st.sampled_from(
        [
            b"../../etc/passwd",
            b"C:\\Windows\\evil.exe",
            b"con",
            b".htaccess",
            b"a" * 1000 + b".pdf",
            b"report\x00.pdf.exe",
            b"\xe2\x80\xaefdp.exe",
            b"",
        ]
    ),
    ENCODED_WORD,
    ENCODED_TEXT.map(lambda b: b[:40]),
)
RANDOM_CTYPE = st.one_of(
    st.sampled_from([b"foo/bar; x=y", b"text", b"/", b";;;", b"multipart", b"text/plain;"]),
    HOSTILE,
)


@st.composite
def _leaf_part(draw: DrawFn) -> bytes:
    """One non-multipart MIME entity: its header lines, a blank line, its body."""
    kind = draw(st.integers(0, 6))
    eol = draw(PART_EOL)
    lines: list[bytes] = []
    cte = b""
    if kind == 0:  # text/plain
        declared, codec = charset_param(draw)
        lines.append(b"Content-Type: text/plain" + declared + eol)
        cte, body = encoded_body(draw, _encode(draw(TEXT), codec))
    elif kind == 1:  # text/html with scripts
        declared, codec = charset_param(draw)
        lines.append(b"Content-Type: text/html" + declared + eol)
        cte, body = encoded_body(draw, draw(HTML) + _encode(draw(TEXT_SHORT), codec))
    elif kind == 2:  # an attachment: random bytes, hostile filename
        name = draw(FILENAMES)
        disposition = draw(
            st.sampled_from(
                [
                    b'attachment; filename="' + name + b'"',
                    b"attachment; filename=" + name,
                    b"attachment; filename*=utf-8''%E2%80%AE%ZZ" + name[:20],
                    b"attachment; filename*0*=utf-8''a%00; filename*1=b.txt",
                    b"inline",
                    b"attachment",
                    b"attachment; filename*=bogus'en'" + name[:20],
                ]
            )
        )
        ctype = draw(
            st.sampled_from([b"application/octet-stream", b"application/pdf", b"image/png"])
        )
        lines.append(b"Content-Type: " + ctype + b'; name="' + name + b'"' + eol)
        lines.append(b"Content-Disposition: " + disposition + eol)
        cte, body = encoded_body(draw, draw(st.binary(max_size=2000)))
    elif kind == 3:  # a DSN's machine-readable part
        lines.append(b"Content-Type: message/delivery-status" + eol)
        body = eol.join(
            [
                b"Reporting-MTA: dns; mx.customer.example",
                b"",
                b"Final-Recipient: rfc822; " + draw(ADDRESS),
                b"Action: " + draw(st.sampled_from([b"failed", b"delayed", b"", b"\xff"])),
                b"Status: " + draw(st.sampled_from([b"5.1.1", b"4.4.7", b"9.9.9", b"", b"5.\x00"])),
                b"",
            ]
        )
        cte = draw(st.sampled_from([b"", b"7bit", b"base64"]))
    elif kind == 4:  # the headers of a returned message
        lines.append(b"Content-Type: text/rfc822-headers" + eol)
        body = b"".join(draw(st.lists(HEADER_LINE, max_size=4)))
    elif kind == 5:  # an unknown or malformed content type around random bytes
        lines.append(b"Content-Type: " + draw(RANDOM_CTYPE) + eol)
        cte, body = encoded_body(draw, draw(st.binary(max_size=1000)))
    else:  # no header lines at all: the default text/plain
        return eol + draw(st.one_of(ENCODED_TEXT, st.binary(max_size=300)))
    if cte:
        lines.append(b"Content-Transfer-Encoding: " + cte + eol)
    return b"".join(lines) + eol + body


LEAF = _leaf_part()
SUBTYPES = [
    b"mixed",
    b"alternative",
    b"related",
    b"report; report-type=delivery-status",
    b"digest",
    b'signed; protocol="application/pgp-signature"',
    b"x-unknown",
    b"MIXED",
]
BOUNDARY = st.one_of(
    st.sampled_from([b"b1", b"=_Part_0_1.2", b"----=_NextPart_000", b"a b", b"x" * 200]),
    st.text("abcdefXYZ0123456789'()+_,-./:=?", min_size=1, max_size=70).map(_utf8),
    HOSTILE,
)


def multipart(draw: DrawFn, children: list[bytes]) -> bytes:
    """A multipart entity around `children`, its boundary declared and closed well or badly."""
    subtype = draw(st.sampled_from(SUBTYPES))
    boundary = draw(BOUNDARY)
    declared = draw(
        st.sampled_from(
            [
                b'; boundary="' + boundary + b'"',
                b"; boundary=" + boundary,
                b"",  # no boundary parameter at all
                b'; boundary=""',
                b"; boundary*=utf-8''" + boundary,
                b'; boundary="' + boundary + b'"; boundary="other"',
                b'; boundary="declared-but-not-used"',
            ]
        )
    )
    eol = draw(PART_EOL)
    preamble = draw(HOSTILE) if draw(BOOL) else b""
    ending = draw(
        st.sampled_from(
            [
                b"--" + boundary + b"--" + eol,
                b"--" + boundary + b"--" + eol,
                b"",  # missing closing boundary
                b"--" + boundary + b"-- trailing garbage" + eol + b"--" + boundary + eol,
                b"--" + boundary,  # cut short
            ]
        )
    )
    epilogue = draw(HOSTILE) if draw(BOOL) else b""
    delimiter = b"--" + boundary + eol
    body = preamble + eol + b"".join(delimiter + child + eol for child in children)
    return b"Content-Type: multipart/" + subtype + declared + eol + eol + body + ending + epilogue


def rfc822(inner: bytes, headers: bytes = b"") -> bytes:
    """A message/rfc822 entity carrying `inner` (a MIME entity) as a whole message."""
    return b"Content-Type: message/rfc822\r\n\r\n" + headers + inner


def _extend(children: SearchStrategy[bytes]) -> SearchStrategy[bytes]:
    @st.composite
    def _multipart(draw: DrawFn) -> bytes:
        return multipart(draw, draw(st.lists(children, max_size=5)))

    @st.composite
    def _enclosed(draw: DrawFn) -> bytes:
        return rfc822(draw(children), b"".join(draw(st.lists(HEADER_LINE, max_size=3))))

    return st.one_of(_multipart(), _enclosed())


# Random MIME shapes: multiparts of multiparts and enclosed messages.
MIME_TREE = st.recursive(LEAF, _extend, max_leaves=10)


@st.composite
def _deep_tree(draw: DrawFn) -> bytes:
    """A leaf nested up to 60 levels deep in multiparts and/or message/rfc822."""
    entity = draw(LEAF)
    depth = draw(st.integers(1, 60))
    style = draw(st.sampled_from(["multipart", "rfc822", "alternating"]))
    same_boundary = draw(BOOL)  # one boundary at every level: the nastiest
    unclosed = draw(st.integers(0, 3))  # every n-th level lacks its closing boundary
    for level in range(depth):
        if style == "rfc822" or (style == "alternating" and level % 2):
            entity = rfc822(entity)
            continue
        boundary = b"deep" if same_boundary else b"deep-%d" % level
        closing = b"" if unclosed and level % (unclosed + 1) == 0 else b"--" + boundary + b"--\r\n"
        entity = (
            b'Content-Type: multipart/mixed; boundary="'
            + boundary
            + b'"\r\n\r\n--'
            + boundary
            + b"\r\n"
            + entity
            + b"\r\n"
            + closing
        )
    return entity


@st.composite
def _wide_tree(draw: DrawFn) -> bytes:
    """A multipart of up to 400 parts (a few drawn leaves, repeated); hundreds now and then."""
    leaves = draw(st.lists(LEAF, min_size=1, max_size=3))
    count = draw(st.integers(100, 400) if draw(ONE_IN_5) else st.integers(0, 30))
    return multipart(draw, [leaves[i % len(leaves)] for i in range(count)])


DOT_LINES = st.lists(
    st.sampled_from(
        [
            b".",
            b"..",
            b".hidden",
            b"From alice@customer.example Mon Jan  1 00:00:00 2024",
            b">From quoted",
            b"",
            b"-- ",
            b"\x00\x00",
            b"\r",
            b"line\rwith\rbare\rcr",
            b"line\nwith\nbare\nlf",
            b"\n.\n",
            b"\r.\r",
            b"\n.\r",
        ]
    ),
    max_size=30,
).map(b"\r\n".join)
# No MIME structure: random binary, 8-bit text, dot lines, one long line, or nothing.
RAW_BODY = st.tuples(
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]),  # the blank line, or none
    st.one_of(
        st.binary(max_size=4000),
        ENCODED_TEXT,
        DOT_LINES,
        st.integers(1_000, 150_000).map(b"y".__mul__),
        st.just(b""),
    ),
).map(_join)
# The message's content: its MIME header lines, a blank line, its body.
ENTITY = st.one_of(LEAF, MIME_TREE, _deep_tree(), _wide_tree(), RAW_BODY)
ESSENTIALS: list[tuple[bytes, SearchStrategy[bytes]]] = [
    (b"From", ADDRESS),
    (b"To", st.one_of(st.sampled_from([d.encode() for d in DESKS]), ADDRESS)),
    (b"Subject", HEADER_VALUE),
    (b"Message-ID", MESSAGE_ID),
    (b"Date", st.one_of(st.sampled_from(DATE_VALUES), HEADER_VALUE)),
    (b"MIME-Version", st.sampled_from([b"1.0", b"1.0 (produced by fuzz)", b"2.0", b""])),
]
COPIES = st.sampled_from([0, 1, 1, 1, 1, 2])  # missing, once, or repeated


@st.composite
def hostile_message(draw: DrawFn) -> bytes:
    """A whole message: hostile top-level header lines followed by a hostile entity."""
    lines: list[bytes] = []
    for name, values in ESSENTIALS:
        for _ in range(draw(COPIES)):
            lines.append(header_line(draw, name, draw(values)))
    if not any(SERIAL in line for line in lines):
        # No Message-ID: maild makes one from the raw bytes' hash, so the bytes must differ
        # from every other example's, or this would be an unintended duplicate.
        lines.append(
            b"Received: from fuzz.client.example by mx.test.invalid id " + SERIAL + b"\r\n"
        )
    if draw(BOOL):
        name = draw(st.sampled_from([b"In-Reply-To", b"References"]))
        lines.append(header_line(draw, name, draw(THREAD_IDS)))
    lines += draw(st.lists(HEADER_LINE, max_size=4))
    if draw(ONE_IN_10) and lines:  # one line repeated up to 300 times
        lines += [draw(st.sampled_from(lines))] * draw(st.integers(2, 300))
    if draw(ONE_IN_15):
        name = draw(st.sampled_from([b"Subject", b"From", b"References", b"X-Huge"]))
        lines.append(name + b": " + draw(HUGE_VALUE) + b"\r\n")
    if len(lines) > 1 and draw(BOOL):
        lines = draw(st.permutations(lines))
    mbox = b"From alice@customer.example Mon Jan  1 00:00:00 2024\r\n"
    prefix = draw(st.sampled_from([b"", b"", b"", mbox]))
    return prefix + b"".join(lines) + draw(ENTITY)


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    params: list[str]
    rcpts: list[str]


LOCAL_PART = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789+_-", min_size=1, max_size=10),
    min_size=1,
    max_size=3,
).map(".".join)
RCPTS = st.lists(
    st.sampled_from(sorted(DESKS_ANY_CASE)), min_size=1, max_size=3, unique_by=str.lower
)


@st.composite
def envelope(draw: DrawFn) -> Envelope:
    """MAIL FROM a plausible address or <>, RCPT TO one to three desks (maybe one refused)."""
    how = draw(st.integers(0, 4))
    domain = draw(
        st.sampled_from(["customer.example", "mx.customer.example", "b\u00fccher.example"])
    )
    sender = [
        "",
        f"{draw(LOCAL_PART)}@{domain}",
        f"j\u00fcrgen.{draw(LOCAL_PART)}@{domain}",
        "MAILER-DAEMON@mx.example",
        "bounce+x=y@customer.example",
    ][how]
    params: list[str] = []
    if not sender.isascii() or draw(BOOL):
        params.append("SMTPUTF8")
    if draw(BOOL):
        params.append(draw(st.sampled_from(["BODY=8BITMIME", "BODY=7BIT"])))
    rcpts = draw(RCPTS)
    if draw(ONE_IN_10):
        rcpts.insert(draw(st.integers(0, len(rcpts))), "nobody@altis-dxp.com")
    return Envelope(sender, params, rcpts)


@dataclass
class Harness:
    """Delivers examples over a few persistent connections; remembers what got 250."""

    port: int
    slots: int = 3
    clients: dict[int, RawSMTP] = field(default_factory=dict)
    accepted: Counter[str] = field(default_factory=Counter)
    serial: int = 0
    resent: int = 0
    largest: int = 0
    # Why maild answered its latest 451, from its log: (reason, error), or None.
    why_deferred: Callable[[], tuple[str, str] | None] = lambda: None
    deferred: Counter[str] = field(default_factory=Counter)  # retried 451s, by reason

    def deliver(
        self, slot: int, env: Envelope, content: bytes, reconnect: bool, again: bool = False
    ) -> bytes:
        """Send one example; `again` sends the previous one's bytes (same serial) once more."""
        self.serial += not again
        self.resent += again
        content = content.replace(SERIAL, b"fuzz.%d.%d" % (os.getpid(), self.serial))
        for attempt in range(1, 4):
            try:
                try:
                    stored = self._deliver(slot, reconnect, env, content)
                except Closing:  # an abuse limit we did not foresee; once more, a new connection
                    stored = self._deliver(slot, True, env, content)
                break
            except Deferred as exc:
                # A 451 is right when the database stalls past [database] busy_timeout (a
                # checkpoint's fsync on a loaded CI machine): the sender retries, as here.
                # Any other reason is a failure the message's content may have caused.
                reason, error = self.why_deferred() or ("unknown", "no log line says why")
                # PostgreSQL's lock_timeout is busy_timeout too: whichever ends the wait first
                stalled = reason == "store_timeout" or "LockNotAvailable" in error
                if not stalled or attempt == 3:
                    raise AssertionError(
                        f"end of DATA answered {exc} ({reason}: {error}), attempt {attempt}"
                    ) from None
                self.deferred[reason] += 1
                time.sleep(1.0)
        self.accepted[sha256(stored)] += 1
        self.largest = max(self.largest, len(stored))
        return stored

    def _deliver(self, slot: int, reconnect: bool, env: Envelope, content: bytes) -> bytes:
        client = self._client(slot, reconnect)
        try:
            return client.deliver(env.mail_from, env.params, env.rcpts, content)
        except BaseException:  # the connection's state is unknown: never use it again
            self.clients.pop(slot, None)
            client.close(polite=False)
            raise

    def _client(self, slot: int, reconnect: bool) -> RawSMTP:
        """The slot's connection; a new one when asked, or before maild's error budget runs out."""
        client = self.clients.pop(slot, None)
        if client is not None and (reconnect or client.errors >= 5):
            client.close()
            client = None
        if client is None:
            client = RawSMTP(self.port)
        self.clients[slot] = client
        return client

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()


# --- tests ---------------------------------------------------------------------------

# A line holding only a dot, delimited by CRLF, LF or CR on both sides: the end of the
# data for the most lenient reader there is.
_LONE_DOT = re.compile(rb"(?:^|(?<=[\r\n]))\.(?=[\r\n])")


def aiosmtpd_reads(wire: bytes) -> tuple[bytes, bytes]:
    """(content, bytes left over) as aiosmtpd 1.4.6's smtp_DATA reads `wire`."""
    lines: list[bytes] = []
    rest = wire
    while rest:
        line, sep, rest = rest.partition(b"\r\n")
        if line == b"." and sep:
            return b"".join(lines), rest
        lines.append((line[1:] if line.startswith(b".") else line) + sep)
    raise AssertionError("no end of data")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=20), SPECIAL, st.sampled_from([b".", b".."]))))
def test_wire_data_has_one_end_of_data_for_every_reading(chunks: list[bytes]) -> None:
    """The stuffed data reads back as the stored bytes and has one lone dot: at its end."""
    wire, stored = wire_data(b"".join(chunks))
    assert aiosmtpd_reads(wire) == (stored, b"")
    assert [m.start() for m in _LONE_DOT.finditer(wire)] == [len(wire) - 3]


def why_deferred(daemon: Daemon) -> tuple[str, str] | None:
    """The reason and error of maild's latest "answered 451", from its log."""
    for event in reversed(daemon.events()):
        if event.get("event") == "message not stored; answered 451":
            return str(event.get("reason", "internal_error")), str(event.get("error", ""))
    return None


@pytest.mark.slow
def test_fuzz_hostile_mail_is_accepted_and_stored(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Generated hostile messages all get 250, maild keeps answering, and all end stored."""
    config = make_config()
    # The suite's 2 s budget for a write (so that the hang tests end quickly) is tighter
    # than production's 5 s; a stall of the CI machine's disk must not read as a failure.
    text = config.read_text()
    assert text.count('busy_timeout = "2s"') == 1
    config.write_text(text.replace('busy_timeout = "2s"', 'busy_timeout = "10s"'))
    started = time.monotonic()
    # `maild serve` in its own process: a crash is an exit, its log a file, and the
    # generator here does not share a GIL with the daemon it is fuzzing.
    with Daemon(config, tmp_path / "maild.log") as daemon:
        database = Database(load_settings(config).database.url)
        harness = Harness(daemon.smtp_port, why_deferred=partial(why_deferred, daemon))

        @settings(settings.get_profile(FUZZ_PROFILE))
        @given(
            env=envelope(),
            content=hostile_message(),
            slot=st.integers(0, harness.slots - 1),
            reconnect=ONE_IN_20,
            resend=ONE_IN_30,
        )
        def deliver(
            env: Envelope, content: bytes, slot: int, reconnect: bool, resend: bool
        ) -> None:
            harness.deliver(slot, env, content, reconnect)
            if resend:  # the same bytes again on another connection, as an MTA retry: a duplicate
                harness.deliver((slot + 1) % harness.slots, env, content, False, again=True)

        try:
            try:
                deliver()
            finally:
                harness.close()
            sent = time.monotonic()
            # every message was under the size limit, so even a 552 would have been a failure
            assert harness.largest < load_settings(config).smtp.max_message_size
            assert daemon.process is not None
            assert daemon.process.poll() is None, "maild exited"
            assert_answers(daemon.smtp_port)
            statuses = assert_all_stored(database, harness.accepted)
            # A 451 for a commit that ran out of time may still have stored the message (the
            # spool's docstring): its retry is then a duplicate, as the MTA's would be.
            retried = sum(harness.deferred.values())
            assert statuses["duplicate"] <= harness.resent + retried, (
                "a Message-ID was reused by accident"
            )
            assert_answers(daemon.smtp_port)
            aside = Counter(
                (status, error.split("\n")[0][:200]) for status, error in set_aside(database)
            )
            assert daemon.terminate() == 0, "maild did not stop cleanly"
        except BaseException as exc:
            errors = daemon_errors(daemon.events())
            exc.add_note("maild's errors:\n" + ("\n".join(errors[-20:]) or "none"))
            if daemon.process is not None and daemon.process.poll() is not None:
                exit_code = daemon.process.returncode
                exc.add_note(f"maild exited {exit_code}; its log ends:\n{daemon.text()[-4000:]}")
            raise
        finally:
            database.close()
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.terminate()  # SIGTERM: its parse workers go with it (SIGKILL leaves them)
    errors = [e for e in daemon_errors(daemon.events()) if "failed processing" not in e]
    print(
        f"\nfuzz: {sum(harness.accepted.values())} messages accepted in {sent - started:.1f} s "
        f"({harness.resent} of them sent twice; 451s retried: {dict(harness.deferred) or 0}), "
        "all stored "
        f"{time.monotonic() - started:.1f} s after the start; statuses {dict(statuses)}",
        *(f"  {n} x {status}: {error}" for (status, error), n in aside.most_common()),
        f"maild's other errors: {len(errors)}",
        *errors[:10],
        sep="\n",
    )


@dataclass(frozen=True)
class Case:
    """A fixed hostile message and its envelope."""

    content: bytes
    mail_from: str = "alice@customer.example"
    rcpts: tuple[str, ...] = ("support@altis-dxp.com",)
    params: tuple[str, ...] = ()
    copies: int = 1  # sent this many times: all but the first are duplicates
    filed: bool = False  # must become a ticket message, not merely be failed with a reason
    more: tuple[bytes, ...] = ()  # further, different messages, sent after the copies
    bug: str = ""  # a known maild bug makes this case fail: the strict-xfail reason
    bug_on: tuple[str, ...] = ("sqlite", "postgresql")  # the databases it fails on


def _headers(*lines: bytes, eol: bytes = b"\r\n") -> bytes:
    return b"".join(line + eol for line in lines)


BASIC = _headers(
    b"From: Alice <alice@customer.example>",
    b"To: support@altis-dxp.com",
    b"Subject: fixed case",
)


def _nested(depth: int, boundary: bytes = b"same") -> bytes:
    entity = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for _ in range(depth):
        entity = (
            b'Content-Type: multipart/mixed; boundary="'
            + boundary
            + b'"\r\n\r\n--'
            + boundary
            + b"\r\n"
            + entity
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
    return entity


CASES: dict[str, Case] = {
    "bare-lf-header-injection": Case(
        b"From: alice@customer.example\nTo: support@altis-dxp.com\n"
        b"Subject: hello\nBcc: victim@elsewhere.example\nX-Priority: 1\r\n"
        b"Message-ID: <fixed-1@customer.example>\n\nbody with bare LF\nline two\n"
    ),
    "bare-cr-nul-and-controls": Case(
        BASIC.replace(b"fixed case", b"nul\x00in\rthe\x1b[31msubject\x7f")
        + b"Message-ID: <fixed-2\x00@customer.example>\r\n"
        + b"X-Weird: a\rb\r\x00c\r\n\r\nbody\x00with\rnul and bare CR\r\n"
    ),
    "eight-bit-headers-in-many-charsets": Case(
        b"From: " + "Дмитрий".encode("koi8-r") + b" <dmitry@customer.example>\r\n"
        b"To: support@altis-dxp.com\r\nSubject: "
        + "障害が発生しました".encode("shift_jis")
        + b"\r\nX-Jis: "
        + "日本語".encode("iso-2022-jp")
        + b"\r\nX-Utf16: "
        + "hi".encode("utf-16")
        + b"\r\nMessage-ID: <fixed-3@customer.example>\r\n\r\n"
        + "网站很慢".encode("gb2312")
        + b"\r\n",
        params=("BODY=8BITMIME",),
    ),
    "bogus-encoded-words": Case(
        b"From: =?utf-8?B?LCwsPGV2aWxAeC5leGFtcGxlPg==?= <alice@customer.example>\r\n"
        b"To: support@altis-dxp.com\r\nSubject: =?x-unknown?B?SGVsbG8=?= =?utf-8?B?!!!?= "
        b"=?utf-8?Q?=ZZ=?= =?utf-8\x00?B?aGk=?= =?iso-2022-jp?B?GyRC?= =?utf-16?B?2D0=?= "
        b"=?utf-8*en?Q?half\r\nMessage-ID: <fixed-4@customer.example>\r\n\r\nbody\r\n"
    ),
    "enormous-header-values": Case(
        BASIC.replace(b"fixed case", b"x" * 200_000)
        + b"References: "
        + b"\r\n ".join(b"<%d@customer.example>" % i for i in range(5000))
        + b"\r\nMessage-ID: <fixed-5@customer.example>\r\n\r\nbody\r\n"
    ),
    "repeated-headers": Case(
        b"".join(b"From: a%d@customer.example\r\n" % i for i in range(200))
        + b"".join(b"Message-ID: <fixed-6.%d@customer.example>\r\n" % i for i in range(100))
        + b"".join(b"Received: from hop%d by hop%d\r\n" % (i, i + 1) for i in range(300))
        + b"To: support@altis-dxp.com\r\nSubject: many\r\nSubject: more\r\n\r\nbody\r\n"
    ),
    "no-from-no-message-id-no-subject": Case(b"\r\njust a body, no header at all\r\n", ""),
    "garbage-addresses": Case(
        b'From: <<<@@@>>>\r\nTo: ,,,;;;\r\nCc: "unterminated <a@b.example\r\n'
        b"Reply-To: group: a@b.example, c@d.example;\r\nSender: a@b@c\r\n"
        b"Return-Path: <>\r\nSubject: garbage\r\nMessage-ID: <fixed-8@customer.example>\r\n\r\n"
        b"body\r\n"
    ),
    "multipart-without-boundary": Case(
        BASIC + b"Message-ID: <fixed-9@customer.example>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n"
        b"part\r\n--x--\r\n"
    ),
    "multipart-missing-closing-boundary": Case(
        BASIC + b"Message-ID: <fixed-10@customer.example>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n--b1\r\n'
        b"Content-Type: text/plain\r\n\r\nplain\r\n--b1\r\nContent-Type: text/html\r\n\r\n"
        b"<p>html, never closed"
    ),
    "nested-sixty-deep": Case(BASIC + b"Message-ID: <fixed-11@customer.example>\r\n" + _nested(60)),
    "three-hundred-parts": Case(
        BASIC + b"Message-ID: <fixed-12@customer.example>\r\n"
        b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n'
        + b"".join(
            b'--p\r\nContent-Type: application/octet-stream; name="f%d.bin"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\nAAEC%03d\r\n" % (i, i)
            for i in range(300)
        )
        + b"--p--\r\n"
    ),
    "broken-base64-and-quoted-printable": Case(
        BASIC + b"Message-ID: <fixed-13@customer.example>\r\n"
        b'Content-Type: multipart/mixed; boundary="q"\r\n\r\n'
        b"--q\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\nSGVsbG8!!!===garbage=\r\nS\r\n"
        b"--q\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=4 caf=C3=A9 =\r\n"
        b'--q\r\nContent-Type: application/pdf; name="x.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLj\r\n--q--\r\n"
    ),
    "html-with-scripts": Case(
        BASIC + b"Message-ID: <fixed-14@customer.example>\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><head><script>alert(document.cookie)</script><style>p{}</style></head>"
        b"<body><img src=x onerror=alert(1)><a href='javascript:alert(1)'>x</a>"
        + b"<div>" * 2000
        + b"<!-- unterminated\r\n"
    ),
    "bounce-report-with-rfc822": Case(
        b"From: Mail Delivery System <MAILER-DAEMON@mx.customer.example>\r\n"
        b"To: support@altis-dxp.com\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        b"Message-ID: <fixed-15@mx.customer.example>\r\nAuto-Submitted: auto-replied\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n\r\n"
        b"--r\r\nContent-Type: text/plain\r\n\r\nI'm sorry.\r\n"
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.customer.example\r\n\r\nFinal-Recipient: rfc822; \x00@\xff\r\n"
        b"Action: failed\r\nStatus: 9.9.9\r\n\r\n"
        b"--r\r\nContent-Type: message/rfc822\r\n\r\n" + _nested(5) + b"\r\n--r--\r\n",
        "",
        ("sysops@altis-dxp.com",),
    ),
    "random-binary": Case(bytes(range(256)) * 40, "", ("hosting@humanmade.com",)),
    "dot-lines-and-mbox-from": Case(
        BASIC + b"Message-ID: <fixed-17@customer.example>\r\n\r\n"
        b".\r\n..\r\n.hidden\r\nFrom alice Mon Jan  1\r\n\n.\n\r.\r\n.\r\nend"
    ),
    "duplicate-delivery": Case(
        BASIC + b"Message-ID: <fixed-18@customer.example>\r\n\r\ntwice\r\n", copies=2
    ),
}


# Found by the fuzz test, fixed in maild; kept as regressions. KNOWN_BUGS holds any
# new finding as a strict xfail (on the databases where it fails) until it is fixed.
FOUND: dict[str, Case] = {
    "far-future-date-in-the-fallback-parse": Case(
        # mail-parser raises TypeError on an enclosed multipart with boundary="", so the
        # fallback parse runs; its Date (email.utils, no range check) is 9999-12-31
        # 23:59:59 -23:59, past datetime.max in UTC, and storing the message raises
        # OverflowError: the delivery ends `failed`, no ticket, and reprocessing fails too.
        b"From: alice@customer.example\r\nTo: support@altis-dxp.com\r\n"
        b"Message-ID: <fixed-19@customer.example>\r\n"
        b"Date: Fri, 31 Dec 9999 23:59:59 -2359\r\nContent-Type: message/rfc822\r\n\r\n"
        b'Content-Type: multipart/mixed; boundary=""\r\n\r\n',
        filed=True,
    ),
    "unbracketed-message-ids-taken-for-duplicates": Case(
        # Two different messages whose Message-IDs lack angle brackets, each followed by
        # a bare CR and a bracketed address. The bare CR is kept inside the field (the
        # header-injection repair), and the id becomes the first <...> in it: the
        # support address. The second message is filed as a duplicate of the first, so
        # its words never reach a ticket. `Message-ID: a@x (<y@z>)` does the same.
        b"From: alice@customer.example\r\nMessage-ID: first@customer.example\r"
        b"To: <support@altis-dxp.com>\r\nSubject: one\r\n\r\nfirst message\r\n",
        filed=True,
        more=(
            b"From: alice@customer.example\r\nMessage-ID: second@customer.example\r"
            b"To: <support@altis-dxp.com>\r\nSubject: two\r\n\r\nsecond message\r\n",
        ),
    ),
    "address-longer-than-320-characters": Case(
        # SQLite ignores VARCHAR lengths; PostgreSQL refuses the 417-character sender in
        # ticket.requester_email (and participant.email, message.from_email): failed.
        b"From: " + b"a" * 400 + b"@customer.example\r\nTo: support@altis-dxp.com\r\n"
        b"Subject: long address\r\nMessage-ID: <fixed-21@customer.example>\r\n\r\nbody\r\n",
        filed=True,
    ),
}


KNOWN_BUGS: dict[str, Case] = {}


@pytest.mark.parametrize("name", [*CASES, *FOUND, *KNOWN_BUGS])
def test_fixed_hostile_message_is_accepted_and_stored(
    maild: RunningMaild, name: str, request: pytest.FixtureRequest
) -> None:
    """Each fixed hostile message gets 250, maild keeps answering, and it ends stored."""
    case = {**CASES, **FOUND, **KNOWN_BUGS}[name]
    backend = maild.service.database.write_engine.dialect.name
    if case.bug and backend in case.bug_on:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.bug))
    client = RawSMTP(maild.smtp_port)
    accepted: Counter[str] = Counter()
    try:
        for content in [case.content] * case.copies + list(case.more):
            stored = client.deliver(case.mail_from, list(case.params), list(case.rcpts), content)
            accepted[sha256(stored)] += 1
    finally:
        client.close()
    assert maild.thread.is_alive()
    assert all(listener.serving for listener in maild.service.listeners)
    assert_answers(maild.smtp_port)
    statuses = assert_all_stored(maild.service.database, accepted, timeout=60)
    assert statuses["duplicate"] == case.copies - 1
    if case.filed:
        assert set_aside(maild.service.database) == []


def slow_message() -> bytes:
    """40 MiB of HTML paragraphs: about 4 s of CPU to parse, well past a 1 s parse_timeout.

    The fuzz first found this with From fields that opened an address group
    (`From: g:<<<...` repeated), which email.utils.getaddresses parsed in
    quadratic time (87 s for 320 KB); maild now reads each field on its own
    within a budget, so a message merely large stands in for "slow" here.
    """
    html = b"<p>slow words here</p>\r\n" * 1_800_000
    return (
        b"From: alice@customer.example\r\nTo: support@altis-dxp.com\r\n"
        b"Content-Type: text/html\r\n\r\n" + html
    )


@pytest.mark.slow
def test_one_slow_message_does_not_fail_the_rest_of_its_batch(
    make_config: Callable[..., Path],
) -> None:
    """Small messages claimed in one batch with a message that times out are filed."""
    settings = load_settings(make_config())
    processing = settings.processing.model_copy(update={"parse_timeout": 1.0, "workers": 1})
    settings = settings.model_copy(update={"processing": processing})
    database = Database(settings.database.url)
    database.create_schema()
    raws = [slow_message()] + [
        BASIC + b"Message-ID: <batch-%d@customer.example>\r\n\r\nsmall\r\n" % i for i in range(3)
    ]
    deliveries = [
        Delivery("smtp", "alice@customer.example", ["support@altis-dxp.com"], raw) for raw in raws
    ]
    # Spooled before maild starts, so that its processor claims all four in one batch,
    # as it does under load (the fuzz saw 53 messages fail behind one).
    slow, *small = database.run_write(lambda s: insert_deliveries(s, deliveries))
    database.close()
    with RunningMaild(settings) as maild:
        maild.settle(60)
        rows = maild.service.database.run_read(
            lambda s: s.exec(select(Inbound.id, Inbound.status, Inbound.error)).all()
        )
    statuses = {row_id: (status, error) for row_id, status, error in rows}
    assert statuses[slow][0] == "failed"
    assert [statuses[i] for i in small] == [("processed", None)] * 3
