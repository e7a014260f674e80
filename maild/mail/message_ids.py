"""Message-IDs: the one rule for reading them, and the key they are stored under.

The parser (a message's own Message-ID, In-Reply-To, References) and the DSN
reader (the Message-ID of the message a bounce is about) read ids with the same
rule, so that a bounce finds the ticket of the message it reports on.
"""

from __future__ import annotations

import hashlib
import re

_ID_TOKEN = re.compile(r"<([^<>]*)>")
_COMMENT = re.compile(r"\([^()]*\)")


def normalize_message_id(value: str) -> str:
    """`<abc@x>` → `abc@x`: the id the field starts with, leniently.

    Comments in parentheses are dropped. The first bracketed token wins when
    the field's first word has one or is not an id (`junk <a@x>` is `a@x`); a
    first word that is a bare id (broken senders write them) wins over a
    bracketed token after it, so `a@x To: <support@...>` (a bare CR folded into
    the field) is `a@x`, never the desk's address shared by other messages.
    """
    text = " ".join(_COMMENT.sub(" ", " ".join(value.split())).split())
    if not text:
        return ""
    first = text.split(" ", 1)[0]
    if "<" not in first and "@" in first:
        return first.strip("<>")
    match = _ID_TOKEN.search(text)
    return match.group(1).strip() if match else first.strip("<>")


def message_id_hash(message_id: str) -> str:
    """The key the unique index is on (Message-IDs come from strangers, any length).

    It takes an id already normalised (by normalize_message_id or extract_ids)
    and only collapses its whitespace: normalising twice is not idempotent
    (`a b@x`, from `<a b@x>`, would become `a`, and `<a c@x>` its duplicate).
    """
    return hashlib.sha256(" ".join(message_id.split()).encode("utf-8", "surrogatepass")).hexdigest()


def extract_ids(value: str | list[str] | None) -> list[str]:
    """Every Message-ID in an In-Reply-To or References header, in order, lenient."""
    if not value:
        return []
    text = " ".join(value) if isinstance(value, list) else str(value)
    tokens = [" ".join(t.split()) for t in _ID_TOKEN.findall(text)]
    if not tokens:  # broken senders: bare ids separated by spaces or commas
        tokens = [t for t in re.split(r"[\s,]+", text) if "@" in t]
    return list(dict.fromkeys(t for t in tokens if t))


__all__ = ["extract_ids", "message_id_hash", "normalize_message_id"]
