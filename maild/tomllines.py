"""Where a table, key or value is written in a TOML file (tomllib keeps no positions).

The config loader and the rules loader both name `FILE:LINE` in their errors; this
is the one reader of lines they share. Line numbers start at 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADER = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.-]+)\s*\]")


@dataclass(frozen=True)
class Table:
    """One `[name]` or `[[name]]` header and the lines up to the next header."""

    name: str
    line: int  # the header's
    end: int  # the last line before the next header (or the file's last)
    array: bool  # [[name]]


class TomlLines:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        starts = [
            (number, match)
            for number, line in enumerate(self.lines, start=1)
            if (match := _HEADER.match(line))
        ]
        self.tables = [
            Table(
                name=match.group(2),
                line=number,
                end=(starts[i + 1][0] - 1) if i + 1 < len(starts) else len(self.lines),
                array=match.group(1) is not None,
            )
            for i, (number, match) in enumerate(starts)
        ]
        self.top_end = starts[0][0] - 1 if starts else len(self.lines)  # keys before any table

    def table(self, name: str) -> Table | None:
        return next((t for t in self.tables if t.name == name), None)

    def array(self, name: str) -> list[Table]:
        """Each `[[name]]` entry, in order."""
        return [t for t in self.tables if t.array and t.name == name]

    def key(self, key: str, start: int, end: int) -> int | None:
        """The line of `key = …` (or dotted `key.sub = …`) between lines start and end."""
        pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*[=.]")
        for number in range(max(start, 1), end + 1):
            if pattern.match(self.lines[number - 1]):
                return number
        return None

    def value(self, value: str, start: int, end: int) -> int | None:
        """The first line between start and end with `value` written as a quoted string."""
        for number in range(max(start, 1), end + 1):
            line = self.lines[number - 1]
            if f'"{value}"' in line or f"'{value}'" in line:
                return number
        return None
