"""The database tables (SQLModel). Enum-valued columns hold the lowercase values.

inbound      one row per accepted SMTP/LMTP/pipe delivery: envelope + raw bytes,
             committed before 250; status received → processed | duplicate | dropped | failed
ticket       one conversation with a customer
ticket_event one change to a ticket (status, priority, type, application, assignee):
             what, old, new, who, when
participant  people on a ticket (requester, cc), unique per ticket and address
message      one stored message of a ticket; unique on the hash of its Message-ID
             (its words are indexed outside the models: store/search.py)
attachment   a file of a message; its bytes are in blob, keyed by sha256
blob         content-addressed attachment bytes, stored once however often sent
page         the PagerDuty outbox: one row per event (trigger/resolve) to send,
             written in the transaction that made it necessary
outmail      the mail outbox (acknowledgements): the rendered bytes and envelope,
             written with the ticket; its message row holds its Message-ID
outmail_rcpt one recipient of an outgoing mail: sent, refused, bounced or withheld;
             the hourly per-address limit counts these
webhook_event the webhook outbox: one row per event and [[webhook]] subscribed to it
             (ticket.created, message.created, ...), written in the transaction of the
             change; sent in order per webhook and ticket
storage_probe one row per host, rewritten by the health checks' write probe
api_token    a bearer token of the HTTP API: its name, scope, customer and the SHA-256
             of the token (never the token); revoked rows are kept for audit
idempotency_key a write through the HTTP API made under an Idempotency-Key: the answer
             it got, so that a retry gets that answer (kept a day)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import JSON, Index, LargeBinary, MetaData, Table, Text, UniqueConstraint
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlmodel import Field, SQLModel

# Named constraints, so that migrations can refer to them on every database.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata: MetaData = SQLModel.metadata


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """A timestamp read back from the database (naive on SQLite) as an aware UTC one."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Inbound(SQLModel, table=True):
    """An accepted delivery, durable before the sender hears 250."""

    __tablename__ = "inbound"
    __table_args__ = (Index("ix_inbound_status_id", "status", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(default_factory=utcnow)
    protocol: str = Field(max_length=8)  # smtp | lmtp | pipe
    peer: str = Field(default="", max_length=255)
    helo: str = Field(default="", sa_type=Text)
    session_id: str = Field(default="", max_length=64)
    mail_from: str = Field(default="", sa_type=Text)
    rcpt_tos: list[str] = Field(default_factory=list, sa_type=JSON)
    size: int = 0
    sha256: str = Field(max_length=64)
    status: str = Field(default="received", max_length=16)
    error: str | None = Field(default=None, sa_type=Text)
    attempts: int = 0
    processed_at: datetime | None = None
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    # the route that dropped it (`drop = true`); a filed delivery's route is on its message
    dropped_by_route: str | None = Field(default=None, max_length=255)
    raw: bytes = Field(sa_type=LargeBinary)


@dataclass(slots=True)
class Envelope:
    """An inbound row as filing reads and marks it: the envelope and the outcome, never
    the raw bytes. Filing writes the outcome back in one UPDATE per transaction."""

    id: int
    protocol: str
    mail_from: str
    rcpt_tos: list[str]
    received_at: datetime
    status: str
    attempts: int
    error: str | None = None
    processed_at: datetime | None = None
    ticket_id: int | None = None
    dropped_by_route: str | None = None


class Ticket(SQLModel, table=True):
    __tablename__ = "ticket"
    __table_args__ = (
        Index("ix_ticket_status_updated", "status", "updated_at"),
        Index("ix_ticket_assignee_updated", "assignee", "updated_at"),
        Index("ix_ticket_application_updated", "application", "updated_at"),  # --application
        # the lists' order (newest first) read from an index, not sorted: the open queue
        # at 250,000 tickets on PostgreSQL (docs/benchmarks.md, issue 20)
        Index("ix_ticket_updated_id", "updated_at", "id"),
        Index("ix_ticket_requester_updated", "requester_email", "updated_at"),  # requester=
    )

    id: int | None = Field(default=None, primary_key=True)
    type: str = Field(max_length=16)
    priority: str = Field(max_length=16)
    status: str = Field(default="open", max_length=16)
    subject: str = Field(default="", sa_type=Text)
    requester_email: str = Field(default="", max_length=320)
    requester_name: str = Field(default="", sa_type=Text)
    rule: str = Field(default="", max_length=255)
    rules_version: str = Field(default="", max_length=64)
    application: str = Field(default="", sa_type=Text)  # the application/environment concerned
    tags: list[str] = Field(default_factory=list, sa_type=JSON)
    assignee: str | None = Field(default=None, max_length=320)  # the agent working it
    # the desk address it came in through (support@…): the From of the desk's mail about it
    desk_address: str = Field(default="", max_length=320)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class TicketEvent(SQLModel, table=True):
    """One change to a ticket, by whom and when: the ticket's history."""

    __tablename__ = "ticket_event"

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    field: str = Field(max_length=32)  # a TicketField
    old: str | None = Field(default=None, sa_type=Text)
    new: str | None = Field(default=None, sa_type=Text)
    by: str = Field(default="", max_length=320)  # an agent's address, or "maild"
    created_at: datetime = Field(default_factory=utcnow)


class Participant(SQLModel, table=True):
    __tablename__ = "participant"
    __table_args__ = (UniqueConstraint("ticket_id", "email"),)

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    email: str = Field(max_length=320, index=True)
    name: str = Field(default="", sa_type=Text)
    role: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    undeliverable_at: datetime | None = None  # a bounce said mail to it cannot be delivered
    undeliverable_reason: str | None = Field(default=None, sa_type=Text)


class Message(SQLModel, table=True):
    __tablename__ = "message"

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    inbound_id: int | None = Field(default=None, foreign_key="inbound.id", index=True)
    message_id: str = Field(sa_type=Text)
    message_id_hash: str = Field(max_length=64, unique=True)
    message_id_synthesized: bool = False
    # sha256 of the sender and the body: the same Message-ID is the same message only when
    # this matches too (NULL: our own mail, and mail stored before maild kept it)
    fingerprint: str | None = Field(default=None, max_length=64)
    in_reply_to: list[str] = Field(default_factory=list, sa_type=JSON)
    references: list[str] = Field(default_factory=list, sa_type=JSON)
    from_email: str = Field(default="", max_length=320)
    from_name: str = Field(default="", sa_type=Text)
    to: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    cc: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    subject: str = Field(default="", sa_type=Text)
    date: datetime | None = None
    text: str = Field(default="", sa_type=Text)
    rule: str = Field(default="", max_length=255)
    rules_version: str = Field(default="", max_length=64)  # the table that routed it
    defects: list[str] = Field(default_factory=list, sa_type=JSON)
    direction: str = Field(default="inbound", max_length=16)  # inbound | outbound | internal
    # human | auto | bounce | ack | agent | note | copy | notify | solved (enums.MessageKind)
    kind: str = Field(default="human", max_length=16)
    auto_reasons: list[str] = Field(default_factory=list, sa_type=JSON)  # why it is automatic
    report: dict[str, Any] | None = Field(default=None, sa_type=JSON)  # a bounce's DSN
    created_at: datetime = Field(default_factory=utcnow)


class Attachment(SQLModel, table=True):
    __tablename__ = "attachment"

    id: int | None = Field(default=None, primary_key=True)
    message_pk: int = Field(foreign_key="message.id", index=True)
    filename: str = Field(sa_type=Text)
    content_type: str = Field(max_length=255)
    size: int
    sha256: str = Field(foreign_key="blob.sha256", max_length=64, index=True)


class Blob(SQLModel, table=True):
    __tablename__ = "blob"

    sha256: str = Field(primary_key=True, max_length=64)
    size: int
    data: bytes = Field(sa_type=LargeBinary)


class Page(SQLModel, table=True):
    """One Events API v2 event for a ticket, durable before it is sent."""

    __tablename__ = "page"
    __table_args__ = (
        Index("ix_page_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_page_sender_key_created_at", "sender_key", "created_at"),
        Index("ix_page_dedup_key_id", "dedup_key", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    inbound_id: int | None = Field(default=None, foreign_key="inbound.id")
    action: str = Field(max_length=16)  # trigger | resolve
    dedup_key: str = Field(max_length=255)
    status: str = Field(default="pending", max_length=16)
    reason: str | None = Field(default=None, sa_type=Text)  # why withheld, or why it failed
    sender: str = Field(default="", max_length=320)
    sender_key: str = Field(default="", max_length=320)  # what the hourly limit counts
    route: str = Field(default="", max_length=255)
    event: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # without routing_key
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_type=Text)
    next_attempt_at: datetime = Field(default_factory=utcnow)  # also the claim lease
    claimed_by: str = Field(default="", max_length=255)  # the daemon sending it (host:config)
    queued_at: datetime = Field(default_factory=utcnow)  # give_up_after counts from here
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None


class Outmail(SQLModel, table=True):
    """One mail to send through the smarthost, durable before it is sent."""

    __tablename__ = "outmail"
    __table_args__ = (Index("ix_outmail_status_next_attempt_at", "status", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    message_pk: int = Field(foreign_key="message.id", index=True)  # its stored copy
    kind: str = Field(default="ack", max_length=16)
    status: str = Field(default="pending", max_length=16)
    reason: str | None = Field(default=None, sa_type=Text)  # why withheld, or why it failed
    mail_from: str = Field(sa_type=Text)  # envelope sender: the ticket's reply address
    raw: bytes = Field(sa_type=LargeBinary)
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_type=Text)
    next_attempt_at: datetime = Field(default_factory=utcnow)  # also the claim lease
    claimed_by: str = Field(default="", max_length=255)
    queued_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None


class OutmailRecipient(SQLModel, table=True):
    """One envelope recipient of an outgoing mail and what became of it."""

    __tablename__ = "outmail_rcpt"
    __table_args__ = (Index("ix_outmail_rcpt_address_key_created_at", "address_key", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    outmail_id: int = Field(foreign_key="outmail.id", index=True)
    email: str = Field(max_length=320)
    address_key: str = Field(default="", max_length=320)  # what the hourly limit counts
    status: str = Field(default="pending", max_length=16)
    error: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(default_factory=utcnow)


class WebhookEvent(SQLModel, table=True):
    """One event for one `[[webhook]]`, durable before it is sent; its id is the
    Maild-Delivery header receivers deduplicate on."""

    __tablename__ = "webhook_event"
    __table_args__ = (
        Index("ix_webhook_event_status_next_attempt_at", "status", "next_attempt_at"),
        # the claim's "no earlier event of this webhook and ticket still pending"
        Index("ix_webhook_event_webhook_ticket_id_id", "webhook", "ticket_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    webhook: str = Field(max_length=64)  # the [[webhook]] name
    event: str = Field(max_length=32)  # ticket.created | ticket.updated | message.created | ...
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # the body's "data"
    status: str = Field(default="pending", max_length=16)
    reason: str | None = Field(default=None, sa_type=Text)  # why it failed
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_type=Text)
    next_attempt_at: datetime = Field(default_factory=utcnow)  # also the claim lease
    claimed_by: str = Field(default="", max_length=255)  # the daemon sending it (host:config)
    queued_at: datetime = Field(default_factory=utcnow)  # give_up_after counts from here
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None


class StorageProbe(SQLModel, table=True):
    """The health checks' write probe: can mail be stored now (disk, locks, server)?"""

    __tablename__ = "storage_probe"

    host: str = Field(primary_key=True, max_length=255)
    checked_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    """A bearer token of the HTTP API (`maild tokens create`); only its hash is stored."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    token_hash: str = Field(max_length=64, unique=True)  # sha256 hex of the whole token
    scope: str = Field(max_length=8)  # read | write
    customer: str | None = Field(default=None, max_length=320)  # an address or *@domain
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None  # marked at most once a minute per process
    revoked_at: datetime | None = None


class IdempotencyKey(SQLModel, table=True):
    """A write of the HTTP API made with an `Idempotency-Key` header (store/idempotency.py):
    the answer it got, written in the write's own transaction."""

    __tablename__ = "idempotency_key"
    __table_args__ = (UniqueConstraint("token", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    token: str = Field(max_length=64)  # the API token's name (names are never reused)
    key: str = Field(max_length=255)  # as the client sent it
    request_hash: str = Field(max_length=64)  # sha256 of the method, path and body
    status: int = 0  # the answer's HTTP status
    response: dict[str, Any] | None = Field(default=None, sa_type=JSON)  # the answer's body
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Agent(SQLModel, table=True):
    """A desk console account (`maild agents add`): only the argon2 hash of its password."""

    __tablename__ = "agent"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)  # lower-case; matches [desk] agents
    name: str = Field(default="", max_length=200)
    password_hash: str = Field(max_length=200)  # argon2id, PHC string
    disabled_at: datetime | None = None  # disabled accounts cannot sign in; rows are kept
    created_at: datetime = Field(default_factory=utcnow)
    password_changed_at: datetime = Field(default_factory=utcnow)
    last_sign_in_at: datetime | None = None


class ConsoleSession(SQLModel, table=True):
    """A signed-in console session: the cookie's SHA-256, never the cookie itself."""

    __tablename__ = "console_session"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    agent_id: int = Field(foreign_key="agent.id", index=True)
    csrf: str = Field(max_length=64)  # the form token of this session's POSTs
    created_at: datetime = Field(default_factory=utcnow)
    seen_at: datetime = Field(default_factory=utcnow)  # idle expiry runs from here
    client: str = Field(default="", max_length=64)  # the address it signed in from


def table_of(model: type[SQLModel]) -> Table:
    """A model's Core table, typed (SQLModel declares `__table__` loosely): the hot
    statements are written in Core against it."""
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


_Model = TypeVar("_Model", bound=SQLModel)


def from_row(model: type[_Model], values: Mapping[str, Any]) -> _Model:
    """An instance of a table model from its column values, made as SQLAlchemy makes the
    objects a query loads: no validation, no attribute events, each field not given at
    its default. `Ticket(**values)` runs SQLModel's constructor, which sets every field
    through the instrumented `setattr`, and pydantic's `get_default`, which reads each
    default factory's signature again every time: 0.27 ms per ticket, for an object
    filing only reads and changes a field or two of (issue 21)."""
    fields, defaults, factories = _defaults_of(model)
    instance = manager_of_class(model).new_instance()
    state = instance.__dict__
    state.update(defaults)
    for name, factory in factories:
        if name not in values:
            state[name] = factory()
    for name, value in values.items():
        if name in fields:
            state[name] = value
    object.__setattr__(instance, "__pydantic_fields_set__", set(values) & fields)
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


@cache
def _defaults_of(
    model: type[SQLModel],
) -> tuple[frozenset[str], dict[str, Any], list[tuple[str, Callable[[], Any]]]]:
    """A model's field names, its fields' plain defaults, and its default factories. The
    mappers are configured first, as a model's constructor or a query would: an object
    made by `new_instance` before that has no attribute machinery to change it with."""
    configure_mappers()
    defaults: dict[str, Any] = {}
    factories: list[tuple[str, Callable[[], Any]]] = []
    for name, field in model.model_fields.items():
        if field.default_factory is not None:
            factories.append((name, field.default_factory))  # type: ignore[arg-type]
        elif not field.is_required():
            defaults[name] = field.default
    return frozenset(model.model_fields), defaults, factories
