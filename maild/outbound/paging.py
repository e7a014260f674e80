"""Paging on-call: when a ticket pages, who may page, how often, and the outbox rows.

Every decision here runs inside the transaction that changes the ticket, so a
page row exists exactly when the ticket change it belongs to committed; the
sender hears 250 long before, and PagerDuty is reached later by the pager
(outbound/pager.py), which only ever claims and updates these rows; store/outboxes.py
shows them.

When a message is filed (intake.file_message):

- a new ticket from a route with `page = true` → a trigger;
- a message through a paging route for a ticket that was never paged (the
  customer escalated by writing to sysops@, or a split delivery of one message
  reached sysops@ second) → a trigger;
- a reply that reopens a ticket whose incident was resolved, or a message
  through a paging route for a ticket whose incident was resolved → a
  trigger again, under the same dedup key;
- a customer's follow-up (a person's mail, not an agent's) to a ticket whose
  incident is still open (its latest trigger pending or sent, not resolved) →
  a trigger under the same dedup key, which PagerDuty adds to the open alert,
  so that the new detail reaches on-call;
- anything else for a paged ticket → nothing: PagerDuty already has it open.

A trigger is withheld, with the reason kept on the row and shown on the
ticket, when paging is disabled, when the sender is not in
`[escalation] allowed_senders`, or when the sender already paged
`[escalation] max_pages_per_sender_per_hour` times in the last hour.

When the desk changes a ticket (desk/actions.change_ticket), the ticket pages as
if its mail had come through the paging route for its new type and priority
(`RuleTable.paging_route`; incident + urgent in the shipped table), with the
agent who changed it as the sender for the allow-list and the hourly limit:

- raised to a paging type and priority, or reopened there, with no open
  incident → a trigger (plan_change_trigger), under the same dedup key;
- solved or closed, lowered below every paging route's priority, or moved to
  a type no paging route makes, with an open incident → a resolve
  (queue_resolve).

An open incident (open_incident) is one whose latest page that is pending or
sent is a trigger: a withheld or failed follow-up or change neither opens nor
closes it, so closing the ticket still resolves it.

One ticket has one dedup key for life, so PagerDuty holds at most one open
incident per ticket whatever is resent.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import bindparam, func, insert
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from maild.config import Settings
from maild.enums import Direction, PageAction, PageStatus, Priority
from maild.mail.addresses import Address, sender_matches
from maild.store.models import Envelope, Message, Page, Ticket, as_utc, from_row, table_of
from maild.store.ratelimit import limit_key

if TYPE_CHECKING:
    from maild.mail.parsing import ParsedMessage
    from maild.routing.rules import Decision

SUMMARY_LIMIT = 1024
DEDUP_LIMIT = 255
BODY_LINES = 20
BODY_CHARS = 2000


@dataclass(frozen=True)
class EscalationPolicy:
    """What the settings say about paging, in the form filing needs."""

    enabled: bool
    allowed_senders: tuple[str, ...]
    max_per_hour: int
    source: str
    ticket_url: str

    @classmethod
    def from_settings(cls, settings: Settings) -> EscalationPolicy:
        return cls(
            enabled=settings.pagerduty.enabled,
            allowed_senders=tuple(settings.escalation.allowed_senders),
            max_per_hour=settings.escalation.max_pages_per_sender_per_hour,
            source=settings.pagerduty.source or settings.smtp.hostname or socket.getfqdn(),
            ticket_url=settings.pagerduty.ticket_url,
        )

    def sender_allowed(self, email: str) -> bool:
        if not self.allowed_senders:
            return True
        return any(sender_matches(allowed, email) for allowed in self.allowed_senders)

    def link(self, ticket_id: int) -> str:
        return self.ticket_url.format(id=ticket_id) if self.ticket_url else ""


def dedup_key(ticket: Ticket) -> str:
    """Stable for the ticket's life, and unique across databases that reuse ticket ids."""
    assert ticket.id is not None
    created = as_utc(ticket.created_at).strftime("%Y%m%dT%H%M%S%fZ")
    return f"maild-ticket-{ticket.id}-{created}"[:DEDUP_LIMIT]


class LastPage(NamedTuple):
    """What filing and the desk read of a ticket's latest page."""

    id: int
    action: str
    status: str
    dedup_key: str


_PAGE = table_of(Page)
_INSERT_PAGE = insert(_PAGE).returning(_PAGE.c.id)
# Core, not the ORM: every follow-up asks this (is the ticket's incident open?), and a
# Page object and the session's autoflush cost it 1 ms where this costs a tenth.
_LATEST_PAGE = (
    sa_select(_PAGE.c.id, _PAGE.c.action, _PAGE.c.status, _PAGE.c.dedup_key)
    .where(_PAGE.c.ticket_id == bindparam("ticket_id"))
    .order_by(_PAGE.c.id.desc())
    .limit(1)
)


def latest_page(session: Session, ticket_id: int) -> LastPage | None:
    row = session.connection().execute(_LATEST_PAGE, {"ticket_id": ticket_id}).first()
    return None if row is None else LastPage(*row)


_LIVE = (PageStatus.PENDING.value, PageStatus.SENT.value)


def open_incident(session: Session, ticket_id: int) -> Page | None:
    """The trigger that keeps the ticket's incident open, or None: the latest page that is
    pending or sent, when it is a trigger. Withheld and failed pages change nothing at
    PagerDuty, so a withheld follow-up after an open trigger leaves it open."""
    page = session.exec(
        select(Page)
        .where(Page.ticket_id == ticket_id, col(Page.status).in_(_LIVE))
        .order_by(col(Page.id).desc())
        .limit(1)
    ).first()
    return page if page is not None and page.action == PageAction.TRIGGER else None


def _recent_pages(session: Session, sender: str, now: datetime) -> int:
    """Triggers from this sender (any case, any `+tag`) in the last hour that count:
    pending, sent or failed, not withheld. Filing holds the sender's ratelimit lock."""
    counted = (PageStatus.PENDING.value, PageStatus.SENT.value, PageStatus.FAILED.value)
    return session.exec(
        select(func.count(col(Page.id))).where(
            Page.sender_key == limit_key(sender),
            Page.action == PageAction.TRIGGER.value,
            col(Page.status).in_(counted),
            Page.created_at >= now - timedelta(hours=1),
        )
    ).one()


def _display(sender: Address | None) -> str:
    if sender is None:
        return "an unknown sender"
    return f"{sender.name} <{sender.email}>" if sender.name else sender.email


def _summary(ticket: Ticket, subject: str, sender: Address | None, note: str) -> str:
    head = f"[{Priority(ticket.priority).value.upper()}] "
    tail = f" - from {_display(sender)} (ticket #{ticket.id}{note})"
    room = SUMMARY_LIMIT - len(head) - len(tail)
    subject = subject or "(no subject)"
    if room < 20:  # a sender name of a thousand characters: cut the tail instead
        return (head + subject + tail)[: SUMMARY_LIMIT - 3] + "..."
    if len(subject) > room:
        subject = subject[: room - 3] + "..."
    return head + subject + tail


def _first_lines(text: str) -> str:
    lines = text.strip().splitlines()[:BODY_LINES]
    body = "\n".join(lines)
    return body if len(body) <= BODY_CHARS else body[: BODY_CHARS - 3] + "..."


def trigger_event(
    policy: EscalationPolicy,
    ticket: Ticket,
    key: str,
    route: str,
    sender: Address | None,
    inbound: Envelope,
    parsed: ParsedMessage,
    why: str,
) -> dict[str, Any]:
    """The Events API v2 body for a trigger, without the routing key (added at send time)."""
    assert ticket.id is not None
    note = {
        "created": "",
        "escalated": ", escalated",
        "reopened": ", reopened",
        "follow-up": ", follow-up",
    }[why]
    details: dict[str, Any] = {
        "ticket": ticket.id,
        "type": ticket.type,
        "priority": ticket.priority,
        "route": route,
        "sender": _display(sender),
        "recipients": list(inbound.rcpt_tos),
        "received_at": as_utc(inbound.received_at).isoformat(),
        "subject": parsed.subject,
        "message_id": parsed.message_id,
        "reason": why,
        "body": _first_lines(parsed.text),
    }
    summary = _summary(ticket, parsed.subject, sender, note)
    return _trigger(policy, ticket, key, route, summary, inbound.received_at, details)


def change_trigger_event(
    policy: EscalationPolicy,
    ticket: Ticket,
    key: str,
    route: str,
    *,
    by: str,
    why: str,
    changes: list[str],
    text: str,
    now: datetime,
) -> dict[str, Any]:
    """The trigger for a change the desk made (why: raised | reopened): the summary names the
    requester as filing's does, and who raised or reopened it; `text` is the latest
    message of the customer's, for on-call to read."""
    assert ticket.id is not None
    requester = Address(ticket.requester_name, ticket.requester_email)
    details: dict[str, Any] = {
        "ticket": ticket.id,
        "type": ticket.type,
        "priority": ticket.priority,
        "route": route,
        "sender": by,
        "requester": _display(requester) if ticket.requester_email else "",
        "subject": ticket.subject,
        "reason": why,
        "changes": changes,
        "body": _first_lines(text),
    }
    summary = _summary(
        ticket, ticket.subject, requester if ticket.requester_email else None, f", {why} by {by}"
    )
    return _trigger(policy, ticket, key, route, summary, now, details)


def _trigger(
    policy: EscalationPolicy,
    ticket: Ticket,
    key: str,
    route: str,
    summary: str,
    when: datetime,
    details: dict[str, Any],
) -> dict[str, Any]:
    assert ticket.id is not None
    event: dict[str, Any] = {
        "event_action": PageAction.TRIGGER.value,
        "dedup_key": key,
        "payload": {
            "summary": summary,
            "source": policy.source,
            "severity": "critical",
            "timestamp": as_utc(when).isoformat(),
            "component": route,
            "group": "maild",
            "class": ticket.type,
            "custom_details": details,
        },
        "client": "maild",
    }
    link = policy.link(ticket.id)
    if link:
        details["ticket_url"] = link
        event["links"] = [{"href": link, "text": f"Ticket #{ticket.id}"}]
        event["client_url"] = link
    return event


def _withheld_reason(
    session: Session, policy: EscalationPolicy, sender: str, now: datetime
) -> str | None:
    if not policy.enabled:
        return "paging disabled ([pagerduty] enabled = false)"
    if not policy.sender_allowed(sender):
        return f"sender {sender or '(none)'} is not in [escalation] allowed_senders"
    if policy.max_per_hour:
        count = _recent_pages(session, sender, now)
        if count >= policy.max_per_hour:
            return (
                f"sender {sender or '(none)'} already paged {count} times in the last hour "
                f"([escalation] max_pages_per_sender_per_hour = {policy.max_per_hour})"
            )
    return None


def plan_trigger(
    session: Session,
    policy: EscalationPolicy,
    ticket: Ticket,
    *,
    routes: list[Decision],
    created: bool,
    reopened: bool,
    sender: Address | None,
    inbound: Envelope,
    parsed: ParsedMessage,
    now: datetime,
    follow_up: bool = False,
) -> Page | None:
    """The trigger this filing calls for (pending or withheld), added to the session, or None.

    `follow_up`: the message is a customer's follow-up to this ticket (a person's mail
    threaded into it, not an agent's); it pages when the ticket's incident is open."""
    assert ticket.id is not None
    paging = [r for r in routes if r.page]
    follow_up = follow_up and not created and policy.enabled
    if not paging and not reopened and not follow_up:
        return None  # whatever its last page: only a paging route, a reopening or a follow-up
    last = None if created else latest_page(session, ticket.id)
    if created or last is None:
        if not paging:
            return None
        why = "created" if created else "escalated"
    elif last.action == PageAction.RESOLVE and reopened:
        why = "reopened"
    elif last.action == PageAction.RESOLVE and paging:
        why = "escalated"  # resolved, reopened by the desk, and now mailed to sysops@ again
    elif follow_up and _still_open(session, ticket.id, last):
        why = "follow-up"  # the same dedup key: PagerDuty adds it to the open alert
    else:
        return None  # its incident is open (or its page was withheld or failed)
    route = paging[0].name if paging else ticket.rule
    key = last.dedup_key if last is not None else dedup_key(ticket)
    email = sender.email if sender else ""
    event = trigger_event(policy, ticket, key, route, sender, inbound, parsed, why)
    return _queue_trigger(session, policy, ticket, route, email, event, now, inbound.id)


def _queue_trigger(
    session: Session,
    policy: EscalationPolicy,
    ticket: Ticket,
    route: str,
    sender: str,
    event: dict[str, Any],
    now: datetime,
    inbound_id: int | None = None,
) -> Page:
    """The trigger row, pending or withheld with the reason, added to the session."""
    assert ticket.id is not None
    reason = _withheld_reason(session, policy, sender, now)
    values = dict(
        ticket_id=ticket.id,
        inbound_id=inbound_id,
        action=PageAction.TRIGGER.value,
        dedup_key=event["dedup_key"],
        status=PageStatus.WITHHELD.value if reason else PageStatus.PENDING.value,
        reason=reason,
        sender=sender,
        sender_key=limit_key(sender),
        route=route,
        event=event,
        next_attempt_at=now,
        queued_at=now,
        created_at=now,
    )
    # Core, not the ORM's unit of work: a Page and a session flush were most of a paging
    # message's filing (issue 21). The row is read, never changed, after this.
    page_id = session.execute(_INSERT_PAGE, values).scalar_one()
    return from_row(Page, {**values, "id": page_id})


def _still_open(session: Session, ticket_id: int, last: LastPage) -> bool:
    """Whether the ticket's incident is open; `last` is its latest page (read already)."""
    if last.action == PageAction.TRIGGER and last.status in _LIVE:
        return True
    return open_incident(session, ticket_id) is not None


def plan_change_trigger(
    session: Session,
    policy: EscalationPolicy,
    ticket: Ticket,
    *,
    route: str,
    by: str,
    why: str,
    changes: list[str],
    now: datetime,
) -> Page | None:
    """The trigger a desk's change calls for (pending, or withheld under the same allow-list
    and hourly limit as mail, `by` being the sender), added to the session; None when the
    ticket's incident is already open. The caller holds `by`'s ratelimit lock."""
    assert ticket.id is not None
    last = latest_page(session, ticket.id)
    if last is not None and _still_open(session, ticket.id, last):
        return None
    key = last.dedup_key if last is not None else dedup_key(ticket)
    text = session.exec(
        select(Message.text)
        .where(Message.ticket_id == ticket.id, Message.direction == Direction.INBOUND.value)
        .order_by(col(Message.id).desc())
        .limit(1)
    ).first()
    event = change_trigger_event(
        policy, ticket, key, route, by=by, why=why, changes=changes, text=text or "", now=now
    )
    return _queue_trigger(session, policy, ticket, route, by, event, now)


def queue_resolve(session: Session, ticket: Ticket, now: datetime) -> Page | None:
    """A resolve for the ticket's open incident (open_incident), or None."""
    assert ticket.id is not None
    last = open_incident(session, ticket.id)
    if last is None:
        return None
    page = Page(
        ticket_id=ticket.id,
        action=PageAction.RESOLVE.value,
        dedup_key=last.dedup_key,
        sender=last.sender,
        sender_key=last.sender_key,
        route=last.route,
        event={"event_action": PageAction.RESOLVE.value, "dedup_key": last.dedup_key},
        next_attempt_at=now,
        queued_at=now,
        created_at=now,
    )
    session.add(page)
    session.flush()
    return page
