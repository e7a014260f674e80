"""`maild rules replay`: how the current table would route recent stored messages.

Each delivery received since a moment is parsed again and routed by the table
now on disk; the route it was filed by (its message's route, or the route
that dropped it) is compared with the route it would get now. Nothing is
changed: this shows an admin what an edit of the rules would do to real mail
before or after a reload.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from maild.enums import InboundStatus
from maild.mail.parsing import parse_message, sender_of
from maild.routing.rules import MessageContext, RuleTable, best_decision
from maild.store.models import Inbound, Message, Ticket, as_utc


def _was(session: Session, row: Inbound) -> str | None:
    """The route a delivery was filed by, or None when it was not routed (failed, a loop)."""
    if row.status == InboundStatus.DROPPED and row.dropped_by_route:
        return row.dropped_by_route
    message = session.exec(select(Message.rule).where(Message.inbound_id == row.id)).first()
    if message:
        return message
    if row.status == InboundStatus.DUPLICATE and row.ticket_id is not None:
        ticket = session.get(Ticket, row.ticket_id)
        return ticket.rule if ticket else None
    return None


def replay(session: Session, table: RuleTable, since: datetime) -> list[dict[str, Any]]:
    rows = session.exec(
        select(Inbound).where(Inbound.received_at >= since).order_by(col(Inbound.id))
    ).all()
    result = []
    for row in rows:
        parsed = parse_message(row.raw, table.header_names)
        context = MessageContext.of(parsed, sender_of(parsed, row.mail_from))
        decisions, _ = table.decide_all(row.rcpt_tos, context)
        now = best_decision(decisions) if decisions else None
        was = _was(session, row)
        result.append(
            {
                "inbound": row.id,
                "received_at": as_utc(row.received_at).isoformat(),
                "status": row.status,
                "ticket_id": row.ticket_id,
                "subject": parsed.subject,
                "was": was,
                "now": now.name if now else None,
                "type": now.type.value if now else None,
                "priority": now.priority.value if now else None,
                "drop": now.drop if now else False,
                "changed": was is not None and (now is None or now.name != was),
            }
        )
    return result
