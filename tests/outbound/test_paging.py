"""Paging on-call: mail to sysops@ reaches PagerDuty's Events API v2, once per ticket.

Everything is real except PagerDuty itself: real SMTP into a real maild, the
real `pagerduty` client inside it, over real TLS to an HTTPS stand-in for the
Events API (tests/fake_events.py) that checks events as the real API does.
"""

from __future__ import annotations

import io
import json
import logging
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from click.testing import CliRunner, Result
from sqlmodel import select

from maild.cli import main
from maild.config import PagerDutySettings, load_settings
from maild.enums import TicketStatus
from maild.logs import configure_logging
from maild.outbound.outbox import record_outcome
from maild.outbound.pager import CLOSED_BEFORE_SENT, EventsClient
from maild.store.database import Database
from maild.store.models import Page, Ticket, as_utc
from maild.store.outboxes import list_pages
from maild.store.tickets import list_tickets
from tests.conftest import RunningMaild, change, mail, wait_until
from tests.daemon import Daemon
from tests.fake_events import FakeEvents, free_port

ROUTING_KEY = "0123456789abcdef0123456789abcdef"
SYSOPS = "sysops@altis-dxp.com"
SUPPORT = "support@altis-dxp.com"
HOSTING = "hosting@altis-dxp.com"
ALICE = "alice@customer.example"
PAGE_KEYS = {
    "id",
    "ticket_id",
    "action",
    "status",
    "reason",
    "dedup_key",
    "sender",
    "route",
    "summary",
    "attempts",
    "last_error",
    "next_attempt_at",
    "created_at",
    "sent_at",
}


class Logs:
    """The JSON log lines of everything in this process (the in-thread daemon included)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def configure(self) -> None:
        configure_logging("json", "info", stream=self.stream)

    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]
        return [e for e in lines if name is None or e.get("event") == name]


@pytest.fixture(autouse=True)
def logs() -> Iterator[Logs]:
    """Log lines kept for the test to read (and off stdout); process-wide logging reset after."""
    kept = Logs()
    kept.configure()
    yield kept
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


@pytest.fixture
def cli(logs: Logs) -> Callable[..., Result]:
    """`maild ARGS --config CONFIG` in this process; the test's log capture restored after."""

    def run(config: Path, *args: str, stdin: bytes | None = None) -> Result:
        try:
            return CliRunner().invoke(
                main, [*args, "--config", str(config)], input=stdin, catch_exceptions=False
            )
        finally:
            logs.configure()  # the CLI points logging at its own stderr

    return run


@pytest.fixture
def events(tmp_path: Path) -> Iterator[FakeEvents]:
    """The Events API stand-in, listening."""
    with FakeEvents(tmp_path / "events") as fake:
        yield fake


def pagerduty_section(url: str, ca_file: Path, more: str = "") -> str:
    return f"""
[pagerduty]
routing_key = "{ROUTING_KEY}"
events_url = "{url}"
ca_file = "{ca_file}"
source = "maild-test"
retry_initial = "0.05s"
retry_max = "0.2s"
timeout = "2s"
{more}
"""


@pytest.fixture
def paging_config(make_config: Callable[..., Path], events: FakeEvents) -> Callable[..., Path]:
    """make_config with [pagerduty] pointed at the stand-in; more [pagerduty] keys, then extra."""

    def make(pagerduty: str = "", extra: str = "") -> Path:
        return make_config(pagerduty_section(events.url, events.ca_file, pagerduty) + extra)

    return make


def start(config: Path) -> RunningMaild:
    return RunningMaild(load_settings(config))


def pages_of(database: Database, ticket_id: int | None = None) -> list[dict[str, Any]]:
    """Page rows as `maild pages list --json` shows them, oldest first."""
    return list(reversed(database.run_read(lambda s: list_pages(s, ticket_id=ticket_id))))


def wait_pages(
    database: Database,
    condition: Callable[[list[dict[str, Any]]], bool],
    what: str,
    timeout: float = 30,
) -> list[dict[str, Any]]:
    """Poll the page rows (oldest first) until there are some and `condition` holds; those rows."""
    seen: list[list[dict[str, Any]]] = []

    def check() -> bool:
        rows = pages_of(database)
        seen.append(rows)
        return bool(rows) and condition(rows)

    wait_until(check, timeout, what)
    return seen[-1]


def statuses(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(row["action"], row["status"]) for row in rows]


def sysops_mail(subject: str = "Site down", **kwargs: Any) -> EmailMessage:
    return mail(subject, to=SYSOPS, **kwargs)


# 1. What a trigger carries.


def test_sysops_mail_sends_one_complete_trigger(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """A mail to sysops@ sends exactly one trigger carrying the ticket, sender, route and link."""
    config = paging_config('ticket_url = "https://desk.example/tickets/{id}"')
    body = "Checkout answers 502 since 09:00.\nNothing in the error log.\n\nAlice"
    message = sysops_mail("Shop down: checkout 502", body=body)
    with start(config) as maild:
        maild.send(message, [SYSOPS], sender=ALICE)
        (event,) = events.wait_for(1)
        rows = wait_pages(maild.service.database, lambda r: r[-1]["status"] == "sent", "sent")
        (ticket,) = maild.tickets()
        received_at = maild.ticket(ticket["id"])["messages"][0]["received_at"]
    tid = ticket["id"]
    assert (ticket["type"], ticket["priority"], ticket["rule"]) == ("incident", "urgent", "sysops")
    assert events.requests == 1
    assert event["event_action"] == "trigger"
    assert event["routing_key"] == ROUTING_KEY
    key = event["dedup_key"]
    assert isinstance(key, str)
    assert 0 < len(key) <= 255
    payload = event["payload"]
    assert (payload["severity"], payload["source"]) == ("critical", "maild-test")
    summary = payload["summary"]
    assert len(summary) <= 1024
    for part in ("URGENT", "Shop down: checkout 502", ALICE):
        assert part in summary
    details = payload["custom_details"]
    assert details["ticket"] == tid
    assert details["route"] == "sysops"
    assert ALICE in details["sender"]
    assert details["recipients"] == [SYSOPS]
    stamp = datetime.fromisoformat(details["received_at"])
    assert stamp.utcoffset() == timedelta(0)
    assert stamp.replace(tzinfo=None) == datetime.fromisoformat(received_at).replace(tzinfo=None)
    assert "Checkout answers 502 since 09:00.\nNothing in the error log." in details["body"]
    assert [link["href"] for link in event["links"]] == [f"https://desk.example/tickets/{tid}"]
    assert [(row["ticket_id"], row["dedup_key"]) for row in rows] == [(tid, key)]

    listed = cli(config, "pages", "list", "--json")
    assert listed.exit_code == 0, listed.stderr
    (view,) = json.loads(listed.stdout)
    assert set(view) == PAGE_KEYS
    assert {k: view[k] for k in ("ticket_id", "action", "status", "attempts", "dedup_key")} == {
        "ticket_id": tid,
        "action": "trigger",
        "status": "sent",
        "attempts": 1,
        "dedup_key": key,
    }
    assert (view["reason"], view["last_error"], view["next_attempt_at"]) == (None, None, None)
    assert view["sent_at"] is not None


def test_a_3000_character_subject_still_fits_the_summary(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A huge subject is cut so payload.summary stays within 1024 characters; the page is sent."""
    subject = " ".join(["outage"] * 429)[:3000]
    assert len(subject) >= 2990
    with start(paging_config()) as maild:
        maild.send(sysops_mail(subject), [SYSOPS], sender=ALICE)
        (event,) = events.wait_for(1)
        wait_pages(maild.service.database, lambda r: statuses(r) == [("trigger", "sent")], "sent")
        (ticket,) = maild.tickets()
    summary = event["payload"]["summary"]
    assert len(summary) <= 1024
    assert summary.startswith("[URGENT] outage outage")
    assert ALICE in summary
    assert f"#{ticket['id']}" in summary


def test_a_2000_character_sender_name_still_fits_the_summary(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A sender whose display name alone overflows the summary still pages, summary cut."""
    name = "Very " * 400
    with start(paging_config()) as maild:
        maild.send(sysops_mail("Down", frm=f'"{name.strip()}" <{ALICE}>'), [SYSOPS], sender=ALICE)
        (event,) = events.wait_for(1)
        wait_pages(maild.service.database, lambda r: statuses(r) == [("trigger", "sent")], "sent")
    summary = event["payload"]["summary"]
    assert len(summary) <= 1024
    assert summary.startswith("[URGENT] Down - from Very Very")
    assert ALICE in event["payload"]["custom_details"]["sender"]


# 2. One incident per ticket.


def test_a_follow_up_to_a_paged_ticket_is_added_to_its_open_alert(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A customer's reply to an open incident is a second trigger under the same dedup key
    (PagerDuty adds it to the open alert), carrying the new text; no new incident."""
    first = sysops_mail("Site down")
    with start(paging_config()) as maild:
        maild.send(first, [SYSOPS], sender=ALICE)
        events.wait_for(1)
        database = maild.service.database
        wait_pages(database, lambda r: statuses(r) == [("trigger", "sent")], "first page sent")
        reply = mail(
            "Re: Site down", to=SUPPORT, body="Still down!", In_Reply_To=first["Message-ID"]
        )
        maild.send(reply, [SUPPORT], sender=ALICE)
        second = events.wait_for(2)[1]
        rows = wait_pages(database, lambda r: r[-1]["status"] == "sent", "follow-up sent")
        (ticket,) = maild.tickets()
    assert ticket["message_count"] == 2
    assert statuses(rows) == [("trigger", "sent"), ("trigger", "sent")]
    assert {row["dedup_key"] for row in rows} == {events.events[0]["dedup_key"]}
    assert second["dedup_key"] == events.events[0]["dedup_key"]
    assert "follow-up" in second["payload"]["summary"]
    assert second["payload"]["custom_details"]["body"] == "Still down!"
    assert second["payload"]["custom_details"]["reason"] == "follow-up"
    assert [row["ticket_id"] for row in rows] == [ticket["id"]] * 2


def test_a_follow_up_pages_nothing_when_no_incident_is_open_or_a_program_wrote_it(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A support@ ticket never paged: its follow-up pages nobody. An automatic reply to an
    open incident pages nobody either."""
    config = paging_config()
    question = mail("A question", to=SUPPORT)
    outage = sysops_mail("Site down")
    with start(config) as maild:
        maild.send(question, [SUPPORT], sender=ALICE)
        maild.send(outage, [SYSOPS], sender=ALICE)
        events.wait_for(1)
        maild.send(
            mail("Re: A question", to=SUPPORT, In_Reply_To=question["Message-ID"]),
            [SUPPORT],
            sender=ALICE,
        )
        maild.send(
            mail(
                "Auto: Site down",
                to=SUPPORT,
                In_Reply_To=outage["Message-ID"],
                Auto_Submitted="auto-replied",
            ),
            [SUPPORT],
            sender=ALICE,
        )
        maild.settle()
        rows = pages_of(maild.service.database)
    assert statuses(rows) == [("trigger", "sent")]
    assert len(events.events) == 1


def test_a_withheld_follow_up_leaves_the_incident_open_and_closing_resolves_it(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """Bob (not in allowed_senders) follows up on Alice's incident: withheld, with the
    reason; the incident is still open, so closing the ticket resolves it."""
    config = paging_config(extra=f'[escalation]\nallowed_senders = ["{ALICE}"]\n')
    first = sysops_mail("Site down", Cc="bob@customer.example")
    with start(config) as maild:
        database = maild.service.database
        maild.send(first, [SYSOPS], sender=ALICE)
        key = events.wait_for(1)[0]["dedup_key"]
        wait_pages(database, lambda r: statuses(r) == [("trigger", "sent")], "trigger sent")
        bobs = mail(
            "Re: Site down",
            to=SUPPORT,
            frm="Bob <bob@customer.example>",
            In_Reply_To=first["Message-ID"],
        )
        maild.send(bobs, [SUPPORT], sender="bob@customer.example")
        maild.settle()
        rows = pages_of(database)
        assert statuses(rows) == [("trigger", "sent"), ("trigger", "withheld")]
        assert "allowed_senders" in rows[1]["reason"]
        closed = cli(config, "tickets", "close", str(rows[0]["ticket_id"]))
        assert closed.exit_code == 0, closed.stderr
        resolve = events.wait_for(2)[1]
    assert (resolve["event_action"], resolve["dedup_key"]) == ("resolve", key)


def test_one_message_to_sysops_and_support_is_one_ticket_and_one_trigger(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """One delivery to sysops@ and support@ makes one ticket and one trigger naming both."""
    with start(paging_config()) as maild:
        maild.send(sysops_mail("Down", Cc=SUPPORT), [SYSOPS, SUPPORT], sender=ALICE)
        (event,) = events.wait_for(1)
        rows = wait_pages(maild.service.database, lambda r: r[-1]["status"] == "sent", "sent")
        tickets = maild.tickets()
    assert [t["rule"] for t in tickets] == ["sysops"]
    assert statuses(rows) == [("trigger", "sent")]
    details = event["payload"]["custom_details"]
    assert (details["ticket"], details["route"]) == (tickets[0]["id"], "sysops")
    assert sorted(details["recipients"]) == sorted([SYSOPS, SUPPORT])
    assert events.requests == 1


def test_mail_to_support_and_hosting_pages_nobody(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """Routes without `page = true` make tickets, no page rows, and no request to PagerDuty."""
    with start(paging_config()) as maild:
        maild.send(mail("A question", to=SUPPORT), [SUPPORT], sender=ALICE)
        maild.send(mail("Slow deploys", to=HOSTING), [HOSTING], sender=ALICE)
        maild.settle()
        tickets = maild.tickets()
        rows = pages_of(maild.service.database)
    assert sorted(t["rule"] for t in tickets) == ["hosting", "support"]
    assert [t["page"] for t in tickets] == [None, None]
    assert rows == []
    assert events.requests == 0


def test_a_support_ticket_escalated_to_sysops_pages_once(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A reply to a support@ ticket sent to sysops@ pages for that ticket, once, as escalated;
    the next one is a follow-up to that open incident."""
    first = mail("Checkout errors", to=SUPPORT)
    with start(paging_config()) as maild:
        database = maild.service.database
        maild.send(first, [SUPPORT], sender=ALICE)
        maild.settle()
        assert pages_of(database) == []
        escalate = sysops_mail("Re: Checkout errors", In_Reply_To=first["Message-ID"])
        maild.send(escalate, [SYSOPS], sender=ALICE)
        (event,) = events.wait_for(1)
        wait_pages(database, lambda r: statuses(r) == [("trigger", "sent")], "escalation sent")
        again = sysops_mail("Re: Checkout errors", In_Reply_To=escalate["Message-ID"])
        maild.send(again, [SYSOPS], sender=ALICE)
        follow_up = events.wait_for(2)[1]
        rows = wait_pages(database, lambda r: r[-1]["status"] == "sent", "follow-up sent")
        (ticket,) = maild.tickets()
    assert ticket["message_count"] == 3
    assert event["payload"]["custom_details"]["ticket"] == ticket["id"]
    assert "escalated" in event["payload"]["summary"]
    # escalated once; the next mail is a follow-up added to the same alert (same key)
    assert "follow-up" in follow_up["payload"]["summary"]
    assert follow_up["dedup_key"] == event["dedup_key"]
    assert statuses(rows) == [("trigger", "sent"), ("trigger", "sent")]
    assert len(events.events) == 2


def test_the_same_message_reaching_sysops_in_a_second_delivery_pages(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """A split delivery (support@ first, then sysops@ with the same Message-ID) pages once."""
    message = mail("Everything is down", to=f"{SUPPORT}, {SYSOPS}")
    with start(paging_config()) as maild:
        database = maild.service.database
        maild.send(message, [SUPPORT], sender=ALICE)
        maild.settle()
        assert pages_of(database) == []
        maild.send(message, [SYSOPS], sender=ALICE)
        (event,) = events.wait_for(1)
        rows = wait_pages(database, lambda r: statuses(r) == [("trigger", "sent")], "sent")
        maild.send(message, [SYSOPS], sender=ALICE)  # and once more: nothing new
        maild.settle()
        (ticket,) = maild.tickets()
        assert pages_of(database) == rows
    assert ticket["message_count"] == 1
    assert event["payload"]["custom_details"]["ticket"] == ticket["id"]
    assert len(events.events) == 1


# 3. Resolve on close; trigger again on reopen.


@pytest.mark.parametrize(("command", "then"), [("close", "solve"), ("solve", "close")])
def test_closing_resolves_and_a_reply_triggers_again_under_the_same_key(
    paging_config: Callable[..., Path],
    events: FakeEvents,
    cli: Callable[..., Result],
    command: str,
    then: str,
) -> None:
    """close/solve sends a resolve with the ticket's dedup key; a reply reopens and re-triggers."""
    config = paging_config()
    first = sysops_mail("Site down")
    with start(config) as maild:
        database = maild.service.database
        maild.send(first, [SYSOPS], sender=ALICE)
        (trigger,) = events.wait_for(1)
        key = trigger["dedup_key"]
        wait_pages(database, lambda r: statuses(r) == [("trigger", "sent")], "trigger sent")
        (ticket,) = maild.tickets()
        tid = ticket["id"]

        closed = cli(config, "tickets", command, str(tid))
        assert closed.exit_code == 0, closed.stderr
        assert f"PagerDuty resolve queued as page 2 (dedup key {key})" in closed.stdout
        resolve = events.wait_for(2)[1]
        assert resolve == {"event_action": "resolve", "dedup_key": key, "routing_key": ROUTING_KEY}
        wait_pages(database, lambda r: r[-1]["status"] == "sent", "resolve sent")

        again = cli(config, "tickets", then, str(tid))  # already resolved: nothing more
        assert again.exit_code == 0, again.stderr
        assert "PagerDuty" not in again.stdout

        reply = sysops_mail("Re: Site down", body="Down again.", In_Reply_To=first["Message-ID"])
        maild.send(reply, [SYSOPS], sender=ALICE)
        retrigger = events.wait_for(3)[2]
        rows = wait_pages(database, lambda r: r[-1]["status"] == "sent", "second trigger sent")
        view = maild.ticket(tid)
    assert (retrigger["event_action"], retrigger["dedup_key"]) == ("trigger", key)
    assert "reopened" in retrigger["payload"]["summary"]
    assert view["status"] == "open"
    assert statuses(rows) == [("trigger", "sent"), ("resolve", "sent"), ("trigger", "sent")]
    assert {row["dedup_key"] for row in rows} == {key}
    assert len(events.events) == 3


def paged_and_closed(
    maild: RunningMaild, events: FakeEvents, cli: Callable[..., Result], first: EmailMessage
) -> tuple[str, dict[str, Any]]:
    """`first` mailed to sysops@ has paged, and `tickets close` resolved it: the dedup key
    and the ticket."""
    maild.send(first, [SYSOPS], sender=ALICE)
    key = events.wait_for(1)[0]["dedup_key"]
    (ticket,) = maild.tickets()
    assert cli(maild.settings.source, "tickets", "close", str(ticket["id"])).exit_code == 0
    events.wait_for(2)
    return key, ticket


def test_reopening_a_resolved_urgent_incident_pages_again_under_the_same_key(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """close resolves; reopen (an urgent incident again) triggers under the same key, and the
    next sysops@ mail joins that incident (a follow-up under the same key) rather than
    opening another."""
    config = paging_config()
    first = sysops_mail("Disk full")
    with start(config) as maild:
        database = maild.service.database
        key, ticket = paged_and_closed(maild, events, cli, first)
        reopened = cli(config, "tickets", "reopen", str(ticket["id"]), "--by", "jo@altis-dxp.com")
        assert reopened.exit_code == 0, reopened.stderr
        assert f"PagerDuty trigger queued as page 3 (dedup key {key})" in reopened.stdout
        third = events.wait_for(3)[2]
        follow_up = sysops_mail("Re: Disk full", body="Full again.", References=first["Message-ID"])
        maild.send(follow_up, [SYSOPS], sender=ALICE)
        fourth = events.wait_for(4)[3]
        rows = wait_pages(database, lambda r: r[-1]["status"] == "sent", "trigger sent")
    assert (third["event_action"], third["dedup_key"]) == ("trigger", key)
    assert "reopened by jo@altis-dxp.com" in third["payload"]["summary"]
    assert (fourth["dedup_key"], fourth["payload"]["custom_details"]["reason"]) == (
        key,
        "follow-up",
    )
    assert statuses(rows) == [("trigger", "sent"), ("resolve", "sent")] + [("trigger", "sent")] * 2
    assert len(events.events) == 4


def test_a_resolved_ticket_reopened_lower_by_the_desk_pages_on_the_next_sysops_mail(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """Reopened below urgent (no page), the next sysops@ message raises it and triggers again."""
    config = paging_config()
    first = sysops_mail("Disk full")
    with start(config) as maild:
        database = maild.service.database
        key, ticket = paged_and_closed(maild, events, cli, first)
        reopened = cli(
            config,
            "tickets",
            "set",
            str(ticket["id"]),
            "--status",
            "open",
            "--priority",
            "high",
            "--by",
            "jo@altis-dxp.com",
        )
        assert (reopened.exit_code, "PagerDuty" in reopened.stdout) == (0, False)
        follow_up = sysops_mail("Re: Disk full", body="Full again.", References=first["Message-ID"])
        maild.send(follow_up, [SYSOPS], sender=ALICE)
        third = events.wait_for(3)[2]
        rows = wait_pages(database, lambda r: r[-1]["status"] == "sent", "trigger sent")
        view = maild.ticket(ticket["id"])
    assert (third["event_action"], third["dedup_key"]) == ("trigger", key)
    assert "escalated" in third["payload"]["summary"]
    assert statuses(rows) == [("trigger", "sent"), ("resolve", "sent"), ("trigger", "sent")]
    assert (view["status"], view["priority"]) == ("open", "urgent")


def test_closing_a_ticket_that_never_paged_queues_nothing(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """Closing a support@ ticket (no page) prints no resolve and writes no page row."""
    config = paging_config()
    with start(config) as maild:
        maild.send(mail("A question", to=SUPPORT), [SUPPORT], sender=ALICE)
        maild.settle()
        (ticket,) = maild.tickets()
        direct = maild.change(ticket["id"], status=TicketStatus.SOLVED).page
        closed = cli(config, "tickets", "close", str(ticket["id"]))
        rows = pages_of(maild.service.database)
    assert direct is None
    assert (closed.exit_code, closed.stdout) == (0, f"ticket {ticket['id']} is closed\n")
    assert rows == []
    assert events.requests == 0


def test_a_resolve_never_overtakes_its_trigger(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """Closing while the trigger is still failing holds the resolve until the trigger is sent."""
    events.fail_always(503)
    with start(paging_config()) as maild:
        database = maild.service.database
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        events.wait_for_requests(1)
        (ticket,) = maild.tickets()
        resolve = maild.change(ticket["id"], status=TicketStatus.CLOSED).page
        assert resolve is not None
        events.wait_for_requests(4)  # the trigger keeps failing; the resolve must wait
        assert {body["event_action"] for body in events.bodies} == {"trigger"}
        events.reset()
        sent = events.wait_for(2)
        rows = wait_pages(
            database, lambda r: [row["status"] for row in r] == ["sent", "sent"], "both sent"
        )
    assert [e["event_action"] for e in sent] == ["trigger", "resolve"]
    assert sent[0]["dedup_key"] == sent[1]["dedup_key"]
    assert statuses(rows) == [("trigger", "sent"), ("resolve", "sent")]


def test_two_daemons_sharing_one_database_send_each_page_once(
    paging_config: Callable[..., Path], events: FakeEvents, tmp_path: Path
) -> None:
    """Two daemons on one database share the outbox: every page is sent, and only once."""
    config = paging_config()
    other = tmp_path / "second" / "config.toml"
    other.parent.mkdir()
    other.write_text(config.read_text())
    with start(config) as one, start(other) as two:
        for number in range(8):
            daemon = one if number % 2 else two
            daemon.send(sysops_mail(f"Outage {number}"), [SYSOPS], sender=ALICE)
        sent = events.wait_for(8)
        rows = wait_pages(
            one.service.database,
            lambda r: [row["status"] for row in r] == ["sent"] * 8,
            "all eight sent",
        )
    assert events.requests == 8
    assert sorted(e["dedup_key"] for e in sent) == sorted(row["dedup_key"] for row in rows)
    assert len({row["dedup_key"] for row in rows}) == 8


# 4-6. Retries, permanent refusals, giving up.


def test_503_then_429_are_retried_until_accepted(
    paging_config: Callable[..., Path], events: FakeEvents, logs: Logs
) -> None:
    """A 503 and a 429 are retried: the page is sent on the third attempt, each one logged."""
    events.fail_next([503, 429])
    with start(paging_config()) as maild:
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        events.wait_for(1)
        (row,) = wait_pages(maild.service.database, lambda r: r[-1]["status"] == "sent", "sent")
    assert (row["attempts"], row["last_error"], row["reason"]) == (3, None, None)
    assert events.requests == 3
    assert len(events.events) == 1
    retried = logs.events("page attempt failed; will retry")
    assert [(e["level"], e["attempts"]) for e in retried] == [("warning", 1), ("warning", 2)]
    assert "HTTP 503" in retried[0]["error"]
    assert "HTTP 429" in retried[1]["error"]


def test_a_network_error_keeps_the_page_pending_until_pagerduty_answers(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Nothing listening: the page stays pending with its error; it is sent once the API is up."""
    fake = FakeEvents(tmp_path / "later", port=free_port())  # not listening yet
    config = make_config(pagerduty_section(fake.url, fake.ca_file))
    with start(config) as maild:
        database = maild.service.database
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        (row,) = wait_pages(database, lambda r: r[0]["attempts"] >= 1, "a failed attempt recorded")
        assert row["status"] == "pending"
        assert "ConnectError" in (row["last_error"] or "")
        assert row["reason"] is None
        with fake:
            (event,) = fake.wait_for(1)
            (row,) = wait_pages(database, lambda r: r[0]["status"] == "sent", "sent after all")
    assert event["event_action"] == "trigger"
    assert row["attempts"] >= 2
    assert row["last_error"] is None


def test_a_timed_out_attempt_is_retried(
    paging_config: Callable[..., Path], events: FakeEvents
) -> None:
    """No answer within [pagerduty] timeout: the attempt counts as failed and is tried again."""
    events.hold()
    with start(paging_config()) as maild:
        database = maild.service.database
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        (row,) = wait_pages(database, lambda r: r[0]["attempts"] >= 1, "a timed-out attempt")
        assert row["status"] == "pending"
        assert "Timeout" in (row["last_error"] or "")
        events.release()
        (row,) = wait_pages(database, lambda r: r[0]["status"] == "sent", "sent on a retry")
    assert row["attempts"] >= 2
    assert {e["dedup_key"] for e in events.events} == {row["dedup_key"]}


def test_an_untrusted_certificate_is_refused(
    make_config: Callable[..., Path], events: FakeEvents, tmp_path: Path
) -> None:
    """TLS is verified: a server whose certificate the ca_file does not vouch for gets nothing."""
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    with start(make_config(pagerduty_section(events.url, stranger))) as maild:
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        (row,) = wait_pages(
            maild.service.database, lambda r: r[0]["attempts"] >= 1, "a refused attempt"
        )
    assert row["status"] == "pending"
    assert "CERTIFICATE_VERIFY_FAILED" in (row["last_error"] or "")
    assert events.requests == 0


def test_a_400_fails_the_page_at_once_with_pagerdutys_message(
    paging_config: Callable[..., Path], events: FakeEvents, logs: Logs
) -> None:
    """A 400 is permanent: one attempt, page failed with PagerDuty's words, an error logged."""
    problem = "Length of 'routing_key' is incorrect (should be 32 characters)"
    events.fail_always(400, "Event object is invalid", [problem])
    with start(paging_config()) as maild:
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        (row,) = wait_pages(maild.service.database, lambda r: r[-1]["status"] == "failed", "fail")
    assert row["attempts"] == 1
    assert events.requests == 1
    assert "Event object is invalid" in row["reason"]
    assert problem in row["reason"]
    assert "Event object is invalid" in row["last_error"]
    (line,) = logs.events("page failed: PagerDuty refused it")
    assert (line["level"], line["status"], line["page"]) == ("error", 400, row["id"])
    assert "Event object is invalid" in line["error"]


def test_still_failing_after_give_up_after_fails_the_page(
    paging_config: Callable[..., Path], events: FakeEvents, logs: Logs
) -> None:
    """503 on every attempt: after give_up_after the page is failed, the reason says why."""
    events.fail_always(503)
    with start(paging_config('give_up_after = "1s"')) as maild:
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        (row,) = wait_pages(maild.service.database, lambda r: r[-1]["status"] == "failed", "fail")
    assert "give_up_after" in row["reason"]
    assert "HTTP 503" in row["reason"]
    assert row["attempts"] >= 2
    assert events.requests == row["attempts"]
    assert events.events == []
    (line,) = logs.events("page failed: gave up")
    assert line["level"] == "error"


# 7. A pending page survives kill -9.


@pytest.mark.slow
def test_a_pending_page_is_sent_after_kill_9_and_restart(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """kill -9 while PagerDuty is unreachable: after restart the page is sent, one ticket."""
    fake = FakeEvents(tmp_path / "later", port=free_port())
    key_file = tmp_path / "routing-key"
    key_file.write_text(ROUTING_KEY + "\n")
    section = pagerduty_section(fake.url, fake.ca_file).replace(
        f'routing_key = "{ROUTING_KEY}"', f'routing_key_file = "{key_file}"'
    )
    config = make_config(section)
    database = Database(load_settings(config).database.url)
    try:
        first = Daemon(config, tmp_path / "first.log").start()
        try:
            with smtplib.SMTP("127.0.0.1", first.smtp_port, timeout=30) as client:
                assert client.send_message(sysops_mail(), ALICE, [SYSOPS]) == {}
            wait_pages(database, lambda r: r[0]["attempts"] >= 1, "an attempt", 60)
            first.kill()
        finally:
            first.__exit__()
        (before,) = pages_of(database)
        assert before["status"] == "pending"
        with fake, Daemon(config, tmp_path / "second.log") as second:
            (event,) = fake.wait_for(1, 60)
            (row,) = wait_pages(database, lambda r: r[0]["status"] == "sent", "sent", 60)
            released = [
                e
                for e in second.events()
                if e.get("event") == "pages the previous run left pending are due again"
            ]
            tickets = database.run_read(lambda s: list_tickets(s, status="all"))
            every_page = pages_of(database)
        logged = first.text() + second.text()
    finally:
        database.close()
    assert (event["event_action"], event["dedup_key"]) == ("trigger", row["dedup_key"])
    assert event["routing_key"] == ROUTING_KEY
    assert row["attempts"] > before["attempts"]
    assert [(t["id"], t["message_count"]) for t in tickets] == [(row["ticket_id"], 1)]
    assert every_page == [row]
    assert [e["count"] for e in released] == [1]
    assert ROUTING_KEY not in logged


@pytest.mark.slow
def test_a_trigger_delivered_just_before_kill_9_is_resolved_when_the_ticket_closes(
    paging_config: Callable[..., Path], events: FakeEvents, tmp_path: Path
) -> None:
    """PagerDuty got the trigger but the daemon died before its 202; closing still resolves it."""
    config = paging_config()
    database = Database(load_settings(config).database.url)
    try:
        events.hold()  # PagerDuty takes the event; its answer is not back yet
        first = Daemon(config, tmp_path / "first.log").start()
        try:
            with smtplib.SMTP("127.0.0.1", first.smtp_port, timeout=30) as client:
                assert client.send_message(sysops_mail(), ALICE, [SYSOPS]) == {}
            (trigger,) = events.wait_for(1)
            first.kill()
        finally:
            first.__exit__()
        (row,) = pages_of(database)
        assert row["status"] == "pending"
        change(database, row["ticket_id"], status=TicketStatus.CLOSED)
        events.release()
        with Daemon(config, tmp_path / "second.log"):
            rows = wait_pages(
                database,
                lambda r: len(r) == 2 and "pending" not in {x["status"] for x in r},
                "both pages settled",
            )
    finally:
        database.close()
    # The on-call was paged (PagerDuty holds an open incident for the key), so the close
    # must reach PagerDuty as a resolve; otherwise the incident stays open for good.
    actions = [e["event_action"] for e in events.events if e["dedup_key"] == trigger["dedup_key"]]
    assert actions[-1] == "resolve", (actions, statuses(rows), [r["reason"] for r in rows])


# 8-10. Withheld pages.


def test_a_sender_outside_allowed_senders_is_withheld(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result], logs: Logs
) -> None:
    """allowed_senders: a stranger's page is withheld with the reason shown; listed senders page."""
    config = paging_config(
        extra='[escalation]\nallowed_senders = ["*@trusted.example", "Carol@Customer.example"]\n'
    )
    with start(config) as maild:
        database = maild.service.database
        maild.send(sysops_mail("From a stranger"), [SYSOPS], sender=ALICE)
        maild.settle()
        maild.send(
            sysops_mail("From a trusted domain", frm="Bob <bob@trusted.example>"),
            [SYSOPS],
            sender="bob@trusted.example",
        )
        maild.send(
            sysops_mail("From a listed address", frm="Carol <carol@customer.example>"),
            [SYSOPS],
            sender="carol@customer.example",
        )
        sent = events.wait_for(2)
        rows = wait_pages(
            database, lambda r: [row["status"] for row in r][1:] == ["sent", "sent"], "two sent"
        )
    assert [row["status"] for row in rows] == ["withheld", "sent", "sent"]
    withheld = rows[0]
    assert ALICE in withheld["reason"]
    assert "allowed_senders" in withheld["reason"]
    assert withheld["attempts"] == 0
    assert {e["payload"]["custom_details"]["ticket"] for e in sent} == {
        rows[1]["ticket_id"],
        rows[2]["ticket_id"],
    }
    assert events.requests == 2
    assert [line["page"] for line in logs.events("page withheld")] == [withheld["id"]]

    shown = cli(config, "tickets", "show", str(withheld["ticket_id"]), "--json")
    assert shown.exit_code == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["type"], view["priority"], view["status"]) == ("incident", "urgent", "open")
    assert view["page"] == {
        "id": withheld["id"],
        "action": "trigger",
        "status": "withheld",
        "reason": withheld["reason"],
    }


def test_max_pages_per_sender_per_hour_withholds_the_third(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """With a limit of 2 a sender's third new incident is withheld; another sender still pages."""
    config = paging_config(extra="[escalation]\nmax_pages_per_sender_per_hour = 2\n")
    with start(config) as maild:
        database = maild.service.database
        for number in (1, 2, 3):
            maild.send(sysops_mail(f"Outage number {number}"), [SYSOPS], sender=ALICE)
            maild.settle()
        maild.send(
            sysops_mail("Also down", frm="Bob <bob@other.example>"),
            [SYSOPS],
            sender="bob@other.example",
        )
        sent = events.wait_for(3)
        rows = wait_pages(
            database, lambda r: sum(row["status"] == "sent" for row in r) == 3, "three sent"
        )
        assert len(maild.tickets()) == 4

        retried = cli(config, "pages", "retry", str(rows[2]["id"]))  # the operator overrides
        assert retried.exit_code == 0, retried.stderr
        events.wait_for(4)
        after = wait_pages(database, lambda r: r[2]["status"] == "sent", "the retried page sent")
    assert [(row["sender"], row["status"]) for row in rows] == [
        (ALICE, "sent"),
        (ALICE, "sent"),
        (ALICE, "withheld"),
        ("bob@other.example", "sent"),
    ]
    reason = rows[2]["reason"]
    assert "max_pages_per_sender_per_hour" in reason
    assert ALICE in reason
    assert ["bob@other.example" in e["payload"]["custom_details"]["sender"] for e in sent] == [
        False,
        False,
        True,
    ]
    assert after[2]["reason"] is None


def test_paging_disabled_records_withheld_pages_and_warns_at_start(
    make_config: Callable[..., Path], logs: Logs
) -> None:
    """enabled = false without a key: serve starts, warns, and sysops@ pages are withheld."""
    config = make_config("[pagerduty]\nenabled = false\n")
    with start(config) as maild:
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        maild.settle()
        (ticket,) = maild.tickets()
        rows = pages_of(maild.service.database)
    (warning,) = logs.events(
        "paging disabled ([pagerduty] enabled = false): pages are recorded as withheld"
    )
    assert warning["level"] == "warning"
    assert warning["paging_routes"] == ["sysops"]
    assert statuses(rows) == [("trigger", "withheld")]
    assert "paging disabled" in rows[0]["reason"]
    assert ticket["page"]["status"] == "withheld"
    assert ticket["page"]["reason"] == rows[0]["reason"]


# 11. Refusing to start; the routing key file.


def run_maild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maild", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_refuses_to_start_when_sysops_pages_but_no_key_is_set(
    make_config: Callable[..., Path],
) -> None:
    """Paging on (the default) with no routing key: `maild serve` exits 78 naming key and route."""
    config = make_config('[pagerduty]\nsource = "maild-test"\n')
    result = run_maild("serve", "--config", str(config))
    assert result.returncode == 78
    assert "routing_key" in result.stderr
    assert "'sysops'" in result.stderr
    assert "maild started" not in result.stdout


def test_serve_refuses_to_start_with_a_missing_ca_file(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A [pagerduty] ca_file that does not exist: `maild serve` exits 78 naming it."""
    missing = tmp_path / "no-such-ca.pem"
    config = make_config(pagerduty_section("https://127.0.0.1:9", missing))
    result = run_maild("serve", "--config", str(config))
    assert result.returncode == 78
    assert "ca_file" in result.stderr
    assert str(missing) in result.stderr


def test_routing_key_file_is_used_and_never_logged(
    make_config: Callable[..., Path], events: FakeEvents, tmp_path: Path, logs: Logs
) -> None:
    """routing_key_file: the daemon pages with the key read from the file, and never logs it."""
    key_file = tmp_path / "routing-key"
    key_file.write_text(ROUTING_KEY + "\n")
    section = pagerduty_section(events.url, events.ca_file).replace(
        f'routing_key = "{ROUTING_KEY}"', f'routing_key_file = "{key_file}"'
    )
    config = make_config(section)
    with start(config) as maild:
        maild.send(sysops_mail(), [SYSOPS], sender=ALICE)
        (event,) = events.wait_for(1)
        wait_pages(maild.service.database, lambda r: r[-1]["status"] == "sent", "sent")
        stored = maild.service.database.run_read(lambda s: s.exec(select(Page.event)).all())
    assert event["routing_key"] == ROUTING_KEY
    assert len(stored) == 1
    assert ROUTING_KEY not in json.dumps(stored), "the routing key is stored with the page"
    assert logs.events("maild started")
    assert logs.events("page sent")
    assert ROUTING_KEY not in logs.text()
    tested = run_maild("pages", "test", "--config", str(config))
    assert tested.returncode == 0, tested.stderr
    assert ROUTING_KEY not in tested.stdout + tested.stderr


# 12. The pages commands.


def test_pages_list_retry_and_their_errors(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """pages list --json / --status; retry sends a failed page; sent or unknown pages exit 1."""
    config = paging_config()
    with start(config) as maild:
        database = maild.service.database
        maild.send(sysops_mail("First outage"), [SYSOPS], sender=ALICE)
        events.wait_for(1)
        wait_pages(database, lambda r: statuses(r) == [("trigger", "sent")], "first sent")
        events.fail_always(400, "Event object is invalid", ["'payload.summary' is missing"])
        maild.send(sysops_mail("Second outage"), [SYSOPS], sender=ALICE)
        rows = wait_pages(database, lambda r: len(r) == 2 and r[1]["status"] == "failed", "fail")
        sent_id, failed_id = rows[0]["id"], rows[1]["id"]

        listed = cli(config, "pages", "list", "--json")
        assert listed.exit_code == 0, listed.stderr
        views = json.loads(listed.stdout)
        assert [set(v) for v in views] == [PAGE_KEYS, PAGE_KEYS]
        assert [(v["id"], v["status"]) for v in views] == [(failed_id, "failed"), (sent_id, "sent")]
        failed = cli(config, "pages", "list", "--json", "--status", "failed")
        assert [v["id"] for v in json.loads(failed.stdout)] == [failed_id]
        assert "Event object is invalid" in json.loads(failed.stdout)[0]["reason"]
        table = cli(config, "pages", "list")
        assert table.exit_code == 0
        assert "Event object is invalid" in table.stdout

        events.reset()
        retried = cli(config, "pages", "retry", str(failed_id))
        assert retried.exit_code == 0, retried.stderr
        assert f"page {failed_id} (trigger, ticket {rows[1]['ticket_id']}) is pending" in (
            retried.stdout
        )
        (_, event) = events.wait_for(2)
        after = wait_pages(database, lambda r: r[1]["status"] == "sent", "the retried page sent")

        again = cli(config, "pages", "retry", str(sent_id))
        unknown = cli(config, "pages", "retry", "999")
    assert event["payload"]["custom_details"]["ticket"] == rows[1]["ticket_id"]
    assert (after[1]["reason"], after[1]["last_error"], after[1]["attempts"]) == (None, None, 2)
    assert again.exit_code == 1
    assert "already sent" in again.stderr
    assert (unknown.exit_code, unknown.stderr) == (1, "maild: no page 999\n")


def test_pages_test_sends_an_info_trigger_and_resolves_it(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """`maild pages test` sends an info trigger then a resolve under one dedup key; exit 0."""
    result = cli(paging_config(), "pages", "test")
    assert result.exit_code == 0, result.stderr
    trigger, resolve = events.events
    assert (trigger["event_action"], trigger["payload"]["severity"]) == ("trigger", "info")
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["payload"]["source"] == "maild-test"
    assert (resolve["event_action"], resolve["dedup_key"]) == ("resolve", trigger["dedup_key"])
    assert trigger["dedup_key"] in result.stdout


def test_pages_test_reports_pagerdutys_refusal(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """`maild pages test` refused with 400 exits 1 with PagerDuty's message on stderr."""
    events.fail_always(400, "Invalid routing key", ["routing_key is not a known integration"])
    result = cli(paging_config(), "pages", "test")
    assert result.exit_code == 1
    assert "Invalid routing key" in result.stderr
    assert "routing_key is not a known integration" in result.stderr
    assert events.requests == 1
    assert events.events == []


# 13. Closed before the page went out.


def test_a_ticket_closed_before_its_page_was_sent_pages_nobody(
    paging_config: Callable[..., Path], events: FakeEvents, cli: Callable[..., Result]
) -> None:
    """ingest (no daemon) queues a trigger; close queues a resolve; the daemon withholds both."""
    config = paging_config()
    raw = sysops_mail("Down over the weekend").as_bytes()
    ingested = cli(config, "ingest", "--recipient", SYSOPS, "--sender", ALICE, stdin=raw)
    assert ingested.exit_code == 0, ingested.stderr
    database = Database(load_settings(config).database.url)
    try:
        (trigger,) = pages_of(database)
        assert (trigger["action"], trigger["status"], trigger["attempts"]) == (
            "trigger",
            "pending",
            0,
        )
        closed = cli(config, "tickets", "close", str(trigger["ticket_id"]))
        assert closed.exit_code == 0, closed.stderr
        assert "PagerDuty resolve queued" in closed.stdout
        assert statuses(pages_of(database)) == [("trigger", "pending"), ("resolve", "pending")]
    finally:
        database.close()
    with start(config) as maild:
        rows = wait_pages(
            maild.service.database,
            lambda r: [row["status"] for row in r] == ["withheld", "withheld"],
            "both withheld",
        )
        view = maild.ticket(trigger["ticket_id"])
    assert [row["reason"] for row in rows] == [CLOSED_BEFORE_SENT] * 2
    assert view["status"] == "closed"
    assert events.requests == 0


def test_an_outcome_is_recorded_only_on_a_page_still_pending(database_url: str) -> None:
    """The pager writes what became of a send in one UPDATE: it lands on a pending row,
    and leaves alone a row someone withheld or sent meanwhile (the CLI, another
    instance) while the send was in flight."""
    database = Database(database_url)
    database.create_schema()
    try:

        def setup(session: Any) -> list[int]:
            ticket = Ticket(type="incident", priority="urgent", subject="Site down")
            session.add(ticket)
            session.flush()
            pages = [
                Page(ticket_id=ticket.id, action="trigger", dedup_key=f"k{n}", status=status)
                for n, status in enumerate(("pending", "withheld", "pending"))
            ]
            session.add_all(pages)
            session.flush()
            return [p.id for p in pages]

        pending, withheld, retrying = database.run_write(setup)
        sent_at = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
        for page_id in (pending, withheld):
            database.run_write(
                lambda s, page_id=page_id: record_outcome(
                    s, Page, page_id, attempts=2, status="sent", now=sent_at
                )
            )
        later = datetime(2026, 11, 24, 11, 0, tzinfo=UTC)
        database.run_write(
            lambda s: record_outcome(
                s, Page, retrying, attempts=1, status="pending", error="503", next_attempt_at=later
            )
        )
        rows = {p.id: p for p in database.run_read(lambda s: list(s.exec(select(Page)).all()))}
        assert (rows[pending].status, rows[pending].attempts) == ("sent", 2)
        assert rows[pending].sent_at is not None
        assert as_utc(rows[pending].sent_at) == sent_at
        assert (rows[withheld].status, rows[withheld].attempts) == ("withheld", 0)
        assert rows[withheld].sent_at is None
        assert (rows[retrying].status, rows[retrying].last_error) == ("pending", "503")
        assert as_utc(rows[retrying].next_attempt_at) == later
    finally:
        database.close()


def test_pages_share_one_connection_to_the_events_api(tmp_path: Path) -> None:
    """PagerDuty keeps connections open; maild's client sends page after page on one
    (a TLS handshake per page cost the daemon more than the page), and opens a new
    one when the server closes it after each request."""
    for keep_alive, wanted in ((True, 1), (False, 3)):
        with FakeEvents(tmp_path / str(keep_alive), keep_alive=keep_alive) as events:
            settings = PagerDutySettings(
                routing_key="0123456789abcdef0123456789abcdef",
                events_url=events.url,
                ca_file=events.ca_file,
            )
            client = EventsClient(settings)
            try:
                for n in range(3):
                    client.send(
                        {
                            "event_action": "trigger",
                            "dedup_key": f"maild-test-{n}",
                            "payload": {
                                "summary": "Site down",
                                "source": "mx.test",
                                "severity": "critical",
                            },
                        }
                    )
            finally:
                client.close()
            assert events.requests == 3
            assert events.connections == wanted, keep_alive
