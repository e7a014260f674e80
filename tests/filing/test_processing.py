"""The processor's order: mail that pages is filed ahead of a backlog."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlmodel import col, select

from maild.config import load_settings
from maild.receive.spool import Delivery, insert_deliveries
from maild.store.database import Database
from maild.store.models import Inbound
from tests.conftest import RunningMaild, mail, wait_until

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


def test_a_stuck_worker_is_killed_through_the_pools_roster(tmp_path: Path) -> None:
    """A worker held by a parse that never returns is killed (the pool's processes are
    its own business: each worker announces its pid when it starts)."""
    import asyncio
    import os
    import time
    from concurrent.futures.process import BrokenProcessPool

    from maild.filing.processing import Processor
    from maild.routing.rules import load_rules
    from tests.conftest import REPO

    async def run() -> None:
        database = Database(f"sqlite:///{tmp_path / 'maild.db'}")
        database.create_schema()
        table = load_rules(REPO / "rules")
        processor = Processor(database, lambda: table, workers=1, parse_timeout=10, poll_interval=1)
        processor.start()
        loop = asyncio.get_running_loop()
        try:
            worker = await loop.run_in_executor(processor._pool, os.getpid)
            stuck = loop.run_in_executor(processor._pool, time.sleep, 600)
            await asyncio.sleep(0.5)
            assert processor._roster is not None
            processor._roster.kill()
            try:
                await asyncio.wait_for(stuck, 30)
                raise AssertionError("the stuck task finished")
            except BrokenProcessPool:
                pass
            assert _gone(worker)
        finally:
            await processor.stop(grace=1)
            database.close()

    asyncio.run(run())


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting to be)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_sysops_mail_is_filed_while_every_queue_worker_is_held(
    make_config: Callable[..., Path],
) -> None:
    """Mail that pages, coming while the queue's batch in hand is large, has a worker of
    its own: it is filed while the queue's only worker is held (here by a task that
    sleeps, then by the large message; in life by a batch of large mail to parse), and
    the large message waits for it."""
    import time

    from maild.filing.processing import URGENT_LANE_BYTES

    settings = load_settings(make_config())  # [processing] workers = 1
    with RunningMaild(settings) as maild:
        processor = maild.service.processor
        pool = processor._pool
        assert pool is not None
        sleeper = pool.submit(time.sleep, 15)  # long enough for a slow CI machine
        wait_until(sleeper.running, 10, "the queue's worker never took the sleeper")
        large = mail("Logs attached", body="x" * 76 + "\n")
        large.add_attachment(b"\0" * URGENT_LANE_BYTES, "application", "gzip", filename="logs.gz")
        maild.send(large, ["support@altis-dxp.com"])
        wait_until(lambda: processor._batch_bytes >= URGENT_LANE_BYTES, 10, "no large batch")
        maild.send(mail("Site down", to="sysops@altis-dxp.com"), ["sysops@altis-dxp.com"])

        def status(rcpt: str) -> str:
            rows = maild.service.database.run_read(
                lambda s: s.exec(select(Inbound.rcpt_tos, Inbound.status)).all()
            )
            (found,) = [status for rcpts, status in rows if rcpts == [rcpt]]
            return found

        wait_until(lambda: status("sysops@altis-dxp.com") == "processed", 12, "sysops@ waited")
        assert not sleeper.done(), "the queue's worker was free after all: nothing was shown"
        assert status("support@altis-dxp.com") == "received"
        maild.settle(30)
        assert status("support@altis-dxp.com") == "processed"


def test_sysops_mail_claimed_with_large_mail_goes_to_the_urgent_lane(
    make_config: Callable[..., Path],
) -> None:
    """Mail that pages, claimed by the queue (free at the time) together with 1 MiB or
    more of older mail, is handed to the urgent lane: it is not filed after the parse of
    that mail. Here the queue's only worker is held, so that only the lane can file it."""
    import time

    from maild.filing.processing import URGENT_LANE_BYTES

    settings = load_settings(make_config())  # [processing] workers = 1
    with RunningMaild(settings) as maild:
        processor = maild.service.processor
        processor._poll_interval = 60.0  # the queue claims when told, not by its poll
        time.sleep(1.0)  # the poll in progress (0.5 s) ends; the next waits a minute
        pool = processor._pool
        assert pool is not None
        sleeper = pool.submit(time.sleep, 15)  # long enough for a slow CI machine
        wait_until(sleeper.running, 10, "the queue's worker never took the sleeper")
        backlog = []
        for n in range(2):
            large = mail(f"Logs {n}", body="x" * 76 + "\n")
            large.add_attachment(
                b"\0" * (URGENT_LANE_BYTES // 2), "application", "gzip", filename="logs.gz"
            )
            rcpts = ["support@altis-dxp.com"]
            backlog.append(Delivery("smtp", "alice@customer.example", rcpts, large.as_bytes()))
        maild.service.database.run_write(lambda s: insert_deliveries(s, backlog))
        assert not processor.busy, "the queue claimed the backlog before the sysops@ mail came"
        maild.send(mail("Site down", to="sysops@altis-dxp.com"), ["sysops@altis-dxp.com"])

        def statuses() -> dict[str, list[str]]:
            rows = maild.service.database.run_read(
                lambda s: s.exec(select(Inbound.rcpt_tos, Inbound.status)).all()
            )
            found: dict[str, list[str]] = {}
            for rcpts, status in rows:
                found.setdefault(rcpts[0], []).append(status)
            return found

        wait_until(
            lambda: statuses()["sysops@altis-dxp.com"] == ["processed"], 12, "sysops@ waited"
        )
        assert not sleeper.done(), "the queue's worker was free after all: nothing was shown"
        assert statuses()["support@altis-dxp.com"] == ["received", "received"]
        maild.settle(30)
        assert statuses()["support@altis-dxp.com"] == ["processed", "processed"]


def test_sysops_mail_behind_a_small_batch_is_first_in_the_next(
    make_config: Callable[..., Path],
) -> None:
    """Behind a small batch the urgent lane is not used (a batch of one costs more than
    the wait): the sysops@ message goes in the queue's next batch, ahead of the older
    support@ mail that does not fit in it."""
    import time

    from maild.filing.processing import MAX_BATCH_MESSAGES

    settings = load_settings(make_config())
    with RunningMaild(settings) as maild:
        processor = maild.service.processor
        pool = processor._pool
        assert pool is not None
        sleeper = pool.submit(time.sleep, 6)  # until the backlog and sysops@ are stored
        wait_until(sleeper.running, 10, "the queue's worker never took the sleeper")
        maild.send(mail("First"), ["support@altis-dxp.com"])
        wait_until(lambda: processor.busy, 10, "the queue never took the first message")
        backlog = [
            Delivery("smtp", "alice@customer.example", ["support@altis-dxp.com"], m.as_bytes())
            for m in (mail(f"Then {n}") for n in range(MAX_BATCH_MESSAGES + 8))
        ]
        maild.service.database.run_write(lambda s: insert_deliveries(s, backlog))
        maild.send(mail("Site down", to="sysops@altis-dxp.com"), ["sysops@altis-dxp.com"])
        assert not sleeper.done(), "the first batch ended before the backlog was stored"
        maild.settle(60)
        assert processor._urgent_pool.pool is None, "the urgent lane was started"
        rows = maild.service.database.run_read(
            lambda s: s.exec(select(Inbound.rcpt_tos, Inbound.processed_at)).all()
        )
    (paged,) = [when for rcpts, when in rows if rcpts == ["sysops@altis-dxp.com"]]
    assert paged is not None
    later = [w for r, w in rows if r != ["sysops@altis-dxp.com"] and w is not None and w > paged]
    # its batch: itself and the 31 oldest; the other 9 of the backlog come after it
    assert len(later) == 9, "the sysops@ message waited for more than the batch in hand"


def test_urgent_ids_filed_meanwhile_are_not_claimed_again(tmp_path: Path) -> None:
    """An urgent id the queue filed before the urgent lane came to it is left alone; a
    claim by id for reprocessing still takes rows in any state."""
    from sqlalchemy import update

    from maild.filing.processing import claim_sized

    database = Database(f"sqlite:///{tmp_path / 'maild.db'}")
    database.create_schema()
    try:
        raw = b"From: a@customer.example\r\nSubject: x\r\n\r\nbody\r\n"
        deliveries = [Delivery("smtp", "a@customer.example", ["sysops@altis-dxp.com"], raw)] * 2
        filed, waiting = database.run_write(lambda s: insert_deliveries(s, deliveries))
        database.run_write(
            lambda s: s.execute(
                update(Inbound).where(col(Inbound.id) == filed).values(status="processed")
            )
        )
        ids = [filed, waiting]
        urgent = database.run_read(lambda s: claim_sized(s, 10, ids=ids, received_only=True))
        assert [i for i, _ in urgent] == [waiting]
        anyhow = database.run_read(lambda s: claim_sized(s, 10, ids=ids))
        assert [i for i, _ in anyhow] == ids
    finally:
        database.close()


def test_pool_workers_tune_malloc(tmp_path: Path) -> None:
    """Each pool worker sets glibc's malloc thresholds as the daemon does (maild.tuning):
    a worker that parsed a 25 MiB message otherwise kept 80 MiB more than it started
    with. Where the C library is not glibc, neither process can."""
    import asyncio

    from maild import tuning
    from maild.filing.processing import Processor
    from maild.routing.rules import load_rules
    from tests.conftest import REPO

    async def run() -> bool:
        database = Database(f"sqlite:///{tmp_path / 'maild.db'}")
        database.create_schema()
        table = load_rules(REPO / "rules")
        processor = Processor(database, lambda: table, workers=1, parse_timeout=10, poll_interval=1)
        processor.start()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(processor._pool, _tuned)
        finally:
            await processor.stop(grace=1)
            database.close()

    assert asyncio.run(run()) is tuning.tune_malloc()


def _tuned() -> bool:
    from maild import tuning

    return tuning.tuned
