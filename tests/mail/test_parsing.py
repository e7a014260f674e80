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

from maild.mail import parsing
from maild.mail.addresses import Address
from maild.mail.htmltext import html_to_text
from maild.mail.message_ids import extract_ids, message_id_hash, normalize_message_id
from maild.mail.parsing import (
    BARE_LINE_BREAK_DEFECT,
    ParsedMessage,
    clean_text,
    parse_message,
    repair_header_line_breaks,
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


def test_charset_labels_decode_as_their_supersets() -> None:
    """GBK labelled gb2312 and Windows-1252 labelled latin-1 decode as mail clients show them."""
    subject = f"{encoded_word('gbk', '赟达科技')} =?iso-8859-1?Q?=93ok=94_=80?="
    raw = (
        f"Subject: {subject}\r\nContent-Type: text/plain; charset=gb2312\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode("ascii") + "王镕\r\n".encode("gbk")
    raw = raw.replace(b"=?gbk?", b"=?gb2312?")
    parsed = parse_message(raw)
    assert (parsed.subject, parsed.text) == ("赟达科技“ok” €", "王镕")


def test_iso_2022_jp_7bit_body_is_decoded() -> None:
    """A 7bit ISO-2022-JP body (escape sequences, all ASCII bytes) decodes to Japanese."""
    body = "お世話になっております。\r\n".encode("iso-2022-jp")
    raw = b'Subject: jp\r\nContent-Type: text/plain; charset="ISO-2022-JP"\r\n\r\n' + body
    assert parse_message(raw).text == "お世話になっております。"


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


def test_html_body_is_read_up_to_max_html_chars(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first MAX_HTML_CHARS of an HTML body are read, and the text says so."""
    monkeypatch.setattr(parsing, "MAX_HTML_CHARS", 20)
    html = "<p>first words</p><p>" + "x" * 100 + "</p>"
    parsed = parse_message(
        raw_message("Subject: x", "Content-Type: text/html; charset=utf-8", body=html)
    )
    expected = "first words\n[... 105 more characters of HTML; the raw message is kept]"
    assert expected == parsed.text


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


def test_html_to_text_decodes_named_and_numeric_references() -> None:
    """Named, decimal and hex character references decode; escaped markup stays text."""
    html = "<p>&euro;&#8364;&#x20AC; &copy; caf&eacute; &lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert html_to_text(html) == "€€€ © café <script>alert(1)</script>"


def test_html_to_text_drops_markup_inside_scripts_and_styles() -> None:
    """Tags written inside a script or style, in any case, never reach the text."""
    html = (
        '<SCRIPT type="text/javascript">document.write("<p>injected</p>")</Script >'
        "<style>p > a { color: red }</style><p>shown</p>"
    )
    assert html_to_text(html) == "shown"


def test_html_to_text_drops_comments_and_declarations() -> None:
    """Comments (Outlook's conditional ones too), doctypes, CDATA and PIs show nothing."""
    html = (
        '<!DOCTYPE html><?xml version="1.0"?><!--[if mso]><p>mso only</p><![endif]-->'
        "<p>one</p><!-- a <p>comment</p> --><![CDATA[raw]]><p>two</p>"
    )
    assert html_to_text(html) == "one\n\ntwo"


def test_html_to_text_an_unclosed_comment_hides_the_rest() -> None:
    """As in a browser, an unclosed comment hides everything after it."""
    assert html_to_text("<p>seen</p><!-- <p>hidden</p>") == "seen"


def test_html_to_text_keeps_lone_less_than_signs() -> None:
    """A "<" that starts no tag is text."""
    assert html_to_text("1 < 2 and 3 <4 and x<") == "1 < 2 and 3 <4 and x<"


def test_html_to_text_never_shows_urls_or_fetches_anything() -> None:
    """Images, links and their addresses are markup: only the link text is kept."""
    html = (
        '<img src="https://tracker.example/p.gif" alt="pixel">'
        '<a href="javascript:alert(1)">click</a><iframe src="https://x.example/"></iframe>'
    )
    assert html_to_text(html) == "click"


@pytest.mark.parametrize(
    "html",
    [
        "<p>before</p>" + "<a" * 200_000,
        "<p>before</p>" + "</" * 200_000,
        "<p>before</p>" + "<!" * 200_000,
        "<p>before</p>" + "<?" * 200_000,
        "<p>before</p>" + "<![CDATA[" * 50_000,
        "<p>before</p>" + "<!--" * 100_000,
    ],
    ids=["start-tags", "end-tags", "declarations", "instructions", "cdata", "comments"],
)
def test_html_to_text_unclosed_constructs_take_linear_time(html: str) -> None:
    """400 KB of unclosed markup is read in one pass (html.parser took minutes on these)."""
    assert html_to_text(html) == "before"


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


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../", "attachment"),
        ("..\\..\\", "attachment"),
        ("../../../../../../etc/shadow", "shadow"),
        ("/etc/passwd", "passwd"),
        ("/", "attachment"),
        ("C:evil.exe", "C_evil.exe"),
        ("C:\\Windows\\System32\\drivers\\etc\\hosts", "hosts"),
        ("\\\\server\\share\\evil.exe", "evil.exe"),
        ("\\\\?\\C:\\Windows\\evil.dll", "evil.dll"),
        ("//server/share/x.txt", "x.txt"),
        ("file:///etc/passwd", "passwd"),
        ("evil.exe\x00.pdf", "evil.exe.pdf"),
        ("\x00", "attachment"),
        ("a\x00/\x00b", "b"),
        ("evil.exe.", "evil.exe"),
        ("report.pdf . .", "report.pdf"),
        ("CON", "_CON"),
        ("con.txt", "_con.txt"),
        ("nul .tar.gz", "_nul .tar.gz"),
        ("LPT1.log", "_LPT1.log"),
        ("com9", "_com9"),
        ("console.txt", "console.txt"),
        ("invoice\u202etxt.exe", "invoicetxt.exe"),
        ("zero\u200bwidth.txt", "zerowidth.txt"),
    ],
)
def test_safe_filename_never_names_a_folder_or_a_device(name: str, expected: str) -> None:
    """Traversal, absolute, drive, UNC, NUL and device names give a plain file name."""
    assert expected == safe_filename(name)


def test_safe_filename_cuts_a_10000_character_name_keeping_the_extension() -> None:
    """A 10,000-character name of 3-byte characters is cut to 255 bytes, extension kept."""
    safe = safe_filename("日" * 10_000 + ".pdf")
    assert safe == "日" * 83 + ".pdf"
    assert len(safe.encode("utf-8")) <= 255


def test_safe_filename_cut_never_ends_with_a_dot_or_space() -> None:
    """A long name without extension, cut at a dot or space, loses the trailing dot or space."""
    assert safe_filename("a" * 253 + ". " + "b" * 100) == "a" * 253


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        ("filename*=utf-8''..%2F..%2F..%2Fetc%2Fpasswd", "passwd"),
        ("filename*=utf-8''..%5C..%5CWindows%5Cwin.ini", "win.ini"),
        ("filename*=utf-8''%2Fetc%2Fcron.d%2Fx", "x"),
        ("filename*=utf-8''C%3A%5Cevil.exe", "evil.exe"),
        ("filename*=utf-8''evil%00.exe", "evil.exe"),
        ("filename*0*=utf-8''..%2F..%2F;\r\n filename*1*=etc%2Fshadow", "shadow"),
        ('filename="=?utf-8?q?..=2F..=2Fetc=2Fpasswd?="', "passwd"),
        ("filename*=utf-8''" + "%E6%97%A5" * 200 + ".txt", "日" * 83 + ".txt"),
    ],
    ids=["slash", "backslash", "absolute", "drive", "nul", "continued", "rfc2047", "long"],
)
def test_encoded_attachment_filenames_cannot_escape(disposition: str, expected: str) -> None:
    """RFC 2231 and RFC 2047 encoded traversal in an attachment's name decodes, then is cut."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            attachment_part(
                "Content-Type: application/octet-stream\r\n"
                f"Content-Disposition: attachment; {disposition}\r\n"
                "Content-Transfer-Encoding: base64",
                "YWJj",
            ),
        ),
    )
    [attachment] = parse_message(raw).attachments
    assert expected == attachment.filename
    assert attachment.data == b"abc"


def test_base64_without_padding_and_with_junk_still_decodes() -> None:
    """An attachment whose base64 lacks its padding or carries stray characters still decodes."""
    raw = with_body(
        ["Subject: file"],
        multipart(
            "mixed",
            attachment_part(
                "Content-Type: application/octet-stream\r\n"
                'Content-Disposition: attachment; filename="a.bin"\r\n'
                "Content-Transfer-Encoding: base64",
                "YWJj\r\nZGVm*Z2g",
            ),
        ),
    )
    assert [a.data for a in parse_message(raw).attachments] == [b"abcdefgh"]


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
        ("a@x (<y@z>)", "a@x"),  # a comment never supplies the id
        ("(c) <a@x>", "a@x"),
        ("first@x To: <support@altis-dxp.com>", "first@x"),  # a folded bare CR
        ("junk <a@x>", "a@x"),
        ("12345", "12345"),
    ],
)
def test_normalize_message_id(value: str, expected: str) -> None:
    """The id the field starts with: a bare id first, else the first bracketed token."""
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
    (mail-parser reads only Message-ID, In-Reply-To, References, Date and Content-*
    at the top level, so the NUL is put in In-Reply-To to make it fail.)
    """
    raw = (
        b"Subject: =?ut\x00f-8?q?abc?=\r\nFrom: Ann <Ann@B.example>\r\n"
        b"Message-ID: <kept@x.example>\r\nReferences: <r@x.example>\r\n"
        b"In-Reply-To: =?ut\x00f-8?q?abc?=\r\n"
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


def test_nul_in_subject_charset_no_longer_sends_the_message_to_the_fallback() -> None:
    """mail-parser is not given the Subject, so a NUL in its charset costs nothing else."""
    raw = b"Subject: =?ut\x00f-8?q?abc?=\r\nMessage-ID: <n@x.example>\r\n\r\nthe body\r\n"
    parsed = parse_message(raw)
    assert (parsed.defects, parsed.subject, parsed.text) == ([], "abc", "the body")


def test_multipart_without_boundary_keeps_its_body_as_text() -> None:
    """A multipart whose boundary parameter is missing shows its body as sent, not nothing."""
    raw = (
        b"Subject: nb\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.text == "--B\nContent-Type: text/plain\n\nhello\n--B--"
    assert "NoBoundaryInMultipartDefect" in parsed.defects


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


# Bare LF and bare CR inside header lines (aiosmtpd passes them through)


def header_names(parsed: ParsedMessage) -> list[str]:
    return [name.lower() for name, _ in parsed.headers]


@pytest.mark.parametrize("breaker", [b"\n", b"\r", b"\n\n", b"\r\r", b"\n\r"])
def test_bare_line_break_in_a_header_line_is_a_space(breaker: bytes) -> None:
    """In a CRLF message, `Subject: a<LF>X-Priority: 1` is one Subject, and a defect says so."""
    raw = b"Subject: a" + breaker + b"X-Priority: 1\r\nFrom: b@c.example\r\n\r\nbody\r\n"
    parsed = parse_message(raw)
    assert parsed.subject == "a X-Priority: 1"
    assert header_names(parsed) == ["subject", "from"]
    assert parsed.defects == [BARE_LINE_BREAK_DEFECT]
    assert parsed.text == "body"


def test_bare_lf_in_a_message_without_body_is_a_space_too() -> None:
    """A CRLF message without an empty line is all header section; a bare LF stays in its line."""
    parsed = parse_message(b"Subject: a\nX-Priority: 1\r\nFrom: b@c.example\r\n")
    assert (parsed.subject, header_names(parsed)) == ("a X-Priority: 1", ["subject", "from"])


def test_bare_lf_cannot_smuggle_threading_or_message_id() -> None:
    """Ids smuggled after a bare LF are neither the Message-ID nor In-Reply-To nor References."""
    raw = (
        b"Subject: x\nMessage-ID: <fake@x>\nIn-Reply-To: <victim@x>\nReferences: <victim@x>\r\n"
        b"Message-ID: <real@x>\r\n\r\nbody\r\n"
    )
    parsed = parse_message(raw)
    assert (parsed.message_id, parsed.in_reply_to, parsed.references) == ("real@x", [], [])


def test_bare_lf_at_the_end_of_a_header_does_not_end_the_header_section() -> None:
    """`Subject: hi<LF><CRLF>` does not turn the headers below it into body."""
    raw = b"Subject: hi\n\r\nAuto-Submitted: auto-generated\r\nFrom: b@c.example\r\n\r\nbody\r\n"
    parsed = parse_message(raw)
    assert header_names(parsed) == ["subject", "auto-submitted", "from"]
    assert (parsed.subject, parsed.text) == ("hi", "body")


def test_bare_line_breaks_in_a_crlf_body_are_kept() -> None:
    """Only header lines change: a body's bare LFs stay line breaks, its bytes untouched."""
    raw = b"Subject: a\nB: c\r\n\r\nline one\nline two\r\n"
    repaired, changed = repair_header_line_breaks(raw)
    assert (repaired, changed) == (b"Subject: a B: c\r\n\r\nline one\nline two\r\n", True)
    assert parse_message(raw).text == "line one\nline two"


def test_a_bare_lf_line_after_crlf_headers_ends_them() -> None:
    """CRLF headers followed by an LF-only empty line end there, as every reader agrees."""
    raw = b"Subject: a\r\nFrom: b@c.example\r\n\nbody\nmore\r\n"
    parsed = parse_message(raw)
    expected = (["subject", "from"], "body\nmore", [])
    assert expected == (header_names(parsed), parsed.text, parsed.defects)


def test_lf_only_messages_keep_their_line_endings() -> None:
    """A pipe-delivered message with LF line endings throughout is read line by line as before."""
    raw = b"Subject: a\nX-Priority: 1\nFrom: b@c.example\n\nbody\r\nmore\n"
    parsed = parse_message(raw)
    assert header_names(parsed) == ["subject", "x-priority", "from"]
    assert (parsed.subject, parsed.defects) == ("a", [])
    assert (raw, False) == repair_header_line_breaks(raw)


def test_bare_cr_in_an_lf_message_header_is_a_space() -> None:
    """A bare CR, which the standard library would take for a line end, is a space in LF mail."""
    parsed = parse_message(b"Subject: a\rIn-Reply-To: <v@x>\nFrom: b@c.example\n\nbody\n")
    assert (parsed.subject, parsed.in_reply_to) == ("a In-Reply-To: <v@x>", [])
    assert header_names(parsed) == ["subject", "from"]


def test_bare_lf_in_a_mime_part_header_cannot_add_a_part_header() -> None:
    """A bare LF in a part's header cannot make its text an attachment."""
    raw = with_body(
        ["Subject: part", "Message-ID: <p@x.example>"],
        multipart(
            "mixed",
            'Content-Type: text/plain; x="a\nContent-Disposition: attachment; filename=e.exe"'
            "\r\n\r\nhello",
        ),
    )
    parsed = parse_message(raw)
    expected = ("hello", [], [BARE_LINE_BREAK_DEFECT])
    assert expected == (parsed.text, parsed.attachments, parsed.defects)


def test_repair_keeps_the_length_and_the_synthesized_id_of_the_received_bytes() -> None:
    """Repair swaps bytes for spaces one for one; a missing Message-ID hashes the bytes as sent."""
    raw = b"Subject: a\nB: c\r\n\r\nbody\r\n"
    repaired, _ = repair_header_line_breaks(raw)
    assert len(raw) == len(repaired)
    assert synthesized_message_id(raw) == parse_message(raw).message_id


def test_messages_without_bare_line_breaks_are_returned_as_they_are() -> None:
    """An ordinary CRLF message is the very same bytes object after the repair step."""
    raw = raw_message("Subject: x", "From: a@b.example", body="one\r\ntwo\r\n")
    repaired, changed = repair_header_line_breaks(raw)
    assert repaired is raw
    assert changed is False


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="aZ:- \r\n", max_size=60).filter(lambda v: "\r\n" not in v),
    st.sampled_from(["Subject", "To", "Content-Type", "X-Custom"]),
)
def test_no_value_without_crlf_can_add_or_remove_a_header(value: str, name: str) -> None:
    """Whatever bare CRs and LFs a header value holds, the message keeps exactly its headers."""
    raw = (
        f"From: a@b.example\r\n{name}: {value}\r\nAuto-Submitted: auto-generated\r\n"
        "Message-ID: <m@x.example>\r\n\r\nbody\r\n"
    ).encode("ascii")
    parsed = parse_message(raw)
    expected = ["from", name.lower(), "auto-submitted", "message-id"]
    assert expected == header_names(parsed)
    assert (parsed.message_id, parsed.text) == ("m@x.example", "body")
    assert len(raw) == len(repair_header_line_breaks(raw)[0])


def test_ids_with_spaces_are_distinct_and_threads_find_them() -> None:
    """`<a b@x>` and `<a c@x>` hash apart; a reply's In-Reply-To finds the same hash."""
    first = parse_message(b"Message-ID: <a b@x>\r\nSubject: one\r\n\r\nbody\r\n")
    second = parse_message(b"Message-ID: <a c@x>\r\nSubject: two\r\n\r\nbody\r\n")
    reply = parse_message(b"In-Reply-To: <a\r\n b@x>\r\nSubject: re\r\n\r\nbody\r\n")
    assert message_id_hash(first.message_id) != message_id_hash(second.message_id)
    assert [message_id_hash(i) for i in reply.in_reply_to] == [message_id_hash(first.message_id)]
