"""Hot reload of the rules: the file watcher, a broken table in /healthz, reload under load."""

from __future__ import annotations

import json
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlmodel import select

from maild.config import load_settings
from maild.routing.rules import load_rules
from maild.store.models import Ticket
from tests.conftest import BILLING, RunningMaild, mail, wait_until
from tests.test_metrics import get
from tests.test_service import rcpt_code

SUPPORT_AS_TASK = ('type = "question"\npriority = "normal"', 'type = "task"\npriority = "low"')


def test_a_new_rules_file_takes_effect_without_a_signal(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """With [rules] watch on, adding billing.toml routes billing@ within moments."""
    with RunningMaild(load_settings(make_config(watch=True))) as maild:
        assert rcpt_code(maild.smtp_port, "billing@altis-dxp.com") == 550
        (rules_dir / "billing.toml").write_text(BILLING)
        wait_until(
            lambda: rcpt_code(maild.smtp_port, "billing@altis-dxp.com") == 250,
            10,
            "the watcher's reload",
        )
        assert maild.service.rules.route_named("billing") is not None


def test_a_broken_file_keeps_the_table_and_shows_in_healthz_until_fixed(
    make_config: Callable[..., Path], rules_dir: Path
) -> None:
    """A broken save keeps the last good table routing mail; /healthz names file:line."""
    config = make_config('[http]\nlisten = "127.0.0.1:0"\n', watch=True)
    with RunningMaild(load_settings(config)) as maild:
        good = maild.service.rules.version
        broken = rules_dir / "broken.toml"
        broken.write_text('[[route]]\nname = "x"\nrecipients = ["x@altis-dxp.com"]\ntype = "?"\n')
        wait_until(lambda: maild.service.rules_problems, 10, "the failed reload")
        status, body = get(maild, "/healthz")
        health = json.loads(body)
        assert (status, health["status"]) == (200, "ok")  # mail flows, by the last good table
        assert health["rules"] == {
            "version": good,
            "routes": 3,
            "reload_problems": [
                f"{broken}:4: type must be one of question, incident, problem, task, not '?'",
                f"{broken}:1: route needs a priority",
            ],
        }
        maild.send(mail("still routed"), ["support@altis-dxp.com"])
        maild.settle()
        assert [t["type"] for t in maild.tickets()] == ["question"]
        broken.unlink()
        wait_until(lambda: not maild.service.rules_problems, 10, "the repaired reload")
        assert json.loads(get(maild, "/healthz")[1])["rules"]["reload_problems"] == []


def test_fifty_rewrites_under_load_lose_nothing_and_never_mix_tables(
    make_config: Callable[..., Path], rules_dir: Path, tmp_path: Path
) -> None:
    """Mail sent while desk.toml is rewritten 50 times: all accepted, each filed by one table.

    The two tables differ in what support@ makes (a normal question, or a low
    task); every ticket must carry one table's version and that table's type
    and priority. Rewrites are in place (an editor's save), so the watcher also
    sees half-written files: those fail to load and the last good table stays.
    """
    desk = rules_dir / "desk.toml"
    original = desk.read_text()
    variants = [original, original.replace(*SUPPORT_AS_TASK, 1)]
    assert variants[0] != variants[1]
    versions = {}
    for number, text in enumerate(variants):
        folder = tmp_path / f"table{number}"
        folder.mkdir()
        (folder / "desk.toml").write_text(text)
        versions[load_rules(folder).version] = [("question", "normal"), ("task", "low")][number]
    replies: list[int] = []
    stop = threading.Event()

    def send_continuously() -> None:
        with smtplib.SMTP("127.0.0.1", maild.smtp_port, timeout=30) as client:
            number = 0
            while not stop.is_set():
                number += 1
                message = mail(f"under load {number}")
                try:
                    client.send_message(message, to_addrs=["support@altis-dxp.com"])
                    replies.append(250)
                except smtplib.SMTPResponseException as exc:
                    replies.append(exc.smtp_code)
                except smtplib.SMTPRecipientsRefused as exc:
                    replies.extend(code for code, _ in exc.recipients.values())

    with RunningMaild(load_settings(make_config(watch=True))) as maild:
        sender = threading.Thread(target=send_continuously)
        sender.start()
        try:
            for rewrite in range(50):
                desk.write_text(variants[(rewrite + 1) % 2])
                time.sleep(0.12)
        finally:
            stop.set()
            sender.join(30)
        maild.settle()
        tickets = maild.service.database.run_read(
            lambda s: [(t.type, t.priority, t.rules_version) for t in s.exec(select(Ticket)).all()]
        )
    assert replies
    assert set(replies) == {250}
    assert len(tickets) == len(replies)
    seen = set()
    for kind, priority, version in tickets:
        assert version in versions
        assert (kind, priority) == versions[version]
        seen.add(version)
    assert seen == set(versions)  # both tables routed some of the mail
