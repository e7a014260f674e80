"""What maild may repeat of a stranger's words (outgoing.echo), and the limit's key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maild.outbound.outgoing import echo
from maild.store.ratelimit import limit_key, lock_id


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("Visit http://evil.example now", "Visit now"),
        ("CHEAP PILLS http://evil.example www.evil.example/buy", "CHEAP PILLS"),
        ("mail sales@evil.example (or <x@y.z>) today", "mail (or today"),
        ("see пример.рф and shop.com/buy!", "see and"),
        ("Invoice 2024.11: EUR 12.50 overdue", "Invoice 2024.11: EUR 12.50 overdue"),
        ("Our site\r\nBcc: victim is down", "Our site Bcc: victim is down"),
        ("", ""),
    ],
)
def test_links_hosts_and_addresses_are_left_out(text: str, said: str) -> None:
    """URLs, www. names, addresses and host names go; other words and numbers stay."""
    assert echo(text, 100) == said


def test_echo_is_shortened_with_an_ellipsis() -> None:
    """A longer text ends at the limit with "…"."""
    assert echo("word " * 50, 20) == "word word word word…"


@given(st.text(max_size=2000), st.integers(min_value=2, max_value=200))
def test_echo_is_one_short_line_with_nothing_to_click(text: str, limit: int) -> None:
    """Whatever a stranger wrote: one line, at most `limit` characters, no link or address."""
    said = echo(text, limit)
    assert len(said) <= limit
    assert not {"\n", "\r", "@"} & set(said)
    assert "://" not in said
    assert "www." not in said.lower()


def test_limit_keys_ignore_case_and_tags() -> None:
    """`Ops+1@X.example` and `ops+2@x.example` are one sender; another local part is not."""
    assert limit_key("Ops+1@X.example") == limit_key("ops+2@x.example") == "ops@x.example"
    assert lock_id(limit_key("ops+1@x.example")) != lock_id(limit_key("dev@x.example"))
