"""`maild tickets reply`: an agent's answer (or internal note) from the command line."""

from __future__ import annotations

import mimetypes
import sys
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from maild.cli.common import (
    EX_CONFIG,
    config_option,
    database_problem,
    desk_policy,
    fail,
    json_option,
    load_config,
    open_database,
    print_json,
    rule_table,
    show,
)
from maild.cli.tickets import tickets

EX_USAGE = 2


def _body(source: str) -> str:
    """The reply's text from a file, or stdin for `-`; exit 2 when it is not UTF-8."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        fail(f"--body-file: {source}: {exc.strerror or exc}", EX_USAGE)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        fail(f"--body-file: {source}: not UTF-8 text ({exc.reason} at byte {exc.start})", EX_USAGE)


@tickets.command("reply")
@config_option
@json_option
@click.argument("ticket_id", type=int)
@click.option(
    "--from",
    "agent",
    required=True,
    metavar="AGENT",
    help='The agent answering: an address [desk] agents lists ("Jo Bloggs <jo@x.com>" too).',
)
@click.option(
    "--body-file",
    "body_file",
    required=True,
    metavar="FILE",
    help="The reply's text (UTF-8); - reads standard input.",
)
@click.option("--cc", multiple=True, metavar="ADDR", help="Add a participant (repeatable).")
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="Attach a file (repeatable); only its name is kept, never its folder.",
)
@click.option("--internal", is_flag=True, help="Store an internal note: never mailed.")
def tickets_reply(
    config_path: Path | None,
    as_json: bool,
    ticket_id: int,
    agent: str,
    body_file: str,
    cc: tuple[str, ...],
    attach: tuple[Path, ...],
    internal: bool,
) -> None:
    """Answer a ticket: mailed to the requester and every participant, or (--internal)
    kept as a note nobody is sent. The running daemon sends it within a second."""
    from maild.desk.reply import MailOff, ReplyRefused, TicketNotFound, reply
    from maild.outbound.correspondence import FileData
    from maild.store.models import utcnow

    settings = load_config(config_path)
    policy = desk_policy(settings)
    table = rule_table(settings)
    body = _body(body_file)
    files = []
    total = 0
    for path in attach:
        size = path.stat().st_size
        total += size
        if total > policy.max_attachment_size:  # before reading it all into memory
            fail(
                f"--attach: more than a message may carry ([smtp] max_message_size = "
                f"{policy.max_attachment_size} bytes)",
                EX_USAGE,
            )
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        files.append(FileData(path.name, kind, path.read_bytes()))
    database = open_database(settings)
    try:
        result = database.run_write(
            lambda s: reply(
                s,
                ticket_id,
                agent=agent,
                body=body,
                cc=list(cc),
                attachments=files,
                internal=internal,
                policy=policy,
                table=table,
                now=utcnow(),
            )
        )
    except TicketNotFound:
        fail(f"no ticket {ticket_id}")
    except MailOff as exc:
        fail(str(exc), EX_CONFIG)
    except ReplyRefused as exc:
        fail(str(exc), EX_USAGE)
    except SQLAlchemyError as exc:
        fail(*database_problem(database.name, exc))
    finally:
        database.close()
    if as_json:
        print_json(result.as_dict())
        return
    if result.kind == "note":
        show(f"ticket {ticket_id}: internal note stored as message {result.message_pk}; not mailed")
        return
    sending = [r["email"] for r in result.recipients if r["status"] == "pending"]
    show(f"ticket {ticket_id}: reply stored as message {result.message_pk}")
    if sending:
        show(f"  mail {result.outmail_id} queued to {', '.join(str(a) for a in sending)}")
    for r in result.recipients:
        if r["status"] != "pending":
            show(f"  not sent to {r['email']}: {r['error']}")
    if result.status != "pending":
        show(f"  mail {result.outmail_id} withheld: {result.reason}")
