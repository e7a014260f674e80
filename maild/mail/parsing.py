"""Raw message bytes to a `ParsedMessage`, with mail-parser, never raising.

Before anything reads a header, `repair_header_line_breaks` makes every
reader see the same header lines: in a CRLF message a bare LF or CR inside a
header line is turned into a space (aiosmtpd passes them through, and the
standard library's parser would start a new header at each), so text put into
one header by a form or a script can never add headers that steer routing,
threading or auto-reply detection. The raw bytes stored elsewhere stay as
received.

mail-parser raises its own errors and also plain AttributeError/ValueError on
some broken MIME. `parse_message` wraps it: when mail-parser fails, a degraded
parse from the standard library's header parser and the raw body takes over and
the failure is recorded in `defects`, so a customer's mail still becomes a
ticket. The raw bytes are kept elsewhere whatever happens here.

This runs in a worker process (see processing.py): its inputs and outputs are
plain picklable data.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.feedparser
import email.header
import email.message
import email.policy
import email.utils
import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import mailparser

from maild.mail import addresses, dsn, hygiene
from maild.mail.addresses import Address
from maild.mail.htmltext import html_to_text
from maild.mail.message_ids import extract_ids, normalize_message_id
from maild.mail.text import one_line

if TYPE_CHECKING:  # authenticity reads headers with this module's HeaderBlock
    from maild.mail.authenticity import Verdict

MAX_TEXT_CHARS = 1_000_000  # the full message stays in the raw copy
MAX_HTML_CHARS = 4 * MAX_TEXT_CHARS  # of an HTML body read for its text (about 2 s at worst)
MAX_HEADERS = 500  # header fields kept, and as many more of the names maild acts on
MAX_HEADER_CHARS = 8192
# Header fields maild acts on: found wherever they stand, even after MAX_HEADERS others
# (an Auto-Submitted placed 600 fields down must still stop an acknowledgement).
ACTED_ON = frozenset(
    {
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "return-path",
        "auto-submitted",
        "precedence",
        *(name.lower() for name in hygiene.AUTO_HEADERS),
        hygiene.LOOP_HEADER.lower(),
    }
)
MAX_ADDRESS = 320
MAX_ADDRESS_CHARS = 65536  # of one address field name (To, Cc): ~1,500 addresses
SYNTHETIC_DOMAIN = "maild.invalid"
# Charset labels read as the superset that mail clients and browsers decode them with
# (the WHATWG Encoding Standard): GBK text labelled gb2312, Windows-1252 labelled latin-1.
CHARSET_SUPERSETS = {
    "gb2312": "gb18030",
    "gb_2312-80": "gb18030",
    "csgb2312": "gb18030",
    "x-gbk": "gb18030",
    "gbk": "gb18030",
    "euc-cn": "gb18030",
    "big5": "big5hkscs",
    "x-x-big5": "big5hkscs",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "iso-8859-9": "cp1254",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
}
_ISO2022_ESCAPE = re.compile("\x1b[$(]")
_WINDOWS_DEVICE = re.compile(r"(?i)(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])\s*(\.|$)")
_SURROGATE = re.compile("[\ud800-\udfff]")
BARE_LINE_BREAK_DEFECT = "BareLineBreakInHeader"
FEED_CHUNK = 1 << 16
MAX_BOUNDARY_CHARS = 200  # RFC 2046 allows 70; longer ones are not looked for
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64_ALPHABET)
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# what email.feedparser takes for a header line (its headerRE), and what mail-parser is asked for
_STDLIB_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:")
_MAILPARSER_HEADERS = frozenset(
    {b"message-id", b"in-reply-to", b"references", b"date", b"mime-version"}
)
_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")
_CRLF_HEADER_END = re.compile(rb"\r\n(?:\r\n|\n)")
_CRLF_PART_HEADER_END = re.compile(rb"\r\n(?:\r\n|\n|--)")
_BOUNDARY_PARAM = re.compile(
    rb'boundary\s*=\s*(?:"([^"\r\n]{1,%d})"|([^\s;"]{1,%d}))' % ((MAX_BOUNDARY_CHARS,) * 2),
    re.IGNORECASE,
)
_DELIMITER_LINE = re.compile(rb"\r\n--([^\r\n]{1,%d})(?=\r\n)" % (MAX_BOUNDARY_CHARS + 16))

logging.getLogger("mailparser").setLevel(logging.ERROR)  # it warns per unknown MIME subtype


@dataclass(frozen=True)
class ParsedAttachment:
    filename: str  # safe: no folders, no control characters, at most 255 bytes
    content_type: str
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class ParsedMessage:
    """What processing needs from a message; every text field is decoded Unicode."""

    message_id: str  # normalised: no angle brackets, no surrounding space
    message_id_synthesized: bool
    in_reply_to: list[str]
    references: list[str]
    subject: str
    from_: Address | None
    to: list[Address]
    cc: list[Address]
    date: datetime | None
    text: str
    attachments: list[ParsedAttachment]
    headers: list[tuple[str, str]]
    defects: list[str] = field(default_factory=list)
    report: dsn.DeliveryReport | None = None  # set when the message is a DSN (a bounce)
    body_sha256: str = ""  # of the body as received (CRLF read as LF): see body_digest
    # for mail whose From is one of [desk] agents: whether that is proven (DKIM, or the
    # trusted MTA's Authentication-Results); set by processing, outside any transaction
    authenticity: Verdict | None = None


def body_digest(raw: bytes) -> str:
    """sha256 of everything after the header section, carriage returns left out: the same
    for every delivery of one message (retries, split deliveries, SMTP or a pipe's LF),
    whatever headers the MTAs on the way added. Hashed in chunks, never copied whole."""
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        start = end + 4
    else:  # LF line endings (a pipe), or no body
        match = _EMPTY_LINE.search(raw)
        start = match.end() if match else len(raw)
    digest = hashlib.sha256()
    view = memoryview(raw)
    for offset in range(start, len(raw), FEED_CHUNK):
        digest.update(view[offset : offset + FEED_CHUNK].tobytes().translate(None, b"\r"))
    return digest.hexdigest()


def synthesized_message_id(raw: bytes) -> str:
    return f"sha256-{hashlib.sha256(raw).hexdigest()}@{SYNTHETIC_DOMAIN}"


def safe_filename(name: str | None) -> str:
    """A filename that cannot name a folder, a device or anything outside its own.

    The last path component only (`/` and `\\` both separate), no control or
    format characters, no `<>:"|?*`, no leading dots, no trailing dots or
    spaces (Windows drops them), a Windows device name (CON, NUL, COM1...)
    prefixed with `_`, at most 255 UTF-8 bytes with the extension kept.
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    text = re.split(r"[/\\]", text)[-1]
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C")
    text = re.sub(r'[<>:"|?*]', "_", text).strip().lstrip(".").rstrip(". ").strip()
    if not text:
        return "attachment"
    if _WINDOWS_DEVICE.match(text):
        text = "_" + text
    encoded = text.encode("utf-8")
    if len(encoded) > 255:
        stem, dot, ext = text.rpartition(".")
        ext = ext if dot and len(ext.encode()) <= 16 else ""
        room = 255 - len(ext.encode()) - (1 if ext else 0)
        stem = (stem if ext else text).encode("utf-8")[:room].decode("utf-8", "ignore")
        text = f"{stem}.{ext}" if ext else stem.rstrip(". ")
    return text


def repair_header_line_breaks(raw: bytes) -> tuple[bytes, bool]:
    """The message with bare line breaks inside header lines made spaces; whether any were.

    A message with a CRLF in it uses CRLF line endings (every SMTP and LMTP
    delivery does). Its header section ends at the first CRLF followed by CRLF
    or LF (or at the end), and inside it a bare LF or bare CR is a character
    within the line, so `Subject: a\\nBcc: x` stays one Subject. The header
    sections of MIME parts (after a delimiter line of a boundary the message
    declares, up to the next empty line or delimiter) are repaired the same way.

    A message with LF line endings throughout (pipe delivery) keeps them, and
    so does one whose CRLFs all come after an empty LF line with no CRLF empty
    line anywhere (LF headers, CR-LF pairs only in its body); in its header
    section only a bare CR becomes a space.

    Nothing else changes: bodies keep their bytes, and the message's length
    stays the same. Linear in the message's size.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf == raw.count(b"\r"):  # no bare line break anywhere
        return raw, False
    first_blank = raw.find(b"\n\n")
    header_end = _crlf_header_end(raw, 0, _CRLF_HEADER_END) if crlf else None
    if header_end is None and (not crlf or 0 <= first_blank < raw.find(b"\r\n")):
        end = first_blank if first_blank >= 0 else len(raw)  # LF line endings
        if raw.find(b"\r", 0, end) < 0:
            return raw, False
        return raw[:end].replace(b"\r", b" ") + raw[end:], True
    if header_end is None:
        header_end = len(raw)
    regions = [(0, header_end)]
    boundaries = {b or q for q, b in _BOUNDARY_PARAM.findall(raw)}
    if boundaries:
        for line in _DELIMITER_LINE.finditer(raw, regions[0][1]):
            if line.group(1).rstrip(b" \t") in boundaries:
                start = line.end() + 2
                part_end = _crlf_header_end(raw, start, _CRLF_PART_HEADER_END)
                regions.append((start, len(raw) if part_end is None else part_end))
    repaired: bytearray | None = None
    done = 0
    for start, end in regions:
        if start < done:
            continue
        done = end
        for bare in _BARE_CR_OR_LF.finditer(raw, start, end):
            if repaired is None:
                repaired = bytearray(raw)
            repaired[bare.start()] = 0x20  # a space: same length, nothing else moves
    return (raw, False) if repaired is None else (bytes(repaired), True)


def _crlf_header_end(raw: bytes, start: int, pattern: re.Pattern[bytes]) -> int | None:
    """Where the CRLF header section starting at `start` ends (its last CRLF excluded).

    None when no empty line (or, for a part, delimiter) follows it.
    """
    if raw.startswith((b"\r\n", b"\n"), start):  # no header lines at all
        return start
    match = pattern.search(raw, start)
    return match.start() if match else None


def message_from_bytes(raw: bytes, head: bytes = b"", start: int = 0) -> email.message.Message:
    """`email.message_from_bytes(head + raw[start:])`, fed in chunks without copying.

    The standard library's version reads through a StringIO that holds the
    whole message at four bytes per character (a 25 MiB message costs over
    250 MiB); fed in chunks the same parser needs about half of that, and a
    large attachment a third. The result is the same compat32 Message.
    """
    parser = email.feedparser.BytesFeedParser(policy=email.policy.compat32)
    if head:
        parser.feed(head)
    view = memoryview(raw)
    for offset in range(start, len(raw), FEED_CHUNK):
        parser.feed(bytes(view[offset : offset + FEED_CHUNK]))
    return parser.close()


def _for_mailparser(raw: bytes) -> email.message.Message:
    """The message as mail-parser gets it: top-level headers only those read from it.

    mail-parser decodes every header, and parses every address, twice; maild
    reads names, addresses and other headers through HeaderBlock instead, so
    mail-parser is spared a 100,000-address Cc or 200,000 X- headers. Header
    lines end where the standard library's parser ends them (at an empty line
    or the first line that is not a header), so the body is the same.
    """
    kept: list[bytes] = []
    keep = True
    position = 0
    while position < len(raw):
        newline = raw.find(b"\n", position)
        end = len(raw) if newline < 0 else newline + 1
        line = raw[position:end]
        if line[:1] in (b" ", b"\t"):  # a continuation goes with its field
            if keep:
                kept.append(line)
        elif _STDLIB_HEADER_LINE.match(line):
            name = line.split(b":", 1)[0].lower()
            keep = name in _MAILPARSER_HEADERS or name.startswith((b"content-", b"from "))
            if keep:
                kept.append(line)
        else:  # the empty line, or the first body line of a message without one
            break
        position = end
    message = message_from_bytes(raw, b"".join(kept), position)
    for part in message.walk():  # mail-parser decodes bodies by the label, so relabel them
        _relabel_charset(part)
    return message


def _relabel_charset(part: email.message.Message) -> None:
    """gb2312 → gb18030 and the like (CHARSET_SUPERSETS) in a part's Content-Type."""
    try:
        charset = part.get_param("charset")
        if isinstance(charset, str) and charset.lower() in CHARSET_SUPERSETS:
            part.set_param("charset", CHARSET_SUPERSETS[charset.lower()])
    except Exception:  # a Content-Type too broken to rewrite keeps its label
        return


def _iso2022_text(text: str) -> str:
    """A 7-bit ISO-2022 body (ISO-2022-JP) decoded; any other text as it is.

    mail-parser returns a 7bit part's text as it stands, which is right for
    ASCII and wrong for the 7-bit charsets: their escape sequences mark it.
    """
    if "\x1b" not in text or not text.isascii() or not _ISO2022_ESCAPE.search(text):
        return text
    try:
        return text.encode("ascii").decode("iso2022_jp_2")
    except UnicodeDecodeError:
        return text


def decode_header_value(value: object) -> str:
    """RFC 2047 words decoded in any charset; never raises; one line.

    A word in a charset Python does not know is decoded as UTF-8 or Latin-1
    rather than left encoded, so the customer's words still show.
    """
    if value is None:
        return ""
    text = str(value)
    try:
        chunks = email.header.decode_header(text)
    except Exception:  # a broken encoded word: keep the raw text
        return " ".join(text.split())
    parts: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            parts.append(chunk)
            continue
        if charset is None:  # plain text between encoded words, escaped by decode_header
            piece = chunk.decode("raw-unicode-escape")
        elif charset == "unknown-8bit":
            piece = _decode_8bit(chunk)
        else:
            try:
                piece = chunk.decode(CHARSET_SUPERSETS.get(charset.lower(), charset), "replace")
            except (LookupError, ValueError):  # unknown charset, or a NUL in its name
                piece = _decode_8bit(chunk)
        parts.append(piece)
    return " ".join("".join(parts).split())


def _lenient_b64decode(text: str) -> bytes:
    """Base64 text to bytes: line breaks and junk ignored, missing padding forgiven.

    Well-formed text (padding only at the end) is decoded in one pass without
    copies, so a 20 MiB attachment costs its decoded size; anything else is
    cleaned first (every `=` dropped, then padded again).
    """
    pad = text.find("=")
    if pad < 0 or not text[pad:].strip("= \t\r\n"):
        try:
            return binascii.a2b_base64(text)
        except (binascii.Error, ValueError):  # bad padding, or not ASCII
            pass
    cleaned = text.encode("ascii", "ignore").translate(None, _NOT_BASE64)
    cleaned = cleaned[: len(cleaned) - (len(cleaned) % 4 == 1)]
    try:
        return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        return b""


def _attachment(item: dict[str, object]) -> ParsedAttachment:
    payload = item.get("payload") or ""
    if isinstance(payload, bytes):
        data = payload
    elif item.get("binary"):
        data = _lenient_b64decode(str(payload))
    else:
        data = str(payload).encode("utf-8", "surrogateescape")
    content_type = str(item.get("mail_content_type") or "application/octet-stream").lower()
    return ParsedAttachment(
        filename=safe_filename(decode_header_value(item.get("filename"))),
        content_type=content_type[:255],
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _truncate(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    more = len(text) - MAX_TEXT_CHARS
    return text[:MAX_TEXT_CHARS] + f"\n[... {more} more characters; the raw message is kept]"


def _html_text(html: str) -> str:
    """The text of an HTML body; only its first MAX_HTML_CHARS are read (bounded time)."""
    if len(html) <= MAX_HTML_CHARS:
        return html_to_text(html)
    more = len(html) - MAX_HTML_CHARS
    return html_to_text(html[:MAX_HTML_CHARS]) + (
        f"\n[... {more} more characters of HTML; the raw message is kept]"
    )


def _aware(value: object) -> datetime | None:
    """An aware UTC datetime, or None when there is none or it cannot be one.

    `Fri, 31 Dec 9999 23:59:59 -2359` parses, but is past datetime.max in UTC:
    storing it would fail the whole message, so such a date is dropped.
    """
    if not isinstance(value, datetime):
        return None
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (OverflowError, ValueError):
        return None


class _MailParser(mailparser.MailParser):  # type: ignore[misc]
    """mail-parser without the two dicts of every header and part (`mail` and
    `mail_partial`) its parse builds at the end, which maild never reads: it takes the
    parts, dates, defects and headers it wants from the parser's own attributes. The
    dicts were 16 % of a 4 KiB message's parse (issue 21)."""

    def _make_mail(self, complete: bool = True) -> dict[str, Any]:
        return {}


def _from_mailparser(
    mail: mailparser.MailParser, head: HeaderBlock, raw: bytes, received: bytes
) -> ParsedMessage:
    plain = [_iso2022_text(p) for p in mail.text_plain if p and p.strip()]
    defects = sorted(str(c) for c in mail.defects_categories)
    if plain:
        text = "\n\n".join(plain)
    elif mail.text_html:
        text = "\n\n".join(_html_text(_iso2022_text(h)) for h in mail.text_html if h)
    elif "NoBoundaryInMultipartDefect" in defects:  # no part can be found: the body as sent
        text = _body_text(raw, head)
    else:
        text = ""
    return _message(
        head,
        received,
        message_id=normalize_message_id(one_line(mail.message_id)),
        in_reply_to=extract_ids(mail.in_reply_to),
        references=extract_ids(mail.references),
        date=mail.date,
        text=text,
        attachments=[_attachment(a) for a in mail.attachments],
        defects=defects,
    )


def _fallback(head: HeaderBlock, raw: bytes, received: bytes, reason: str) -> ParsedMessage:
    """Headers from our own lenient reader, the body as text: enough for a ticket."""
    try:
        date_text = head.first("date")
        date = email.utils.parsedate_to_datetime(date_text) if date_text else None
    except (TypeError, ValueError, IndexError, OverflowError):
        date = None
    return _message(
        head,
        received,
        message_id=normalize_message_id(head.first("message-id")),
        in_reply_to=extract_ids(head.first("in-reply-to")),
        references=extract_ids(" ".join(head.all("references"))),
        date=date,
        text=_body_text(raw, head),
        attachments=[],
        defects=[f"ParseFailure: {reason}"],
    )


def _message(
    head: HeaderBlock,
    received: bytes,
    *,
    message_id: str,
    in_reply_to: list[str],
    references: list[str],
    date: object,
    text: str,
    attachments: list[ParsedAttachment],
    defects: list[str],
) -> ParsedMessage:
    """A ParsedMessage: subject, addresses and headers from `head`, the rest as given."""
    from_list = head.addresses("from")
    return ParsedMessage(
        message_id=message_id or synthesized_message_id(received),
        message_id_synthesized=not message_id,
        in_reply_to=in_reply_to,
        references=references,
        subject=head.text("subject"),
        from_=from_list[0] if from_list else None,
        to=head.addresses("to"),
        cc=head.addresses("cc"),
        date=_aware(date),
        text=_truncate(_plain_newlines(text).strip()),
        attachments=attachments,
        headers=head.decoded(),
        defects=defects,
    )


def _body_text(raw: bytes, head: HeaderBlock) -> str:
    """Everything after the header section, as UTF-8 text (undecodable bytes replaced)."""
    body = raw[head.body_start :].replace(b"\r\n", b"\n").lstrip(b"\n")
    return body.decode("utf-8", "replace")


def _decode_8bit(value: bytes) -> str:
    """Header bytes as text: UTF-8 (SMTPUTF8 mail) when valid, else Windows-1252/Latin-1.

    Undeclared 8-bit bytes in headers are common from old clients; they are nearly
    always one of these two, and guessing beats dropping the customer's words.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return value.decode("cp1252")
    except UnicodeDecodeError:
        return value.decode("latin-1")


@dataclass
class HeaderBlock:
    """The message's header fields as (name, value) from the raw bytes, in order.

    Read here rather than through `email`'s compat32 parser, which turns 8-bit
    header bytes into surrogates or drops them. Names keep their case; lookups
    ignore it.
    """

    body_start: int  # where the empty line after the header section starts in the raw bytes
    fields: list[tuple[str, str]]

    @classmethod
    def from_raw(cls, raw: bytes, wanted: frozenset[str] = frozenset()) -> HeaderBlock:
        """The fields of the header section: the first MAX_HEADERS, and after them up to
        MAX_HEADERS more of those named in ACTED_ON or `wanted` (lower-case names the
        rules' header conditions read)."""
        end = _EMPTY_LINE.search(raw)  # the first empty line, CRLF or LF
        body_start = len(raw) if end is None else end.start()
        head = raw[:body_start].replace(b"\r\n", b"\n")
        fields: list[tuple[str, list[bytes]]] = []
        keep = ACTED_ON | wanted
        kept = False  # whether the field being read was kept (its continuations go with it)
        length = 0  # of the field being read, so a million continuations stay linear
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t"):  # a folded continuation of the field above
                if kept and length < MAX_HEADER_CHARS * 4:
                    fields[-1][1].append(line.strip())
                    length += len(line)
                continue
            field_name, sep, value = line.partition(b":")
            field_name = field_name.strip()
            kept = bool(sep and field_name and b" " not in field_name)  # not "From " or garbage
            if kept and len(fields) >= MAX_HEADERS:  # past the cap, only what maild reads
                name = field_name.decode("ascii", "replace")
                kept = len(fields) < 2 * MAX_HEADERS and name.lower() in keep
            if not kept:
                continue
            fields.append((field_name.decode("ascii", "replace"), [value.strip()]))
            length = len(value)
        return cls(
            body_start=body_start,
            fields=[(n, _decode_8bit(b" ".join(v))[:MAX_HEADER_CHARS]) for n, v in fields],
        )

    def all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [v for n, v in self.fields if n.lower() == wanted]

    def first(self, name: str) -> str:
        values = self.all(name)
        return values[0] if values else ""

    def text(self, name: str) -> str:
        """The first field of that name with its RFC 2047 words decoded, on one line."""
        return decode_header_value(self.first(name))

    def addresses(self, name: str) -> list[Address]:
        """Every address in every field of that name; names decoded after splitting.

        Splitting before decoding keeps an encoded comma inside a name from
        splitting one address in two.
        """
        pairs: list[tuple[str, str]] = []
        budget = MAX_ADDRESS_CHARS
        for value in self.all(name):
            if budget <= 0:  # thousands of addresses: the raw message keeps the rest
                break
            budget -= len(value)
            try:
                # One field at a time: getaddresses is quadratic in an address group
                # spread over joined fields (`From: g:<<<...` repeated took 87 s).
                pairs.extend(email.utils.getaddresses([value]))
            except Exception:  # noqa: S112 (it has raised on pathological input; skip that field)
                continue
        result = []
        for name, addr in pairs:
            addr = " ".join(addr.split())
            # Longer than RFC 5321 allows (64 + 1 + 255) is not an address, and not storable.
            if "@" in addr and len(addr) <= MAX_ADDRESS:
                result.append(Address(name=decode_header_value(name), email=addr.lower()))
        return result

    def decoded(self) -> list[tuple[str, str]]:
        return [(n, decode_header_value(v)) for n, v in self.fields]


def _plain_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def clean_text(text: str) -> str:
    """Text every database can store: no NUL, no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text


def _clean_address(address: Address) -> Address:
    return Address(name=clean_text(address.name), email=clean_text(address.email))


def _cleaned(parsed: ParsedMessage) -> ParsedMessage:
    parsed.message_id = clean_text(parsed.message_id)
    parsed.in_reply_to = [clean_text(i) for i in parsed.in_reply_to]
    parsed.references = [clean_text(i) for i in parsed.references]
    parsed.subject = clean_text(parsed.subject)
    parsed.from_ = _clean_address(parsed.from_) if parsed.from_ else None
    parsed.to = [_clean_address(a) for a in parsed.to]
    parsed.cc = [_clean_address(a) for a in parsed.cc]
    parsed.text = clean_text(parsed.text)
    parsed.headers = [(clean_text(k), clean_text(v)) for k, v in parsed.headers]
    parsed.attachments = [
        ParsedAttachment(clean_text(a.filename), clean_text(a.content_type), a.data, a.sha256)
        for a in parsed.attachments
    ]
    return parsed


def parse_message(raw: bytes, wanted_headers: frozenset[str] = frozenset()) -> ParsedMessage:
    """Parse raw message bytes; never raises for any input.

    Every reader below (mail-parser, HeaderBlock, the DSN reader) gets the same
    bytes with header line breaks repaired; a synthesized Message-ID is still
    the hash of the bytes as received. The DSN reader reads the message
    mail-parser was given, not the bytes again.
    """
    received = raw
    raw, repaired = repair_header_line_breaks(received)
    parsed, message = _parse(raw, received, wanted_headers)
    parsed = _cleaned(parsed)
    parsed.body_sha256 = body_digest(received)
    if repaired:
        parsed.defects.append(BARE_LINE_BREAK_DEFECT)
    # None also when the standard library could not parse it (nested too deeply)
    parsed.report = None if message is None else dsn.read_report(raw, message)
    return parsed


def _parse(
    raw: bytes, received: bytes, wanted: frozenset[str] = frozenset()
) -> tuple[ParsedMessage, email.message.Message | None]:
    """The parsed message, and the standard library's Message of it when there is one."""
    message: email.message.Message | None = None
    head: HeaderBlock | None = None
    try:
        message = _for_mailparser(raw)
        mail = _MailParser(message)
        head = HeaderBlock.from_raw(raw, wanted)
        return _from_mailparser(mail, head, raw, received), message
    except RecursionError:
        reason = "RecursionError: MIME nested too deeply"
    except Exception as exc:  # mail-parser raises AttributeError/ValueError on broken MIME too
        reason = f"{type(exc).__name__}: {exc}"[:500]
    try:
        return _fallback(head or HeaderBlock.from_raw(raw, wanted), raw, received, reason), message
    except Exception as exc:  # the last resort: an empty message that still makes a ticket
        return ParsedMessage(
            message_id=synthesized_message_id(received),
            message_id_synthesized=True,
            in_reply_to=[],
            references=[],
            subject="",
            from_=None,
            to=[],
            cc=[],
            date=None,
            text=_truncate(raw.decode("utf-8", "replace")),
            attachments=[],
            headers=[],
            defects=[f"ParseFailure: {reason}", f"FallbackFailure: {type(exc).__name__}"],
        ), message


def sender_of(parsed: ParsedMessage, mail_from: str) -> Address | None:
    """Who sent the message: From, else the envelope sender; None when neither is a usable
    address. Filing, `rules explain` and `rules replay` all route by it."""
    if parsed.from_ is not None:
        return parsed.from_
    # MAIL FROM is not parsed as headers are: the same length rule applies here.
    if mail_from and "@" in mail_from and len(mail_from) <= MAX_ADDRESS:
        return Address(name="", email=addresses.normalize(mail_from))
    return None
