"""The routing table: `rules/*.toml`, which mail makes which ticket (see rules/README.md).

A table is loaded whole and checked whole: every problem is reported with its
file and line, and a table with any problem is refused (the daemon keeps the
last good one or refuses to start; it never routes by half a table). A loaded
`RuleTable` is immutable, so a reload swaps it atomically while sessions use
the old one.

Routing happens twice. At RCPT only the recipient is known: the first route
*without conditions* (recipients only) that matches it accepts or rejects it.
At filing the sender, subject and headers are known too: the first route in
table order whose every condition holds wins, and what it leaves unset comes
from that base route (`RuleTable.decide`).
"""

from __future__ import annotations

import hashlib
import re
import string
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

from maild.enums import Priority, TicketType
from maild.errors import Problem, RecipientRefused, RulesError
from maild.mail import addresses
from maild.mail.addresses import Address
from maild.tomllines import Table, TomlLines

if TYPE_CHECKING:
    from maild.mail.parsing import ParsedMessage

SET_KEYS = frozenset(
    {"type", "priority", "page", "ack", "application", "tags", "notify", "copy_participants"}
)
BOOLEAN_KEYS = {"page": False, "ack": True}  # and their defaults
APPLICATION_FIELDS = frozenset({"subaddress", "local", "domain", "recipient"})
_LOCAL = re.compile(r"^[^@\s+*]+$")
_REPLY = re.compile(r"^5\d\d [245]\.\d{1,3}\.\d{1,3} \S")


@dataclass(frozen=True)
class Pattern:
    """A `recipients` entry: `box@d`, `*@d`, `box+*@d` or `box+tag@d` (lower-case)."""

    text: str
    local: str  # "*" for any mailbox
    tag: str | None  # None: any or no +tag; "*": any non-empty +tag; else exactly that tag
    domain: str

    @classmethod
    def parse(cls, written: str) -> Pattern | None:
        text = addresses.normalize(written)
        local, at, domain = text.rpartition("@")
        if not at or not addresses.is_domain(domain) or not local:
            return None
        if local == "*":
            return cls(text, "*", None, domain)
        box, plus, tag = local.partition("+")
        if not _LOCAL.match(box) or (plus and (not tag or ("*" in tag and tag != "*"))):
            return None
        return cls(text, box, tag if plus else None, domain)

    def matches(self, address: str) -> bool:
        domain = addresses.domain_of(address)
        if domain != self.domain:
            return False
        if self.local == "*":
            return True
        box = addresses.route_key(address).rpartition("@")[0]
        if box != self.local:
            return False
        tag = addresses.subaddress(address)
        if self.tag is None:
            return True
        return bool(tag) if self.tag == "*" else tag == self.tag


@dataclass(frozen=True)
class MessageContext:
    """What filing knows of a message besides its recipient."""

    sender: str = ""  # From, else MAIL FROM (parsing.sender_of)
    subject: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, parsed: ParsedMessage, sender: Address | None) -> MessageContext:
        """The context of a parsed message whose sender is `sender` (parsing.sender_of)."""
        return cls(
            sender=sender.email if sender else "",
            subject=parsed.subject,
            headers=tuple(parsed.headers),
        )


@dataclass(frozen=True)
class Route:
    """One `[[route]]`: its conditions, what it sets, where it is."""

    name: str
    recipients: tuple[str, ...]  # the patterns as written, normalised
    type: TicketType | None
    priority: Priority | None
    page: bool | None
    file: str
    line: int
    position: int  # order in the whole table: the first route that applies wins
    ack: bool | None = None
    application: str | None = None
    tags: tuple[str, ...] | None = None
    senders: tuple[str, ...] = ()
    sender_domains: tuple[str, ...] = ()
    subject: re.Pattern[str] | None = None
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    drop: bool = False
    reject: str | None = None
    patterns: tuple[Pattern, ...] = field(default=(), repr=False)
    notify: tuple[str, ...] | None = None  # who hears of new tickets and follow-ups
    copy_participants: bool | None = None  # None: [desk] copy_participants decides

    @property
    def unconditional(self) -> bool:
        """Recipients and nothing else: decided at RCPT time."""
        return bool(self.patterns) and not (
            self.senders or self.sender_domains or self.subject or self.headers
        )

    def takes(self, address: str) -> bool:
        return any(p.matches(address) for p in self.patterns)

    def why_not(self, recipient: str, context: MessageContext) -> str | None:
        """None when every condition holds; else the first that does not, in words."""
        if self.patterns and not self.takes(recipient):
            return "recipient not in recipients"
        sender = addresses.normalize(context.sender)
        if self.senders and not any(addresses.sender_matches(s, sender) for s in self.senders):
            return f"sender {sender or '(none)'} is not in senders"
        if self.sender_domains:
            domain = addresses.domain_of(sender)
            if not any(domain == d or domain.endswith("." + d) for d in self.sender_domains):
                return f"sender domain {domain or '(none)'} is not in sender_domains"
        if self.subject is not None and not self.subject.search(context.subject):
            return f"subject does not match /{self.subject.pattern}/"
        for name, regex in self.headers:
            values = [v for k, v in context.headers if k.lower() == name]
            if not any(regex.search(v) for v in values):
                return f"no {name} header matches /{regex.pattern}/"
        return None


@dataclass(frozen=True)
class Decision:
    """How one recipient of one message is routed: the winner's sets over the base's."""

    name: str  # the route that won
    type: TicketType
    priority: Priority
    page: bool
    ack: bool
    application: str
    tags: tuple[str, ...]
    drop: bool
    position: int
    base: str  # the route without conditions that took the recipient at RCPT
    recipient: str
    notify: tuple[str, ...] = ()  # addresses told of new tickets and customer follow-ups
    copy_participants: bool | None = None  # None: as [desk] copy_participants says

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.name,
            "base": self.base,
            "recipient": self.recipient,
            "type": self.type.value,
            "priority": self.priority.value,
            "page": self.page,
            "ack": self.ack,
            "application": self.application,
            "tags": list(self.tags),
            "drop": self.drop,
            "notify": list(self.notify),
            "copy_participants": self.copy_participants,
        }


@dataclass(frozen=True)
class Step:
    """One route tried by `explain`, and what came of it."""

    route: str
    file: str
    line: int
    outcome: str  # wins | applies (an earlier route won) | skipped: <why>


@dataclass(frozen=True)
class RuleTable:
    """An immutable, checked routing table."""

    routes: tuple[Route, ...]
    version: str  # sha256 over the files' names and bytes, recorded with what it routed
    folder: str
    domains: frozenset[str]

    @property
    def header_names(self) -> frozenset[str]:
        """The header fields the routes' `headers` conditions read (lower-case)."""
        return frozenset(name for route in self.routes for name, _ in route.headers)

    def _base(self, address: str) -> Route | None:
        return next((r for r in self.routes if r.unconditional and r.takes(address)), None)

    def resolve(self, address: str) -> Route:
        """The RCPT decision: the base route, or RecipientRefused with the SMTP reply."""
        domain = addresses.domain_of(addresses.route_key(address))
        if domain not in self.domains:
            raise RecipientRefused(
                address,
                f"550 5.7.1 <{address}>: relay access denied, {domain or 'no domain'} "
                "is not a domain of this desk",
                "not our domain",
            )
        route = self._base(address)
        if route is None:
            raise RecipientRefused(
                address, f"550 5.1.1 <{address}>: no such mailbox here", "no route"
            )
        if route.reject is not None:
            raise RecipientRefused(address, route.reject, f"rejected by route {route.name}")
        return route

    def decide(self, recipient: str, context: MessageContext) -> Decision:
        """The route for one recipient of a message; RecipientRefused as at RCPT."""
        base = self.resolve(recipient)
        # The base applies whatever the message says, so some route always does.
        winner = next(r for r in self.routes if r.why_not(recipient, context) is None)
        return _decision(winner, base, recipient)

    def decide_all(
        self, recipients: Sequence[str], context: MessageContext
    ) -> tuple[list[Decision], list[str]]:
        """Decisions for the recipients that have a route, and the recipients that have none."""
        decisions: list[Decision] = []
        unrouted: list[str] = []
        for recipient in recipients:
            try:
                decisions.append(self.decide(recipient, context))
            except RecipientRefused:
                unrouted.append(recipient)
        return decisions, unrouted

    def explain(self, recipient: str, context: MessageContext) -> list[Step]:
        """Every route tried for the recipient, in order: which won, why others did not."""
        steps = []
        won = False
        for route in self.routes:
            why = route.why_not(recipient, context)
            if why is None:
                outcome = "applies (an earlier route won)" if won else "wins"
                won = True
            else:
                outcome = f"skipped: {why}"
            steps.append(Step(route.name, route.file, route.line, outcome))
        return steps

    def is_ours(self, address: str) -> bool:
        """True when an address is one of the desk's own (a route takes it)."""
        try:
            self.resolve(address)
        except RecipientRefused as refused:
            return refused.reason.startswith("rejected")
        return True

    def route_named(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    def paging_route(self, kind: TicketType, priority: Priority) -> Route | None:
        """The route whose mail pages for a ticket of this type at this priority: the first,
        in table order, with recipients and `page = true` that makes this type at this
        priority or a lower one (the desk raising a ticket there pages as that mail would)."""
        return next(
            (
                r
                for r in self.routes
                if r.page
                and r.patterns
                and not r.drop
                and r.reject is None
                and r.type == kind
                and r.priority is not None
                and r.priority.rank <= priority.rank
            ),
            None,
        )


def _decision(winner: Route, base: Route, recipient: str) -> Decision:
    def pick(value: Any, fallback: Any) -> Any:
        return value if value is not None else fallback

    template = pick(winner.application, base.application) or ""
    local, domain = addresses.split(addresses.route_key(recipient))
    application = template.format(
        subaddress=addresses.subaddress(recipient),
        local=local,
        domain=domain,
        recipient=addresses.normalize(recipient),
    )
    kind = pick(winner.type, base.type)
    priority = pick(winner.priority, base.priority)
    assert kind is not None  # checked at load: routes with recipients set both
    assert priority is not None
    return Decision(
        name=winner.name,
        type=kind,
        priority=priority,
        page=bool(pick(winner.page, base.page)),
        ack=bool(pick(winner.ack, pick(base.ack, True))),
        application=application,
        tags=tuple(pick(winner.tags, base.tags) or ()),
        drop=winner.drop,
        position=winner.position,
        base=base.name,
        recipient=recipient,
        notify=tuple(pick(winner.notify, base.notify) or ()),
        copy_participants=pick(winner.copy_participants, base.copy_participants),
    )


def best_decision(decisions: Iterable[Decision]) -> Decision:
    """Highest priority among those that do not drop; ties: the earlier route; all drop: first."""
    chosen = list(decisions)
    keep = [d for d in chosen if not d.drop] or chosen
    return min(keep, key=lambda d: (-d.priority.rank, d.position))


@dataclass
class _Locator:
    """Finds the line of a route, key or value in a rules file (tomllib gives none)."""

    toml: TomlLines
    routes: list[Table]

    def route(self, index: int) -> int:
        return self.routes[index].line if index < len(self.routes) else 1

    def _span(self, index: int) -> tuple[int, int]:
        if index < len(self.routes):
            return self.routes[index].line, self.routes[index].end
        return 1, self.toml.top_end

    def key(self, index: int, key: str) -> int:
        return self.toml.key(key, *self._span(index)) or self.route(index)

    def value(self, index: int, value: str) -> int:
        return self.toml.value(value, *self._span(index)) or self.key(index, "recipients")


def _toml_line(error: tomllib.TOMLDecodeError) -> int:
    match = re.search(r"line (\d+)", str(error))
    return int(match.group(1)) if match else 1


_REJECT = 'reject must be an SMTP reply such as "550 5.7.1 This address is retired", not {value!r}'
_NAME = "route needs a name (a non-empty string)"
_REJECT_AT_RCPT = (
    "reject only works on a route with recipients and no other conditions "
    "(it is decided at RCPT time)"
)
_NO_CONDITION = (
    "a route without recipients needs at least one of senders, sender_domains, subject, headers"
)
# What pydantic's own checks (a missing key, a wrong type, an empty list) are reported as: the
# user reads these, never pydantic's words. The validators of RouteSpec raise the rest.
_TYPE_ERRORS = {
    "name": _NAME,
    "drop": "drop must be true or false, not {value!r}",
    "page": "page must be true or false, not {value!r}",
    "ack": "ack must be true or false, not {value!r}",
    "copy_participants": "copy_participants must be true or false, not {value!r}",
    "reject": _REJECT,
    "recipients": "recipients must be a non-empty list of addresses",
    "application": "application must be a string",
}


def _pattern(value: Any) -> Pattern:
    pattern = Pattern.parse(value) if isinstance(value, str) else None
    if pattern is None:
        raise ValueError(
            f"{value!r} is not an address like support@example.com, *@example.com or "
            "sysops+*@example.com"
        )
    return pattern


def _sender(value: str) -> str:
    if not addresses.is_sender_pattern(value):
        raise ValueError(f"{value!r} in senders is not an address or *@domain")
    return value


def _notify(value: str) -> str:
    if not addresses.is_address(value):
        raise ValueError(f"{value!r} in notify is not an address")
    return value.strip().lower()


def _domain(value: str) -> str:
    if not addresses.is_domain(value):
        raise ValueError(f"{value!r} in sender_domains is not a domain")
    return value


def _regex(text: Any, label: str) -> re.Pattern[str]:
    if not isinstance(text, str):
        raise ValueError(f"{label} must be a regular expression in a string")
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{label}: not a valid regular expression: {exc}") from None


class RouteSpec(BaseModel):
    """One [[route]] as written, each key checked on its own (`_whole_route` checks them together).

    Strict: TOML has types, so `page = "yes"` is a mistake to report, not a value to coerce. A
    validator raises ValueError with one argument per problem, so that a key with several (two
    unknown placeholders) reports each; a list element's problem is reported at its own line.
    The fields are in the order their problems are reported.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    drop: bool = False
    page: bool | None = None
    ack: bool | None = None
    reject: str | None = None
    recipients: (
        Annotated[list[Annotated[Pattern, PlainValidator(_pattern)]], Field(min_length=1)] | None
    ) = None
    senders: list[Annotated[str, AfterValidator(_sender)]] = []
    sender_domains: list[Annotated[str, AfterValidator(_domain)]] = []
    subject: re.Pattern[str] | None = None
    headers: dict[str, re.Pattern[str]] | None = None
    type: TicketType | None = None
    priority: Priority | None = None
    application: str | None = None
    tags: list[str] | None = None
    notify: list[Annotated[str, AfterValidator(_notify)]] | None = None
    copy_participants: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError(_NAME)
        return name.strip()

    @field_validator("reject")
    @classmethod
    def _reject(cls, reply: str) -> str:
        if not _REPLY.match(reply):
            raise ValueError(_REJECT.format(value=reply))
        return reply

    @field_validator("senders", "sender_domains", "tags", "notify", mode="before")
    @classmethod
    def _strings(cls, value: Any, info: ValidationInfo) -> Any:
        """Stripped; a wrong list is one problem of the key, and its entries are not checked."""
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"{info.field_name} must be a list of non-empty strings")
        return [v.strip() for v in value]

    @field_validator("subject", mode="plain")
    @classmethod
    def _subject(cls, text: Any) -> re.Pattern[str]:
        return _regex(text, "subject")

    @field_validator("headers", mode="plain")
    @classmethod
    def _headers(cls, table: Any) -> dict[str, re.Pattern[str]]:
        """Every header's regular expression is checked, and each wrong one reported."""
        if not isinstance(table, dict) or not table:
            raise ValueError("headers must be a table of header name = regular expression")
        regexes, wrong = {}, []
        for header, text in table.items():
            try:
                regexes[header] = _regex(text, f"headers.{header}")
            except ValueError as exc:
                wrong.append(str(exc))
        if wrong:
            raise ValueError(*wrong)
        return regexes

    @field_validator("type", "priority", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: ValidationInfo) -> StrEnum:
        kind: type[StrEnum] = TicketType if info.field_name == "type" else Priority
        known = [k.value for k in kind]
        if value not in known:
            raise ValueError(f"{info.field_name} must be one of {', '.join(known)}, not {value!r}")
        return kind(value)

    @field_validator("application")
    @classmethod
    def _application(cls, template: str) -> str:
        """A str.format template of the recipient's parts; each unknown placeholder is reported."""
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ValueError(f"application: {exc}") from None
        known = ", ".join(sorted(APPLICATION_FIELDS))
        unknown = sorted(fields - APPLICATION_FIELDS)
        if unknown:
            raise ValueError(
                *(f"application: unknown placeholder {{{f}}} (known: {known})" for f in unknown)
            )
        return template

    def route(self, file: str, line: int, position: int) -> Route:
        """The Route these keys make (once `_whole_route` has found no problem either)."""
        patterns = tuple(self.recipients or ())

        def flag(value: bool | None, key: str) -> bool | None:
            # A route with recipients is complete; one without (refining) leaves unset to the base.
            return value if value is not None else BOOLEAN_KEYS[key] if patterns else None

        return Route(
            name=self.name,
            recipients=tuple(p.text for p in patterns),
            type=self.type,
            priority=self.priority,
            page=flag(self.page, "page"),
            ack=flag(self.ack, "ack"),
            application=self.application,
            tags=tuple(self.tags) if self.tags is not None else None,
            senders=tuple(s.lower() for s in self.senders),
            sender_domains=tuple(d.lower() for d in self.sender_domains),
            subject=self.subject,
            headers=tuple((h.lower(), regex) for h, regex in (self.headers or {}).items()),
            drop=self.drop,
            reject=self.reject,
            patterns=patterns,
            notify=tuple(self.notify) if self.notify is not None else None,
            copy_participants=self.copy_participants,
            file=file,
            line=line,
            position=position,
        )


def _messages(error: ErrorDetails) -> list[str]:
    """What one pydantic error is reported as: a validator's own words, else ours for the key."""
    key = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted(RouteSpec.model_fields))
        return [f"unknown key {key!r} in [[route]] (known: {known})"]
    if error["type"] == "value_error":
        return [str(message) for message in error["ctx"]["error"].args]
    return [_TYPE_ERRORS[key].format(value=error["input"])]


def _order(error: ErrorDetails) -> tuple[int, str]:
    """Unknown keys first, by name; then the keys in RouteSpec's order."""
    key = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        return -1, key
    return list(RouteSpec.model_fields).index(key), ""


def _whole_route(
    raw: dict[str, Any], failed: set[tuple[int | str, ...]]
) -> Iterator[tuple[str, str | None]]:
    """The route as a whole, as (message, key at fault): a rejecting route is decided at RCPT
    time, a route without recipients refines others, one with recipients must say what it makes.

    It runs even when keys failed (`failed`: their pydantic locations), so that every problem of
    the route is reported at once. A key counts as written even when wrong; recipients count
    when one of them is valid, senders and sender_domains when their list is well formed and
    not empty."""
    recipients = raw.get("recipients")
    patterns = isinstance(recipients, list) and any(
        ("recipients", i) not in failed for i in range(len(recipients))
    )
    conditions = (
        "subject" in raw
        or "headers" in raw
        or any(raw.get(key) and (key,) not in failed for key in ("senders", "sender_domains"))
    )
    drop = raw.get("drop") is True
    if "reject" in raw:
        if drop:
            yield "reject and drop cannot be combined", "reject"
        if not patterns or conditions:
            yield _REJECT_AT_RCPT, "reject"
        sets = sorted(SET_KEYS & raw.keys())
        if sets:
            yield "a rejecting route sets nothing", sets[0]
    elif "recipients" not in raw:
        if not conditions:
            yield _NO_CONDITION, None
    elif not drop:
        for key in ("type", "priority"):
            if not isinstance(raw.get(key), str):  # a string, even unknown, is reported once
                yield f"route needs a {key}", None


def _check_route(
    raw: Any, index: int, position: int, where: _Locator, file: str, problems: list[Problem]
) -> Route | None:
    """The Route of one [[route]]; or None, with every problem it has added to `problems`, each
    at the line of the key or list entry at fault (else the route's)."""
    line = where.route(index)
    if not isinstance(raw, dict):
        problems.append(Problem(file, line, "[[route]] must be a table"))
        return None

    def at(key: str | None) -> int:
        return where.key(index, key) if key is not None and key in raw else line

    spec: RouteSpec | None = None
    errors: list[ErrorDetails] = []
    try:
        spec = RouteSpec.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=_order)
    found: list[Problem] = []
    for error in errors:
        loc = error["loc"]
        here = where.value(index, str(error["input"])) if len(loc) > 1 else at(str(loc[0]))
        found += [Problem(file, here, message) for message in _messages(error)]
    failed = {error["loc"] for error in errors}
    found += [Problem(file, at(key), message) for message, key in _whole_route(raw, failed)]
    problems += found
    return spec.route(file, line, position) if spec is not None and not found else None


def load_rules(folder: Path) -> RuleTable:
    """Load and check every `*.toml` in `folder` (name order); RulesError lists all problems."""
    if not folder.is_dir():
        raise RulesError([Problem(str(folder), 0, "rules folder does not exist")])
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise RulesError([Problem(str(folder), 0, "no *.toml rules files in the folder")])
    loader = _Loader()
    for path in files:
        loader.read(path)
    if not loader.problems and not loader.routes:
        loader.problems.append(Problem(str(folder), 0, "the rules table has no [[route]]"))
    loader.check_reachable()
    if loader.problems:
        raise RulesError(loader.problems)
    return RuleTable(
        routes=tuple(loader.routes),
        version=loader.digest.hexdigest(),
        folder=str(folder),
        domains=frozenset(p.domain for r in loader.routes for p in r.patterns),
    )


@dataclass
class _Loader:
    """The table as it is read file by file, with the checks that span routes and files."""

    problems: list[Problem] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    names: dict[str, tuple[Route, int, float]] = field(default_factory=dict)  # first of each
    shadowed: list[Route] = field(default_factory=list)  # left out as duplicates: still cover
    taken: dict[str, Route] = field(default_factory=dict)  # patterns of unconditional routes

    def read(self, path: Path) -> None:
        """One file: its routes checked one by one, then against the routes read before."""
        file = str(path)
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.problems.append(Problem(file, _toml_line(exc), f"not valid TOML: {exc}"))
            return
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(Problem(file, 0, f"cannot read: {exc}"))
            return
        self.digest.update(path.name.encode() + b"\0" + data + b"\0")
        toml = TomlLines(text)
        where = _Locator(toml, toml.array("route"))
        changed = _mtime(path)  # a duplicate name is blamed on the file changed last
        for key in sorted(set(table) - {"route"}):
            self.problems.append(
                Problem(file, 1, f"unknown top-level key {key!r} (expected [[route]])")
            )
        raw_routes = table.get("route", [])
        if not isinstance(raw_routes, list):
            self.problems.append(Problem(file, 1, "route must be an array of tables: [[route]]"))
            return
        for index, raw in enumerate(raw_routes):
            route = _check_route(raw, index, len(self.routes), where, file, self.problems)
            if route is None or not self._named(route, where.key(index, "name"), changed):
                continue
            if route.unconditional:
                self._claim_recipients(route, raw["recipients"], where, index)
            self.routes.append(route)

    def _named(self, route: Route, line: int, changed: float) -> bool:
        """False for a second route of a name, blamed on the definition the admin touched last
        (the newer file; in one file, the later route), not the one read first."""
        if route.name not in self.names:
            self.names[route.name] = (route, line, changed)
            return True
        first, first_line, first_changed = self.names[route.name]
        here, there = (route.file, line), (first.file, first_line)
        if first_changed > changed:
            here, there = there, here
        self.problems.append(
            Problem(*here, f"duplicate route name {route.name!r} (also at {there[0]}:{there[1]})")
        )
        self.shadowed.append(route)
        return False

    def _claim_recipients(
        self, route: Route, written: list[str], where: _Locator, index: int
    ) -> None:
        """A route without conditions takes its recipients; a second one taking one is wrong."""
        for text, pattern in zip(written, route.patterns, strict=True):
            if pattern.text not in self.taken:
                self.taken[pattern.text] = route
                continue
            first = self.taken[pattern.text]
            self.problems.append(
                Problem(
                    route.file,
                    where.value(index, text),
                    f"duplicate recipient {pattern.text!r}: already routed by "
                    f"{first.name!r} at {first.file}:{first.line}",
                )
            )

    def check_reachable(self) -> None:
        """A recipient of a route with conditions needs a route without them that takes it at
        RCPT, or its mail is refused. A route that failed to load may be the one that would."""
        consequence = "; this may follow from a problem above" if self.problems else ""
        unconditional = [r for r in [*self.routes, *self.shadowed] if r.unconditional]
        for route in self.routes:
            if route.unconditional:
                continue
            for pattern in route.patterns:
                if not any(u.takes(_probe(pattern)) for u in unconditional):
                    self.problems.append(
                        Problem(
                            route.file,
                            route.line,
                            f"recipient {pattern.text!r} of route {route.name!r} has conditions "
                            "but no route without conditions takes it: mail to it would be "
                            "refused" + consequence,
                        )
                    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _probe(pattern: Pattern) -> str:
    """An address the pattern matches, to ask whether a route without conditions takes it."""
    local = "probe" if pattern.local == "*" else pattern.local
    tag = "" if pattern.tag is None else "+" + ("probe" if pattern.tag == "*" else pattern.tag)
    return f"{local}{tag}@{pattern.domain}"
