"""The routing table: `rules/*.toml` mapping recipient addresses to ticket kinds.

A table is loaded whole and checked whole: every problem is reported with its
file and line, and a table with any problem is refused (the daemon keeps or
refuses to start, it never routes by half a table). A loaded `RuleTable` is
immutable, so a reload can swap it atomically while sessions use the old one.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maild import addresses
from maild.enums import Priority, TicketType
from maild.errors import Problem, RecipientRefused, RulesError

ROUTE_KEYS = frozenset({"name", "recipients", "type", "priority", "page", "ack"})
BOOLEAN_KEYS = {"page": False, "ack": True}  # and their defaults
_ADDRESS = re.compile(r"^[^@\s]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Route:
    """One `[[route]]`: which recipients it takes and what ticket they make."""

    name: str
    recipients: tuple[str, ...]
    type: TicketType
    priority: Priority
    page: bool
    file: str
    line: int
    position: int  # order in the whole table; the first route wins ties
    ack: bool = True  # acknowledge new tickets from people ([outbound] must be set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.name,
            "type": self.type.value,
            "priority": self.priority.value,
            "page": self.page,
            "ack": self.ack,
            "file": self.file,
            "line": self.line,
        }


@dataclass(frozen=True)
class RuleTable:
    """An immutable, checked routing table."""

    routes: tuple[Route, ...]
    version: str  # sha256 over the files' names and bytes, recorded with what it routed
    folder: str
    _by_recipient: dict[str, Route] = field(repr=False)
    domains: frozenset[str]

    def resolve(self, address: str) -> Route:
        """The route for an envelope recipient, or RecipientRefused with the SMTP reply."""
        key = addresses.route_key(address)
        _, domain = addresses.split(key)
        if domain not in self.domains:
            raise RecipientRefused(
                address,
                f"550 5.7.1 <{address}>: relay access denied, {domain or 'no domain'} "
                "is not a domain of this desk",
                "not our domain",
            )
        route = self._by_recipient.get(key)
        if route is None:
            raise RecipientRefused(
                address, f"550 5.1.1 <{address}>: no such mailbox here", "no route"
            )
        return route

    def is_ours(self, address: str) -> bool:
        """True when the address is one of the desk's own routed addresses."""
        return addresses.route_key(address) in self._by_recipient

    def route_named(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)


def best_route(routes: Iterable[Route]) -> Route:
    """Highest priority wins; ties go to the route that comes first in the table."""
    return min(routes, key=lambda r: (-r.priority.rank, r.position))


def _header_lines(text: str) -> list[int]:
    return [
        number
        for number, line in enumerate(text.splitlines(), start=1)
        if re.match(r"^\s*\[\[\s*route\s*\]\]", line)
    ]


@dataclass
class _Locator:
    """Finds the line of a route, key or value in a rules file (tomllib gives none)."""

    text: str
    starts: list[int]

    def route(self, index: int) -> int:
        return self.starts[index] if index < len(self.starts) else 1

    def _span(self, index: int) -> list[tuple[int, str]]:
        lines = self.text.splitlines()
        start = self.route(index)
        end = len(lines)
        for number in range(start + 1, len(lines) + 1):
            if re.match(r"^\s*\[", lines[number - 1]):
                end = number - 1
                break
        return [(n, lines[n - 1]) for n in range(start, end + 1)]

    def key(self, index: int, key: str) -> int:
        for number, line in self._span(index):
            if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
                return number
        return self.route(index)

    def value(self, index: int, value: str) -> int:
        for number, line in self._span(index):
            if f'"{value}"' in line or f"'{value}'" in line:
                return number
        return self.key(index, "recipients")


def _toml_line(error: tomllib.TOMLDecodeError) -> int:
    match = re.search(r"line (\d+)", str(error))
    return int(match.group(1)) if match else 1


def _check_route(
    raw: Any, index: int, where: _Locator, file: str, problems: list[Problem]
) -> dict[str, Any] | None:
    line = where.route(index)
    if not isinstance(raw, dict):
        problems.append(Problem(file, line, "[[route]] must be a table"))
        return None
    ok = True
    for key in sorted(set(raw) - ROUTE_KEYS):
        problems.append(
            Problem(
                file,
                where.key(index, key),
                f"unknown key {key!r} in [[route]] (known: {', '.join(sorted(ROUTE_KEYS))})",
            )
        )
        ok = False
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(
            Problem(
                file,
                where.key(index, "name") if "name" in raw else line,
                "route needs a name (a non-empty string)",
            )
        )
        ok = False
    kind = raw.get("type")
    if kind not in {t.value for t in TicketType}:
        problems.append(
            Problem(
                file,
                where.key(index, "type") if "type" in raw else line,
                f"type must be one of {', '.join(t.value for t in TicketType)}, not {kind!r}"
                if "type" in raw
                else "route needs a type",
            )
        )
        ok = False
    priority = raw.get("priority")
    if priority not in {p.value for p in Priority}:
        problems.append(
            Problem(
                file,
                where.key(index, "priority") if "priority" in raw else line,
                f"priority must be one of {', '.join(p.value for p in Priority)}, not {priority!r}"
                if "priority" in raw
                else "route needs a priority",
            )
        )
        ok = False
    for key, default in BOOLEAN_KEYS.items():
        value = raw.get(key, default)
        if not isinstance(value, bool):
            problems.append(
                Problem(file, where.key(index, key), f"{key} must be true or false, not {value!r}")
            )
            ok = False
    recipients = raw.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        problems.append(
            Problem(
                file,
                where.key(index, "recipients") if "recipients" in raw else line,
                "recipients must be a non-empty list of addresses",
            )
        )
        return None
    for recipient in recipients:
        if not isinstance(recipient, str) or not _ADDRESS.match(recipient.strip()):
            problems.append(
                Problem(
                    file,
                    where.value(index, str(recipient)),
                    f"{recipient!r} is not an address like support@example.com",
                )
            )
            ok = False
        elif "+" in addresses.split(recipient.strip())[0]:
            problems.append(
                Problem(
                    file,
                    where.value(index, recipient),
                    f"{recipient!r} has a +subaddress; routing ignores subaddresses, "
                    "list the base address",
                )
            )
            ok = False
    return raw if ok else None


def load_rules(folder: Path) -> RuleTable:
    """Load and check every `*.toml` in `folder` (name order); RulesError lists all problems."""
    problems: list[Problem] = []
    if not folder.is_dir():
        raise RulesError([Problem(str(folder), 0, "rules folder does not exist")])
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise RulesError([Problem(str(folder), 0, "no *.toml rules files in the folder")])
    digest = hashlib.sha256()
    routes: list[Route] = []
    by_recipient: dict[str, Route] = {}
    names: dict[str, Route] = {}
    for path in files:
        file = str(path)
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            problems.append(Problem(file, _toml_line(exc), f"not valid TOML: {exc}"))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(file, 0, f"cannot read: {exc}"))
            continue
        digest.update(path.name.encode() + b"\0" + data + b"\0")
        where = _Locator(text, _header_lines(text))
        for key in sorted(set(table) - {"route"}):
            problems.append(Problem(file, 1, f"unknown top-level key {key!r} (expected [[route]])"))
        raw_routes = table.get("route", [])
        if not isinstance(raw_routes, list):
            problems.append(Problem(file, 1, "route must be an array of tables: [[route]]"))
            continue
        for index, raw in enumerate(raw_routes):
            checked = _check_route(raw, index, where, file, problems)
            if checked is None:
                continue
            route = Route(
                name=checked["name"].strip(),
                recipients=tuple(addresses.normalize(r) for r in checked["recipients"]),
                type=TicketType(checked["type"]),
                priority=Priority(checked["priority"]),
                page=checked.get("page", BOOLEAN_KEYS["page"]),
                ack=checked.get("ack", BOOLEAN_KEYS["ack"]),
                file=file,
                line=where.route(index),
                position=len(routes),
            )
            if route.name in names:
                first = names[route.name]
                problems.append(
                    Problem(
                        file,
                        where.key(index, "name"),
                        f"duplicate route name {route.name!r} (first at {first.file}:{first.line})",
                    )
                )
                continue
            names[route.name] = route
            for written, recipient in zip(checked["recipients"], route.recipients, strict=True):
                if recipient in by_recipient:
                    first = by_recipient[recipient]
                    problems.append(
                        Problem(
                            file,
                            where.value(index, written),
                            f"duplicate recipient {recipient!r}: already routed by "
                            f"{first.name!r} at {first.file}:{first.line}",
                        )
                    )
                else:
                    by_recipient[recipient] = route
            routes.append(route)
    if not problems and not routes:
        problems.append(Problem(str(folder), 0, "the rules table has no [[route]]"))
    if problems:
        raise RulesError(problems)
    return RuleTable(
        routes=tuple(routes),
        version=digest.hexdigest(),
        folder=str(folder),
        _by_recipient=by_recipient,
        domains=frozenset(addresses.split(r)[1] for r in by_recipient),
    )


def resolve_all(table: RuleTable, recipients: Sequence[str]) -> tuple[list[Route], list[str]]:
    """Routes for the recipients that have one, and the recipients that have none."""
    routes: list[Route] = []
    unrouted: list[str] = []
    for recipient in recipients:
        try:
            routes.append(table.resolve(recipient))
        except RecipientRefused:
            unrouted.append(recipient)
    return routes, unrouted
