"""The `maild` command. The only place that turns errors into exit codes.

Exit codes: 0 done; 1 the thing asked for failed or was not found; 2 usage;
78 (EX_CONFIG) the config or rules are wrong. `maild ingest` follows sysexits
for MTAs: 0 stored, 65 too large, 67 unknown recipient, 75 try again later.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from maild import __version__
from maild.config import Settings, default_config_path, load_settings
from maild.enums import InboundStatus, Outcome
from maild.errors import ConfigError, MaildError, RecipientRefused, RulesError
from maild.logs import configure_logging
from maild.mail.display import for_display, json_safe

if TYPE_CHECKING:  # imported where used: `maild --help` stays quick
    from maild.outbound.acks import AckPolicy
    from maild.rules import MessageContext, RuleTable
    from maild.store.database import Database

EX_OK = 0
EX_DATAERR = 65
EX_NOUSER = 67
EX_TEMPFAIL = 75
EX_CONFIG = 78

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Config file [default: $MAILD_CONFIG, else /etc/maild/config.toml]",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def _outbox_list_options(noun: str) -> Callable[[F], F]:
    """The options of an outbox's list command (`pages list`, `acks list`)."""
    from maild.enums import OutboxStatus

    options = [
        config_option,
        json_option,
        click.option("--status", type=click.Choice([s.value for s in OutboxStatus])),
        click.option("--ticket", "ticket_id", type=int, help=f"Only this ticket's {noun}."),
        click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True),
    ]

    def wrap(func: F) -> F:
        for option in reversed(options):  # the first listed is the outermost
            func = option(func)
        return func

    return wrap


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"maild: {message}", err=True)
    sys.exit(code)


def _settings(config_path: Path | None, *, quiet: bool = True) -> Settings:
    path = config_path or default_config_path()
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        _fail(str(exc), EX_CONFIG)
    # Commands print their results on stdout; their own log lines go to stderr.
    configure_logging(
        settings.log.format, "warning" if quiet else settings.log.level, stream=sys.stderr
    )
    return settings


def _print_json(value: Any) -> None:
    click.echo(json_safe(json.dumps(value, indent=2, ensure_ascii=False)))


def _show(text: str) -> None:
    """One line (or block) of human output: controls and bidi controls made visible."""
    click.echo(for_display(text))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [
        [("" if v is None else for_display(str(v))) for v in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        line = "  ".join(value.ljust(widths[i]) for i, value in enumerate(row)).rstrip()
        lines.append(line)
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


_NO_DATABASE = re.compile(r'FATAL:\s+database ".*" does not exist')


def _database_problem(name: str, exc: BaseException) -> tuple[str, int]:
    """A database error as one line naming the database, and its exit code: 78 when the
    database does not exist (a wrong URL), else 1."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    # PostgreSQL's invalid_catalog_name. A refused connection carries no SQLSTATE (libpq
    # gives only the server's text), so its message is read too.
    if getattr(orig, "sqlstate", None) == "3D000" or _NO_DATABASE.search(first):
        return f"there is no database {name}: {first}", EX_CONFIG
    return f"database {name} is not usable: {first}", 1


def _database(settings: Settings, *, create: bool = False, schema: bool = True) -> Database:
    """The configured database, checked: its schema must be this maild's. Only `serve`,
    `ingest` and `db upgrade` may `create` it; every other command on a missing or
    empty database exits 78, naming it and the command that creates it."""
    from maild.store.database import Database, DatabaseMissing

    fix = f"maild db upgrade --config {settings.source}"
    try:
        database = Database(settings.database.url, settings.database.busy_timeout, create=create)
    except DatabaseMissing as exc:
        _fail(f"{exc}; create it with `{fix}`", EX_CONFIG)
    except MaildError as exc:
        _fail(str(exc), EX_CONFIG)
    if not schema:
        return database
    try:
        database.ensure_schema(settings.source, create=create)
    except MaildError as exc:
        database.close()
        _fail(str(exc), EX_CONFIG)
    except SQLAlchemyError as exc:
        database.close()
        _fail(*_database_problem(database.name, exc))
    return database


def _read(config_path: Path | None, work: Callable[[Any], T]) -> T:
    """Run one read against the configured database and close it."""
    database = _database(_settings(config_path))
    try:
        return database.run_read(work)
    except SQLAlchemyError as exc:
        _fail(*_database_problem(database.name, exc))
    finally:
        database.close()


def _retry(settings: Settings, noun: str, row_id: int, retry: Callable[..., T]) -> T:
    """An outbox row made due again (`pages retry`, `acks retry`); exit 1 naming the problem."""
    from maild.outbound.outbox import NotFound, NotRetryable
    from maild.store.models import utcnow

    database = _database(settings)
    try:
        return database.run_write(lambda s: retry(s, row_id, utcnow()))
    except NotFound:
        _fail(f"no {noun} {row_id}")
    except NotRetryable as exc:
        _fail(str(exc))
    finally:
        database.close()


def _print_views(
    views: list[dict[str, Any]],
    as_json: bool,
    empty: str,
    headers: Sequence[str],
    row: Callable[[dict[str, Any]], Sequence[Any]],
) -> None:
    """A list command's output: JSON, a line saying there is nothing, or a table."""
    if as_json:
        _print_json(views)
    elif not views:
        click.echo(empty)
    else:
        click.echo(_table(headers, [row(v) for v in views]))


def _rules(settings: Settings) -> RuleTable:
    from maild.rules import load_rules

    try:
        return load_rules(settings.rules.path)
    except RulesError as exc:
        _fail(f"the rules table is broken:\n{exc}", EX_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maild")
def main() -> None:
    """maild: email in, support tickets out."""


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the SMTP (and LMTP) server until SIGTERM."""
    from maild.service import Service
    from maild.tuning import tune_process

    settings = _settings(config_path, quiet=False)
    configure_logging(settings.log.format, settings.log.level)  # the daemon logs to stdout
    try:
        service = Service(settings)
    except RulesError as exc:
        _fail(f"refusing to start, the rules table is broken:\n{exc}", EX_CONFIG)
    except MaildError as exc:
        _fail(f"refusing to start: {exc}", EX_CONFIG)
    try:
        tune_process()  # the GIL switch interval and malloc's thresholds (maild/tuning.py)
        asyncio.run(service.run())
    except MaildError as exc:  # an out-of-date schema, say
        _fail(f"refusing to start: {exc}", EX_CONFIG)
    except OSError as exc:
        _fail(f"cannot start: {exc}", 1)
    except SQLAlchemyError as exc:
        from maild.store.database import describe

        message, code = _database_problem(describe(settings.database.url), exc)
        _fail(f"cannot start: {message}", code)


@main.command()
@config_option
@click.option(
    "--recipient",
    "recipients",
    multiple=True,
    required=True,
    help="Envelope recipient (repeat for several).",
)
@click.option("--sender", default="", help="Envelope sender (MAIL FROM).")
@click.argument("source", default="-", type=click.Path(allow_dash=True, dir_okay=False))
def ingest(config_path: Path | None, recipients: tuple[str, ...], sender: str, source: str) -> None:
    """Store one message from FILE (or stdin) as an MTA pipe transport would deliver it.

    Exit codes (sysexits): 0 stored, 65 too large, 67 unknown recipient,
    75 temporary failure (the MTA should retry).
    """
    try:
        code = _ingest(config_path, recipients, sender, source)
    except SystemExit:
        raise
    except BaseException as exc:  # anything of ours: the MTA must keep the mail and retry
        click.echo(f"maild: temporary failure: {type(exc).__name__}: {exc}", err=True)
        code = EX_TEMPFAIL
    sys.exit(code)


def _ingest(config_path: Path | None, recipients: tuple[str, ...], sender: str, source: str) -> int:
    from maild.filing.processing import process_now
    from maild.receive.spool import Delivery, insert_deliveries
    from maild.rules import load_rules

    path = config_path or default_config_path()
    try:
        settings = load_settings(path)
        table = load_rules(settings.rules.path)
    except (ConfigError, RulesError) as exc:
        click.echo(f"maild: temporary failure, fix the configuration: {exc}", err=True)
        return EX_TEMPFAIL
    configure_logging(settings.log.format, "warning", stream=sys.stderr)
    for recipient in recipients:
        try:
            table.resolve(recipient)
        except RecipientRefused as refused:
            click.echo(f"maild: {refused.smtp_reply}", err=True)
            return EX_NOUSER
    raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    if len(raw) > settings.smtp.max_message_size:
        click.echo(
            f"maild: message is {len(raw)} bytes, over [smtp] max_message_size "
            f"({settings.smtp.max_message_size})",
            err=True,
        )
        return EX_DATAERR
    from maild.store.database import Database

    database = Database(settings.database.url, settings.database.busy_timeout)
    try:
        database.ensure_schema(settings.source)
        delivery = Delivery(protocol="pipe", mail_from=sender, rcpt_tos=list(recipients), raw=raw)
        (inbound_id,) = database.run_write(lambda s: insert_deliveries(s, [delivery]))
        try:
            from maild.filing.intake import FilingContext
            from maild.outbound.acks import AckPolicy
            from maild.outbound.paging import EscalationPolicy

            context = FilingContext(
                table,
                EscalationPolicy.from_settings(settings),
                AckPolicy.from_settings(settings.outbound),
            )
            (filed,) = process_now(database, context, [inbound_id]) or (None,)
        except Exception as exc:  # stored is what counts; the daemon or reprocess finishes it
            click.echo(f"maild: stored as {inbound_id}; processing deferred: {exc}", err=True)
            return EX_OK
        if filed is not None and filed.outcome is Outcome.FAILED:
            click.echo(f"maild: stored as {inbound_id}; processing failed: {filed.error}", err=True)
        elif filed is not None:
            click.echo(
                f"maild: stored as {inbound_id}; {filed.outcome} ticket {filed.ticket_id}", err=True
            )
    finally:
        database.close()
    return EX_OK


@main.command()
@config_option
@json_option
@click.argument("ids", nargs=-1, type=int)
def reprocess(config_path: Path | None, as_json: bool, ids: tuple[int, ...]) -> None:
    """File deliveries again: the given inbound IDs, else every failed or unprocessed one."""
    from maild.filing.intake import FilingContext
    from maild.filing.processing import process_now
    from maild.outbound.paging import EscalationPolicy
    from maild.store.inbound import unfiled_ids

    settings = _settings(config_path)
    table = _rules(settings)
    database = _database(settings)
    try:
        wanted = list(ids) or database.run_read(unfiled_ids)
        context = FilingContext(table, EscalationPolicy.from_settings(settings), _acks(settings))
        results = process_now(database, context, wanted)
    finally:
        database.close()
    views = [
        {
            "inbound": r.inbound_id,
            "outcome": r.outcome,
            "ticket": r.ticket_id,
            "route": r.route,
            "error": r.error,
        }
        for r in results
    ]
    _print_views(
        views,
        as_json,
        "nothing to reprocess",
        ["INBOUND", "OUTCOME", "TICKET", "ROUTE", "ERROR"],
        lambda v: [v["inbound"], v["outcome"], v["ticket"], v["route"], v["error"]],
    )
    if any(r.outcome is Outcome.FAILED for r in results):
        sys.exit(1)


@main.group()
def tickets() -> None:
    """List, show and change tickets."""


@tickets.command("list")
@config_option
@json_option
@click.option(
    "--status",
    default="open",
    show_default=True,
    type=click.Choice(["open", "closed", "all", "pending", "solved"]),
    help="open = open+pending, closed = solved+closed.",
)
@click.option("--type", "type_", type=click.Choice(["question", "incident", "problem", "task"]))
@click.option("--priority", type=click.Choice(["low", "normal", "high", "urgent"]))
@click.option("--search", help="Text in the subject, requester or messages.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many tickets.")
def tickets_list(
    config_path: Path | None,
    as_json: bool,
    status: str,
    type_: str | None,
    priority: str | None,
    search: str | None,
    limit: int | None,
) -> None:
    """Tickets, most recently updated first."""
    from maild.store.tickets import list_tickets

    views = _read(
        config_path,
        lambda s: list_tickets(
            s, status=status, type_=type_, priority=priority, search=search, limit=limit
        ),
    )
    _print_views(
        views,
        as_json,
        "no tickets",
        ["ID", "TYPE", "PRIORITY", "STATUS", "PAGE", "MSGS", "UPDATED", "REQUESTER", "SUBJECT"],
        lambda v: [
            v["id"],
            v["type"],
            v["priority"],
            v["status"],
            _page_cell(v["page"]),
            v["message_count"],
            (v["updated_at"] or "")[:16].replace("T", " "),
            v["requester"],
            _clip(v["subject"] or "(no subject)", 60),
        ],
    )


def _page_cell(page: dict[str, Any] | None) -> str:
    if page is None:
        return "-"
    return page["status"] if page["action"] == "trigger" else f"{page['action']}:{page['status']}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@tickets.command("show")
@config_option
@json_option
@click.argument("ticket_id", type=int)
def tickets_show(config_path: Path | None, as_json: bool, ticket_id: int) -> None:
    """One ticket with its participants and messages."""
    from maild.store.tickets import TicketNotFound, show_ticket

    try:
        view = _read(config_path, lambda s: show_ticket(s, ticket_id))
    except TicketNotFound:
        _fail(f"no ticket {ticket_id}")
    if as_json:
        _print_json(view)
        return
    _show(f"Ticket #{view['id']}: {view['subject'] or '(no subject)'}")
    _show(f"  {view['type']}, {view['priority']}, {view['status']}; route {view['rule']}")
    _show(f"  created {view['created_at']}, updated {view['updated_at']}")
    for page in view["pages"]:
        why = f": {page['reason']}" if page["reason"] else ""
        _show(f"  page {page['id']}: {page['action']} {page['status']}{why}")
    for ack in view["acknowledgements"]:
        why = (
            f": {ack['reason'] or ack['last_error']}" if ack["reason"] or ack["last_error"] else ""
        )
        _show(f"  acknowledgement {ack['id']}: {ack['status']}{why}")
    for person in view["participants"]:
        name = f"{person['name']} " if person["name"] else ""
        bad = f" (undeliverable: {person['undeliverable']})" if "undeliverable" in person else ""
        _show(f"  {person['role']:<9} {name}<{person['email']}>{bad}")
    for number, message in enumerate(view["messages"], start=1):
        sender = message["from"]
        flags = ""
        if message["direction"] == "outbound":
            flags = " (sent by maild)"
        elif message["kind"] != "human":
            flags = f" ({message['kind']}: {', '.join(message['auto_reasons'])})"
        _show(f"\n--- message {number}: {message['message_id']}{flags}")
        _show(f"From: {sender['name'] + ' ' if sender['name'] else ''}<{sender['email']}>")
        _show(f"Date: {message['date'] or message['received_at']}")
        _show(f"Subject: {message['subject']}")
        if message["defects"]:  # what the parser and filing found (a reused Message-ID, ...)
            _show(f"Defects: {'; '.join(message['defects'])}")
        for att in message["attachments"]:
            _show(
                f"Attachment: {att['filename']} ({att['content_type']}, "
                f"{att['size']} bytes, sha256 {att['sha256'][:12]}…)"
            )
        _show("")
        _show(message["text"])


def _status_command(name: str, status: str, help_text: str) -> None:
    @tickets.command(name, help=help_text)
    @config_option
    @click.argument("ticket_id", type=int)
    def command(config_path: Path | None, ticket_id: int) -> None:
        from maild.enums import TicketStatus
        from maild.store.tickets import TicketNotFound, set_status

        database = _database(_settings(config_path))
        try:
            page = database.run_write(lambda s: set_status(s, ticket_id, TicketStatus(status)))
        except TicketNotFound:
            _fail(f"no ticket {ticket_id}")
        finally:
            database.close()
        click.echo(f"ticket {ticket_id} is {status}")
        if page is not None:
            click.echo(f"PagerDuty resolve queued as page {page.id} (dedup key {page.dedup_key})")


_status_command("close", "closed", "Close a ticket (a new reply reopens it).")
_status_command("solve", "solved", "Mark a ticket solved (a new reply reopens it).")
_status_command("reopen", "open", "Open a ticket again.")


@main.group()
def rules() -> None:
    """Check and try the routing table."""


@rules.command("check")
@config_option
def rules_check(config_path: Path | None) -> None:
    """Load the whole table; list every problem with file:line (exit 78 if any)."""
    from maild.rules import load_rules

    settings = _settings(config_path)
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
            _fail(f"--header {value!r}: write NAME=VALUE, for example --header X-Priority=1", 2)
        headers.append((name.strip(), text))
    return tuple(headers)


def _routing_view(
    table: RuleTable, recipients: Sequence[str], context: MessageContext
) -> dict[str, Any]:
    """How the table routes a message: per recipient every route tried, and the decision."""
    from maild.rules import best_decision

    per_recipient = []
    decisions = []
    for recipient in recipients:
        entry: dict[str, Any] = {"recipient": recipient}
        try:
            decision = table.decide(recipient, context)
        except RecipientRefused as refused:
            entry.update(accepted=False, reason=refused.reason, smtp_reply=refused.smtp_reply)
        else:
            decisions.append(decision)
            route = table.route_named(decision.name)
            assert route is not None  # a decision names a route of the table that made it
            entry.update(
                accepted=True,
                decision={**decision.as_dict(), "file": route.file, "line": route.line},
                steps=[
                    {"route": st.route, "file": st.file, "line": st.line, "outcome": st.outcome}
                    for st in table.explain(recipient, context)
                ],
            )
        per_recipient.append(entry)
    chosen = best_decision(decisions).as_dict() if decisions else None
    return {
        "rules_version": table.version,
        "sender": context.sender,
        "subject": context.subject,
        "recipients": per_recipient,
        "decision": chosen,
    }


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
    from maild.rules import MessageContext

    settings = _settings(config_path)
    table = _rules(settings)
    context = MessageContext(sender=sender, subject=subject, headers=_header_option(headers))
    view = _routing_view(table, [address], context)
    (entry,) = view["recipients"]
    if as_json:
        result = {"address": address, "accepted": entry["accepted"]}
        if entry["accepted"]:
            result.update(entry["decision"])
            result["steps"] = entry["steps"]
        else:
            result.update(reason=entry["reason"], smtp_reply=entry["smtp_reply"])
        _print_json(result)
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
    from maild.rules import MessageContext

    if (inbound_id is None) == (file is None):
        _fail("give either --message ID or FILE.eml", 2)
    settings = _settings(config_path)
    table = _rules(settings)
    mail_from = ""
    filed: dict[str, Any] | None = None
    if inbound_id is not None:
        from maild.store.inbound import filed_by
        from maild.store.models import Inbound

        row, filed = _read(
            config_path, lambda s: (s.get(Inbound, inbound_id), filed_by(s, inbound_id))
        )
        if row is None:
            _fail(f"no inbound delivery {inbound_id}")
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
        _print_json(view)
        return
    if inbound_id is not None:
        _show(_filed_line(filed, view["decision"], table.version))
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
    from maild.replay import replay
    from maild.store.models import utcnow

    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", 2)
    settings = _settings(config_path)
    table = _rules(settings)
    rows = _read(config_path, lambda s: replay(s, table, utcnow() - timedelta(seconds=seconds)))
    if changed:
        rows = [r for r in rows if r["changed"]]
    if as_json:
        _print_json(rows)
        return
    _print_views(
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


@main.group()
def inbound() -> None:
    """Inspect accepted deliveries (the spool) and their processing state."""


@inbound.command("list")
@config_option
@json_option
@click.option("--status", type=click.Choice([s.value for s in InboundStatus]))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def inbound_list(config_path: Path | None, as_json: bool, status: str | None, limit: int) -> None:
    """Accepted deliveries, newest first."""
    from maild.store.inbound import list_inbound

    _print_views(
        _read(config_path, lambda s: list_inbound(s, status, limit)),
        as_json,
        "no deliveries",
        ["ID", "STATUS", "RECEIVED", "FROM", "TO", "SIZE", "TICKET", "ERROR"],
        lambda v: [
            v["id"],
            v["status"],
            (v["received_at"] or "")[:19].replace("T", " "),
            v["mail_from"] or "<>",
            ",".join(v["rcpt_tos"]),
            v["size"],
            v["ticket_id"],
            _clip(v["error"] or "", 50),
        ],
    )


@inbound.command("show")
@config_option
@json_option
@click.option("--raw", is_flag=True, help="Write the raw message bytes to stdout instead.")
@click.argument("inbound_id", type=int)
def inbound_show(config_path: Path | None, as_json: bool, raw: bool, inbound_id: int) -> None:
    """One delivery's envelope and state (or its raw bytes)."""
    from maild.store.inbound import get_inbound, inbound_view

    row = _read(config_path, lambda s: get_inbound(s, inbound_id))
    if row is None:
        _fail(f"no delivery {inbound_id}")
    if raw:
        sys.stdout.buffer.write(row.raw)
        return
    view = inbound_view(row)
    if as_json:
        _print_json(view)
    else:
        for key, value in view.items():
            click.echo(f"{key:>12}: {value}")


@main.group()
def pages() -> None:
    """The PagerDuty outbox: pages sent, pending, failed and withheld."""


@pages.command("list")
@_outbox_list_options("pages")
def pages_list(
    config_path: Path | None,
    as_json: bool,
    status: str | None,
    ticket_id: int | None,
    limit: int,
) -> None:
    """Pages, newest first, with why each was withheld or failed."""
    from maild.store.outboxes import list_pages

    _print_views(
        _read(
            config_path, lambda s: list_pages(s, status=status, ticket_id=ticket_id, limit=limit)
        ),
        as_json,
        "no pages",
        ["ID", "TICKET", "ACTION", "STATUS", "TRIES", "CREATED", "SENDER", "WHY"],
        lambda v: [
            v["id"],
            v["ticket_id"],
            v["action"],
            v["status"],
            v["attempts"],
            (v["created_at"] or "")[:19].replace("T", " "),
            v["sender"],
            _clip(v["reason"] or v["last_error"] or "", 70),
        ],
    )


@pages.command("retry")
@config_option
@click.argument("page_id", type=int)
def pages_retry(config_path: Path | None, page_id: int) -> None:
    """Send a failed or withheld page (again); the running daemon sends it within a second."""
    from maild.outbound.pager import retry_page

    settings = _settings(config_path)
    page = _retry(settings, "page", page_id, retry_page)
    click.echo(f"page {page_id} ({page.action}, ticket {page.ticket_id}) is pending")
    if not settings.pagerduty.enabled:
        click.echo("note: [pagerduty] enabled = false; it is sent once paging is enabled", err=True)


@pages.command("test")
@config_option
@click.option(
    "--no-resolve", is_flag=True, help="Leave the test incident open (resolve it in PagerDuty)."
)
def pages_test(config_path: Path | None, no_resolve: bool) -> None:
    """Send a test trigger (severity info) with the configured routing key, then resolve it.

    This reaches PagerDuty for real: it checks the routing key, events_url,
    ca_file and the network path from this host. Exit 1 saying whether the
    URL could not be reached or PagerDuty answered with a refusal.
    """
    import socket
    import uuid

    from maild.errors import SendDeferred, SendRefused
    from maild.outbound.pager import EventsClient
    from maild.store.models import utcnow

    settings = _settings(config_path)
    if not settings.pagerduty.key():
        _fail("[pagerduty] has no routing_key or routing_key_file", EX_CONFIG)
    try:
        client = EventsClient(settings.pagerduty)
    except (OSError, ValueError) as exc:
        _fail(f"[pagerduty] ca_file: {exc}", EX_CONFIG)
    source = settings.pagerduty.source or settings.smtp.hostname or socket.getfqdn()
    key = f"maild-test-{uuid.uuid4().hex}"
    event = {
        "event_action": "trigger",
        "dedup_key": key,
        "payload": {
            "summary": f"maild test page from {source} (safe to ignore)",
            "source": source,
            "severity": "info",
            "timestamp": utcnow().isoformat(),
            "custom_details": {"test": True},
        },
        "client": "maild",
    }
    try:
        client.send(event)
        click.echo(f"trigger accepted by {settings.pagerduty.events_url} (dedup key {key})")
        if not no_resolve:
            client.send({"event_action": "resolve", "dedup_key": key})
            click.echo("resolve accepted")
    except (SendDeferred, SendRefused) as exc:
        url = settings.pagerduty.events_url
        if exc.status is None:  # no answer at all: DNS, connect, TLS, timeout
            _fail(f"could not reach {url}: {exc}")
        if exc.status in (408, 429) or exc.status >= 500:
            _fail(f"{url} answered {exc.status}, a temporary failure (try again later): {exc}")
        _fail(f"PagerDuty refused the test event ({url} answered {exc.status}): {exc}")
    finally:
        client.close()


def _acks(settings: Settings) -> AckPolicy:
    from maild.outbound.acks import AckPolicy

    try:
        return AckPolicy.from_settings(settings.outbound)
    except ConfigError as exc:
        _fail(str(exc), EX_CONFIG)


@main.group()
def acks() -> None:
    """The acknowledgement outbox: mail sent to customers, pending, failed and withheld."""


@acks.command("list")
@_outbox_list_options("acknowledgements")
def acks_list(
    config_path: Path | None,
    as_json: bool,
    status: str | None,
    ticket_id: int | None,
    limit: int,
) -> None:
    """Acknowledgements, newest first, with their recipients and why any was withheld."""
    from maild.store.outboxes import list_outmail

    _print_views(
        _read(
            config_path,
            lambda s: list_outmail(s, status=status, ticket_id=ticket_id, limit=limit),
        ),
        as_json,
        "no acknowledgements",
        ["ID", "TICKET", "STATUS", "TRIES", "CREATED", "TO", "WHY"],
        lambda v: [
            v["id"],
            v["ticket_id"],
            v["status"],
            v["attempts"],
            (v["created_at"] or "")[:19].replace("T", " "),
            _clip(", ".join(f"{r['email']} ({r['status']})" for r in v["recipients"]), 50),
            _clip(v["reason"] or v["last_error"] or "", 60),
        ],
    )


@acks.command("retry")
@config_option
@click.argument("outmail_id", type=int)
def acks_retry(config_path: Path | None, outmail_id: int) -> None:
    """Send a failed or withheld acknowledgement again to its recipients not yet reached."""
    from maild.outbound.mailer import retry_outmail

    settings = _settings(config_path)
    outmail = _retry(settings, "acknowledgement", outmail_id, retry_outmail)
    click.echo(f"acknowledgement {outmail_id} (ticket {outmail.ticket_id}) is pending")
    if not settings.outbound.enabled:
        click.echo("note: no [outbound] smarthost; it is sent once one is set", err=True)


@main.group()
def db() -> None:
    """The database schema: migrations shipped with maild."""


@db.command("upgrade")
@config_option
@json_option
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(config_path: Path | None, as_json: bool, revision: str) -> None:
    """Migrate the database to this maild's schema (creates it when empty). Safe to rerun."""
    from maild.store.schema import upgrade

    database = _database(_settings(config_path, quiet=False), create=True, schema=False)
    try:
        before, after = upgrade(database.write_engine, revision)
    except SQLAlchemyError as exc:
        message, code = _database_problem(database.name, exc)
        _fail(f"migration failed, the database is unchanged: {message}", code)
    finally:
        database.close()
    if as_json:
        _print_json(
            {
                "database": database.name,
                "before": before,
                "after": after,
                "changed": before != after,
            }
        )
    elif before == after:
        click.echo(f"{database.name}: schema already at revision {after}")
    else:
        click.echo(f"{database.name}: schema upgraded from {before or 'empty'} to revision {after}")


@db.command("current")
@config_option
@json_option
def db_current(config_path: Path | None, as_json: bool) -> None:
    """The database's schema revision and the one this maild needs (exit 1 if they differ;
    78 when there is no database, or no maild tables in it)."""
    from maild.store.schema import SchemaMissing, schema_state

    settings = _settings(config_path, quiet=False)
    database = _database(settings, schema=False)
    try:
        state = schema_state(database.write_engine)
    except SQLAlchemyError as exc:
        _fail(*_database_problem(database.name, exc))
    finally:
        database.close()
    if state.empty and state.current is None:
        _fail(str(SchemaMissing(database.name, settings.source)), EX_CONFIG)
    view = {
        "database": database.name,
        "current": state.current,
        "head": state.head,
        "up_to_date": state.up_to_date,
    }
    if as_json:
        _print_json(view)
    elif state.up_to_date:
        click.echo(f"{database.name}: revision {state.current} (up to date)")
    else:
        click.echo(
            f"{database.name}: revision {state.current or 'none'}, this maild needs "
            f"{state.head}: run `maild db upgrade --config {settings.source}`"
        )
    if not state.up_to_date:
        sys.exit(1)
