"""The outbox rows as the CLI and the ticket views show them: pages, outgoing mail and
webhook events.

Read models only: the pager and the mailer (maild/outbound) write these rows,
nothing here changes them. The JSON shapes are part of the CLI's contract.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlalchemy import select as select_core
from sqlmodel import Session, col, select

from maild.enums import MailStatus, OutboxStatus, PageStatus
from maild.store.models import (
    Message,
    Outmail,
    OutmailRecipient,
    Page,
    WebhookEvent,
    as_utc,
    table_of,
)

# Pages.


def page_view(page: Page) -> dict[str, Any]:
    payload = page.event.get("payload") or {}
    return {
        "id": page.id,
        "ticket_id": page.ticket_id,
        "action": page.action,
        "status": page.status,
        "reason": page.reason,
        "dedup_key": page.dedup_key,
        "sender": page.sender,
        "route": page.route,
        "summary": payload.get("summary", ""),
        "attempts": page.attempts,
        "last_error": page.last_error,
        "next_attempt_at": as_utc(page.next_attempt_at).isoformat()
        if page.status == PageStatus.PENDING
        else None,
        "created_at": as_utc(page.created_at).isoformat(),
        "sent_at": as_utc(page.sent_at).isoformat() if page.sent_at else None,
    }


def list_pages(
    session: Session,
    *,
    status: str | None = None,
    ticket_id: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    query = select(Page)
    if status:
        query = query.where(Page.status == status)
    if ticket_id is not None:
        query = query.where(Page.ticket_id == ticket_id)
    query = query.order_by(col(Page.id).desc())
    if limit:
        query = query.limit(limit)
    return [page_view(p) for p in session.exec(query).all()]


def ticket_pages(session: Session, ticket_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each ticket's latest page, as the ticket views show it."""
    if not ticket_ids:
        return {}
    latest = (
        select(func.max(col(Page.id)))
        .where(col(Page.ticket_id).in_(ticket_ids))
        .group_by(col(Page.ticket_id))
    )
    page = table_of(Page).c
    rows = session.execute(
        select_core(page.id, page.ticket_id, page.action, page.status, page.reason).where(
            page.id.in_(latest)
        )
    ).all()  # columns, not models: one per listed ticket
    return {
        p.ticket_id: {"id": p.id, "action": p.action, "status": p.status, "reason": p.reason}
        for p in rows
    }


# Outgoing mail (acknowledgements).


def outmail_view(session: Session, outmail: Outmail) -> dict[str, Any]:
    recipients = session.exec(
        select(OutmailRecipient)
        .where(OutmailRecipient.outmail_id == outmail.id)
        .order_by(col(OutmailRecipient.id))
    ).all()
    message = session.get(Message, outmail.message_pk)
    return {
        "id": outmail.id,
        "ticket_id": outmail.ticket_id,
        "kind": outmail.kind,
        "status": outmail.status,
        "reason": outmail.reason,
        "subject": message.subject if message else "",
        "message_id": message.message_id if message else "",
        "recipients": [
            {"email": r.email, "status": r.status, "error": r.error} for r in recipients
        ],
        "attempts": outmail.attempts,
        "last_error": outmail.last_error,
        "next_attempt_at": as_utc(outmail.next_attempt_at).isoformat()
        if outmail.status == MailStatus.PENDING
        else None,
        "created_at": as_utc(outmail.created_at).isoformat(),
        "sent_at": as_utc(outmail.sent_at).isoformat() if outmail.sent_at else None,
    }


def list_outmail(
    session: Session,
    *,
    status: str | None = None,
    ticket_id: int | None = None,
    limit: int | None = None,
    oldest_first: bool = False,
) -> list[dict[str, Any]]:
    query = select(Outmail)
    if status:
        query = query.where(Outmail.status == status)
    if ticket_id is not None:
        query = query.where(Outmail.ticket_id == ticket_id)
    query = query.order_by(col(Outmail.id) if oldest_first else col(Outmail.id).desc())
    if limit:
        query = query.limit(limit)
    return [outmail_view(session, o) for o in session.exec(query).all()]


# Webhook events.


def webhook_event_view(row: WebhookEvent) -> dict[str, Any]:
    return {
        "id": row.id,  # the Maild-Delivery header
        "webhook": row.webhook,
        "event": row.event,
        "ticket_id": row.ticket_id,
        "status": row.status,
        "reason": row.reason,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "next_attempt_at": as_utc(row.next_attempt_at).isoformat()
        if row.status == OutboxStatus.PENDING
        else None,
        "created_at": as_utc(row.created_at).isoformat(),
        "sent_at": as_utc(row.sent_at).isoformat() if row.sent_at else None,
    }


def list_webhook_events(
    session: Session,
    *,
    status: str | None = None,
    ticket_id: int | None = None,
    webhook: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Newest first (the payloads are not shown: `--json` lists what was sent when)."""
    query = select(WebhookEvent)
    if status:
        query = query.where(WebhookEvent.status == status)
    if ticket_id is not None:
        query = query.where(WebhookEvent.ticket_id == ticket_id)
    if webhook is not None:
        query = query.where(WebhookEvent.webhook == webhook)
    query = query.order_by(col(WebhookEvent.id).desc())
    if limit:
        query = query.limit(limit)
    return [webhook_event_view(row) for row in session.exec(query).all()]
