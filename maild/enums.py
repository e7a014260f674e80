"""The ticket vocabulary shared by the rules, the store and the CLI."""

from __future__ import annotations

from enum import StrEnum


class TicketType(StrEnum):
    """What kind of help the customer needs."""

    QUESTION = "question"  # ask anything
    INCIDENT = "incident"  # unplanned, hurting service now
    PROBLEM = "problem"  # the cause, or possible cause, of incidents
    TASK = "task"  # provisioning, access, operations; not same-day


class Priority(StrEnum):
    """How soon; compare with `rank`, not with string order."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.URGENT: 3}


class TicketStatus(StrEnum):
    OPEN = "open"
    PENDING = "pending"  # waiting for the customer
    SOLVED = "solved"
    CLOSED = "closed"


class InboundStatus(StrEnum):
    """Where a received message is in its life."""

    RECEIVED = "received"  # committed, 250 sent, not yet turned into a ticket message
    PROCESSED = "processed"  # stored as a message of a ticket
    DUPLICATE = "duplicate"  # its Message-ID was already stored; nothing new was made
    FAILED = "failed"  # processing raised; the error is kept, `maild reprocess` retries
    DROPPED = "dropped"  # kept, on purpose no ticket: our own mail back, an unmatched bounce


class MessageKind(StrEnum):
    """What a stored message is, as hygiene.classify and the acknowledgement decide."""

    HUMAN = "human"  # written by a person: may open, reopen and be acknowledged
    AUTO = "auto"  # auto-generated (out-of-office, list, monitoring): never acknowledged
    BOUNCE = "bounce"  # a delivery status notification about mail we sent
    ACK = "ack"  # our own acknowledgement (direction outbound)
    AGENT = "agent"  # an agent's public reply: by mail (verified) or from the CLI
    NOTE = "note"  # an agent's internal note (direction internal): never sent
    COPY = "copy"  # the desk's copy of a participant's mail to the other participants
    NOTIFY = "notify"  # the desk's notice to a route's `notify` addresses
    SOLVED = "solved"  # the notice to the requester that the ticket is solved


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"  # an internal note: stored, never sent


class ParticipantRole(StrEnum):
    REQUESTER = "requester"
    CC = "cc"


class TicketField(StrEnum):
    """What a ticket event changed."""

    STATUS = "status"
    PRIORITY = "priority"
    TYPE = "type"
    APPLICATION = "application"
    ASSIGNEE = "assignee"
    CC = "cc"  # a CC taken off the ticket: old is the address, new is null


class PageAction(StrEnum):
    """An Events API v2 event_action maild sends."""

    TRIGGER = "trigger"
    RESOLVE = "resolve"


class Outcome(StrEnum):
    """What filing did with one delivery (maild_messages_processed_total's label)."""

    CREATED = "created"  # a new ticket
    THREADED = "threaded"  # a message of an existing ticket
    DUPLICATE = "duplicate"  # a copy of a message already stored
    BOUNCE = "bounce"  # a DSN, attached to the ticket of the message it reports on
    DROPPED = "dropped"  # kept, on purpose no ticket
    FAILED = "failed"  # could not be filed; kept for `maild reprocess`


class OutboxStatus(StrEnum):
    """Where an outbox row (a page, an outgoing mail) is in its life."""

    PENDING = "pending"  # to be sent (now, or at next_attempt_at after a failure)
    SENT = "sent"  # PagerDuty answered 202; the smarthost took the mail for every
    # recipient it did not refuse
    FAILED = "failed"  # refused, or still failing after give_up_after
    WITHHELD = "withheld"  # never sent, for the reason recorded with it


PageStatus = OutboxStatus  # a page's
MailStatus = OutboxStatus  # an outgoing mail's


class RecipientState(StrEnum):
    """One recipient of an outgoing mail."""

    PENDING = "pending"
    SENT = "sent"
    REFUSED = "refused"  # the smarthost answered 5xx to RCPT
    BOUNCED = "bounced"  # a DSN came back for it
    WITHHELD = "withheld"  # not sent: over the hourly limit, or known undeliverable
