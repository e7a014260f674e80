"""Reading the spool of accepted deliveries (the `inbound` table) for operators."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from maild.enums import InboundStatus, OutboxStatus
from maild.store.models import Inbound, Message


def inbound_view(row: Inbound) -> dict[str, Any]:
    return {
        "id": row.id,
        "status": row.status,
        "received_at": row.received_at.isoformat() if row.received_at else None,
        "processed_at": row.processed_at.isoformat() if row.processed_at else None,
        "protocol": row.protocol,
        "peer": row.peer,
        "helo": row.helo,
        "session_id": row.session_id,
        "mail_from": row.mail_from,
        "rcpt_tos": row.rcpt_tos,
        "size": row.size,
        "sha256": row.sha256,
        "ticket_id": row.ticket_id,
        "attempts": row.attempts,
        "error": row.error,
    }


_COLUMNS = [
    getattr(Inbound, name)
    for name in (
        "id",
        "status",
        "received_at",
        "processed_at",
        "protocol",
        "peer",
        "helo",
        "session_id",
        "mail_from",
        "rcpt_tos",
        "size",
        "sha256",
        "ticket_id",
        "attempts",
        "error",
    )
]


def list_inbound(
    session: Session, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Newest first; the raw bytes are not loaded."""
    query = select(*_COLUMNS)
    if status:
        query = query.where(Inbound.status == status)
    rows = session.exec(query.order_by(col(Inbound.id).desc()).limit(limit)).all()
    return [inbound_view(Inbound(**row._asdict(), raw=b"")) for row in rows]


def get_inbound(session: Session, inbound_id: int) -> Inbound | None:
    return session.get(Inbound, inbound_id)


def filed_by(session: Session, inbound_id: int) -> dict[str, Any] | None:
    """The route and table version that filed a delivery's message, and its ticket;
    None when it made no ticket message (a duplicate, dropped, not filed yet)."""
    row = session.exec(
        select(Message.rule, Message.rules_version, Message.ticket_id, Message.id)
        .where(Message.inbound_id == inbound_id, Message.rule != "")
        .order_by(col(Message.id))
        .limit(1)
    ).first()
    if row is None:
        return None
    rule, version, ticket_id, message_id = row
    return {"route": rule, "rules_version": version, "ticket": ticket_id, "message": message_id}


def unfiled_ids(session: Session) -> list[int]:
    """Deliveries not yet filed: failed ones, and ones still waiting (a pipe delivery whose
    processing was deferred, or mail a stopped daemon left behind)."""
    waiting = (InboundStatus.FAILED.value, InboundStatus.RECEIVED.value)
    return [
        i
        for i in session.exec(
            select(Inbound.id).where(col(Inbound.status).in_(waiting)).order_by(col(Inbound.id))
        ).all()
        if i is not None
    ]


def backlog(session: Session) -> dict[str, int]:
    """Work waiting: deliveries not yet processed, failed ones kept, pages, mail and webhook
    events not sent."""
    from sqlalchemy import func

    from maild.store.models import Outmail, Page, WebhookEvent

    counts = dict(
        session.exec(
            select(Inbound.status, func.count(col(Inbound.id)))
            .where(col(Inbound.status).in_(("received", "failed")))
            .group_by(col(Inbound.status))
        ).all()
    )
    pages = session.exec(
        select(func.count(col(Page.id))).where(Page.status == OutboxStatus.PENDING)
    ).one()
    mail = session.exec(
        select(func.count(col(Outmail.id))).where(Outmail.status == OutboxStatus.PENDING)
    ).one()
    hooks = session.exec(
        select(func.count(col(WebhookEvent.id))).where(WebhookEvent.status == OutboxStatus.PENDING)
    ).one()
    return {
        "inbound": counts.get("received", 0),
        "failed": counts.get("failed", 0),
        "pages": pages,
        "acknowledgements": mail,
        "webhooks": hooks,
    }
