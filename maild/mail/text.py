"""One-line folding: the one rule for reading a header value, or writing one, on one line."""

from __future__ import annotations

import unicodedata


def one_line(value: object, limit: int | None = None, *, controls: bool = False) -> str:
    """`value` on one line: a list gives its first item, None gives ""; runs of whitespace
    (line breaks included) become one space. With `controls`, control and format
    characters become spaces first, so text maild writes into a header of its own can
    never start another. At most `limit` characters."""
    if isinstance(value, list):
        value = value[0] if value else ""
    text = str(value or "")
    if controls:
        text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    folded = " ".join(text.split())
    return folded if limit is None else folded[:limit]
