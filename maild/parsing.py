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
    """RFC 2047 words decoded in any charset; never raises; one line."""
    if value is None:
        return ""
    text = str(value)
    try:
        decoded = str(email.header.make_header(email.header.decode_header(text)))
    except Exception:  # unknown charset, broken encoded word: keep the raw text
        decoded = text
    return " ".join(decoded.split())


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


def _headers(message: email.message.Message | None) -> list[tuple[str, str]]:
    if message is None:
        return []
    result = []
    for name, value in list(message.items())[:MAX_HEADERS]:
        result.append((str(name), decode_header_value(value)[:MAX_HEADER_CHARS]))
    return result


def _aware(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _from_mailparser(raw: bytes) -> ParsedMessage:
    parsed = mailparser.parse_from_bytes(raw)
    raw_id = _one_line(parsed.message_id)
    message_id = normalize_message_id(raw_id)
    plain = [p for p in parsed.text_plain if p and p.strip()]
    if plain:
        text = "\n\n".join(plain)
    else:
        text = "\n\n".join(html_to_text(h) for h in parsed.text_html if h)
    from_list = _addresses(parsed.from_)
    defects = sorted(str(c) for c in parsed.defects_categories)
    return ParsedMessage(
        message_id=message_id or synthesized_message_id(raw),
        message_id_synthesized=not message_id,
        in_reply_to=extract_ids(parsed.in_reply_to),
        references=extract_ids(parsed.references),
        subject=decode_header_value(_one_line(parsed.subject)),
        from_=from_list[0] if from_list else None,
        to=_addresses(parsed.to),
        cc=_addresses(parsed.cc),
        date=_aware(parsed.date),
        text=_truncate(text.strip()),
        attachments=[_attachment(a) for a in parsed.attachments],
        headers=_headers(parsed.message),
        defects=defects,
    )


def _fallback(raw: bytes, reason: str) -> ParsedMessage:
    """Headers from the standard library, the body as text: enough for a ticket."""
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    message: email.message.Message | None
    try:
        message = email.message_from_bytes(head + b"\n\n")
    except Exception:
        message = None

    def get(name: str) -> str:
        if message is None:
            return ""
        try:
            return str(message.get(name) or "")
        except Exception:
            return ""

    def addresses(name: str) -> list[Address]:
        try:
            pairs = email.utils.getaddresses([decode_header_value(get(name))])
        except Exception:
            return []
        return _addresses([tuple(p) for p in pairs])

    try:
        date = email.utils.parsedate_to_datetime(get("Date")) if get("Date") else None
    except (TypeError, ValueError, IndexError):
        date = None
    message_id = normalize_message_id(get("Message-ID"))
    from_list = addresses("From")
    return ParsedMessage(
        message_id=message_id or synthesized_message_id(raw),
        message_id_synthesized=not message_id,
        in_reply_to=extract_ids(get("In-Reply-To")),
        references=extract_ids(get("References")),
        subject=decode_header_value(get("Subject")),
        from_=from_list[0] if from_list else None,
        to=addresses("To"),
        cc=addresses("Cc"),
        date=_aware(date),
        text=_truncate(body.decode("utf-8", "replace").strip()),
        attachments=[],
        headers=_headers(message),
        defects=[f"ParseFailure: {reason}"],
    )


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
