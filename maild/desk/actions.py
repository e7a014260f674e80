"""What the desk does to a ticket: functions over a Session, no printing, no exit codes.

The CLI (`maild tickets set`, and its shortcuts `close`, `solve`, `reopen`) runs them in
one write transaction; the HTTP API is to run the same. They raise NotAllowed for a
request they refuse and store.tickets.TicketNotFound; callers turn those into exit
codes or HTTP answers.

change_ticket:

- sets the status, priority, type, application and assignee asked for. Each one that
  differs from the ticket's is a `ticket_event` row (field, old, new, by, when) and
  moves `updated_at`; a request that changes nothing writes nothing.
- keeps PagerDuty in step, in the same transaction (outbound/paging.py), deciding on
  the ticket as the whole request leaves it:
  - an open or pending ticket moved to a type and priority for which a route pages
    (RuleTable.paging_route: incident + urgent in the shipped table), or reopened
    while it is there, pages as that route's mail would: a trigger carrying the
    subject, with `by` as the sender for `[escalation] allowed_senders` and the
    hourly limit (withheld with the reason, as filing does), unless its incident is
    already open;
  - solved or closed, lowered below every such route's priority, or moved to a type
    no paging route makes: its open incident is resolved, under the same dedup key;
  - raising a solved or closed ticket pages nobody: nothing is left to do for it.
- set to solved, the requester is sent the solved notice (template `solved`: a
  reply reopens the ticket; correspondence.plan_solved_notice), in the same
  transaction, when the desk sends mail and a person opened the ticket.
- tells the webhooks subscribed to `ticket.updated` (outbound/webhook_events.py), in
  the same transaction: the changes as its events have them, and `by`.
  The daemon's pager polls the page table every second, so a change made by the CLI
  reaches PagerDuty without waking the daemon.

Reopening pages, as a customer's reply reopening the ticket does: an urgent incident
reopened is an incident again. An agent reopening one that is not lowers it in the
same request (`--status open --priority high`) and nobody is woken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from maild.config import Settings
from maild.enums import ParticipantRole, Priority, TicketField, TicketStatus, TicketType
from maild.mail import addresses
from maild.outbound import webhook_events
from maild.outbound.correspondence import DeskPolicy, Planned, plan_solved_notice
from maild.outbound.paging import EscalationPolicy, plan_change_trigger, queue_resolve
from maild.outbound.webhook_events import Webhooks
from maild.routing.rules import RuleTable
from maild.store import ratelimit
from maild.store.models import Page, Participant, Ticket, TicketEvent, utcnow
from maild.store.tickets import TicketNotFound

CLOSED = frozenset({TicketStatus.SOLVED, TicketStatus.CLOSED})
_MOVES = frozenset({TicketField.TYPE, TicketField.PRIORITY})

__all__ = [
    "ChangeResult",
    "Changes",
    "DeskContext",
    "NotAllowed",
    "TicketNotFound",
    "change_line",
    "change_ticket",
    "check_agent",
]


class NotAllowed(ValueError):
    """A request the desk refuses as it stands; the message says why."""


@dataclass(frozen=True)
class Changes:
    """What to change; None (and unassign False) leaves a field as it is."""

    status: TicketStatus | None = None
    priority: Priority | None = None
    type: TicketType | None = None
    application: str | None = None
    assignee: str | None = None  # an agent's address
    unassign: bool = False  # assignee back to nobody
    remove_cc: tuple[str, ...] = ()  # CC'd addresses to take off the ticket (not the requester)

    def wanted(self) -> list[tuple[TicketField, str | None]]:
        """(field, new value) for each field asked for, in TicketField order."""
        asked: list[tuple[TicketField, str | None]] = []
        if self.status is not None:
            asked.append((TicketField.STATUS, self.status.value))
        if self.priority is not None:
            asked.append((TicketField.PRIORITY, self.priority.value))
        if self.type is not None:
            asked.append((TicketField.TYPE, self.type.value))
        if self.application is not None:
            asked.append((TicketField.APPLICATION, self.application.strip()))
        if self.unassign:
            asked.append((TicketField.ASSIGNEE, None))
        elif self.assignee is not None:
            asked.append((TicketField.ASSIGNEE, addresses.normalize(self.assignee)))
        return asked


@dataclass(frozen=True)
class DeskContext:
    """What the desk's actions need besides the database, built from the settings the
    way the daemon builds its own (Service.desk): the routing table (which route pages
    for which type and priority), the paging policy (None: changes page nobody) and
    `[desk] agents`."""

    table: RuleTable
    policy: EscalationPolicy | None
    agents: tuple[str, ...] = ()
    mail: DeskPolicy | None = None  # the desk's mail (the solved notice); None: none sent

    @property
    def webhooks(self) -> Webhooks | None:
        """Who hears of a change (ticket.updated): the desk's policy's webhooks."""
        return self.mail.webhooks if self.mail is not None else None

    @classmethod
    def from_settings(cls, settings: Settings, table: RuleTable) -> DeskContext:
        """Raises ConfigError naming a template file and line at fault."""
        return cls(
            table,
            EscalationPolicy.from_settings(settings),
            tuple(settings.desk.agents),
            DeskPolicy.from_settings(settings),
        )


@dataclass(frozen=True)
class ChangeResult:
    """The ticket as changed, its new events (empty: nothing changed) and the page queued
    for it: a trigger (pending, or withheld with its reason) or a resolve, or None."""

    ticket: Ticket
    events: list[TicketEvent]
    page: Page | None = None
    notice: Planned | None = None  # the solved notice to the requester, queued or withheld

    def event(self, field: TicketField) -> TicketEvent | None:
        return next((e for e in self.events if e.field == field.value), None)

    @property
    def solved(self) -> bool:
        """This change solved the ticket (the requester is to hear of it)."""
        status = self.event(TicketField.STATUS)
        return status is not None and status.new == TicketStatus.SOLVED.value


def change_line(field: str, old: str | None, new: str | None) -> str:
    """One change in words: `priority: normal → urgent`."""
    return f"{field}: {old or '(none)'} → {new or '(none)'}"


def check_agent(address: str, agents: Sequence[str], what: str = "by") -> str:
    """The address as the desk records it (lower-case). NotAllowed unless it is one plain
    address and, when `[desk] agents` lists any, one of theirs (a typo guard for who is
    named: whoever runs the CLI can name anyone; the API names its authenticated user)."""
    if not addresses.is_address(address):
        raise NotAllowed(f"{what}: {address!r} is not an email address")
    email = addresses.normalize(address)
    if agents and not any(addresses.sender_matches(pattern, email) for pattern in agents):
        raise NotAllowed(f"{what}: {email} is not one of [desk] agents ({', '.join(agents)})")
    return email


def change_ticket(
    session: Session,
    ticket_id: int,
    changes: Changes,
    *,
    by: str,
    context: DeskContext,
    now: datetime | None = None,
    via: str | None = None,
) -> ChangeResult:
    """Apply `changes` to the ticket as `by` (an address, recorded on each event and used as
    the page's sender), writing an event per field that changes and the page it calls for.
    `via` names how the change came (an API token: "token NAME"), recorded on the events
    after `by`: "jo@example.com (token NAME)".

    The caller checks `by` (check_agent) and commits. NotAllowed: nothing to change, an
    assignee and unassign together, an assignee that is not an address (or not an agent
    when `[desk] agents` lists any), an application of more than one line."""
    now = now or utcnow()
    wanted = _check(changes, context, by)
    # The sender's hourly-limit lock before the ticket's row lock, in filing's order
    # (file_batch locks its senders first), so that the two never wait in a cycle.
    ratelimit.lock(session, [ratelimit.limit_key(by)])
    ticket = session.get(
        Ticket, ticket_id, with_for_update={"key_share": True}, populate_existing=True
    )
    if ticket is None:
        raise TicketNotFound(ticket_id)
    before = (TicketStatus(ticket.status), ticket.type, Priority(ticket.priority))
    recorded = f"{by} ({via})"[:320] if via else by
    events: list[TicketEvent] = []
    events.extend(_remove_cc(session, ticket, changes.remove_cc, recorded, now))
    for field, new in wanted:
        old: str | None = getattr(ticket, field.value)
        if old == new:
            continue
        setattr(ticket, field.value, new)
        events.append(
            TicketEvent(
                ticket_id=ticket_id,
                field=field.value,
                old=old,
                new=new,
                by=recorded,
                created_at=now,
            )
        )
    if not events:
        return ChangeResult(ticket, [])
    ticket.updated_at = now
    session.add(ticket)
    session.add_all(events)
    page = _page(session, context, ticket, before, events, by, now)
    result = ChangeResult(ticket, events, page)
    if result.solved and context.mail is not None:
        notice = plan_solved_notice(session, context.mail, ticket, now)
        result = ChangeResult(ticket, events, page, notice)
    session.flush()
    webhook_events.queue(
        session,
        context.webhooks,
        webhook_events.TICKET_UPDATED,
        ticket,
        now,
        changes=[webhook_events.change_data(e.field, e.old, e.new) for e in events],
        by=by,
    )
    return result


def _check(changes: Changes, context: DeskContext, by: str) -> list[tuple[TicketField, str | None]]:
    if not by.strip() or len(by) > 320:
        raise NotAllowed("who makes the change (by) must be an address of at most 320 characters")
    if changes.unassign and changes.assignee is not None:
        raise NotAllowed("a ticket cannot be assigned and unassigned at once")
    if changes.assignee is not None:
        check_agent(changes.assignee, context.agents, "assignee")
    if changes.application is not None and any(
        ord(c) < 0x20 or ord(c) == 0x7F for c in changes.application
    ):
        raise NotAllowed("application must be one line of text without control characters")
    for email in changes.remove_cc:
        if not addresses.is_address(email):
            raise NotAllowed(f"remove_cc: {email!r} is not an email address")
    wanted = changes.wanted()
    if not wanted and not changes.remove_cc:
        raise NotAllowed(
            "nothing to change: give a status, priority, type, application, assignee "
            "or a CC to remove"
        )
    return wanted


def _remove_cc(
    session: Session, ticket: Ticket, emails: Sequence[str], by: str, now: datetime
) -> list[TicketEvent]:
    """Take these CC'd addresses off the ticket: they get no more copies (until they write
    again). The requester is not a CC and stays; an address not on the ticket is no change."""
    if not emails:
        return []
    wanted = {addresses.normalize(e) for e in emails}
    people = session.exec(
        select(Participant).where(
            Participant.ticket_id == ticket.id,
            col(Participant.email).in_(wanted),
            Participant.role == ParticipantRole.CC.value,
        )
    ).all()
    events = []
    for person in sorted(people, key=lambda p: p.email):
        session.delete(person)
        events.append(
            TicketEvent(
                ticket_id=ticket.id or 0,
                field=TicketField.CC.value,
                old=person.email,
                new=None,
                by=by,
                created_at=now,
            )
        )
    return events


def _page(
    session: Session,
    context: DeskContext,
    ticket: Ticket,
    before: tuple[TicketStatus, str, Priority],
    events: list[TicketEvent],
    by: str,
    now: datetime,
) -> Page | None:
    """The trigger or resolve the change calls for (module docstring), added to the session."""
    changed = {TicketField(e.field) for e in events}
    old_status, old_type, old_priority = before
    if TicketStatus(ticket.status) in CLOSED:
        if changed & (_MOVES | {TicketField.STATUS}):
            return queue_resolve(session, ticket, now)
        return None
    moved = bool(changed & _MOVES)
    reopened = TicketField.STATUS in changed and old_status in CLOSED
    priority = Priority(ticket.priority)
    route = context.table.paging_route(TicketType(ticket.type), priority)
    if route is not None:
        if not (moved or reopened) or context.policy is None:
            return None
        return plan_change_trigger(
            session,
            context.policy,
            ticket,
            route=route.name,
            by=by,
            why="reopened" if reopened else "raised",
            changes=[change_line(e.field, e.old, e.new) for e in events],
            now=now,
        )
    if moved and (ticket.type != old_type or priority.rank < old_priority.rank):
        return queue_resolve(session, ticket, now)  # lowered below it, or another type
    return None
