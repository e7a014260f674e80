"""`maild agents`: the desk console's accounts (maild/store/agents.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
from sqlmodel import Session

from maild.cli.common import (
    config_option,
    fail,
    json_option,
    load_config,
    main,
    print_views,
    read_with,
    show,
    write_with,
)

T = TypeVar("T")


def _write(config_path: Path | None, work: Callable[[Session], T]) -> T:
    from maild.store.agents import AgentError

    return write_with(config_path, work, (AgentError,))


def _password(password_file: Path | None) -> str:
    """From --password-file (its first line), else asked twice on a terminal."""
    from maild.store.agents import AgentError, check_password

    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--password-file {password_file}: {exc}")
        password = text.splitlines()[0] if text.splitlines() else ""
    elif sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        fail("give --password-file FILE, or run this on a terminal to be asked", 2)
    try:
        return check_password(password)
    except AgentError as exc:
        fail(str(exc))


def _checked_agent(config_path: Path | None, email: str) -> str:
    """EMAIL as the desk records it; exit 1 unless [desk] agents matches it."""
    from maild.desk.actions import NotAllowed, check_agent

    settings = load_config(config_path)
    if not settings.desk.agents:
        fail(
            "[desk] agents lists nobody: set it to the desk's staff (for example "
            'agents = ["*@altis-dxp.com"]) before adding console accounts',
            78,
        )
    try:
        return check_agent(email, settings.desk.agents, "EMAIL")
    except NotAllowed as exc:
        fail(str(exc))


@main.group()
def agents() -> None:
    """The desk console's accounts: add, list, disable, enable, passwd."""


@agents.command("add")
@config_option
@click.argument("email")
@click.option("--name", default="", help="The agent's name, as the console shows it.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the password from this file's first line (else it is asked twice).",
)
def agents_add(config_path: Path | None, email: str, name: str, password_file: Path | None) -> None:
    """Make a console account for EMAIL, which [desk] agents must match."""
    from maild.store.agents import add_agent

    email = _checked_agent(config_path, email)
    password = _password(password_file)
    agent = _write(config_path, lambda s: add_agent(s, email, name, password))
    show(f"agent {agent.email} added; sign in at /console/sign-in")


@agents.command("list")
@config_option
@json_option
def agents_list(config_path: Path | None, as_json: bool) -> None:
    """Every account, by address: never a password or its hash."""
    from maild.store.agents import list_agents

    print_views(
        read_with(config_path, list_agents),
        as_json,
        "no agents",
        ["EMAIL", "NAME", "STATE", "CREATED", "LAST SIGN-IN"],
        lambda v: [
            v["email"],
            v["name"],
            "disabled" if v["disabled"] else "active",
            v["created_at"][:16].replace("T", " "),
            (v["last_sign_in_at"] or "never")[:16].replace("T", " "),
        ],
    )


@agents.command("disable")
@config_option
@click.argument("email")
def agents_disable(config_path: Path | None, email: str) -> None:
    """EMAIL can no longer sign in; its sessions end now. Its row stays for the history."""
    from maild.store.agents import disable_agent

    agent = _write(config_path, lambda s: disable_agent(s, email))
    show(f"agent {agent.email} disabled; its sessions are signed out")


@agents.command("enable")
@config_option
@click.argument("email")
def agents_enable(config_path: Path | None, email: str) -> None:
    """EMAIL may sign in again (with its password as it was)."""
    from maild.store.agents import enable_agent

    agent = _write(config_path, lambda s: enable_agent(s, email))
    show(f"agent {agent.email} enabled")


@agents.command("passwd")
@config_option
@click.argument("email")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the new password from this file's first line (else it is asked twice).",
)
def agents_passwd(config_path: Path | None, email: str, password_file: Path | None) -> None:
    """A new password for EMAIL; its sessions end (sign in again with the new one)."""
    from maild.store.agents import set_password

    password = _password(password_file)
    agent = _write(config_path, lambda s: set_password(s, email, password))
    show(f"agent {agent.email}: password changed; its sessions are signed out")
