"""Webhooks: every event reaches a real HTTPS receiver once, in order per ticket, signed.

Real SMTP into a real maild (in a thread, or a subprocess where it is killed), real
TLS to a receiver on loopback (tests/fake_webhooks.py) that verifies each signature
and processes each event once by its Maild-Delivery id, as the README tells
receivers to.
"""

from __future__ import annotations

import json
import smtplib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import select

from maild.cli import main
from maild.config import load_settings
from maild.desk.reply import reply
from maild.enums import Priority, TicketStatus
from maild.outbound.webhook_events import Webhooks
from maild.outbound.webhooks import (
    WebhookJob,
    body,
    claim_due,
    sign,
    slack_text,
    verify,
)
from maild.store.database import Database
from maild.store.models import WebhookEvent, utcnow
from maild.store.outboxes import list_webhook_events
from tests.conftest import AGENT, RunningMaild, mail, wait_until
from tests.daemon import Daemon
from tests.fake_events import FakeEvents
from tests.fake_webhooks import SECRET, FakeReceiver, Request
from tests.outbound.test_paging import pagerduty_section

SUPPORT = "support@altis-dxp.com"
SYSOPS = "sysops@altis-dxp.com"
ALICE = "alice@customer.example"
EVERY_EVENT = ["ticket.created", "ticket.updated", "message.created", "page.sent", "page.failed"]
DESK = """
[desk]
agents = ["*@altis-dxp.com"]
ticket_url = "https://desk.example/tickets/{id}"
"""


def webhook_section(
    receiver: FakeReceiver,
    *,
    name: str = "dashboard",
    events: list[str] | None = None,
    more: str = "",
) -> str:
    return f"""
[[webhook]]
name = "{name}"
url = "{receiver.url}"
ca_file = "{receiver.ca_file}"
secret = "{SECRET}"
events = {json.dumps(events or EVERY_EVENT)}
timeout = "2s"
retry_initial = "0.05s"
retry_max = "0.3s"
{more}
"""


@pytest.fixture(autouse=True)
def _quiet(quiet_logging: None) -> None:
    """The CLI reconfigures logging; keep the in-process daemon's logs off stdout."""


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[FakeReceiver]:
    with FakeReceiver(tmp_path / "receiver") as running:
        yield running


@pytest.fixture
def config(make_config: Callable[..., Path], receiver: FakeReceiver) -> Path:
    return make_config(DESK + webhook_section(receiver))


def rows(database: Database, **filters: Any) -> list[dict[str, Any]]:
    """The webhook events as `maild webhooks list --json` shows them, oldest first."""
    return list(reversed(database.run_read(lambda s: list_webhook_events(s, **filters))))


def settled(database: Database, count: int) -> list[dict[str, Any]]:
    """Wait until `count` events exist and none is pending; them, oldest first."""
    wait_until(
        lambda: (
            len(found := rows(database)) == count and all(r["status"] != "pending" for r in found)
        ),
        30,
        f"{count} webhook events settled",
    )
    return rows(database)


def by_ticket(requests: list[Request]) -> dict[int, list[tuple[int, str]]]:
    """Each ticket's events as processed: (delivery id, type), in the order they came."""
    result: dict[int, list[tuple[int, str]]] = {}
    for request in requests:
        event = request.json()
        result.setdefault(event["data"]["ticket"]["id"], []).append((event["id"], event["type"]))
    return result


def opened(maild: RunningMaild, subject: str = "Staging is slow") -> tuple[str, int]:
    """A customer's new ticket: its first mail's Message-ID and the ticket's id."""
    first = mail(subject)
    maild.send(first, [SUPPORT], sender=ALICE)
    maild.settle()
    (ticket,) = [t for t in maild.tickets() if t["subject"] == subject]
    return first["Message-ID"], ticket["id"]


def answered(maild: RunningMaild, first: str, text: str = "Still slow.") -> None:
    maild.send(mail("Re: Staging is slow", body=text, In_Reply_To=first), [SUPPORT], sender=ALICE)
    maild.settle()


def note(maild: RunningMaild, ticket_id: int, text: str) -> None:
    """An agent's internal note, as `maild tickets reply --internal` stores it."""
    service = maild.service
    service.database.run_write(
        lambda s: reply(
            s,
            ticket_id,
            agent=AGENT,
            body=text,
            internal=True,
            policy=service.correspondence,
            table=service.rules,
            now=utcnow(),
        )
    )


# 1. What arrives.


def test_a_tickets_life_reaches_the_receiver_once_each_in_order_and_signed(
    config: Path, receiver: FakeReceiver
) -> None:
    """A new ticket, a reply, a desk change, a note: five events, each once, in order,
    every signature valid, the data as the ticket and messages were stored."""
    with RunningMaild(load_settings(config)) as maild:
        first, ticket_id = opened(maild)
        answered(maild, first)
        maild.change(ticket_id, priority=Priority.HIGH, assignee=AGENT)
        note(maild, ticket_id, "Check the CDN first.")
        processed = receiver.wait_processed(5)
        stored = settled(maild.service.database, 5)
        shown = maild.ticket(ticket_id)
    assert [r.event for r in processed] == [
        "ticket.created",
        "message.created",
        "message.created",
        "ticket.updated",
        "message.created",
    ]
    assert len(receiver.requests) == 5  # nothing was sent twice
    assert all(r.verified for r in processed)
    events = [r.json() for r in processed]
    assert [e["id"] for e in events] == [r["id"] for r in stored]
    assert [r.delivery for r in processed] == [str(r["id"]) for r in stored]
    assert [e["type"] for e in events] == [r.event for r in processed]
    assert {e["version"] for e in events} == {1}
    assert {r.path for r in processed} == {"/hooks"}
    assert {r.headers["content-type"] for r in processed} == {"application/json"}
    assert all(r.headers["user-agent"].startswith("maild/") for r in processed)
    created = events[0]["data"]["ticket"]
    assert (created["id"], created["subject"], created["requester"], created["status"]) == (
        ticket_id,
        "Staging is slow",
        ALICE,
        "open",
    )
    assert created["url"] == f"https://desk.example/tickets/{ticket_id}"
    message_ids = [m["message_id"] for m in shown["messages"]]
    customer, follow_up, internal = (events[i]["data"]["message"] for i in (1, 2, 4))
    assert [customer["message_id"], follow_up["message_id"], internal["message_id"]] == (
        message_ids
    )
    assert (customer["kind"], customer["direction"], customer["internal"]) == (
        "human",
        "inbound",
        False,
    )
    assert customer["from"] == {"name": "Alice Example", "email": ALICE}
    assert customer["text"].strip() == "Hello, our site is slow."
    assert follow_up["text"].strip() == "Still slow."
    assert isinstance(customer["id"], int)
    assert follow_up["id"] > customer["id"]
    assert (internal["kind"], internal["internal"], internal["text"]) == (
        "note",
        True,
        "Check the CDN first.",
    )
    updated = events[3]["data"]
    assert updated["by"] == AGENT
    assert updated["changes"] == [
        {"field": "priority", "old": "normal", "new": "high"},
        {"field": "assignee", "old": None, "new": AGENT},
    ]
    assert updated["ticket"]["priority"] == "high"
    assert [r["status"] for r in stored] == ["sent"] * 5
    assert all(r["attempts"] == 1 for r in stored)


def test_a_reply_that_reopens_a_solved_ticket_is_an_update_by_maild(
    config: Path, receiver: FakeReceiver
) -> None:
    """The customer's reply reopens the ticket: ticket.updated (status solved → open, by
    maild), then its message.created."""
    with RunningMaild(load_settings(config)) as maild:
        first, ticket_id = opened(maild)
        maild.change(ticket_id, status=TicketStatus.SOLVED)
        answered(maild, first, "It is slow again.")
        processed = receiver.wait_processed(5)
    assert [r.event for r in processed][2:] == [
        "ticket.updated",
        "ticket.updated",
        "message.created",
    ]
    reopened = processed[3].json()["data"]
    assert (reopened["by"], reopened["changes"]) == (
        "maild",
        [{"field": "status", "old": "solved", "new": "open"}],
    )


def test_each_webhook_hears_only_its_events(
    make_config: Callable[..., Path], receiver: FakeReceiver, tmp_path: Path
) -> None:
    """Two webhooks: one for new tickets only, one for messages only; each its own rows."""
    with FakeReceiver(tmp_path / "second") as other:
        config = make_config(
            webhook_section(receiver, name="tickets", events=["ticket.created"])
            + webhook_section(other, name="messages", events=["message.created"])
        )
        with RunningMaild(load_settings(config)) as maild:
            first, _ = opened(maild)
            answered(maild, first)
            database = maild.service.database
            receiver.wait_processed(1)
            other.wait_processed(2)
            settled(database, 3)
            named = {r["webhook"]: r["event"] for r in rows(database, webhook="tickets")}
    assert [r.event for r in receiver.processed] == ["ticket.created"]
    assert [r.event for r in other.processed] == ["message.created"] * 2
    assert named == {"tickets": "ticket.created"}


def test_slack_format_posts_one_line_of_text_with_the_ticket_link(
    make_config: Callable[..., Path], receiver: FakeReceiver
) -> None:
    """format = "slack": `{"text": ...}` naming the linked ticket, its subject and sender."""
    config = make_config(
        DESK + webhook_section(receiver, events=["ticket.created"], more='format = "slack"')
    )
    with RunningMaild(load_settings(config)) as maild:
        _, ticket_id = opened(maild, "Site <down> & out")
        (request,) = receiver.wait_processed(1)
    assert request.verified
    assert request.json() == {
        "text": f"New ticket <https://desk.example/tickets/{ticket_id}|#{ticket_id}> "
        f"*Site &lt;down&gt; &amp; out* (question, normal) from Alice Example ({ALICE})"
    }


def test_no_webhook_configured_writes_no_event_rows(maild: RunningMaild) -> None:
    """Without [[webhook]] filing and the desk write nothing to the webhook outbox."""
    first, ticket_id = opened(maild)
    answered(maild, first)
    maild.change(ticket_id, priority=Priority.HIGH)
    assert maild.service.correspondence.webhooks is None
    assert maild.service.webhooks is None
    assert rows(maild.service.database) == []


def test_an_event_commits_with_its_change_or_not_at_all(
    config: Path, receiver: FakeReceiver
) -> None:
    """A desk change whose transaction rolls back leaves no event behind."""
    from maild.desk.actions import Changes, change_ticket

    with RunningMaild(load_settings(config)) as maild:
        _, ticket_id = opened(maild)
        receiver.wait_processed(2)
        context = maild.service.desk()

        def change_then_fail(session: Any) -> None:
            change_ticket(
                session, ticket_id, Changes(priority=Priority.URGENT), by=AGENT, context=context
            )
            assert len(session.exec(select(WebhookEvent)).all()) == 3  # written, uncommitted
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            maild.service.database.run_write(change_then_fail)
        after = rows(maild.service.database)
        (ticket,) = maild.tickets()
    assert [r["event"] for r in after] == ["ticket.created", "message.created"]
    assert ticket["priority"] == "normal"


# 2. Pages.


def test_page_sent_and_page_failed_follow_the_pages_outcome(
    make_config: Callable[..., Path], receiver: FakeReceiver, tmp_path: Path
) -> None:
    """sysops@ mail pages: page.sent after its ticket's events; a refused page: page.failed."""
    with FakeEvents(tmp_path / "events") as events:
        config = make_config(
            pagerduty_section(events.url, events.ca_file)
            + webhook_section(receiver, events=["ticket.created", "page.sent", "page.failed"])
        )
        with RunningMaild(load_settings(config)) as maild:
            maild.send(mail("Site down", to=SYSOPS), [SYSOPS], sender=ALICE)
            first = receiver.wait_processed(2)
            events.fail_always(400, "Event object is invalid")
            maild.send(mail("Database down", to=SYSOPS), [SYSOPS], sender=ALICE)
            processed = receiver.wait_processed(4)
    assert [r.event for r in first] == ["ticket.created", "page.sent"]
    assert [r.event for r in processed[2:]] == ["ticket.created", "page.failed"]
    sent, failed = processed[1].json()["data"], processed[3].json()["data"]
    assert (sent["page"]["action"], sent["page"]["status"]) == ("trigger", "sent")
    assert sent["page"]["sent_at"] is not None
    assert sent["ticket"]["priority"] == "urgent"
    assert failed["page"]["status"] == "failed"
    assert "Event object is invalid" in failed["page"]["error"]
    assert failed["ticket"]["id"] != sent["ticket"]["id"]


# 3. Failures: retried, in order; refused; given up.


def test_a_500_storm_delays_every_event_and_loses_none_in_order(
    config: Path, receiver: FakeReceiver
) -> None:
    """The receiver answers 500 for a while: nothing is processed, every event is retried,
    and once it answers 200 each arrives once, each ticket's in order."""
    receiver.fail_always(500)
    with RunningMaild(load_settings(config)) as maild:
        database = maild.service.database
        first_a, ticket_a = opened(maild, "Staging is slow")
        _, ticket_b = opened(maild, "Backups missing")
        answered(maild, first_a, "Still slow.")
        maild.change(ticket_b, status=TicketStatus.PENDING)
        maild.change(ticket_a, priority=Priority.HIGH)
        receiver.wait_requests(12)
        during = rows(database)
        assert receiver.processed == []
        receiver.reset()
        processed = receiver.wait_processed(7)
        stored = settled(database, 7)
    assert all(r["status"] == "pending" for r in during)
    assert max(r["attempts"] for r in during) >= 2
    assert [r["status"] for r in stored] == ["sent"] * 7
    assert all(r.verified for r in processed)
    order = by_ticket(processed)
    assert [kind for _, kind in order[ticket_a]] == [
        "ticket.created",
        "message.created",
        "message.created",
        "ticket.updated",
    ]
    assert [kind for _, kind in order[ticket_b]] == [
        "ticket.created",
        "message.created",
        "ticket.updated",
    ]
    for events in order.values():
        assert [i for i, _ in events] == sorted(i for i, _ in events)
    # a ticket's next event is posted only once the one before it was answered 200
    for ticket, events in order.items():
        posted = [
            int(r.delivery) for r in receiver.requests if by_ticket([r]).get(ticket) is not None
        ]
        firsts = [posted.index(i) for i, _ in events]
        lasts = [len(posted) - 1 - posted[::-1].index(i) for i, _ in events]
        assert all(lasts[n] < firsts[n + 1] for n in range(len(events) - 1)), posted
    assert len(receiver.requests) > 7


def test_a_refused_event_fails_and_the_tickets_next_event_goes(
    config: Path, receiver: FakeReceiver
) -> None:
    """A 400 fails the event at once (its answer kept); the ticket's next event follows."""
    receiver.fail_next([400])
    with RunningMaild(load_settings(config)) as maild:
        opened(maild)
        (processed,) = receiver.wait_processed(1)
        stored = settled(maild.service.database, 2)
    assert [r["status"] for r in stored] == ["failed", "sent"]
    assert stored[0]["attempts"] == 1
    assert stored[0]["reason"] == 'HTTP 400: {"status": 400}'
    assert processed.event == "message.created"


def test_an_event_still_failing_after_give_up_after_fails(
    make_config: Callable[..., Path], receiver: FakeReceiver
) -> None:
    """503 for ever: retried until give_up_after, then failed with the last answer."""
    receiver.fail_always(503)
    config = make_config(
        webhook_section(receiver, events=["ticket.created"], more='give_up_after = "2s"')
    )
    with RunningMaild(load_settings(config)) as maild:
        opened(maild)
        (row,) = settled(maild.service.database, 1)
    assert row["status"] == "failed"
    assert row["attempts"] >= 2
    assert "gave up after" in row["reason"]
    assert "HTTP 503" in row["reason"]


def test_an_untrusted_certificate_is_retried_not_sent(
    make_config: Callable[..., Path], receiver: FakeReceiver, tmp_path: Path
) -> None:
    """Without the receiver's CA, TLS fails: the event stays pending, nothing is posted."""
    section = webhook_section(receiver, events=["ticket.created"]).replace(
        f'ca_file = "{receiver.ca_file}"\n', ""
    )
    with RunningMaild(load_settings(make_config(section))) as maild:
        opened(maild)
        wait_until(
            lambda: (found := rows(maild.service.database)) and found[0]["attempts"] >= 2,
            30,
            "two attempts",
        )
        (row,) = rows(maild.service.database)
    assert row["status"] == "pending"
    assert "CERTIFICATE_VERIFY_FAILED" in row["last_error"]
    assert receiver.requests == []


# 4. kill -9.


@pytest.mark.slow
def test_kill_9_mid_stream_loses_nothing_and_repeats_only_what_was_in_flight(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A 500 storm, then answers held while the daemon is killed: after restart every event
    is processed once, each ticket's in order; only the held ones were posted twice."""
    receiver = FakeReceiver(tmp_path / "receiver").start()
    config = make_config(DESK + webhook_section(receiver))
    database = Database(load_settings(config).database.url)
    try:
        receiver.fail_always(500)
        first = Daemon(config, tmp_path / "first.log").start()
        try:
            with smtplib.SMTP("127.0.0.1", first.smtp_port, timeout=30) as client:
                originals = [mail(f"Outage {n}") for n in range(3)]
                for message in originals:
                    assert client.send_message(message, ALICE, [SUPPORT]) == {}
                for message in originals:
                    follow = mail("Re: outage", In_Reply_To=message["Message-ID"])
                    assert client.send_message(follow, ALICE, [SUPPORT]) == {}
            wait_until(lambda: len(rows(database)) == 9, 30, "nine events")
            receiver.wait_requests(6)
            receiver.hold()
            receiver.reset()
            held_from = len(receiver.requests)
            receiver.wait_requests(held_from + 1)  # posted, its 200 not yet answered
            first.kill()
        finally:
            first.__exit__()
        held = {r.delivery for r in receiver.requests[held_from:]}
        receiver.release()
        assert any(r["status"] == "pending" and r["attempts"] >= 1 for r in rows(database))
        with Daemon(config, tmp_path / "second.log"):
            processed = receiver.wait_processed(9, 60)
            stored = settled(database, 9)
    finally:
        database.close()
        receiver.stop()
    assert [r["status"] for r in stored] == ["sent"] * 9
    assert sorted(int(r.delivery) for r in processed) == [r["id"] for r in stored]
    assert all(r.verified for r in receiver.requests)
    order = by_ticket(processed)
    assert len(order) == 3
    for events in order.values():
        assert [kind for _, kind in events] == [
            "ticket.created",
            "message.created",
            "message.created",
        ]
        assert [i for i, _ in events] == sorted(i for i, _ in events)
    posted_ok = Counter(r.delivery for r in receiver.requests if r.status == 200)
    repeated = {delivery for delivery, times in posted_ok.items() if times > 1}
    assert repeated <= held
    assert held


# 5. The commands.


@pytest.fixture
def cli() -> Callable[..., Result]:
    def run(config: Path, *args: str) -> Result:
        return CliRunner().invoke(main, [*args, "--config", str(config)])

    return run


def test_webhooks_list_and_retry(
    config: Path, receiver: FakeReceiver, cli: Callable[..., Result]
) -> None:
    """list --json/--status/--ticket/--webhook; retry sends a failed event again; a sent or
    unknown one exits 1."""
    receiver.fail_next([410])
    with RunningMaild(load_settings(config)) as maild:
        _, ticket_id = opened(maild)
        stored = settled(maild.service.database, 2)
        failed_id, sent_id = stored[0]["id"], stored[1]["id"]

        listed = cli(config, "webhooks", "list", "--json")
        failed = cli(config, "webhooks", "list", "--json", "--status", "failed")
        mine = cli(config, "webhooks", "list", "--json", "--ticket", str(ticket_id))
        other = cli(config, "webhooks", "list", "--json", "--webhook", "nobody")
        table = cli(config, "webhooks", "list")
        retried = cli(config, "webhooks", "retry", str(failed_id))
        assert retried.exit_code == 0, retried.output
        receiver.wait_processed(2)
        after = settled(maild.service.database, 2)
        again = cli(config, "webhooks", "retry", str(sent_id))
        unknown = cli(config, "webhooks", "retry", "999")
    views = json.loads(listed.stdout)
    assert [(v["id"], v["status"]) for v in views] == [(sent_id, "sent"), (failed_id, "failed")]
    assert set(views[0]) == {
        "id",
        "webhook",
        "event",
        "ticket_id",
        "status",
        "reason",
        "attempts",
        "last_error",
        "next_attempt_at",
        "created_at",
        "sent_at",
    }
    assert [v["id"] for v in json.loads(failed.stdout)] == [failed_id]
    assert len(json.loads(mine.stdout)) == 2
    assert json.loads(other.stdout) == []
    assert "HTTP 410" in table.stdout
    assert "ticket.created" in table.stdout
    assert retried.stdout == (
        f"webhook event {failed_id} (ticket.created to dashboard, ticket {ticket_id}) is pending\n"
    )
    assert [r["status"] for r in after] == ["sent", "sent"]
    assert [r.event for r in receiver.processed] == ["message.created", "ticket.created"]
    assert (again.exit_code, unknown.exit_code) == (1, 1)
    assert "already sent" in again.stderr
    assert unknown.stderr == "maild: no webhook event 999\n"


# 6. The pieces.


def test_a_signature_verifies_only_for_its_body_secret_and_time() -> None:
    """verify: the same body and secret within five minutes; nothing else."""
    payload = b'{"id":1}'
    header = sign(b"secret", payload, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(b"secret", payload, header, now=1_700_000_100)
    assert not verify(b"secret", payload + b" ", header, now=1_700_000_100)
    assert not verify(b"other", payload, header, now=1_700_000_100)
    assert not verify(b"secret", payload, header, now=1_700_000_301)
    assert not verify(b"secret", payload, "v1=" + header.rpartition("v1=")[2])
    rotated = f"{header},v1={'0' * 64}"
    assert verify(b"secret", payload, rotated, now=1_700_000_000)


def test_the_readmes_verification_snippet_accepts_maild_and_refuses_a_forgery() -> None:
    """The README's Python receiver snippet, run as written, against a signed body."""
    verified = _readme_verified()
    payload = b'{"id":7,"type":"ticket.created"}'
    import time

    header = sign(b"whsec-0123456789abcdef", payload, int(time.time()))
    assert verified(b"whsec-0123456789abcdef", payload, header)
    assert not verified(b"whsec-0123456789abcdef", payload + b"x", header)
    stale = sign(b"whsec-0123456789abcdef", payload, int(time.time()) - 600)
    assert not verified(b"whsec-0123456789abcdef", payload, stale)


def _readme_verified() -> Callable[[bytes, bytes, str], bool]:
    """The README's Python receiver snippet, run as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("```python\n", readme.index("### Verifying a webhook"))
    snippet = readme[start + len("```python\n") : readme.index("```", start + 10)]
    space: dict[str, Any] = {}
    exec(compile(snippet, "README.md", "exec"), space)  # noqa: S102 (our own README)
    verified: Callable[[bytes, bytes, str], bool] = space["verified"]
    return verified


_README_VERIFIED = _readme_verified()


@settings(max_examples=300, deadline=None)
@given(
    header=st.lists(
        st.tuples(
            st.sampled_from(["t", "v1", "v0", "", " t"]),
            st.one_of(
                st.text(max_size=70),
                st.sampled_from(["²", "١٧٠٠٠٠٠٠٠٠", "9" * 400, "é" * 64, "-1", "+5"]),
            ),
        ),
        max_size=5,
    ).map(lambda parts: ",".join(f"{k}={v}" for k, v in parts))
)
def test_a_hostile_signature_header_is_refused_never_raised_on(header: str) -> None:
    """Whatever Maild-Signature a forger sends, verify and the README's snippet answer
    False; neither raises (a receiver would answer 500 and be retried, not refuse)."""
    payload = b'{"id":1}'
    assert verify(b"secret", payload, header) is False
    assert _README_VERIFIED(b"secret", payload, header) is False


def test_only_the_oldest_pending_event_of_a_webhook_and_ticket_is_claimed(
    database_url: str,
) -> None:
    """Events 1-2 of ticket A and 3 of ticket B, for one webhook: 1 and 3 are claimed; 2 only
    once 1 is settled, even while 1 is leased (in flight)."""
    from maild.store.models import Ticket

    database = Database(database_url, create=True)
    database.ensure_schema("test", create=True)
    try:
        hooks = Webhooks({"ticket.created": ("w",), "message.created": ("w",)})
        now = utcnow()

        def fill(session: Any) -> None:
            for subject in ("A", "B"):
                session.add(Ticket(type="question", priority="normal", subject=subject))
            session.flush()
            from maild.outbound.webhook_events import insert_rows

            insert_rows(session, hooks.rows("ticket.created", 1, {"n": 1}, now))
            insert_rows(session, hooks.rows("message.created", 1, {"n": 2}, now))
            insert_rows(session, hooks.rows("ticket.created", 2, {"n": 3}, now))

        database.run_write(fill)
        first = database.run_write(lambda s: claim_due(s, utcnow(), 32, 60, "x"))
        again = database.run_write(lambda s: claim_due(s, utcnow(), 32, 60, "x"))

        def settle(session: Any) -> None:
            row = session.get(WebhookEvent, first[0].id)
            row.status = "sent"
            session.add(row)

        database.run_write(settle)
        then = database.run_write(lambda s: claim_due(s, utcnow(), 32, 60, "x"))
    finally:
        database.close()
    assert [(j.ticket_id, j.payload) for j in first] == [(1, {"n": 1}), (2, {"n": 3})]
    assert again == []
    assert [(j.ticket_id, j.payload) for j in then] == [(1, {"n": 2})]


def test_the_maild_body_is_the_event_with_its_delivery_id() -> None:
    job = WebhookJob(7, "w", "ticket.created", 3, {"ticket": {"id": 3}}, 0, utcnow(), utcnow())
    document = json.loads(body(job, "maild"))
    assert document == {
        "id": 7,
        "type": "ticket.created",
        "created_at": job.created_at.isoformat(),
        "version": 1,
        "data": {"ticket": {"id": 3}},
    }


@pytest.mark.parametrize(
    ("event", "data", "text"),
    [
        (
            "ticket.updated",
            {
                "ticket": {"id": 4, "subject": "Slow", "url": ""},
                "changes": [{"field": "status", "old": "open", "new": "solved"}],
                "by": "jo@altis-dxp.com",
            },
            "Ticket #4 *Slow*: status: open → solved (by jo@altis-dxp.com)",
        ),
        (
            "message.created",
            {
                "ticket": {"id": 4, "subject": "Slow", "url": "https://d/4"},
                "message": {
                    "from": {"name": "Jo", "email": "jo@altis-dxp.com"},
                    "internal": True,
                    "text": "Check <the> CDN\nthen DNS",
                },
            },
            "Ticket <https://d/4|#4> *Slow*: new internal note from Jo (jo@altis-dxp.com)\n"
            "> Check &lt;the&gt; CDN\n> then DNS",
        ),
        (
            "page.failed",
            {"ticket": {"id": 4, "subject": ""}, "page": {"action": "trigger", "error": "400"}},
            "Ticket #4 *(no subject)*: PagerDuty trigger failed: 400",
        ),
    ],
)
def test_slack_texts_say_what_happened_with_slacks_characters_escaped(
    event: str, data: dict[str, Any], text: str
) -> None:
    assert slack_text(event, data) == text


# 7. The settings.


def _config_file(folder: Path, body: str) -> Path:
    path = folder / "config.toml"
    path.write_text(body, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    from maild.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


HOOK = """
[[webhook]]
url = "https://hooks.example.com/maild"
events = ["ticket.created"]
secret = "0123456789abcdef"
"""


def test_webhook_settings_are_read_with_their_defaults(tmp_path: Path) -> None:
    """The URL's host names a webhook; a secret file and a CA file are read beside the config."""
    (tmp_path / "secret").write_text("from-a-file-0123456789\n")
    path = _config_file(
        tmp_path,
        HOOK
        + """
[[webhook]]
name = "chat"
url = "http://[::1]:8080/slack"
events = ["page.failed", "message.created"]
secret_file = "secret"
format = "slack"
ca_file = "ca.pem"
timeout = "3s"
""",
    )
    first, second = load_settings(path).webhook
    assert (first.name, first.format, first.timeout, first.give_up_after) == (
        "hooks.example.com",
        "maild",
        10.0,
        86400.0,
    )
    assert (first.retry_initial, first.retry_max) == (5.0, 600.0)
    assert (second.name, second.format, second.timeout) == ("chat", "slack", 3.0)
    assert second.key() == b"from-a-file-0123456789"
    assert second.secret_file == tmp_path / "secret"
    assert second.ca_file == tmp_path / "ca.pem"
    assert "from-a-file" not in repr(second)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://hooks.example.com/x", True),
        ("https://10.0.0.7:8443/x", True),  # named "10.0.0.7-8443"
        ("http://127.0.0.1:9000/x", True),
        ("http://127.8.0.1/x", True),
        ("http://localhost/x", True),
        ("http://[::1]/x", True),
        ("http://hooks.example.com/x", False),
        ("http://10.0.0.7/x", False),
        ("http://localhost.example.com/x", False),
        ("ftp://hooks.example.com/x", False),
        ("https:///x", False),
        ("https://user:pw@hooks.example.com/x", False),
    ],
)
def test_only_https_is_allowed_except_to_this_host(tmp_path: Path, url: str, ok: bool) -> None:
    path = _config_file(tmp_path, HOOK.replace("https://hooks.example.com/maild", url))
    if ok:
        assert load_settings(path).webhook[0].url == url
    else:
        assert _error(path).startswith(f"{path}:3: [[webhook]] #1 url: ")


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (
            ('events = ["ticket.created"]', 'events = ["ticket.created", "ticket.deleted"]'),
            "9: [[webhook]] #2 events",
            "'ticket.deleted' is not an event; the events are ticket.created, "
            "ticket.updated, message.created, page.sent, page.failed",
        ),
        (('events = ["ticket.created"]', "events = []"), "9: [[webhook]] #2 events", "lists no"),
        (
            ('events = ["ticket.created"]', 'events = ["page.sent", "page.sent"]'),
            "9: [[webhook]] #2 events",
            "lists an event twice",
        ),
        (('events = ["ticket.created"]', ""), "7: [[webhook]] #2 events", "required"),
        (
            ('secret = "0123456789abcdef"', ""),
            "7: [[webhook]] #2",
            "needs secret_file (or secret, or the systemd credential webhook-chat.example.com)",
        ),
        (
            ('secret = "0123456789abcdef"', 'secret = "short"'),
            "10: [[webhook]] #2 secret",
            "too short (5 characters; use 16 or more)",
        ),
        (
            ('secret = "0123456789abcdef"', 'secret_file = "missing"'),
            "10: [[webhook]] #2 secret_file",
            "",
        ),
        (('secret = "0123456789abcdef"', 'format = "teams"'), "10: [[webhook]] #2 format", ""),
        (
            ('secret = "0123456789abcdef"', "retries = 3"),
            "10: [[webhook]] #2 retries",
            "unknown key",
        ),
        (('secret = "0123456789abcdef"', 'name = "a b"'), "10: [[webhook]] #2 name", "'a b'"),
    ],
)
def test_a_wrong_webhook_names_its_table_line_and_key(
    tmp_path: Path, change: tuple[str, str], where: str, message: str
) -> None:
    """A problem in the second [[webhook]] names the file, the table's number, line and key."""
    second = HOOK.replace("https://hooks.example.com/maild", "https://chat.example.com/x")
    path = _config_file(tmp_path, HOOK + second.replace(*change))
    assert _error(path).startswith(f"{path}:{where}: {message}")


def test_two_webhooks_with_one_name_and_a_lone_table_are_refused(tmp_path: Path) -> None:
    same = _config_file(tmp_path, HOOK + HOOK)
    assert _error(same) == (
        f"{same}:8: [[webhook]] #2 url: the name 'hooks.example.com' is taken by "
        '[[webhook]] #1; give each webhook its own name = "..."'
    )
    lone = _config_file(tmp_path, HOOK.replace("[[webhook]]", "[webhook]"))
    assert _error(lone) == f"{lone}:2: [webhook]: write [[webhook]], one table per webhook"


def test_the_secret_comes_from_the_systemd_credential_named_for_the_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "webhook-dash").write_text("credential-secret-0123\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(folder))
    path = _config_file(
        tmp_path,
        HOOK.replace('secret = "0123456789abcdef"', "").replace(
            "[[webhook]]", '[[webhook]]\nname = "dash"'
        ),
    )
    (hook,) = load_settings(path).webhook
    assert hook.key() == b"credential-secret-0123"


def test_a_command_refuses_an_http_webhook_to_another_host_with_exit_78(
    tmp_path: Path, cli: Callable[..., Result]
) -> None:
    path = _config_file(tmp_path, HOOK.replace("https://", "http://"))
    done = cli(path, "webhooks", "list")
    assert done.exit_code == 78
    assert done.stderr.startswith(f"maild: {path}:3: [[webhook]] #1 url: ")
    assert "use https://" in done.stderr


def test_the_config_examples_commented_webhooks_load_as_written(tmp_path: Path) -> None:
    """config.example.toml's two [[webhook]] tables, uncommented, are valid settings."""
    text = (Path(__file__).resolve().parents[2] / "config.example.toml").read_text()
    part = text[text.index("# [[webhook]]\n") :]
    body = "\n".join(
        line[2:] if line.startswith("# ") else "" if line == "#" else line
        for line in part.splitlines()
    )
    for name in ("webhook-dashboard", "webhook-slack"):
        (tmp_path / name).write_text("s" * 20)
        body = body.replace(f"/etc/maild/{name}", str(tmp_path / name))
    hooks = load_settings(_config_file(tmp_path, body)).webhook
    assert [(h.name, h.format) for h in hooks] == [
        ("dashboard", "maild"),
        ("slack-support", "slack"),
    ]
    assert hooks[0].events == EVERY_EVENT


def test_changes_made_by_the_cli_reach_the_receiver_through_the_running_daemon(
    config: Path, receiver: FakeReceiver, cli: Callable[..., Result]
) -> None:
    """`tickets set` and `tickets reply --internal` write their events; the daemon's poll
    posts them, after the ticket's earlier events."""
    with RunningMaild(load_settings(config)) as maild:
        _, ticket_id = opened(maild)
        changed = cli(
            config, "tickets", "set", str(ticket_id), "--status", "pending", "--by", AGENT
        )
        assert changed.exit_code == 0, changed.output
        args = ["tickets", "reply", str(ticket_id), "--from", AGENT, "--internal"]
        noted = CliRunner().invoke(
            main,
            [*args, "--body-file", "-", "--config", str(config)],
            input="Waiting for the customer.\n",
        )
        assert noted.exit_code == 0, noted.output
        processed = receiver.wait_processed(4)
    assert [r.event for r in processed] == [
        "ticket.created",
        "message.created",
        "ticket.updated",
        "message.created",
    ]
    assert processed[2].json()["data"]["changes"] == [
        {"field": "status", "old": "open", "new": "pending"}
    ]
    note = processed[3].json()["data"]["message"]
    assert (note["internal"], note["text"]) == (True, "Waiting for the customer.\n")


def test_serve_refuses_a_webhook_ca_file_that_does_not_exist(
    make_config: Callable[..., Path], receiver: FakeReceiver, tmp_path: Path
) -> None:
    from maild.errors import ConfigError
    from maild.service import Service

    section = webhook_section(receiver).replace(str(receiver.ca_file), str(tmp_path / "none"))
    config = make_config(section)
    with pytest.raises(ConfigError) as info:
        Service(load_settings(config))
    assert str(info.value) == (
        f"{config}: [[webhook]] 'dashboard' ca_file: {tmp_path / 'none'}: No such file or directory"
    )


def test_filing_wakes_the_webhooks_sender_rather_than_waiting_for_its_poll(
    config: Path, receiver: FakeReceiver
) -> None:
    """With the sender's poll made 60 s, a new ticket's events still arrive at once."""
    with RunningMaild(load_settings(config)) as maild:
        sender = maild.service.webhooks
        assert sender is not None
        sender._poll = 60.0  # the next wait; only a wake-up ends it early
        maild.send(mail("Woken"), [SUPPORT], sender=ALICE)
        processed = receiver.wait_processed(2, timeout=20)
    assert [r.event for r in processed] == ["ticket.created", "message.created"]


def test_a_change_through_the_api_wakes_the_webhooks_sender(
    make_config: Callable[..., Path], receiver: FakeReceiver
) -> None:
    """A PATCH that changes a ticket (no page, no notice: only ticket.updated) reaches
    the receiver at once, with the sender's poll made 60 s."""
    from tests.http.conftest import bearer, http_url, make_token

    config = make_config('[http]\nlisten = "127.0.0.1:0"\n' + DESK + webhook_section(receiver))
    with RunningMaild(load_settings(config)) as maild:
        _, ticket_id = opened(maild)
        receiver.wait_processed(2, timeout=20)
        sender = maild.service.webhooks
        assert sender is not None
        sender._poll = 60.0  # the next wait; only a wake-up ends it early
        token = make_token(maild.service.database, "desk", "write")
        answer = httpx2.patch(
            f"{http_url(maild)}/api/v1/tickets/{ticket_id}",
            json={"priority": "high", "by": AGENT},
            headers=bearer(token),
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        processed = receiver.wait_processed(3, timeout=20)
    assert [r.event for r in processed] == ["ticket.created", "message.created", "ticket.updated"]
