"""The bodies of the mail maild sends: one template per kind, per-route overrides, checked
when loaded.

Each kind of mail (`ack`, `reply`, `copy`, `notify`, `solved`) has a built-in
template in maild/templates/<kind>.txt. The `[outbound] templates` folder may
replace it (`<kind>.txt`) and add one per route (`<kind>-<route>.txt`, for mail
about tickets of that route). A template is Python's `string.Template`:
`${name}` placeholders, `$$` for a dollar sign. Which placeholders a kind knows is
KIND_PLACEHOLDERS; an unknown one, or a stray `$`, is refused at load with the
file and line, so a broken template stops `maild serve` (or a reload keeps the
previous ones) instead of failing a mail later.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from maild.errors import ConfigError

KINDS = ("ack", "reply", "copy", "notify", "solved")

# What every desk mail (all kinds but the acknowledgement) can say about its ticket.
_TICKET = frozenset(
    {
        "ticket_id",
        "subject",
        "ticket_type",
        "priority",
        "status",
        "reply_address",
        "desk_address",
        "desk_name",
        "ticket_url",
        "greeting_name",
        "requester_name",
        "requester_email",
    }
)
_WRITER = frozenset({"author_name", "author_email", "body", "attachments_note"})
KIND_PLACEHOLDERS: Mapping[str, frozenset[str]] = {
    "ack": frozenset(
        {
            "ticket_id",
            "subject",
            "ticket_type",
            "priority",
            "greeting_name",
            "requester_name",
            "requester_email",
            "reply_address",
            "desk_address",
            "paging_note",
        }
    ),
    "reply": _TICKET | _WRITER,
    "copy": _TICKET | _WRITER,
    "notify": _TICKET | _WRITER | {"event", "route"},
    "solved": _TICKET,
}


@dataclass(frozen=True)
class Templates:
    """Every kind's body: the default (the folder's `<kind>.txt`, else maild's built-in
    text) and the per-route ones (`<kind>-<route>.txt`)."""

    defaults: dict[str, string.Template]
    by_route: dict[tuple[str, str], string.Template] = field(default_factory=dict)
    folder: str = ""

    def get(self, kind: str, route: str) -> string.Template:
        return self.by_route.get((kind, route), self.defaults[kind])

    def for_route(self, route: str) -> string.Template:
        """The acknowledgement's template for a route."""
        return self.get("ack", route)


def check_template(text: str, source: str, kind: str = "ack") -> string.Template:
    """The template, or ConfigError naming the file and line of a stray `$` or of a
    placeholder this kind does not know."""
    known = KIND_PLACEHOLDERS[kind]
    template = string.Template(text)
    if not template.is_valid():
        # Find the first stray `$` for the error's line.
        for number, line in enumerate(text.splitlines(), start=1):
            if not string.Template(line).is_valid():
                raise ConfigError(
                    f"{source}:{number}: a stray $ (write $$ for a dollar sign, "
                    "${name} for a placeholder)"
                )
        raise ConfigError(f"{source}: a stray $ (write $$ for a dollar sign)")
    for name in template.get_identifiers():
        if name not in known:
            number = next(
                (
                    n
                    for n, line in enumerate(text.splitlines(), start=1)
                    if f"${name}" in line or f"${{{name}}}" in line
                ),
                1,
            )
            raise ConfigError(
                f"{source}:{number}: unknown placeholder ${{{name}}} "
                f"(known in {kind} templates: {', '.join(sorted(known))})"
            )
    return template


def _kind_of(name: str) -> tuple[str, str] | None:
    """(kind, route) a file in the templates folder is for ("" route: the kind's default),
    or None for any other file."""
    if not name.endswith(".txt"):
        return None
    stem = name[: -len(".txt")]
    for kind in KINDS:
        if stem == kind:
            return kind, ""
        if stem.startswith(f"{kind}-") and len(stem) > len(kind) + 1:
            return kind, stem[len(kind) + 1 :]
    return None


def load_templates(folder: Path) -> Templates:
    """Every kind's templates from the folder; maild's built-in text for a kind it has no
    `<kind>.txt` for. Raises ConfigError naming the file and line at fault."""
    defaults: dict[str, string.Template] = {}
    by_route: dict[tuple[str, str], string.Template] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.txt")):
            found = _kind_of(path.name)
            if found is None:
                continue
            kind, route = found
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: cannot read: {exc}") from None
            template = check_template(text, str(path), kind)
            if route:
                by_route[(kind, route)] = template
            else:
                defaults[kind] = template
    for kind in KINDS:
        if kind not in defaults:
            builtin = resources.files("maild").joinpath("templates", f"{kind}.txt")
            defaults[kind] = check_template(builtin.read_text(encoding="utf-8"), str(builtin), kind)
    return Templates(defaults=defaults, by_route=by_route, folder=str(folder))
