"""`maild ingest` (an MTA's pipe transport) and `maild reprocess`: filing by command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from maild.cli.common import (
    EX_DATAERR,
    EX_NOUSER,
    EX_OK,
    EX_TEMPFAIL,
    ack_policy,
    config_option,
    desk_policy,
    json_option,
    load_config,
    main,
    open_database,
    print_views,
    rule_table,
)
from maild.config import default_config_path, load_settings
from maild.enums import Outcome
from maild.errors import ConfigError, RecipientRefused, RulesError
from maild.logs import configure_logging


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
    from maild.routing.rules import load_rules

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
            from maild.outbound.correspondence import DeskPolicy
            from maild.outbound.paging import EscalationPolicy

            acks = AckPolicy.from_settings(settings.outbound)
            context = FilingContext(
                table,
                EscalationPolicy.from_settings(settings),
                acks,
                DeskPolicy.from_settings(settings, acks),
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

    settings = load_config(config_path)
    table = rule_table(settings)
    database = open_database(settings)
    try:
        wanted = list(ids) or database.run_read(unfiled_ids)
        acks = ack_policy(settings)
        context = FilingContext(
            table, EscalationPolicy.from_settings(settings), acks, desk_policy(settings, acks)
        )
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
    print_views(
        views,
        as_json,
        "nothing to reprocess",
        ["INBOUND", "OUTCOME", "TICKET", "ROUTE", "ERROR"],
        lambda v: [v["inbound"], v["outcome"], v["ticket"], v["route"], v["error"]],
    )
    if any(r.outcome is Outcome.FAILED for r in results):
        sys.exit(1)
