"""`maild webhooks`: the webhook outbox."""

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
def webhooks() -> None:
    """The webhook outbox: events sent, pending and failed, per [[webhook]]."""


@webhooks.command("list")
@outbox_list_options("events")
@click.option("--webhook", "webhook", metavar="NAME", help="Only this [[webhook]]'s events.")
def webhooks_list(
    config_path: Path | None,
    as_json: bool,
    status: str | None,
    ticket_id: int | None,
    limit: int,
    webhook: str | None,
) -> None:
    """Webhook events, newest first, with why each failed or is still pending."""
    from maild.store.outboxes import list_webhook_events

    print_views(
        read_with(
            config_path,
            lambda s: list_webhook_events(
                s, status=status, ticket_id=ticket_id, webhook=webhook, limit=limit
            ),
        ),
        as_json,
        "no webhook events",
        ["ID", "WEBHOOK", "EVENT", "TICKET", "STATUS", "TRIES", "CREATED", "WHY"],
        lambda v: [
            v["id"],
            v["webhook"],
            v["event"],
            v["ticket_id"],
            v["status"],
            v["attempts"],
            (v["created_at"] or "")[:19].replace("T", " "),
            clip(v["reason"] or v["last_error"] or "", 60),
        ],
    )


@webhooks.command("retry")
@config_option
@click.argument("event_id", type=int)
def webhooks_retry(config_path: Path | None, event_id: int) -> None:
    """Send a failed webhook event again (or a pending one now); the running daemon sends
    it within a second, before that ticket's later events still pending."""
    from maild.outbound.webhooks import retry_webhook

    settings = load_config(config_path)
    row = retry_row(settings, "webhook event", event_id, retry_webhook)
    click.echo(
        f"webhook event {event_id} ({row.event} to {row.webhook}, ticket {row.ticket_id}) "
        "is pending"
    )
    if row.webhook not in {h.name for h in settings.webhook}:
        click.echo(
            f"note: no [[webhook]] is named {row.webhook!r} in {settings.source}: it fails "
            "again unless one is",
            err=True,
        )
