"""What webhooks are told: the five events, who subscribes to each, what each carries, and
the outbox rows written in the transaction of the change.

An event is a `webhook_event` row per `[[webhook]]` subscribed to it, inserted in the
same transaction as the change it reports, so that the two commit together or not at
all. The sender (outbound/webhooks.py) posts them, in order per webhook and ticket.

- `ticket.created`: filing made a ticket (mail, or the API's form through filing).
- `ticket.updated`: a ticket's status, priority, type, application or assignee changed:
  by the desk (desk/actions.change_ticket: `changes` as its ticket events, `by` the
  agent), or by filing (a customer's reply reopening it, a route raising its priority:
  `by` is "maild"). A reply that only moves `updated_at` is no update.
- `message.created`: every message stored on a ticket except the desk's automatic mail
  (acknowledgements, copies, notifications, solved notices): a customer's mail (also
  automatic mail and bounces, with their `kind`), an agent's verified mail, an agent's
  reply from the CLI or the API, and an internal note (`internal: true`).
- `page.sent`, `page.failed`: the pager recorded a page's outcome (PagerDuty took it,
  or refused it, or it was given up on).

Each event's `data` has the ticket as the change left it (`ticket`), and by type
`message`, `changes` and `by`, or `page`. Payloads are snapshots: a retry sends the
same bytes. A message's text is cut at TEXT_CHARS characters (`text_truncated`); the
whole is in `maild tickets show` and the API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlmodel import Session

from maild.config import WEBHOOK_EVENTS, Settings
from maild.enums import Direction
from maild.store.models import Ticket, WebhookEvent, as_utc, table_of

TICKET_CREATED, TICKET_UPDATED, MESSAGE_CREATED, PAGE_SENT, PAGE_FAILED = WEBHOOK_EVENTS
TEXT_CHARS = 10_000  # of a message's text an event carries
BY_MAILD = "maild"  # who made filing's own changes (a reply reopening, a route raising)

_WEBHOOK_EVENT = table_of(WebhookEvent)
_INSERT = insert(_WEBHOOK_EVENT)


class FileInfo(Protocol):
    """What an event says of an attachment (a parsed one, or a file an agent attached)."""

    @property
    def filename(self) -> str: ...
    @property
    def content_type(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class Webhooks:
    """Who hears of what: the `[[webhook]]` names subscribed to each event (only events
    someone subscribes to are keys), and the ticket link the events carry. Small and
    picklable: filing's pool workers get it with the rest of the desk's policy."""

    # not hashed (a dict): the policies that carry this stay hashable
    subscribers: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    ticket_url: str = ""  # "https://desk.example/tickets/{id}"

    @classmethod
    def from_settings(cls, settings: Settings) -> Webhooks | None:
        """None when no `[[webhook]]` is configured: filing then writes nothing more."""
        if not settings.webhook:
            return None
        subscribers = {
            event: names
            for event in WEBHOOK_EVENTS
            if (names := tuple(h.name for h in settings.webhook if event in h.events))
        }
        return cls(subscribers, settings.desk.ticket_url or settings.pagerduty.ticket_url)

    def wants(self, event: str) -> bool:
        return event in self.subscribers

    def link(self, ticket_id: int | None) -> str:
        return self.ticket_url.format(id=ticket_id) if self.ticket_url and ticket_id else ""

    def rows(
        self, event: str, ticket_id: int, data: dict[str, Any], now: datetime
    ) -> list[dict[str, Any]]:
        """The outbox rows of one event: one per webhook subscribed to it."""
        return [
            {
                "webhook": name,
                "event": event,
                "ticket_id": ticket_id,
                "payload": data,
                "status": "pending",
                "attempts": 0,
                "claimed_by": "",
                "next_attempt_at": now,
                "queued_at": now,
                "created_at": now,
            }
            for name in self.subscribers.get(event, ())
        ]


def insert_rows(session: Session | Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Write outbox rows (Webhooks.rows) in one statement."""
    if rows:
        session.execute(_INSERT, list(rows))


def queue(
    session: Session | Connection,
    hooks: Webhooks | None,
    event: str,
    ticket: Ticket,
    now: datetime,
    **data: Any,
) -> None:
    """One event about `ticket` (its view is added as `data.ticket`), for every webhook
    subscribed to it; nothing when none is."""
    if hooks is None or not hooks.wants(event):
        return
    assert ticket.id is not None
    payload = {"ticket": ticket_data(ticket, hooks.link(ticket.id)), **data}
    insert_rows(session, hooks.rows(event, ticket.id, payload, now))


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def ticket_data(ticket: Ticket, url: str = "") -> dict[str, Any]:
    """The ticket as an event carries it: the fields of `maild tickets list --json`
    without its participants, message count and page, and with its link (or "")."""
    return {
        "id": ticket.id,
        "type": ticket.type,
        "priority": ticket.priority,
        "status": ticket.status,
        "subject": ticket.subject,
        "requester": ticket.requester_email,
        "requester_name": ticket.requester_name,
        "rule": ticket.rule,
        "application": ticket.application,
        "tags": list(ticket.tags),
        "assignee": ticket.assignee,
        "created_at": _iso(ticket.created_at),
        "updated_at": _iso(ticket.updated_at),
        "url": url,
    }


def message_data(row: Mapping[str, Any], attachments: Iterable[FileInfo] = ()) -> dict[str, Any]:
    """A stored message as an event carries it, from its column values (filing's row, or
    a Message's): `id` is its number in the database (filing fills it in once inserted)."""
    text = row.get("text") or ""
    date = row.get("date")
    return {
        "id": row.get("id"),
        "message_id": f"<{row['message_id']}>",
        "direction": row["direction"],
        "kind": row["kind"],
        "internal": row["direction"] == Direction.INTERNAL.value,
        "from": {"name": row.get("from_name") or "", "email": row.get("from_email") or ""},
        "to": list(row.get("to") or []),
        "cc": list(row.get("cc") or []),
        "subject": row.get("subject") or "",
        "date": _iso(date) if isinstance(date, datetime) else None,
        "text": text[:TEXT_CHARS],
        "text_truncated": len(text) > TEXT_CHARS,
        "auto_reasons": list(row.get("auto_reasons") or []),
        "attachments": [
            {
                "filename": a.filename,
                "content_type": a.content_type,
                "size": a.size,
                "sha256": a.sha256,
            }
            for a in attachments
        ],
        "created_at": _iso(row.get("created_at")),
    }


def change_data(field: str, old: str | None, new: str | None) -> dict[str, str | None]:
    return {"field": field, "old": old, "new": new}
