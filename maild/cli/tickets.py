"""`maild tickets`: list, show and change tickets."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.exc import SQLAlchemyError

from maild.cli.common import (
    F,
    clip,
    config_option,
    database_problem,
    desk_context,
    fail,
    json_option,
    load_config,
    main,
    open_database,
    print_json,
    print_views,
    read_with,
    show,
)
from maild.config import Settings
from maild.enums import Priority, TicketStatus, TicketType

if TYPE_CHECKING:  # imported where used: `maild --help` stays quick
    from sqlmodel import Session

    from maild.desk.actions import ChangeResult, Changes
    from maild.outbound.correspondence import Planned
    from maild.store.models import Page


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
@click.option(
    "--participant",
    metavar="ADDRESS",
    help="Tickets this address is on (requester or CC) or wrote a message to, in any case.",
)
@click.option("--application", metavar="NAME", help="Tickets of this application, exactly.")
@click.option(
    "--search",
    metavar="WORDS",
    callback=lambda _ctx, _param, value: _check_search(value),
    help="Tickets with a message (subject or text) that has all these words; at most 32.",
)
@click.option("--assignee", metavar="ADDR", help="Only the tickets assigned to this agent.")
@click.option("--unassigned", is_flag=True, help="Only the tickets nobody is assigned.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many tickets.")
def tickets_list(
    config_path: Path | None,
    as_json: bool,
    status: str,
    type_: str | None,
    priority: str | None,
    participant: str | None,
    application: str | None,
    search: str | None,
    assignee: str | None,
    unassigned: bool,
    limit: int | None,
) -> None:
    """Tickets, most recently updated first. The filters combine."""
    from maild.store.tickets import list_tickets

    if assignee is not None and unassigned:
        raise click.UsageError("--assignee and --unassigned cannot be combined")
    views = read_with(
        config_path,
        lambda s: list_tickets(
            s,
            status=status,
            type_=type_,
            priority=priority,
            participant=participant,
            application=application,
            search=search,
            limit=limit,
            assignee=assignee,
            unassigned=unassigned,
        ),
    )
    print_views(
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
            clip(v["subject"] or "(no subject)", 60),
        ],
    )


def _check_search(value: str | None) -> str | None:
    """--search's words counted before the database is opened (exit 2 past the limit)."""
    from maild.store.search import TooManyWords, words

    if value is not None:
        try:
            words(value)
        except TooManyWords as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _page_cell(page: dict[str, Any] | None) -> str:
    if page is None:
        return "-"
    return page["status"] if page["action"] == "trigger" else f"{page['action']}:{page['status']}"


@tickets.command("show")
@config_option
@json_option
@click.argument("ticket_id", type=int)
def tickets_show(config_path: Path | None, as_json: bool, ticket_id: int) -> None:
    """One ticket with its participants and messages."""
    from maild.desk.actions import change_line
    from maild.outbound.outgoing import NOUNS
    from maild.store.tickets import TicketNotFound, show_ticket

    try:
        view = read_with(config_path, lambda s: show_ticket(s, ticket_id))
    except TicketNotFound:
        fail(f"no ticket {ticket_id}")
    if as_json:
        print_json(view)
        return
    show(f"Ticket #{view['id']}: {view['subject'] or '(no subject)'}")
    show(f"  {view['type']}, {view['priority']}, {view['status']}; route {view['rule']}")
    show(f"  created {view['created_at']}, updated {view['updated_at']}")
    show(f"  assignee {view['assignee'] or '(nobody)'}")
    for page in view["pages"]:
        why = f": {page['reason']}" if page["reason"] else ""
        show(f"  page {page['id']}: {page['action']} {page['status']}{why}")
    for ack in view["acknowledgements"]:
        why = (
            f": {ack['reason'] or ack['last_error']}" if ack["reason"] or ack["last_error"] else ""
        )
        noun = NOUNS.get(ack["kind"], ack["kind"])
        show(f"  {noun} {ack['id']}: {ack['status']}{why}")
    for person in view["participants"]:
        name = f"{person['name']} " if person["name"] else ""
        bad = f" (undeliverable: {person['undeliverable']})" if "undeliverable" in person else ""
        show(f"  {person['role']:<9} {name}<{person['email']}>{bad}")
    if view["events"]:
        show("\nEvents:")
        for event in view["events"]:
            when = (event["at"] or "")[:19].replace("T", " ")
            line = change_line(event["field"], event["old"], event["new"])
            show(f"  {when}  {event['by']}  {line}")
    for number, message in enumerate(view["messages"], start=1):
        sender = message["from"]
        flags = ""
        if message["direction"] == "outbound":
            flags = f" ({NOUNS.get(message['kind'], message['kind'])}, sent by maild)"
        elif message["direction"] == "internal":
            flags = " (internal note, never sent)"
        elif message["kind"] == "agent":
            flags = " (agent's reply, verified)"
        elif message["kind"] != "human":
            flags = f" ({message['kind']}: {', '.join(message['auto_reasons'])})"
        show(f"\n--- message {number}: {message['message_id']}{flags}")
        show(f"From: {sender['name'] + ' ' if sender['name'] else ''}<{sender['email']}>")
        show(f"Date: {message['date'] or message['received_at']}")
        show(f"Subject: {message['subject']}")
        if message["defects"]:  # what the parser and filing found (a reused Message-ID, ...)
            show(f"Defects: {'; '.join(message['defects'])}")
        for att in message["attachments"]:
            show(
                f"Attachment {att['number']}: {att['filename']} ({att['content_type']}, "
                f"{att['size']} bytes, sha256 {att['sha256'][:12]}…)"
            )
        show("")
        show(message["text"])


# Changing a ticket: `set`, and its shortcuts `close`, `solve` and `reopen`.


def _by_option(required: bool) -> Callable[[F], F]:
    return click.option(
        "--by",
        metavar="ADDR",
        required=required,
        help=(
            "Who makes the change (recorded on each event; the page's sender for "
            "[escalation] allowed_senders); one of [desk] agents when those are set."
            + ("" if required else "  [default: the user running maild, as USER@HOST]")
        ),
    )


def _who(by: str | None, settings: Settings) -> str:
    """--by checked (exit 2 unless an address, one of [desk] agents when set), or, for the
    shortcuts, the user running the command as USER@HOST (not checked against the agents:
    it names who ran it, not whom someone typed)."""
    return _local_user() if by is None else _checked(by, settings, "--by")


def _checked(address: str, settings: Settings, option: str) -> str:
    """An address option as the desk records it; exit 2 naming the option (check_agent)."""
    from maild.desk.actions import NotAllowed, check_agent

    try:
        return check_agent(address, settings.desk.agents, option)
    except NotAllowed as exc:
        raise click.BadParameter(str(exc).removeprefix(f"{option}: "), param_hint=option) from None


def _local_user() -> str:
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a container's uid)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}".lower()[:320]


def _change(
    settings: Settings, ticket_id: int, changes: Changes, by: str
) -> tuple[ChangeResult, dict[str, Any]]:
    """change_ticket in one transaction; the result and the ticket as `show --json` has it."""
    from maild.desk.actions import NotAllowed, change_ticket
    from maild.store.tickets import TicketNotFound, show_ticket

    context = desk_context(settings)
    database = open_database(settings)

    def work(session: Session) -> tuple[ChangeResult, dict[str, Any]]:
        result = change_ticket(session, ticket_id, changes, by=by, context=context)
        session.flush()
        return result, show_ticket(session, ticket_id)

    try:
        return database.run_write(work)
    except TicketNotFound:
        fail(f"no ticket {ticket_id}")
    except NotAllowed as exc:
        fail(str(exc), 2)
    except SQLAlchemyError as exc:
        fail(*database_problem(database.name, exc))
    finally:
        database.close()


def _page_line(page: Page) -> str:
    if page.status == "withheld":
        return f"PagerDuty {page.action} withheld (page {page.id}): {page.reason}"
    return f"PagerDuty {page.action} queued as page {page.id} (dedup key {page.dedup_key})"


def _notice_line(notice: Planned) -> str:
    """The solved notice: queued to the requester, or withheld and why."""
    mail = notice.outmail
    if mail.status == "withheld":
        return f"solved notice withheld (mail {mail.id}): {mail.reason}"
    return f"solved notice to the requester queued as mail {mail.id}"


CHANGE_OPTIONS = (
    "--priority, --type, --application, --status, --assignee, --unassign or --remove-cc"
)


@tickets.command("set")
@config_option
@json_option
@click.argument("ticket_id", type=int)
@click.option("--priority", type=click.Choice([p.value for p in Priority]))
@click.option("--type", "type_", type=click.Choice([t.value for t in TicketType]))
@click.option("--application", help="The application or environment concerned.")
@click.option("--status", type=click.Choice([s.value for s in TicketStatus]))
@click.option("--assignee", metavar="ADDR", help="The agent working it.")
@click.option("--unassign", is_flag=True, help="Nobody works it any more.")
@click.option(
    "--remove-cc",
    metavar="ADDR",
    multiple=True,
    help="Take this CC off the ticket: no more copies until it writes again (repeatable).",
)
@_by_option(required=True)
def tickets_set(
    config_path: Path | None,
    as_json: bool,
    ticket_id: int,
    priority: str | None,
    type_: str | None,
    application: str | None,
    status: str | None,
    assignee: str | None,
    unassign: bool,
    remove_cc: tuple[str, ...],
    by: str,
) -> None:
    """Change a ticket: each change is an event on it, shown by `tickets show`.

    Raised to a type and priority that a route pages for (incident + urgent in the
    shipped rules), or reopened there, the ticket pages on-call as that route's mail
    would, with --by as the sender; solved, closed or lowered below it, its incident
    is resolved. The running daemon sends the page within a second.
    """
    from maild.desk.actions import Changes, change_line

    if assignee is not None and unassign:
        raise click.UsageError("--assignee and --unassign cannot be combined")
    if (priority, type_, application, status, assignee) == (None,) * 5 and not (
        unassign or remove_cc
    ):
        raise click.UsageError(f"nothing to change: give {CHANGE_OPTIONS}")
    settings = load_config(config_path)
    who = _who(by, settings)
    if assignee is not None:
        assignee = _checked(assignee, settings, "--assignee")
    changes = Changes(
        status=TicketStatus(status) if status else None,
        priority=Priority(priority) if priority else None,
        type=TicketType(type_) if type_ else None,
        application=application,
        assignee=assignee,
        unassign=unassign,
        remove_cc=remove_cc,
    )
    result, view = _change(settings, ticket_id, changes, who)
    if as_json:
        print_json(view)
        return
    if not result.events:
        click.echo(f"ticket {ticket_id} unchanged: it already is as asked")
    for event in result.events:
        show(change_line(event.field, event.old, event.new))
    if result.page is not None:
        show(_page_line(result.page))
    if result.notice is not None:
        show(_notice_line(result.notice))


def _status_command(name: str, status: TicketStatus, help_text: str) -> None:
    @tickets.command(name, help=help_text)
    @config_option
    @click.argument("ticket_id", type=int)
    @_by_option(required=False)
    def command(config_path: Path | None, ticket_id: int, by: str | None) -> None:
        from maild.desk.actions import Changes

        settings = load_config(config_path)
        result, _ = _change(settings, ticket_id, Changes(status=status), _who(by, settings))
        click.echo(f"ticket {ticket_id} is {status.value}")
        if result.page is not None:
            show(_page_line(result.page))
        if result.notice is not None:
            show(_notice_line(result.notice))


_status_command(
    "close", TicketStatus.CLOSED, "Close a ticket (a new reply reopens it); shortcut of `set`."
)
_status_command(
    "solve",
    TicketStatus.SOLVED,
    "Mark a ticket solved (a new reply reopens it); shortcut of `set`.",
)
_status_command(
    "reopen",
    TicketStatus.OPEN,
    "Open a ticket again; shortcut of `set` (an urgent incident reopened pages again).",
)


# Attachments out.


@tickets.command("attachment")
@config_option
@click.argument("ticket_id", type=int)
@click.argument("number", type=click.IntRange(min=1))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bytes to this file (the mail's own filename is never used as a path).",
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def tickets_attachment(
    config_path: Path | None, ticket_id: int, number: int, output: Path | None, force: bool
) -> None:
    """Write attachment NUMBER of a ticket (as numbered in `tickets show`), byte for byte.

    Without -o the bytes go to stdout, but never to a terminal (a customer's file can
    hold escape sequences). An existing FILE is kept unless --force (then replaced
    whole: a reader never sees half of it).
    """
    from maild.store.tickets import AttachmentNotFound, TicketNotFound, attachment_bytes

    if output is None and sys.stdout.isatty():
        raise click.UsageError(
            "will not write an attachment to a terminal: give -o FILE, or redirect stdout"
        )
    if output is not None and not force and output.exists():
        fail(f"{output} exists; give --force to replace it")
    try:
        attachment, data = read_with(config_path, lambda s: attachment_bytes(s, ticket_id, number))
    except TicketNotFound:
        fail(f"no ticket {ticket_id}")
    except AttachmentNotFound as exc:
        fail(str(exc))
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        _write_file(output, data, replace=force)
    except FileExistsError:
        fail(f"{output} exists; give --force to replace it")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    click.echo(
        f"wrote {len(data)} bytes to {output} (attachment {number}: {attachment.filename!r}, "
        f"{attachment.content_type})",
        err=True,
    )


def _write_file(path: Path, data: bytes, *, replace: bool) -> None:
    """`data` as the file `path`, all or nothing: written beside it under a temporary name,
    then renamed over it (replace) or linked to it (never over an existing file)."""
    import os
    import tempfile

    descriptor, temporary = tempfile.mkstemp(prefix=".maild-attachment-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # FileExistsError if someone made it meanwhile
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: O_EXCL, unlinked if cut short
                _write_new(path, data)
    finally:
        if os.path.lexists(temporary):  # linked, or not got that far; renamed: gone already
            os.unlink(temporary)


def _write_new(path: Path, data: bytes) -> None:
    import os

    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
