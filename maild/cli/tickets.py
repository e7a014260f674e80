"""`maild tickets`: list, show and change tickets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from maild.cli.common import (
    clip,
    config_option,
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

    views = read_with(
        config_path,
        lambda s: list_tickets(
            s, status=status, type_=type_, priority=priority, search=search, limit=limit
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
    for page in view["pages"]:
        why = f": {page['reason']}" if page["reason"] else ""
        show(f"  page {page['id']}: {page['action']} {page['status']}{why}")
    for ack in view["acknowledgements"]:
        why = (
            f": {ack['reason'] or ack['last_error']}" if ack["reason"] or ack["last_error"] else ""
        )
        show(f"  acknowledgement {ack['id']}: {ack['status']}{why}")
    for person in view["participants"]:
        name = f"{person['name']} " if person["name"] else ""
        bad = f" (undeliverable: {person['undeliverable']})" if "undeliverable" in person else ""
        show(f"  {person['role']:<9} {name}<{person['email']}>{bad}")
    for number, message in enumerate(view["messages"], start=1):
        sender = message["from"]
        flags = ""
        if message["direction"] == "outbound":
            flags = " (sent by maild)"
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
                f"Attachment: {att['filename']} ({att['content_type']}, "
                f"{att['size']} bytes, sha256 {att['sha256'][:12]}…)"
            )
        show("")
        show(message["text"])


def _status_command(name: str, status: str, help_text: str) -> None:
    @tickets.command(name, help=help_text)
    @config_option
    @click.argument("ticket_id", type=int)
    def command(config_path: Path | None, ticket_id: int) -> None:
        from maild.enums import TicketStatus
        from maild.store.tickets import TicketNotFound, set_status

        database = open_database(load_config(config_path))
        try:
            page = database.run_write(lambda s: set_status(s, ticket_id, TicketStatus(status)))
        except TicketNotFound:
            fail(f"no ticket {ticket_id}")
        finally:
            database.close()
        click.echo(f"ticket {ticket_id} is {status}")
        if page is not None:
            click.echo(f"PagerDuty resolve queued as page {page.id} (dedup key {page.dedup_key})")


_status_command("close", "closed", "Close a ticket (a new reply reopens it).")
_status_command("solve", "solved", "Mark a ticket solved (a new reply reopens it).")
_status_command("reopen", "open", "Open a ticket again.")
