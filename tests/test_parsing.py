"""Raw bytes to ParsedMessage: charsets, addresses, bodies, attachments, ids, broken input."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maild.addresses import Address
from maild.htmltext import html_to_text
from maild.parsing import (
    ParsedMessage,
    clean_text,
    extract_ids,
    normalize_message_id,
    parse_message,
    safe_filename,
    synthesized_message_id,
)


def raw_message(*headers: str, body: str = "Hello.\r\n") -> bytes:
    """Headers and a body joined with CRLF, as they arrive on the wire."""
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("utf-8")


def encoded_word(charset: str, text: str) -> str:
    """An RFC 2047 B-encoded word, built by hand."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode('ascii')}?="


def multipart(subtype: str, *parts: str, boundary: str = "BOUNDARY") -> str:
    """A multipart body (header lines included) from already formatted parts."""
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts)
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n{body}--{boundary}--\r\n'
    )


def with_body(headers: list[str], mime: str) -> bytes:
    """A message whose MIME headers and body come from `mime` (see multipart())."""
    return ("\r\n".join([*headers, "MIME-Version: 1.0"]) + "\r\n" + mime).encode("utf-8")


def strings(value: object) -> Iterator[str]:
    """Every str inside a ParsedMessage, however deeply nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from strings(getattr(value, item.name))


def assert_storable(parsed: ParsedMessage) -> None:
    """Every text field of `parsed` is UTF-8-encodable and free of NUL."""
    texts = list(strings(parsed))
    assert parsed.subject in texts  # the walk does reach the fields
    for text in texts:
        assert "\x00" not in text
        text.encode("utf-8")
        assert text == clean_text(text)


# RFC 2047 subjects and display names

CHARSET_CASES = [
    pytest.param(encoded_word("utf-8", "Grüße aus Köln ✓"), "Grüße aus Köln ✓", id="utf-8"),
    pytest.param("=?iso-8859-1?Q?Caf=E9_d=E9j=E0_vu?=", "Café déjà vu", id="iso-8859-1"),
    pytest.param(
        "=?windows-1252?Q?=93Quoted=94_=80_5_=96_ok?=", "“Quoted” € 5 – ok", id="windows-1252"
    ),
    pytest.param(
        encoded_word("ISO-2022-JP", "日本語の件名です"), "日本語の件名です", id="iso-2022-jp"
    ),
    pytest.param(encoded_word("GB2312", "中文主题测试"), "中文主题测试", id="gb2312"),
]


@pytest.mark.parametrize(("encoded", "expected"), CHARSET_CASES)
def test_encoded_subject_decodes(encoded: str, expected: str) -> None:
    """An RFC 2047 encoded Subject decodes to the right Unicode in each common charset."""
    parsed = parse_message(raw_message(f"Subject: {encoded}", "Message-ID: <a@x.example>"))
    assert expected == parsed.subject


@pytest.mark.parametrize(("encoded", "expected"), CHARSET_CASES)
def test_encoded_display_name_decodes(encoded: str, expected: str) -> None:
    """An RFC 2047 encoded From display name decodes to the right Unicode in each charset."""
    parsed = parse_message(raw_message(f"From: {encoded} <Sender@Example.COM>", "Subject: x"))
    assert Address(name=expected, email="sender@example.com") == parsed.from_


def test_mixed_plain_and_encoded_words_in_one_subject() -> None:
    """Plain words around encoded ones stay; space between adjacent encoded words is dropped."""
    subject = (
        f"Re: {encoded_word('ISO-2022-JP', '日本語')} {encoded_word('GB2312', '中文')} "
        "and =?utf-8?q?caf=C3=A9?= =?utf-8?q?_au_lait?= menu"
    )
    parsed = parse_message(raw_message(f"Subject: {subject}"))
    assert parsed.subject == "Re: 日本語中文 and café au lait menu"


def test_folded_subject_is_one_line() -> None:
    """A Subject folded over several lines becomes one line."""
    parsed = parse_message(raw_message("Subject: first part\r\n  second part\r\n\tthird"))
    assert parsed.subject == "first part second part third"


def test_utf8_8bit_headers_decode() -> None:
    """Raw UTF-8 in headers (SMTPUTF8 senders) decodes to the same text."""
    parsed = parse_message(raw_message("Subject: Zürich café", "From: Jürgen <j@example.de>"))
    assert parsed.subject == "Zürich café"
    assert Address(name="Jürgen", email="j@example.de") == parsed.from_


LATIN1_HEADERS = b"Subject: caf\xe9 au lait\r\nFrom: J\xfcrgen M\xfcller <j@x.de>\r\n\r\nbody\r\n"


def test_latin1_8bit_subject_keeps_its_text() -> None:
    """An undeclared latin-1 byte in Subject is replaced or decoded, never silently dropped."""
    parsed = parse_message(LATIN1_HEADERS)
    assert parsed.subject in {"caf\ufffd au lait", "café au lait"}


def test_latin1_8bit_display_name_keeps_its_text() -> None:
    """An undeclared latin-1 byte in a display name is replaced or decoded, never escaped."""
    parsed = parse_message(LATIN1_HEADERS)
    assert parsed.from_ in {
        Address(name="J\ufffdrgen M\ufffdller", email="j@x.de"),
        Address(name="Jürgen Müller", email="j@x.de"),
    }


# Addresses


def test_from_to_cc_are_addresses_with_lower_cased_emails() -> None:
    """From, To and Cc become Address(name, email) with the email lower-cased, names kept."""
    parsed = parse_message(
        raw_message(
            "From: Alice Example <Alice@Customer.EXAMPLE>",
            "To: Support Desk <SUPPORT@altis-dxp.com>",
            'Cc: Bob <BOB@x.org>, "Carol, C." <carol@Y.org>, dave@z.org,\r\n Eve <eve@w.org>',
            "Subject: x",
        )
    )
    assert Address(name="Alice Example", email="alice@customer.example") == parsed.from_
    assert [Address(name="Support Desk", email="support@altis-dxp.com")] == parsed.to
    expected_cc = [
        Address(name="Bob", email="bob@x.org"),
        Address(name="Carol, C.", email="carol@y.org"),
        Address(name="", email="dave@z.org"),
        Address(name="Eve", email="eve@w.org"),
    ]
    assert expected_cc == parsed.cc


def test_several_to_addresses_keep_their_order() -> None:
    """A To header with several addresses gives them all, in order."""
    parsed = parse_message(raw_message("To: a@one.example, B <b@two.example>", "Subject: x"))
    expected = [Address(name="", email="a@one.example"), Address(name="B", email="b@two.example")]
    assert expected == parsed.to


def test_missing_from_is_none_and_missing_lists_are_empty() -> None:
    """Without From, To or Cc the sender is None and the lists are empty."""
    parsed = parse_message(raw_message("Subject: nobody"))
    assert parsed.from_ is None
    assert parsed.to == []
    assert parsed.cc == []


# Bodies


def test_text_body_from_text_plain() -> None:
    """A text/plain body is the message text, trimmed."""
    parsed = parse_message(
        raw_message(
            "Subject: x",
            "Content-Type: text/plain; charset=utf-8",
            body="\r\n  Hello, our site is slow. Grüße  \r\n\r\n",
        )
    )
    assert parsed.text == "Hello, our site is slow. Grüße"


def test_text_body_lines_end_with_newline_not_crlf() -> None:
    """A plain body's wire CRLF line ends become line feeds, as in HTML-only and fallback text."""
    parsed = parse_message(
        raw_message(
            "Subject: x",
            "Content-Type: text/plain; charset=utf-8",
            body="Hello,\r\n\r\nour site is slow.\r\n",
        )
    )
    assert parsed.text == "Hello,\n\nour site is slow."


def test_latin1_body_is_decoded_with_its_charset() -> None:
    """A text/plain body in iso-8859-1 quoted-printable decodes to Unicode."""
    raw = (
        b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nD=E9j=E0 vu, =A35\r\n"
    )
    assert parse_message(raw).text == "Déjà vu, £5"


def test_html_only_mail_becomes_text() -> None:
    """An HTML-only body becomes text: scripts, styles and titles dropped, blocks kept as lines."""
    html = (
        "<html><head><title>Title</title><style>p { color: red }</style></head><body>"
        "<script>alert('x')</script><p>Hello   there,</p><p>Second &amp; last</p>"
        "<ul><li>one</li><li>two</li></ul>line<br>break</body></html>"
    )
    parsed = parse_message(
        raw_message("Subject: x", "Content-Type: text/html; charset=utf-8", body=html)
    )
    assert parsed.text == "Hello there,\n\nSecond & last\n\n- one\n- two\nline\nbreak"


def test_multipart_alternative_prefers_plain() -> None:
    """In multipart/alternative the text/plain part is the text, even when HTML comes first."""
    raw = with_body(
        ["Subject: alt"],
        multipart(
            "alternative",
            "Content-Type: text/html; charset=utf-8\r\n\r\n<p>HTML version</p>",
            "Content-Type: text/plain; charset=utf-8\r\n\r\nPlain version",
        ),
    )
    assert parse_message(raw).text == "Plain version"


def test_multipart_alternative_with_only_html_uses_html() -> None:
    """When the alternative has no plain part, the HTML part is converted."""
    raw = with_body(
        ["Subject: alt"],
        multipart(
            "alternative",
            "Content-Type: text/html; charset=utf-8\r\n\r\n<div>Only</div><div>HTML</div>",
        ),
    )
    assert parse_message(raw).text == "Only\n\nHTML"


def test_html_to_text_drops_scripts_and_styles() -> None:
    """Script, style and head content never reaches the text."""
    html = (
        "<head><title>T</title><style>.a{}</style></head>"
        "<p>keep</p><script>var secret = 1;</script><noscript>no</noscript><p>this</p>"
    )
    assert html_to_text(html) == "keep\n\nthis"


def test_html_to_text_keeps_table_cells_apart() -> None:
    """Table cells are separated by tabs so their words do not run together."""
    assert html_to_text("<table><tr><td>a</td><td>b</td></tr></table>") == "a\tb"


def test_html_to_text_keeps_preformatted_indentation() -> None:
    """Whitespace inside <pre> is kept, indentation included."""
    html = "<p>Log:</p><pre>def f():\n    return 1</pre>"
    assert html_to_text(html) == "Log:\n\ndef f():\n    return 1"


def test_html_to_text_tolerates_unclosed_tags() -> None:
    """Unclosed tags still give their text."""
    assert html_to_text("<p>unclosed <b>bold") == "unclosed bold"


# Attachments

BINARY = bytes(range(256)) * 4


def attachment_part(headers: str, payload: str) -> str:
    return f"{headers}\r\n\r\n{payload}"


def test_binary_attachment_bytes_and_hash_are_exact() -> None:
    """A base64 attachment's bytes, size, sha256 and content type are exactly the sent file."""
    payload = base64.encodebytes(BINARY).decode("ascii").replace("\n", "\r\n")
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            "Content-Type: text/plain; charset=utf-8\r\n\r\nSee attached",
            attachment_part(
                'Content-Type: application/octet-stream; name="data.bin"\r\n'
                'Content-Disposition: attachment; filename="data.bin"\r\n'
                "Content-Transfer-Encoding: base64",
                payload,
            ),
        ),
    )
    parsed = parse_message(raw)
    assert parsed.text == "See attached"
    [attachment] = parsed.attachments
    assert attachment.filename == "data.bin"
    assert attachment.content_type == "application/octet-stream"
    assert attachment.data == BINARY
    assert attachment.size == 1024
    assert hashlib.sha256(BINARY).hexdigest() == attachment.sha256


def test_path_in_attachment_filename_is_dropped() -> None:
    """An attachment named ../../etc/passwd is stored as passwd."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            attachment_part(
                "Content-Type: application/octet-stream\r\n"
                'Content-Disposition: attachment; filename="../../etc/passwd"\r\n'
                "Content-Transfer-Encoding: base64",
                base64.b64encode(b"root:x:0:0").decode("ascii"),
            ),
        ),
    )
    [attachment] = parse_message(raw).attachments
    assert attachment.filename == "passwd"
    assert attachment.data == b"root:x:0:0"


def test_rfc2231_filename_decodes() -> None:
    """An RFC 2231 filename*=utf-8''... decodes to the non-ASCII name."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            attachment_part(
                "Content-Type: application/pdf\r\n"
                "Content-Disposition: attachment; "
                "filename*=utf-8''R%C3%A9sum%C3%A9%20%E6%97%A5%E6%9C%AC.pdf\r\n"
                "Content-Transfer-Encoding: base64",
                base64.b64encode(b"%PDF-1.4").decode("ascii"),
            ),
        ),
    )
    [attachment] = parse_message(raw).attachments
    assert attachment.filename == "Résumé 日本.pdf"
    assert attachment.content_type == "application/pdf"


def test_rfc2231_continued_filename_decodes() -> None:
    """An RFC 2231 filename split over filename*0* and filename*1* is joined and decoded."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            attachment_part(
                "Content-Type: application/octet-stream\r\n"
                "Content-Disposition: attachment;\r\n"
                " filename*0*=utf-8''%E6%97%A5%E6%9C%AC;\r\n"
                " filename*1*=%E8%AA%9E.txt\r\n"
                "Content-Transfer-Encoding: base64",
                "YWJj",
            ),
        ),
    )
    [attachment] = parse_message(raw).attachments
    assert attachment.filename == "日本語.txt"
    assert attachment.data == b"abc"


def test_rfc2047_encoded_filename_decodes() -> None:
    """A filename written as an RFC 2047 encoded word (Outlook style) decodes."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            attachment_part(
                "Content-Type: application/octet-stream\r\n"
                f'Content-Disposition: attachment; filename="{encoded_word("utf-8", "日本語")}"\r\n'
                "Content-Transfer-Encoding: base64",
                "YWJj",
            ),
        ),
    )
    assert [a.filename for a in parse_message(raw).attachments] == ["日本語"]


def test_quoted_printable_text_attachment_bytes_survive() -> None:
    """A quoted-printable latin-1 text attachment keeps its decoded bytes, not re-encoded."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            "Content-Type: text/plain; charset=utf-8\r\n\r\nNotes attached",
            attachment_part(
                'Content-Type: text/plain; charset=iso-8859-1; name="notes.txt"\r\n'
                'Content-Disposition: attachment; filename="notes.txt"\r\n'
                "Content-Transfer-Encoding: quoted-printable",
                "Caf=E9 line one=\r\n continued\r\ntab\there=3D end",
            ),
        ),
    )
    [attachment] = parse_message(raw).attachments
    expected = b"Caf\xe9 line one continued\r\ntab\there= end"
    assert expected == attachment.data
    assert hashlib.sha256(expected).hexdigest() == attachment.sha256
    assert attachment.content_type == "text/plain"


def test_attachment_only_mail_has_empty_text_and_the_attachment() -> None:
    """A multipart with only an attachment gives empty text and that attachment."""
    raw = with_body(
        ["Subject: scan"],
        multipart(
            "mixed",
            attachment_part(
                'Content-Type: application/pdf; name="scan.pdf"\r\n'
                'Content-Disposition: attachment; filename="scan.pdf"\r\n'
                "Content-Transfer-Encoding: base64",
                base64.b64encode(b"%PDF-1.4 scan").decode("ascii"),
            ),
        ),
    )
    parsed = parse_message(raw)
    assert parsed.text == ""
    assert [(a.filename, a.data) for a in parsed.attachments] == [("scan.pdf", b"%PDF-1.4 scan")]


def test_single_part_attachment_message() -> None:
    """A non-multipart message that is itself an attachment gives that attachment."""
    raw = (
        b'Subject: pdf\r\nContent-Type: application/pdf; name="r.pdf"\r\n'
        b'Content-Disposition: attachment; filename="r.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQ=\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == ""
    assert [(a.filename, a.data) for a in parsed.attachments] == [("r.pdf", b"%PDF-1.4")]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("a\x00b\x1f\x7fc.txt", "abc.txt"),
        ("line\r\nbreak.txt", "linebreak.txt"),
        ("C:\\Users\\x\\evil.exe", "evil.exe"),
        ("..\\..\\boot.ini", "boot.ini"),
        ("../../etc/passwd", "passwd"),
        ("...hidden", "hidden"),
        (".bashrc", "bashrc"),
        ("  spaced.txt  ", "spaced.txt"),
        ('a<b>:c"d|e?f*g.txt', "a_b__c_d_e_f_g.txt"),
        ("\u202egnp.exe", "gnp.exe"),
        ("e\u0301.txt", "é.txt"),
        ("", "attachment"),
        (None, "attachment"),
        ("   ", "attachment"),
        (".", "attachment"),
        ("..", "attachment"),
        ("dir/", "attachment"),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    """safe_filename strips folders, control characters, leading dots and shell-special marks."""
    assert expected == safe_filename(name)


def test_safe_filename_shortens_long_names_keeping_the_extension() -> None:
    """A 400-byte name is cut to at most 255 UTF-8 bytes, whole characters, extension kept."""
    name = "é" * 198 + ".pdf"  # 396 + 4 = 400 bytes
    assert len(name.encode("utf-8")) == 400
    safe = safe_filename(name)
    assert len(safe.encode("utf-8")) <= 255
    assert safe == "é" * 125 + ".pdf"


def test_safe_filename_shortens_long_names_without_extension() -> None:
    """A 400-byte name without an extension is cut to exactly 255 bytes."""
    assert safe_filename("a" * 400) == "a" * 255


def test_safe_filename_drops_an_overlong_extension_when_shortening() -> None:
    """An extension longer than 16 bytes is not kept when a long name is shortened."""
    safe = safe_filename("a" * 300 + "." + "b" * 99)
    assert safe == "a" * 255


# Message-ID, In-Reply-To, References


def test_message_id_without_angle_brackets() -> None:
    """The Message-ID is stored without angle brackets or surrounding space, case kept."""
    parsed = parse_message(raw_message("Message-ID:   <Abc.123@Example.JP>  ", "Subject: x"))
    assert parsed.message_id == "Abc.123@Example.JP"
    assert parsed.message_id_synthesized is False


def test_folded_message_id() -> None:
    """A Message-ID folded onto the next line is still found."""
    parsed = parse_message(raw_message("Message-ID:\r\n <folded@x.example>", "Subject: x"))
    assert parsed.message_id == "folded@x.example"


def test_missing_message_id_is_synthesized_from_the_bytes() -> None:
    """Without a Message-ID the id is sha256-<hex of raw>@maild.invalid, flagged synthesized."""
    raw = raw_message("Subject: no id", "From: a@b.example")
    parsed = parse_message(raw)
    assert f"sha256-{hashlib.sha256(raw).hexdigest()}@maild.invalid" == parsed.message_id
    assert synthesized_message_id(raw) == parsed.message_id
    assert parsed.message_id_synthesized is True


def test_synthesized_message_id_is_identical_for_identical_bytes() -> None:
    """The same bytes give the same synthesized id; different bytes a different one."""
    raw = raw_message("Subject: no id")
    assert parse_message(raw).message_id == parse_message(bytes(raw)).message_id
    assert parse_message(raw).message_id != parse_message(raw + b"more\r\n").message_id


def test_references_folded_comma_separated_in_order_without_duplicates() -> None:
    """References folded over lines, separated by commas or nothing, give each id once in order."""
    parsed = parse_message(
        raw_message(
            "Subject: Re: x",
            "In-Reply-To: <parent@x.example>",
            "References: <r1@x.example>\r\n <r2@x.example>,<r3@x.example>\r\n"
            "\t<r1@x.example><r4@x.example>",
        )
    )
    assert parsed.in_reply_to == ["parent@x.example"]
    assert parsed.references == ["r1@x.example", "r2@x.example", "r3@x.example", "r4@x.example"]


def test_bare_ids_without_brackets_are_parsed() -> None:
    """Broken senders' ids without angle brackets, space or comma separated, are taken."""
    parsed = parse_message(
        raw_message(
            "Subject: Re: x",
            "In-Reply-To: parent@x.example",
            "References: r1@x.example, r2@x.example r1@x.example",
        )
    )
    assert parsed.in_reply_to == ["parent@x.example"]
    assert parsed.references == ["r1@x.example", "r2@x.example"]


def test_missing_threading_headers_give_empty_lists() -> None:
    """Without In-Reply-To and References both lists are empty."""
    parsed = parse_message(raw_message("Subject: new"))
    assert (parsed.in_reply_to, parsed.references) == ([], [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        ("<a@x> <b@x>", ["a@x", "b@x"]),
        (["<a@x> <b@x>", "<a@x> <c@x>"], ["a@x", "b@x", "c@x"]),
        ("<a@x>\r\n <b@x>", ["a@x", "b@x"]),
        ("< a@x >", ["a@x"]),
        ("<>", []),
        ("a@x,b@x;c", ["a@x", "b@x;c"]),
        ("no ids here", []),
    ],
)
def test_extract_ids(value: str | list[str] | None, expected: list[str]) -> None:
    """extract_ids takes every bracketed token, else bare ids, in order and once each."""
    assert expected == extract_ids(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<abc@x>", "abc@x"),
        ("  <abc@x>  ", "abc@x"),
        ("abc@x", "abc@x"),
        ("<a@x> <b@x>", "a@x"),
        ("<\r\n abc@x>", "abc@x"),
        ("", ""),
    ],
)
def test_normalize_message_id(value: str, expected: str) -> None:
    """normalize_message_id takes the first bracketed token, else the trimmed value."""
    assert expected == normalize_message_id(value)


# Date


def test_date_is_aware_utc() -> None:
    """The Date header becomes an aware datetime in UTC."""
    parsed = parse_message(raw_message("Date: Tue, 01 Jul 2025 10:00:00 +0200", "Subject: x"))
    assert datetime(2025, 7, 1, 8, 0, tzinfo=UTC) == parsed.date
    assert parsed.date is not None
    assert timedelta(0) == parsed.date.utcoffset()


def test_garbage_date_is_none() -> None:
    """A Date header that is not a date gives None."""
    assert parse_message(raw_message("Date: next tuesday-ish", "Subject: x")).date is None


def test_missing_date_is_none() -> None:
    """Without a Date header the date is None."""
    assert parse_message(raw_message("Subject: x")).date is None


# Broken input never raises


def nested(depth: int) -> bytes:
    head = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth)
    )
    tail = "".join(f"--b{i}--\r\n" for i in reversed(range(depth)))
    return f"Subject: deep\r\n{head}Content-Type: text/plain\r\n\r\ninner\r\n{tail}".encode()


def test_truncated_multipart_keeps_the_text() -> None:
    """A multipart cut off before its closing boundary still gives the text so far."""
    raw = (
        b'Subject: cut\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b'--B\r\nContent-Type: multipart/alternative; boundary="C"\r\n\r\n'
        b"--C\r\nContent-Type: text/plain\r\n\r\nhello wor"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "cut"
    assert parsed.text == "hello wor"
    assert "CloseBoundaryNotFoundDefect" in parsed.defects
    assert_storable(parsed)


def test_nul_bytes_in_headers_and_body_are_replaced() -> None:
    """NUL bytes in headers and body become U+FFFD; the rest of the text is kept."""
    parsed = parse_message(b"Subject: a\x00b\r\nFrom: A\x00 <a@x.org>\r\n\r\nbo\x00dy\r\n")
    assert parsed.subject == "a\ufffdb"
    assert Address(name="A\ufffd", email="a@x.org") == parsed.from_
    assert parsed.text == "bo\ufffddy"
    assert_storable(parsed)


def test_unknown_charset_name_does_not_lose_the_body() -> None:
    """charset="x-nonsense" still gives the body, undecodable bytes replaced."""
    raw = (
        b"Subject: =?x-nonsense?q?abc?=\r\n"
        b'Content-Type: text/plain; charset="x-nonsense"\r\n\r\nbody \xe9\r\n'
    )
    parsed = parse_message(raw)
    assert parsed.subject == "abc"
    assert parsed.text == "body \ufffd"
    assert_storable(parsed)


def test_nul_in_body_charset_name_does_not_lose_the_body() -> None:
    """A charset name containing NUL still gives the body text."""
    raw = b'Subject: a\r\nContent-Type: text/plain; charset="utf\x00-8"\r\n\r\nbody\r\n'
    parsed = parse_message(raw)
    assert parsed.text == "body"
    assert_storable(parsed)


def test_nul_in_encoded_word_charset_falls_back_and_keeps_headers() -> None:
    """When mail-parser fails (NUL in a charset), the fallback keeps the headers and body.

    The broken charset name is not trusted: the word's bytes are read as UTF-8.
    """
    raw = (
        b"Subject: =?ut\x00f-8?q?abc?=\r\nFrom: Ann <Ann@B.example>\r\n"
        b"Message-ID: <kept@x.example>\r\nReferences: <r@x.example>\r\n"
        b"Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n\r\nthe body\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.defects == ["ParseFailure: ValueError: embedded null character"]
    assert parsed.subject == "abc"
    assert Address(name="Ann", email="ann@b.example") == parsed.from_
    assert parsed.message_id == "kept@x.example"
    assert parsed.references == ["r@x.example"]
    assert datetime(2025, 7, 1, 10, 0, tzinfo=UTC) == parsed.date
    assert parsed.text == "the body"
    assert_storable(parsed)


def test_deeply_nested_multiparts() -> None:
    """200 nested multiparts parse without raising and still give the innermost text."""
    parsed = parse_message(nested(200))
    assert parsed.subject == "deep"
    assert parsed.text == "inner"
    assert_storable(parsed)


def test_empty_bytes() -> None:
    """Empty input gives an empty message with a synthesized id."""
    parsed = parse_message(b"")
    assert f"sha256-{hashlib.sha256(b'').hexdigest()}@maild.invalid" == parsed.message_id
    assert (
        parsed.subject,
        parsed.text,
        parsed.from_,
        parsed.to,
        parsed.attachments,
    ) == ("", "", None, [], [])


def test_non_utf8_8bit_headers_are_storable() -> None:
    """Undeclared 8-bit bytes in headers never raise and give storable text."""
    parsed = parse_message(
        b"Subject: caf\xe9 \xff\xfe\r\nFrom: J\xfcrgen <j@x.de>\r\nTo: \xc0\xc1 <to@x.de>\r\n"
        b"\r\nbody \xe9\r\n"
    )
    assert (parsed.from_.email if parsed.from_ else None) == "j@x.de"
    assert [a.email for a in parsed.to] == ["to@x.de"]
    assert parsed.text == "body \ufffd"
    assert_storable(parsed)


def test_encoded_lone_surrogate_in_header_is_storable() -> None:
    """UTF-8-encoded surrogate bytes in a header never reach the result as lone surrogates."""
    assert_storable(parse_message(b"Subject: x \xed\xa0\x80 y\r\nFrom: \xed\xb0\x80@x\r\n\r\nb"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("a\x00b", "a\ufffdb"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("\udcff\x00", "\ufffd\ufffd"),
    ],
)
def test_clean_text(text: str, expected: str) -> None:
    """clean_text replaces NUL and lone surrogates with U+FFFD and leaves the rest alone."""
    assert expected == clean_text(text)


# Properties


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000))
def test_parse_message_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    """parse_message returns a storable ParsedMessage for any bytes."""
    parsed = parse_message(raw)
    assert isinstance(parsed, ParsedMessage)
    assert_storable(parsed)


@settings(max_examples=200, deadline=None)
@given(
    subject=st.text(max_size=200),
    sender=st.text(max_size=100),
    to=st.text(max_size=100),
    references=st.text(max_size=200),
    message_id=st.text(max_size=100),
    content_type=st.text(max_size=100),
)
def test_parse_message_never_raises_on_arbitrary_header_values(
    subject: str, sender: str, to: str, references: str, message_id: str, content_type: str
) -> None:
    """Messages built from arbitrary header values parse to storable text without raising."""
    raw = raw_message(
        f"Subject: {subject}",
        f"From: {sender}",
        f"To: {to}",
        f"References: {references}",
        f"In-Reply-To: {references}",
        f"Message-ID: {message_id}",
        f"Content-Type: {content_type}",
        body="A fixed body.\r\n",
    )
    parsed = parse_message(raw)
    assert_storable(parsed)
    assert parsed.message_id
    assert all(parsed.references)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Subject: =?utf-8?b?",
                b"=?iso-2022-jp?q?\x1b$B?=",
                b"Content-Type: multipart/mixed; boundary=b\r\n",
                b"--b\r\n",
                b"--b--\r\n",
                b"Content-Transfer-Encoding: base64\r\n",
                b"Content-Disposition: attachment; filename*=utf-8''%FF%00\r\n",
                b'Content-Type: text/html; charset="x-\x00"\r\n',
                b"\r\n",
                b"\x00",
                b"\xff\xfe",
                b"<p>hi</p>",
                b"References: <a@b>,\r\n c@d\r\n",
            ]
        )
        | st.binary(max_size=20),
        max_size=40,
    )
)
def test_parse_message_never_raises_on_mime_shaped_garbage(chunks: list[bytes]) -> None:
    """Random sequences of MIME fragments parse to storable text without raising."""
    assert_storable(parse_message(b"".join(chunks)))


def test_raw_utf8_headers_of_smtputf8_mail_are_read_as_utf8() -> None:
    """SMTPUTF8 mail carries UTF-8 headers unencoded; subject and names keep their text."""
    raw = (
        "Subject: Größe überschritten 日本\r\n"
        "From: Jürgen Müller <jürgen@bücher.example>\r\n\r\nx\r\n"
    )
    parsed = parse_message(raw.encode("utf-8"))
    assert parsed.subject == "Größe überschritten 日本"
    assert Address(name="Jürgen Müller", email="jürgen@bücher.example") == parsed.from_


def test_encoded_comma_in_a_display_name_does_not_split_the_address() -> None:
    """A name whose encoded word decodes to "Doe, John" stays one address."""
    raw = raw_message(
        "From: =?utf-8?q?Doe=2C_John?= <john@x.example>",
        "Cc: =?utf-8?q?Roe=2C_Jane?= <jane@y.example>, bob@z.example",
        "Subject: x",
    )
    parsed = parse_message(raw)
    assert Address(name="Doe, John", email="john@x.example") == parsed.from_
    assert [
        Address(name="Roe, Jane", email="jane@y.example"),
        Address(name="", email="bob@z.example"),
    ] == parsed.cc


def test_preformatted_html_keeps_indentation_but_other_blocks_are_trimmed() -> None:
    """Only <pre> keeps leading spaces; paragraphs lose the spaces around their text."""
    text = html_to_text("<p>   hello  </p><pre>  def f():\n      return 1\n</pre><div>  end </div>")
    assert text == "hello\n\n  def f():\n      return 1\n\nend"
