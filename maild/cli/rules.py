"""`maild rules`: check, test, explain and replay the routing table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from maild.cli.common import (
    EX_CONFIG,
    config_option,
    fail,
    json_option,
    load_config,
    main,
    print_json,
    print_views,
    read_with,
    rule_table,
    show,
)
from maild.errors import RulesError

if TYPE_CHECKING:  # imported where used: `maild --help` stays quick
    from maild.routing.rules import MessageContext, RuleTable


@main.group()
def rules() -> None:
    """Check and try the routing table."""


@rules.command("check")
@config_option
def rules_check(config_path: Path | None) -> None:
    """Load the whole table; list every problem with file:line (exit 78 if any)."""
    from maild.routing.rules import load_rules

    settings = load_config(config_path)
    try:
        table = load_rules(settings.rules.path)
    except RulesError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{len(exc.problems)} problem(s) in {settings.rules.path}", err=True)
        sys.exit(EX_CONFIG)
    click.echo(
        f"ok: {len(table.routes)} routes, {len(table.domains)} domains "
        f"({', '.join(sorted(table.domains))}), version {table.version[:12]}"
    )


def _header_option(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    headers = []
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            fail(f"--header {value!r}: write NAME=VALUE, for example --header X-Priority=1", 2)
        headers.append((name.strip(), text))
    return tuple(headers)


def _routing_view(
    table: RuleTable, recipients: Sequence[str], context: MessageContext
) -> dict[str, Any]:
    from maild.routing.views import routing_view

    return routing_view(table, recipients, context)


def _echo_routing(view: dict[str, Any], steps: bool) -> None:
    for entry in view["recipients"]:
        recipient = entry["recipient"]
        if not entry["accepted"]:
            click.echo(f"{recipient}: refused at RCPT ({entry['reason']}): {entry['smtp_reply']}")
            continue
        d = entry["decision"]
        extra = "".join(
            [
                ", pages on-call" if d["page"] else "",
                f", application {d['application']}" if d["application"] else "",
                f", tags {', '.join(d['tags'])}" if d["tags"] else "",
                ", dropped (stored, no ticket)" if d["drop"] else "",
            ]
        )
        click.echo(
            f"{recipient}: route {d['route']!r} ({d['file']}:{d['line']}) -> "
            f"{d['type']}, {d['priority']}{extra}"
        )
        if steps:
            for step in entry["steps"]:
                click.echo(f"  {step['route']} ({step['file']}:{step['line']}): {step['outcome']}")
    if steps and view["decision"] is not None and len(view["recipients"]) > 1:
        d = view["decision"]
        click.echo(f"decision: route {d['route']!r} -> {d['type']}, {d['priority']}")


@rules.command("test")
@config_option
@json_option
@click.option("--from", "sender", default="", help="The sender (From) to route as.")
@click.option("--subject", default="", help="The subject to route as.")
@click.option("--header", "headers", multiple=True, help="A header NAME=VALUE (repeatable).")
@click.argument("address")
def rules_test(
    config_path: Path | None,
    as_json: bool,
    sender: str,
    subject: str,
    headers: tuple[str, ...],
    address: str,
) -> None:
    """Where mail to ADDRESS goes: route, type, priority, page (exit 1 if refused)."""
    from maild.routing.rules import MessageContext
    from maild.routing.views import address_view

    settings = load_config(config_path)
    table = rule_table(settings)
    context = MessageContext(sender=sender, subject=subject, headers=_header_option(headers))
    view = _routing_view(table, [address], context)
    (entry,) = view["recipients"]
    if as_json:
        print_json(address_view(table, address, context))
    else:
        _echo_routing(view, steps=True)
    if not entry["accepted"]:
        sys.exit(1)


@rules.command("explain")
@config_option
@json_option
@click.option("--message", "inbound_id", type=int, help="A stored delivery (maild inbound list).")
@click.option("--rcpt", "rcpts", multiple=True, help="Envelope recipient for FILE (repeatable).")
@click.argument(
    "file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
def rules_explain(
    config_path: Path | None,
    as_json: bool,
    inbound_id: int | None,
    rcpts: tuple[str, ...],
    file: Path | None,
) -> None:
    """Which routes were tried for a message, which matched, why others did not, the decision.

    Give a stored delivery (--message ID) or a FILE.eml; for a file the
    recipients are --rcpt, else the message's To and Cc.
    """
    from maild.mail.parsing import parse_message, sender_of
    from maild.routing.rules import MessageContext

    if (inbound_id is None) == (file is None):
        fail("give either --message ID or FILE.eml", 2)
    settings = load_config(config_path)
    table = rule_table(settings)
    mail_from = ""
    filed: dict[str, Any] | None = None
    if inbound_id is not None:
        from maild.store.inbound import filed_by
        from maild.store.models import Inbound

        row, filed = read_with(
            config_path, lambda s: (s.get(Inbound, inbound_id), filed_by(s, inbound_id))
        )
        if row is None:
            fail(f"no inbound delivery {inbound_id}")
        raw, recipients, mail_from = row.raw, list(row.rcpt_tos), row.mail_from
    else:
        assert file is not None
        raw = file.read_bytes()
        recipients = list(rcpts)
    parsed = parse_message(raw, table.header_names)
    if not recipients:
        recipients = [a.email for a in [*parsed.to, *parsed.cc]]
    context = MessageContext.of(parsed, sender_of(parsed, mail_from))
    view = _routing_view(table, recipients, context)
    if inbound_id is not None:
        # The table that filed the message may not be today's: say which one it was.
        view["filed"] = filed
        known = filed["rules_version"] if filed else ""  # "" for mail filed before 0006
        view["table_changed"] = (known != table.version) if known else None
    if as_json:
        print_json(view)
        return
    if inbound_id is not None:
        show(_filed_line(filed, view["decision"], table.version))
    _echo_routing(view, steps=True)


def _filed_line(filed: dict[str, Any] | None, decision: dict[str, Any] | None, version: str) -> str:
    """How a stored message was filed, against what today's table would do."""
    now = f"`{decision['route']}`" if decision else "no route (refused)"
    if filed is None:
        return f"not filed by a route (no ticket message); today's table would choose {now}"
    was = f"filed by `{filed['route']}` into ticket #{filed['ticket']}"
    today = f"today's table ({version[:12]}) would choose {now}"
    if not filed["rules_version"]:
        return f"{was} (table version not recorded); {today}"
    if filed["rules_version"] == version:
        return f"{was} (table {version[:12]}, today's table)"
    return f"{was} (table {filed['rules_version'][:12]}); {today}"


@rules.command("replay")
@config_option
@json_option
@click.option("--since", default="7d", show_default=True, help="How far back: 30m, 12h, 7d.")
@click.option("--changed", is_flag=True, help="Only the messages whose routing would change.")
def rules_replay(config_path: Path | None, as_json: bool, since: str, changed: bool) -> None:
    """How the current table would route recent stored messages, and which would change."""
    from datetime import timedelta

    from maild.config import parse_duration
    from maild.routing.replay import replay
    from maild.store.models import utcnow

    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        fail(f"--since: {exc}", 2)
    settings = load_config(config_path)
    table = rule_table(settings)
    rows = read_with(config_path, lambda s: replay(s, table, utcnow() - timedelta(seconds=seconds)))
    if changed:
        rows = [r for r in rows if r["changed"]]
    if as_json:
        print_json(rows)
        return
    print_views(
        rows,
        False,
        "no messages in that time",
        ["INBOUND", "TICKET", "WAS", "NOW", "TYPE", "PRIORITY", "CHANGED"],
        lambda v: [
            v["inbound"],
            v["ticket_id"] or "",
            v["was"] or "-",
            v["now"] or "-",
            v["type"] or "",
            v["priority"] or "",
            "yes" if v["changed"] else "",
        ],
    )
