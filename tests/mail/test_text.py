"""Shared small rules: one-line folding, and sender patterns (rules and paging)."""

from __future__ import annotations

import pytest

from maild.mail import addresses
from maild.mail.text import one_line


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


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [
        ("ops@example.com", True),
        ("*@example.com", True),
        ("OPS@Example.COM ", True),
        ("ops@localhost", True),
        ("a*b@example.com", False),
        ("@example.com", False),
        ("ops@", False),
        ("ops@-bad-.com", False),
        ("two words@example.com", False),
    ],
)
def test_a_sender_pattern_is_one_rule_for_rules_and_paging(pattern: str, valid: bool) -> None:
    """The rules' `senders` and `[escalation] allowed_senders` accept the same patterns."""
    assert addresses.is_sender_pattern(pattern) is valid


def test_a_sender_pattern_matches_an_address_or_a_whole_domain() -> None:
    assert addresses.sender_matches("*@example.com", "Ops@EXAMPLE.com")
    assert not addresses.sender_matches("*@example.com", "ops@sub.example.com")
    assert addresses.sender_matches("ops@example.com", "<OPS@example.com>")
    assert not addresses.sender_matches("ops@example.com", "ops+x@example.com")
