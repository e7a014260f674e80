"""The TOML line finder the config and rules loaders share for FILE:LINE in errors."""

from __future__ import annotations

from maild.tomllines import TomlLines

TEXT = """\
top = 1
[smtp]
listen = "127.0.0.1:25"
max_message_size = "25 MiB"

[pagerduty]
routing_key = "x"
headers.X-Foo = "y"

[[route]]
name = "support"
recipients = ["support@altis-dxp.com"]
[[route]]
name = 'hosting'
"""


def test_tables_keys_and_values_are_found_on_their_lines() -> None:
    toml = TomlLines(TEXT)
    assert [(t.name, t.line, t.end, t.array) for t in toml.tables] == [
        ("smtp", 2, 5, False),
        ("pagerduty", 6, 9, False),
        ("route", 10, 12, True),
        ("route", 13, 14, True),
    ]
    assert toml.top_end == 1
    assert toml.key("top", 1, toml.top_end) == 1
    smtp = toml.table("smtp")
    assert smtp is not None
    assert toml.key("max_message_size", smtp.line + 1, smtp.end) == 4
    assert toml.key("routing_key", smtp.line + 1, smtp.end) is None  # another table's
    assert toml.key("headers", 6, 9) == 8  # a dotted key
    first, second = toml.array("route")
    assert toml.value("support@altis-dxp.com", first.line, first.end) == 12
    assert toml.value("hosting", second.line, second.end) == 14  # single quotes too
    assert toml.table("absent") is None
