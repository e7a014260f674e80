"""The one exception tree of maild.

Every error knows whether it is the sender's fault (permanent, 5xx, the mail
bounces) or ours (temporary, 4xx, the sending MTA retries). Only the edges turn
errors into something else: the SMTP handler into reply codes, the CLI into
exit codes.

    MaildError
    ├── ConfigError            a settings file is wrong (names file and key)
    ├── RulesError             the routing table is wrong (names file:line)
    ├── TemporaryFailure       our fault: answer 4xx / exit 75, keep the mail
    │   ├── StorageUnavailable the database did not take the write
    │   │   └── StorageTimeout the write did not finish within busy_timeout
    │   └── SendDeferred       an outbox send failed for now: the outbox retries it
    └── PermanentFailure       the sender's fault: answer 5xx / exit 6x
        ├── RecipientRefused   no route for this address, or not our domain
        ├── MessageTooLarge    over [smtp] max_message_size
        └── SendRefused        the far end refused what an outbox sent: no retry

The outbox senders (the pager to PagerDuty, the mailer to the smarthost) raise
only SendDeferred and SendRefused from an attempt; outbox.OutboxWorker decides
what each means for the row.
"""

from __future__ import annotations

from dataclasses import dataclass


class MaildError(Exception):
    """Base of every error maild raises on purpose."""


class ConfigError(MaildError):
    """The settings file cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a rules file, with where it is."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class RulesError(MaildError):
    """The routing table cannot be loaded; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class TemporaryFailure(MaildError):
    """Our own failure: the sender must retry later (SMTP 4xx, sysexits 75)."""

    smtp_reply = "451 4.3.0 Temporary local problem, please try again later"


class StorageUnavailable(TemporaryFailure):
    """The database did not take the write: it failed."""

    reason = "store_failed"  # the label of maild_messages_deferred_total


class StorageTimeout(StorageUnavailable):
    """The write did not finish within [database] busy_timeout (its rows are not kept)."""

    reason = "store_timeout"


class SendDeferred(TemporaryFailure):
    """One attempt of an outbox send failed in a way worth trying again: a network error,
    a timeout, 429 or 5xx from PagerDuty, a 4xx from the smarthost, a refused login."""

    def __init__(
        self, message: str, status: int | None = None, *, possibly_delivered: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status when one came; None when no answer did
        self.possibly_delivered = possibly_delivered  # sent, but no reply came to say so


class PermanentFailure(MaildError):
    """The sender's fault: retrying the same thing will not help (SMTP 5xx)."""

    smtp_reply = "554 5.0.0 Transaction failed"


class RecipientRefused(PermanentFailure):
    """A recipient we do not accept mail for."""

    def __init__(self, address: str, smtp_reply: str, reason: str) -> None:
        self.address = address
        self.smtp_reply = smtp_reply
        self.reason = reason
        super().__init__(f"{address}: {reason}")


class MessageTooLarge(PermanentFailure):
    """The message is larger than [smtp] max_message_size."""

    smtp_reply = "552 5.3.4 Message size exceeds fixed maximum message size"


class SendRefused(PermanentFailure):
    """The far end refused what an outbox sent (PagerDuty's 400, the smarthost's 5xx to
    MAIL or DATA): sending it again cannot help."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
