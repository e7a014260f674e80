"""Raw message bytes to a `ParsedMessage`, with mail-parser, never raising.

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
import email.header
import email.utils
import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime

import mailparser

from maild.addresses import Address
from maild.htmltext import html_to_text

MAX_TEXT_CHARS = 1_000_000  # the full message stays in the raw copy
MAX_HEADERS = 500
MAX_HEADER_CHARS = 8192
SYNTHETIC_DOMAIN = "maild.invalid"
_ID_TOKEN = re.compile(r"<([^<>]*)>")
_SURROGATE = re.compile("[\ud800-\udfff]")

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


def normalize_message_id(value: str) -> str:
    """`<abc@x>` → `abc@x`: the first bracketed token, else the trimmed value."""
    text = " ".join(value.split())
    match = _ID_TOKEN.search(text)
    token = match.group(1) if match else text
    return token.strip()


def message_id_hash(message_id: str) -> str:
    """The key the unique index is on (Message-IDs come from strangers, any length)."""
    return hashlib.sha256(
        normalize_message_id(message_id).encode("utf-8", "surrogatepass")
    ).hexdigest()


def extract_ids(value: str | list[str] | None) -> list[str]:
    """Every Message-ID in an In-Reply-To or References header, in order, lenient."""
    if not value:
        return []
    text = " ".join(value) if isinstance(value, list) else str(value)
    tokens = [t.strip() for t in _ID_TOKEN.findall(text)]
    if not tokens:  # broken senders: bare ids separated by spaces or commas
        tokens = [t for t in re.split(r"[\s,]+", text) if "@" in t]
    seen: set[str] = set()
    ids = []
    for token in tokens:
        if token and token not in seen:
            seen.add(token)
            ids.append(token)
    return ids


def synthesized_message_id(raw: bytes) -> str:
    return f"sha256-{hashlib.sha256(raw).hexdigest()}@{SYNTHETIC_DOMAIN}"


def safe_filename(name: str | None) -> str:
    """A filename that cannot name a folder, a device or anything outside its own."""
    text = unicodedata.normalize("NFC", str(name or ""))
    text = re.split(r"[/\\]", text)[-1]
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C")
    text = re.sub(r'[<>:"|?*]', "_", text).strip().lstrip(".").strip()
    if not text:
        return "attachment"
    encoded = text.encode("utf-8")
    if len(encoded) > 255:
        stem, dot, ext = text.rpartition(".")
        ext = ext if dot and len(ext.encode()) <= 16 else ""
        room = 255 - len(ext.encode()) - (1 if ext else 0)
        stem = (stem if ext else text).encode("utf-8")[:room].decode("utf-8", "ignore")
        text = f"{stem}.{ext}" if ext else stem
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
                piece = chunk.decode(charset, "replace")
            except (LookupError, ValueError):  # unknown charset, or a NUL in its name
                piece = _decode_8bit(chunk)
        parts.append(piece)
    return " ".join("".join(parts).split())


def _one_line(value: object) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    return " ".join(str(value or "").split())


def _addresses(pairs: object) -> list[Address]:
    result: list[Address] = []
    if not isinstance(pairs, list):
        return result
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            continue
        name, addr = (" ".join(str(x or "").split()) for x in pair)
        if "@" in addr:
            result.append(Address(name=name, email=addr.lower()))
    return result


def _lenient_b64decode(text: str) -> bytes:
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", text.encode("ascii", "ignore"))
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


def _aware(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _from_mailparser(raw: bytes) -> ParsedMessage:
    parsed = mailparser.parse_from_bytes(raw)
    head = HeaderBlock.from_raw(raw)
    raw_id = _one_line(parsed.message_id)
    message_id = normalize_message_id(raw_id)
    plain = [p for p in parsed.text_plain if p and p.strip()]
    if plain:
        text = "\n\n".join(plain)
    else:
        text = "\n\n".join(html_to_text(h) for h in parsed.text_html if h)
    from_list = head.addresses("from")
    defects = sorted(str(c) for c in parsed.defects_categories)
    return ParsedMessage(
        message_id=message_id or synthesized_message_id(raw),
        message_id_synthesized=not message_id,
        in_reply_to=extract_ids(parsed.in_reply_to),
        references=extract_ids(parsed.references),
        subject=head.text("subject"),
        from_=from_list[0] if from_list else None,
        to=head.addresses("to"),
        cc=head.addresses("cc"),
        date=_aware(parsed.date),
        text=_truncate(_plain_newlines(text).strip()),
        attachments=[_attachment(a) for a in parsed.attachments],
        headers=head.decoded(),
        defects=defects,
    )


def _fallback(raw: bytes, reason: str) -> ParsedMessage:
    """Headers from our own lenient reader, the body as text: enough for a ticket."""
    head = HeaderBlock.from_raw(raw)
    body = raw.replace(b"\r\n", b"\n")[len(head.raw_head) :].lstrip(b"\n")
    try:
        date_text = head.first("date")
        date = email.utils.parsedate_to_datetime(date_text) if date_text else None
    except (TypeError, ValueError, IndexError, OverflowError):
        date = None
    message_id = normalize_message_id(head.first("message-id"))
    from_list = head.addresses("from")
    return ParsedMessage(
        message_id=message_id or synthesized_message_id(raw),
        message_id_synthesized=not message_id,
        in_reply_to=extract_ids(head.first("in-reply-to")),
        references=extract_ids(" ".join(head.all("references"))),
        subject=head.text("subject"),
        from_=from_list[0] if from_list else None,
        to=head.addresses("to"),
        cc=head.addresses("cc"),
        date=_aware(date),
        text=_truncate(_plain_newlines(body.decode("utf-8", "replace")).strip()),
        attachments=[],
        headers=head.decoded(),
        defects=[f"ParseFailure: {reason}"],
    )


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
    """The message's header fields as (lower-case name, value) from the raw bytes.

    Read here rather than through `email`'s compat32 parser, which turns 8-bit
    header bytes into surrogates or drops them.
    """

    raw_head: bytes
    fields: list[tuple[str, str]]

    @classmethod
    def from_raw(cls, raw: bytes) -> HeaderBlock:
        data = raw.replace(b"\r\n", b"\n")
        end = data.find(b"\n\n")
        head = data if end < 0 else data[:end]
        fields: list[tuple[str, list[bytes]]] = []
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t"):  # a folded continuation of the field above
                if fields and sum(map(len, fields[-1][1])) < MAX_HEADER_CHARS * 4:
                    fields[-1][1].append(line.strip())
                continue
            field_name, sep, value = line.partition(b":")
            field_name = field_name.strip()
            if not sep or not field_name or b" " in field_name or len(fields) >= MAX_HEADERS:
                continue  # an mbox "From " line, garbage, or too many fields
            fields.append((field_name.decode("ascii", "replace"), [value.strip()]))
        return cls(
            raw_head=head,
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
        try:
            pairs = email.utils.getaddresses(self.all(name))
        except Exception:  # getaddresses has raised on pathological input in some versions
            return []
        return _addresses([(decode_header_value(n), a) for n, a in pairs])

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


def _clean_address(address: Address | None) -> Address | None:
    if address is None:
        return None
    return Address(name=clean_text(address.name), email=clean_text(address.email))


def _cleaned(parsed: ParsedMessage) -> ParsedMessage:
    parsed.message_id = clean_text(parsed.message_id)
    parsed.in_reply_to = [clean_text(i) for i in parsed.in_reply_to]
    parsed.references = [clean_text(i) for i in parsed.references]
    parsed.subject = clean_text(parsed.subject)
    parsed.from_ = _clean_address(parsed.from_)
    parsed.to = [a for a in map(_clean_address, parsed.to) if a]
    parsed.cc = [a for a in map(_clean_address, parsed.cc) if a]
    parsed.text = clean_text(parsed.text)
    parsed.headers = [(clean_text(k), clean_text(v)) for k, v in parsed.headers]
    parsed.attachments = [
        ParsedAttachment(clean_text(a.filename), clean_text(a.content_type), a.data, a.sha256)
        for a in parsed.attachments
    ]
    return parsed


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse raw message bytes; never raises for any input."""
    return _cleaned(_parse(raw))


def _parse(raw: bytes) -> ParsedMessage:
    try:
        return _from_mailparser(raw)
    except RecursionError:
        reason = "RecursionError: MIME nested too deeply"
    except Exception as exc:  # mail-parser raises AttributeError/ValueError on broken MIME too
        reason = f"{type(exc).__name__}: {exc}"[:500]
    try:
        return _fallback(raw, reason)
    except Exception as exc:  # the last resort: an empty message that still makes a ticket
        return ParsedMessage(
            message_id=synthesized_message_id(raw),
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
        )
