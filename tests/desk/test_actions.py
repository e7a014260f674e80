"""The desk's changes to a ticket: an event per change, and PagerDuty kept in step.

Real databases (SQLite, and PostgreSQL when configured); tickets are filed from real
mail by filing's own code, so their pages are as production makes them. What reaches
PagerDuty from a running daemon is in tests/cli/test_tickets.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from maild.desk.actions import (
    ChangeResult,
    Changes,
    DeskContext,
    NotAllowed,
    change_line,
    change_ticket,
    check_agent,
)
from maild.enums import Priority, TicketField, TicketStatus, TicketType
from maild.filing.intake import FilingContext, file_batch
from maild.mail.parsing import parse_message
from maild.outbound.paging import EscalationPolicy, dedup_key
from maild.receive.spool import Delivery, insert_deliveries
from maild.routing.rules import RuleTable, load_rules
from maild.store.database import Database
from maild.store.models import Page, Ticket, TicketEvent, utcnow
from maild.store.tickets import TicketNotFound, list_tickets, show_ticket
from tests.conftest import AGENT, REPO, mail
from tests.conftest import change as desk_change

ALICE = "alice@customer.example"
HOSTING = "hosting@altis-dxp.com"
SYSOPS = "sysops@altis-dxp.com"
SUPPORT = "support@altis-dxp.com"


def policy(**changes: Any) -> EscalationPolicy:
    settings: dict[str, Any] = {
        "enabled": True,
        "allowed_senders": (),
        "max_per_hour": 0,
        "source": "maild-test",
        "ticket_url": "",
    }
    return EscalationPolicy(**{**settings, **changes})


SHIPPED = load_rules(REPO / "rules")


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """An empty maild database (SQLite, or a PostgreSQL schema of its own)."""
    database = Database(database_url)
    database.create_schema()
    try:
        yield database
    finally:
        database.close()


def file(database: Database, message: EmailMessage, to: str, table: RuleTable = SHIPPED) -> int:
    """The message filed through `to` as the daemon files it (paging on); its ticket's id."""
    delivery = Delivery("smtp", ALICE, [to], message.as_bytes())
    ids = database.run_write(lambda s: insert_deliveries(s, [delivery]))
    items = [(ids[0], parse_message(delivery.raw))]
    context = FilingContext(table, policy())
    (filed,) = database.run_write(lambda s: file_batch(s, context, items))
    assert filed.ticket_id is not None
    return filed.ticket_id


def change(
    database: Database, ticket_id: int, context: DeskContext | None = None, **changes: Any
) -> ChangeResult:
    """The desk's change (tests/conftest.change), paging on unless the context says otherwise."""
    return desk_change(database, ticket_id, context or DeskContext(SHIPPED, policy()), **changes)


def pages(database: Database, ticket_id: int) -> list[Page]:
    return list(
        database.run_read(
            lambda s: s.exec(
                select(Page).where(Page.ticket_id == ticket_id).order_by(col(Page.id))
            ).all()
        )
    )


def events(database: Database, ticket_id: int) -> list[tuple[str, str | None, str | None, str]]:
    view = database.run_read(lambda s: show_ticket(s, ticket_id))
    return [(e["field"], e["old"], e["new"], e["by"]) for e in view["events"]]


def hosting_ticket(database: Database, subject: str = "Checkout errors") -> int:
    return file(database, mail(subject, to=HOSTING, body="Checkout answers 500."), HOSTING)


# 1. Events.


def test_every_change_is_an_event_with_old_new_by_and_when(database: Database) -> None:
    """Each field that changes writes one event (what, old, new, who, when) and moves updated_at."""
    tid = hosting_ticket(database)
    now = utcnow() + timedelta(minutes=5)
    result = database.run_write(
        lambda s: change_ticket(
            s,
            tid,
            Changes(
                status=TicketStatus.PENDING,
                priority=Priority.HIGH,
                type=TicketType.PROBLEM,
                application="shop-prod",
                assignee="Jo@Altis-DXP.com",
            ),
            by=AGENT,
            context=DeskContext(SHIPPED, policy()),
            now=now,
        )
    )
    view = database.run_read(lambda s: show_ticket(s, tid))
    assert [(e.field, e.old, e.new, e.by) for e in result.events] == [
        ("status", "open", "pending", AGENT),
        ("priority", "normal", "high", AGENT),
        ("type", "incident", "problem", AGENT),
        ("application", "", "shop-prod", AGENT),
        ("assignee", None, "jo@altis-dxp.com", AGENT),
    ]
    assert view["events"] == [
        {"field": e.field, "old": e.old, "new": e.new, "by": AGENT, "at": now.isoformat()}
        for e in result.events
    ]
    assert (view["status"], view["priority"], view["type"], view["application"]) == (
        "pending",
        "high",
        "problem",
        "shop-prod",
    )
    assert view["assignee"] == "jo@altis-dxp.com"
    assert view["updated_at"] == now.isoformat()
    assert (result.page, result.solved) == (None, False)


def test_a_change_to_what_the_ticket_already_is_writes_nothing(database: Database) -> None:
    """Asking for the ticket's own values writes no event and leaves updated_at alone."""
    tid = hosting_ticket(database)
    before = database.run_read(lambda s: show_ticket(s, tid))
    result = change(
        database, tid, status=TicketStatus.OPEN, priority=Priority.NORMAL, application=""
    )
    after = database.run_read(lambda s: show_ticket(s, tid))
    assert (result.events, result.page) == ([], None)
    assert after["events"] == []
    assert after["updated_at"] == before["updated_at"]


def test_only_the_fields_that_differ_are_events(database: Database) -> None:
    """A request of one same and one new value writes one event; unassigning is an event to null."""
    tid = hosting_ticket(database)
    change(database, tid, assignee="sam@altis-dxp.com")
    change(database, tid, priority=Priority.NORMAL, assignee="jo@altis-dxp.com")
    change(database, tid, unassign=True, by="sam@altis-dxp.com")
    change(database, tid, unassign=True)
    assert events(database, tid) == [
        ("assignee", None, "sam@altis-dxp.com", AGENT),
        ("assignee", "sam@altis-dxp.com", "jo@altis-dxp.com", AGENT),
        ("assignee", "jo@altis-dxp.com", None, "sam@altis-dxp.com"),
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "nothing to change"),
        ({"assignee": AGENT, "unassign": True}, "assigned and unassigned at once"),
        ({"assignee": "not an address"}, "is not an email address"),
        ({"assignee": "*@altis-dxp.com"}, "is not an email address"),
        ({"application": "two\nlines"}, "one line"),
    ],
)
def test_a_request_the_desk_refuses_changes_nothing(
    database: Database, changes: dict[str, Any], message: str
) -> None:
    """NotAllowed says why, and the ticket keeps its values and has no event."""
    tid = hosting_ticket(database)
    with pytest.raises(NotAllowed, match=message):
        change(database, tid, **changes)
    assert events(database, tid) == []


def test_with_agents_set_the_assignee_must_be_one(database: Database) -> None:
    """[desk] agents: an assignee outside them is refused; one inside is recorded lower-case."""
    tid = hosting_ticket(database)
    context = DeskContext(SHIPPED, policy(), ("*@altis-dxp.com", "kim@freelance.example"))
    with pytest.raises(NotAllowed, match="not one of \\[desk\\] agents"):
        change(database, tid, context, assignee="mallory@evil.example")
    change(database, tid, context, assignee="Kim@Freelance.example")
    assert events(database, tid) == [("assignee", None, "kim@freelance.example", AGENT)]


def test_check_agent_takes_one_address_of_the_agents() -> None:
    """check_agent: an address (any case), one of [desk] agents when they are set."""
    assert check_agent("Jo@Altis-DXP.com", ()) == "jo@altis-dxp.com"
    assert check_agent("jo@altis-dxp.com", ("*@altis-dxp.com",)) == "jo@altis-dxp.com"
    for bad in ("jo", "jo@", "Jo <jo@altis-dxp.com>", "jo@altis-dxp.com\x00", "a b@x.example"):
        with pytest.raises(NotAllowed, match="not an email address"):
            check_agent(bad, ())
    with pytest.raises(NotAllowed, match="not one of"):
        check_agent("jo@altis-dxp.com.evil.example", ("*@altis-dxp.com",))


def test_an_unknown_ticket_is_ticket_not_found(database: Database) -> None:
    """Changing a ticket that does not exist raises TicketNotFound and writes nothing."""
    with pytest.raises(TicketNotFound):
        change(database, 42, priority=Priority.URGENT)
    assert database.run_read(lambda s: s.exec(select(TicketEvent)).all()) == []


def test_change_line_reads_as_a_sentence() -> None:
    """A change in words, nothing as (none)."""
    assert change_line("priority", "normal", "urgent") == "priority: normal → urgent"
    assert change_line("assignee", None, AGENT) == f"assignee: (none) → {AGENT}"


def test_assignee_filters_of_list_tickets(database: Database) -> None:
    """list_tickets(assignee=) finds an agent's tickets (any case); unassigned the others."""
    first, second, third = (hosting_ticket(database, f"Ticket {n}") for n in (1, 2, 3))
    change(database, first, assignee="jo@altis-dxp.com")
    change(database, third, assignee="sam@altis-dxp.com")

    def ids(**filters: Any) -> list[int]:
        return [v["id"] for v in database.run_read(lambda s: list_tickets(s, **filters))]

    assert ids(assignee="JO@altis-dxp.com") == [first]
    assert ids(assignee="sam@altis-dxp.com") == [third]
    assert ids(unassigned=True) == [second]
    assert ids(assignee="nobody@altis-dxp.com") == []
    assert sorted(ids()) == [first, second, third]


# 2. Paging: raised to a paging type and priority.


def test_raising_a_hosting_incident_to_urgent_pages_as_sysops_mail_would(
    database: Database,
) -> None:
    """incident + urgent is what sysops@ makes: a pending trigger naming the subject, the
    agent as sender, the sysops route, the ticket's dedup key."""
    tid = hosting_ticket(database, "Checkout errors since nine")
    assert pages(database, tid) == []
    result = change(database, tid, priority=Priority.URGENT)
    (page,) = pages(database, tid)
    ticket = database.run_read(lambda s: s.get(Ticket, tid))
    assert ticket is not None
    assert result.page is not None
    assert result.page.id == page.id
    assert (page.action, page.status, page.reason) == ("trigger", "pending", None)
    assert (page.sender, page.route, page.inbound_id) == (AGENT, "sysops", None)
    assert page.dedup_key == dedup_key(ticket)
    summary = page.event["payload"]["summary"]
    assert summary == (
        f"[URGENT] Checkout errors since nine - from Alice Example <{ALICE}> "
        f"(ticket #{tid}, raised by {AGENT})"
    )
    details = page.event["payload"]["custom_details"]
    assert details["changes"] == ["priority: normal → urgent"]
    assert (details["sender"], details["route"], details["reason"]) == (AGENT, "sysops", "raised")
    assert details["body"] == "Checkout answers 500."
    assert page.event["payload"]["class"] == "incident"


def test_a_question_made_an_urgent_incident_pages_once(database: Database) -> None:
    """Type and priority changed together page once; raising again pages nobody (open incident)."""
    tid = file(database, mail("Site slow", to=SUPPORT), SUPPORT)
    change(database, tid, type=TicketType.INCIDENT)
    assert pages(database, tid) == []
    change(database, tid, priority=Priority.URGENT)
    change(database, tid, priority=Priority.HIGH, type=TicketType.QUESTION)  # resolve
    change(database, tid, priority=Priority.URGENT, type=TicketType.INCIDENT)  # again
    change(database, tid, application="shop")  # nothing to do with paging
    assert [(p.action, p.status) for p in pages(database, tid)] == [
        ("trigger", "pending"),
        ("resolve", "pending"),
        ("trigger", "pending"),
    ]
    assert len({p.dedup_key for p in pages(database, tid)}) == 1


def test_a_ticket_whose_incident_is_open_is_not_paged_again(database: Database) -> None:
    """A sysops@ ticket already paged: changes that keep it urgent page nobody."""
    tid = file(database, mail("Site down", to=SYSOPS), SYSOPS)
    (trigger,) = pages(database, tid)
    change(database, tid, type=TicketType.PROBLEM)  # away: resolve
    change(database, tid, type=TicketType.INCIDENT)  # back: trigger
    change(database, tid, assignee=AGENT, application="shop")
    assert [(p.action, p.dedup_key) for p in pages(database, tid)] == [
        ("trigger", trigger.dedup_key),
        ("resolve", trigger.dedup_key),
        ("trigger", trigger.dedup_key),
    ]


def test_the_allow_list_withholds_the_agents_page_with_the_reason(database: Database) -> None:
    """[escalation] allowed_senders applies to --by: outside it the trigger is kept, withheld."""
    tid = hosting_ticket(database)
    context = DeskContext(SHIPPED, policy(allowed_senders=("*@trusted.example",)))
    result = change(database, tid, context, priority=Priority.URGENT)
    (page,) = pages(database, tid)
    assert result.page is not None
    assert result.page.status == "withheld"
    assert page.status == "withheld"
    assert page.reason == f"sender {AGENT} is not in [escalation] allowed_senders"
    allowed = DeskContext(SHIPPED, policy(allowed_senders=("*@altis-dxp.com",)))
    other = hosting_ticket(database, "Another")
    change(database, other, allowed, priority=Priority.URGENT)
    assert [p.status for p in pages(database, other)] == ["pending"]


def test_the_hourly_limit_counts_the_agents_pages(database: Database) -> None:
    """max_pages_per_sender_per_hour = 1: the agent's second page in the hour is withheld."""
    context = DeskContext(SHIPPED, policy(max_per_hour=1))
    first, second = hosting_ticket(database, "One"), hosting_ticket(database, "Two")
    change(database, first, context, priority=Priority.URGENT)
    change(database, second, context, priority=Priority.URGENT)
    (withheld,) = pages(database, second)
    assert withheld.status == "withheld"
    assert withheld.reason is not None
    assert "max_pages_per_sender_per_hour = 1" in withheld.reason
    assert [p.status for p in pages(database, first)] == ["pending"]


def test_paging_disabled_records_the_page_withheld(database: Database) -> None:
    """[pagerduty] enabled = false: the trigger is withheld saying so, as filing does."""
    tid = hosting_ticket(database)
    change(database, tid, DeskContext(SHIPPED, policy(enabled=False)), priority=Priority.URGENT)
    (page,) = pages(database, tid)
    assert page.status == "withheld"
    assert page.reason == "paging disabled ([pagerduty] enabled = false)"


def test_without_a_paging_policy_a_raise_pages_nobody(database: Database) -> None:
    """A context without a policy (as filing's without one) queues no trigger."""
    tid = hosting_ticket(database)
    change(database, tid, DeskContext(SHIPPED, None), priority=Priority.URGENT)
    assert pages(database, tid) == []


def test_a_solved_ticket_raised_to_urgent_pages_nobody(database: Database) -> None:
    """Nothing is left to do for a solved ticket: raising it pages nobody."""
    tid = hosting_ticket(database)
    change(database, tid, status=TicketStatus.SOLVED)
    change(database, tid, priority=Priority.URGENT)
    assert pages(database, tid) == []


def test_a_route_paging_at_high_pages_for_urgent_too(database: Database, tmp_path: Path) -> None:
    """A paging route at incident + high also takes an urgent incident (at or above its
    priority); lowering below high resolves, lowering to high does not."""
    rules = tmp_path / "rules"
    rules.mkdir()
    text = (REPO / "rules" / "desk.toml").read_text()
    rules.joinpath("desk.toml").write_text(
        text.replace('priority = "urgent"\npage = true', 'priority = "high"\npage = true')
    )
    table = load_rules(rules)
    context = DeskContext(table, policy())
    tid = file(database, mail("Checkout errors", to=HOSTING), HOSTING, table)
    change(database, tid, context, priority=Priority.URGENT)
    change(database, tid, context, priority=Priority.HIGH)
    assert [(p.action, p.route) for p in pages(database, tid)] == [("trigger", "sysops")]
    change(database, tid, context, priority=Priority.NORMAL)
    assert [p.action for p in pages(database, tid)] == ["trigger", "resolve"]


# 3. Resolving.


@pytest.mark.parametrize(
    "changes",
    [
        {"status": TicketStatus.SOLVED},
        {"status": TicketStatus.CLOSED},
        {"priority": Priority.HIGH},
        {"priority": Priority.LOW},
        {"type": TicketType.PROBLEM},
    ],
)
def test_solved_closed_lowered_or_another_type_resolves_under_the_same_key(
    database: Database, changes: dict[str, Any]
) -> None:
    """An open incident is resolved once the ticket leaves what paged, under its dedup key."""
    tid = file(database, mail("Site down", to=SYSOPS), SYSOPS)
    result = change(database, tid, **changes)
    trigger, resolve = pages(database, tid)
    assert result.page is not None
    assert result.page.id == resolve.id
    assert (resolve.action, resolve.status, resolve.dedup_key) == (
        "resolve",
        "pending",
        trigger.dedup_key,
    )
    assert resolve.event == {"event_action": "resolve", "dedup_key": trigger.dedup_key}
    change(database, tid, **changes)  # the same again: no event, no second resolve
    assert len(pages(database, tid)) == 2


def test_a_pending_ticket_keeps_its_incident(database: Database) -> None:
    """Waiting for the customer (pending) is still an incident: nothing is resolved."""
    tid = file(database, mail("Site down", to=SYSOPS), SYSOPS)
    change(database, tid, status=TicketStatus.PENDING)
    assert [p.action for p in pages(database, tid)] == ["trigger"]


def test_closing_a_ticket_that_never_paged_queues_nothing(database: Database) -> None:
    """A support@ ticket closed: an event, no page."""
    tid = file(database, mail("A question", to=SUPPORT), SUPPORT)
    result = change(database, tid, status=TicketStatus.CLOSED)
    assert result.page is None
    assert pages(database, tid) == []
    assert events(database, tid) == [("status", "open", "closed", AGENT)]


def test_a_withheld_trigger_is_no_incident_to_resolve(database: Database) -> None:
    """Solving a ticket whose only trigger was withheld queues no resolve."""
    tid = hosting_ticket(database)
    change(database, tid, DeskContext(SHIPPED, policy(enabled=False)), priority=Priority.URGENT)
    change(database, tid, status=TicketStatus.SOLVED)
    assert [(p.action, p.status) for p in pages(database, tid)] == [("trigger", "withheld")]


def test_solving_is_reported_for_the_solved_notice(database: Database) -> None:
    """ChangeResult.solved is true for the change that solves the ticket, and only that one."""
    tid = hosting_ticket(database)
    assert change(database, tid, status=TicketStatus.SOLVED).solved
    assert not change(database, tid, status=TicketStatus.SOLVED).solved
    assert not change(database, tid, status=TicketStatus.CLOSED).solved
    result = change(database, tid, status=TicketStatus.SOLVED)
    assert result.solved
    assert result.event(TicketField.STATUS) is result.events[0]


# 4. Reopening.


def test_reopening_a_resolved_urgent_incident_triggers_again(database: Database) -> None:
    """Reopened, an urgent incident is one again: a trigger under the same key, "reopened"."""
    tid = file(database, mail("Site down", to=SYSOPS), SYSOPS)
    change(database, tid, status=TicketStatus.SOLVED)
    result = change(database, tid, status=TicketStatus.OPEN)
    first, _, again = pages(database, tid)
    assert result.page is not None
    assert result.page.id == again.id
    assert (again.action, again.status, again.dedup_key) == ("trigger", "pending", first.dedup_key)
    assert again.event["payload"]["summary"].endswith(f"(ticket #{tid}, reopened by {AGENT})")
    assert again.event["payload"]["custom_details"]["reason"] == "reopened"


def test_reopening_below_urgent_in_the_same_change_pages_nobody(database: Database) -> None:
    """The decision is made on the ticket as the whole change leaves it."""
    tid = file(database, mail("Site down", to=SYSOPS), SYSOPS)
    change(database, tid, status=TicketStatus.CLOSED)
    change(database, tid, status=TicketStatus.OPEN, priority=Priority.HIGH)
    assert [p.action for p in pages(database, tid)] == ["trigger", "resolve"]
    assert events(database, tid) == [
        ("status", "open", "closed", AGENT),
        ("status", "closed", "open", AGENT),
        ("priority", "urgent", "high", AGENT),
    ]


def test_reopening_a_ticket_that_is_not_urgent_pages_nobody(database: Database) -> None:
    """A hosting@ incident at normal reopened: an event, no page."""
    tid = hosting_ticket(database)
    change(database, tid, status=TicketStatus.SOLVED)
    change(database, tid, status=TicketStatus.OPEN)
    assert pages(database, tid) == []
