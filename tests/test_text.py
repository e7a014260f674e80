"""One-line folding, the one rule the parser, the DSN reader and outgoing mail share."""

from __future__ import annotations

import pytest

from maild.text import one_line


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        ("Site\r\n  down", {}, "Site down"),
        (["<a@x>", "<b@x>"], {}, "<a@x>"),
        ([], {}, ""),
        (None, {}, ""),
        ("a\x07b", {}, "a\x07b"),  # read as received: control characters are stored
        ("a\x07b\u202ec", {"controls": True}, "a b c"),  # written: none reaches a header
        ("family 👨\u200d👩\u200d👧", {}, "family 👨\u200d👩\u200d👧"),
        ("x" * 50, {"limit": 32}, "x" * 32),
    ],
)
def test_one_line(value: object, kwargs: dict[str, object], expected: str) -> None:
    assert one_line(value, **kwargs) == expected  # type: ignore[arg-type]
