"""The processor's order: mail that pages is filed ahead of a backlog."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlmodel import col, select

from maild.config import load_settings
from maild.database import Database
from maild.models import Inbound
from maild.spool import Delivery, insert_deliveries
from tests.conftest import RunningMaild, mail

BACKLOG = 400


def test_sysops_mail_jumps_a_backlog(make_config: Callable[..., Path]) -> None:
    """400 support@ messages wait to be filed; a sysops@ message sent after them is
    filed before most of them (it waits at most for the batch in hand)."""
    settings = load_settings(make_config())
    database = Database(settings.database.url)
    database.create_schema()
    deliveries = [
        Delivery(
            "smtp",
            "alice@customer.example",
            ["support@altis-dxp.com"],
            b"From: alice@customer.example\r\nTo: support@altis-dxp.com\r\n"
            b"Message-ID: <backlog-%d@customer.example>\r\nSubject: backlog %d\r\n\r\nslow\r\n"
            % (n, n),
        )
        for n in range(BACKLOG)
    ]
    database.run_write(lambda s: insert_deliveries(s, deliveries))
    database.close()
    with RunningMaild(settings) as maild:
        maild.send(mail("Site down", to="sysops@altis-dxp.com"), ["sysops@altis-dxp.com"])
        maild.settle(120)
        rows = maild.service.database.run_read(
            lambda s: s.exec(
                select(Inbound.id, Inbound.rcpt_tos, Inbound.status).order_by(
                    col(Inbound.processed_at), col(Inbound.id)
                )
            ).all()
        )
    assert {status for _, _, status in rows} == {"processed"}
    order = [rcpt for _, rcpt, _ in rows]
    position = order.index(["sysops@altis-dxp.com"])
    # Filed while most of the backlog still waited: after at most the batch the
    # processor had in hand when it arrived (and the few claimed before maild heard).
    assert position < BACKLOG // 4, f"sysops@ mail filed {position}th of {len(order)}"
