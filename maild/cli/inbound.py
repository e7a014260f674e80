"""`maild inbound`: the spool of accepted deliveries."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from maild.cli.common import (
    clip,
    config_option,
    fail,
    json_option,
    main,
    print_json,
    print_views,
    read_with,
)
from maild.enums import InboundStatus


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

    print_views(
        read_with(config_path, lambda s: list_inbound(s, status, limit)),
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
            clip(v["error"] or "", 50),
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

    row = read_with(config_path, lambda s: get_inbound(s, inbound_id))
    if row is None:
        fail(f"no delivery {inbound_id}")
    if raw:
        sys.stdout.buffer.write(row.raw)
        return
    view = inbound_view(row)
    if as_json:
        print_json(view)
    else:
        for key, value in view.items():
            click.echo(f"{key:>12}: {value}")
