"""`maild tokens`: the HTTP API's bearer tokens (maild/store/tokens.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
from sqlmodel import Session

from maild.cli.common import (
    config_option,
    json_option,
    main,
    print_json,
    print_views,
    show,
    write_with,
)

T = TypeVar("T")


def _write(config_path: Path | None, work: Callable[[Session], T]) -> T:
    from maild.store.tokens import TokenError

    return write_with(config_path, work, (TokenError,))


@main.group()
def tokens() -> None:
    """Bearer tokens of the HTTP API: create, list, revoke."""


@tokens.command("create")
@config_option
@json_option
@click.argument("name")
@click.option(
    "--scope",
    type=click.Choice(["read", "write"]),
    required=True,
    help="read: GET only; write: read, and create and change tickets.",
)
@click.option(
    "--customer",
    metavar="ADDR|*@DOMAIN",
    help="Only tickets where a matching address takes part (a dashboard acting for one customer).",
)
def tokens_create(
    config_path: Path | None, as_json: bool, name: str, scope: str, customer: str | None
) -> None:
    """Make a token named NAME and print it, once: only its SHA-256 is stored."""
    from maild.store.tokens import Scope, create_token

    row, token = _write(config_path, lambda s: create_token(s, name, Scope(scope), customer))
    if as_json:
        print_json({"name": row.name, "token": token})
        return
    click.echo(token)
    who = f", customer {row.customer}" if row.customer else ", every ticket"
    click.echo(
        f"token {row.name!r} ({row.scope}{who}); store it now: it is not shown again",
        err=True,
    )


@tokens.command("list")
@config_option
@json_option
def tokens_list(config_path: Path | None, as_json: bool) -> None:
    """Every token (revoked ones too), by name: never the token itself."""
    from maild.cli.common import read_with
    from maild.store.tokens import list_tokens

    print_views(
        read_with(config_path, list_tokens),
        as_json,
        "no tokens",
        ["NAME", "SCOPE", "CUSTOMER", "CREATED", "LAST USED", "REVOKED"],
        lambda v: [
            v["name"],
            v["scope"],
            v["customer"] or "*",
            _minute(v["created_at"]),
            _minute(v["last_used_at"]) or "never",
            _minute(v["revoked_at"]),
        ],
    )


def _minute(timestamp: str | None) -> str:
    return (timestamp or "")[:16].replace("T", " ")


@tokens.command("revoke")
@config_option
@click.argument("name")
def tokens_revoke(config_path: Path | None, name: str) -> None:
    """Revoke the token NAME: requests with it fail from now on; its row stays for audit."""
    from maild.store.tokens import revoke_token

    row = _write(config_path, lambda s: revoke_token(s, name))
    show(f"token {row.name!r} revoked")
