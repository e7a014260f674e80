"""`maild pages`: the page outbox, and a test page."""

from __future__ import annotations

from pathlib import Path

import click

from maild.cli.common import (
    EX_CONFIG,
    clip,
    config_option,
    fail,
    load_config,
    main,
    outbox_list_options,
    print_views,
    read_with,
    retry_row,
)


@main.group()
def pages() -> None:
    """The PagerDuty outbox: pages sent, pending, failed and withheld."""


@pages.command("list")
@outbox_list_options("pages")
def pages_list(
    config_path: Path | None,
    as_json: bool,
    status: str | None,
    ticket_id: int | None,
    limit: int,
) -> None:
    """Pages, newest first, with why each was withheld or failed."""
    from maild.store.outboxes import list_pages

    print_views(
        read_with(
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
            clip(v["reason"] or v["last_error"] or "", 70),
        ],
    )


@pages.command("retry")
@config_option
@click.argument("page_id", type=int)
def pages_retry(config_path: Path | None, page_id: int) -> None:
    """Send a failed or withheld page (again); the running daemon sends it within a second."""
    from maild.outbound.pager import retry_page

    settings = load_config(config_path)
    page = retry_row(settings, "page", page_id, retry_page)
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

    settings = load_config(config_path)
    if not settings.pagerduty.key():
        fail("[pagerduty] has no routing_key or routing_key_file", EX_CONFIG)
    try:
        client = EventsClient(settings.pagerduty)
    except (OSError, ValueError) as exc:
        fail(f"[pagerduty] ca_file: {exc}", EX_CONFIG)
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
            fail(f"could not reach {url}: {exc}")
        if exc.status in (408, 429) or exc.status >= 500:
            fail(f"{url} answered {exc.status}, a temporary failure (try again later): {exc}")
        fail(f"PagerDuty refused the test event ({url} answered {exc.status}): {exc}")
    finally:
        client.close()
