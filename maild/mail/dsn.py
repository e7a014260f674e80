"""Delivery status notifications (RFC 3464): what a bounce says, read from its MIME.

A DSN is `multipart/report; report-type=delivery-status` with a human part, a
`message/delivery-status` part (a per-message block, then one block per
recipient: Final-Recipient, Action, Status, Diagnostic-Code) and the original
message or its headers (`message/rfc822`, `text/rfc822-headers`). The
original's Message-ID is how a bounce finds the acknowledgement it is about.

Only standard DSNs are read here; a free-text bounce from an old MTA is still
recognised as automatic mail by its sender (mailer-daemon@, an empty return
path) in maild/hygiene.py, but cannot be tied to a ticket.

Runs in the parser process: inputs and outputs are plain picklable data, and it
never raises.
"""

from __future__ import annotations

import email
import email.message
import re
from dataclasses import dataclass, field

from maild.mail.message_ids import normalize_message_id
from maild.mail.text import one_line

MAX_RECIPIENTS = 100


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient of the bounced message and what happened to it."""

    address: str  # lower-case, without the address-type prefix
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # "5.1.1"
    diagnostic: str  # the remote server's words, one line

    @property
    def failed(self) -> bool:
        return self.action == "failed" or (self.action == "" and self.status.startswith("5"))


@dataclass(frozen=True)
class DeliveryReport:
    """The useful part of a DSN."""

    original_message_id: str  # normalised, "" when the bounce did not include it
    recipients: tuple[RecipientStatus, ...] = field(default_factory=tuple)
    reporting_mta: str = ""

    @property
    def failed(self) -> tuple[RecipientStatus, ...]:
        return tuple(r for r in self.recipients if r.failed)

    def as_dict(self) -> dict[str, object]:
        return {
            "original_message_id": self.original_message_id,
            "reporting_mta": self.reporting_mta,
            "recipients": [
                {
                    "address": r.address,
                    "action": r.action,
                    "status": r.status,
                    "diagnostic": r.diagnostic,
                }
                for r in self.recipients
            ],
        }


def _typed_address(value: object) -> str:
    """`rfc822; someone@example.com` → `someone@example.com`."""
    text = one_line(value, 320)
    if ";" in text:
        text = text.split(";", 1)[1]
    return text.strip().strip("<>").strip().lower()


def _blocks(part: email.message.Message) -> list[email.message.Message]:
    """The header blocks of a message/delivery-status part.

    The standard library parses them into sub-messages; some senders label the
    part text/plain-ish or the parser leaves it as a string, so that is read too.
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, email.message.Message)]
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload or "")
    blocks = []
    for chunk in re.split(r"\r?\n\s*\r?\n", text):
        if chunk.strip():
            blocks.append(email.message_from_string(chunk.strip() + "\n"))
    return blocks


def _original_message_id(part: email.message.Message) -> str:
    if part.get_content_type() == "message/rfc822":
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, email.message.Message):
            return normalize_message_id(one_line(inner.get("Message-ID", "")))
        return ""
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    headers = email.message_from_string(text.split("\n\n", 1)[0] + "\n")
    return normalize_message_id(one_line(headers.get("Message-ID", "")))


def is_report(raw: bytes) -> bool:
    """A cheap look at the first 64 KiB of the header, so ordinary mail is not read as a DSN."""
    end = raw.find(b"\n\n", 0, 65536)
    head = raw[: end if end >= 0 else 65536].lower()
    return b"multipart/report" in head and b"delivery-status" in head


def read_report(raw: bytes, message: email.message.Message | None = None) -> DeliveryReport | None:
    """The DeliveryReport of a standard DSN, or None for any other message.

    `message` is `raw` already parsed, when the caller has it (parse_message
    passes the one it gave mail-parser: of the top-level headers only the
    Content-Type is read here), so a bounce is not parsed a second time;
    without it, `raw` is parsed here, and only when `is_report` says it may be
    a DSN.
    """
    if not is_report(raw):
        return None
    try:
        if message is None:
            from maild.mail.parsing import message_from_bytes  # parsing imports this module

            message = message_from_bytes(raw)
        if message.get_content_type() != "multipart/report":
            return None
        recipients: list[RecipientStatus] = []
        original = ""
        reporting = ""
        found = False
        for part in message.walk():
            kind = part.get_content_type()
            if kind in ("message/delivery-status", "message/global-delivery-status"):
                found = True
                blocks = _blocks(part)
                if blocks:
                    reporting = _typed_address(blocks[0].get("Reporting-MTA", ""))
                for block in blocks[1:] if len(blocks) > 1 else blocks:
                    address = _typed_address(
                        block.get("Final-Recipient") or block.get("Original-Recipient") or ""
                    )
                    if not address or len(recipients) >= MAX_RECIPIENTS:
                        continue
                    recipients.append(
                        RecipientStatus(
                            address=address,
                            action=one_line(block.get("Action", ""), 32).lower(),
                            status=one_line(block.get("Status", ""), 32),
                            diagnostic=one_line(block.get("Diagnostic-Code", ""), 1000),
                        )
                    )
            elif (
                kind in ("message/rfc822", "text/rfc822-headers", "message/global") and not original
            ):
                original = _original_message_id(part)
        if not found:
            return None
        return DeliveryReport(
            original_message_id=original, recipients=tuple(recipients), reporting_mta=reporting
        )
    except Exception:  # a broken report is still mail; hygiene flags it by its sender
        return None
