"""`maild acks`: the acknowledgement outbox."""

from __future__ import annotations

from pathlib import Path

import click

from maild.cli.common import (
    clip,
    config_option,
    load_config,
    main,
    outbox_list_options,
    print_views,
    read_with,
    retry_row,
)


@main.group()
def acks() -> None:
    """The acknowledgement outbox: mail sent to customers, pending, failed and withheld."""


@acks.command("list")
@outbox_list_options("acknowledgements")
def acks_list(
    config_path: Path | None,
    as_json: bool,
    status: str | None,
    ticket_id: int | None,
    limit: int,
) -> None:
    """Acknowledgements, newest first, with their recipients and why any was withheld."""
    from maild.store.outboxes import list_outmail

    print_views(
        read_with(
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
            clip(", ".join(f"{r['email']} ({r['status']})" for r in v["recipients"]), 50),
            clip(v["reason"] or v["last_error"] or "", 60),
        ],
    )


@acks.command("retry")
@config_option
@click.argument("outmail_id", type=int)
def acks_retry(config_path: Path | None, outmail_id: int) -> None:
    """Send a failed or withheld acknowledgement again to its recipients not yet reached."""
    from maild.outbound.mailer import retry_outmail

    settings = load_config(config_path)
    outmail = retry_row(settings, "acknowledgement", outmail_id, retry_outmail)
    click.echo(f"acknowledgement {outmail_id} (ticket {outmail.ticket_id}) is pending")
    if not settings.outbound.enabled:
        click.echo("note: no [outbound] smarthost; it is sent once one is set", err=True)
