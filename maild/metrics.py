"""Prometheus metrics: maild's own registry, served at /metrics by maild/http/app.py.

`[http] listen = "127.0.0.1:9125"` turns on the HTTP listener (maild/http): /metrics
in Prometheus text format (prometheus-client), /healthz and /readyz beside it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate

REGISTRY = CollectorRegistry()

RECEIVED = Counter(
    "maild_messages_received",
    "Messages accepted with 250 (committed to the spool), by listener protocol.",
    ["protocol"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "maild_recipients_refused",
    "Recipients and connections refused, by reason (unknown_mailbox, relay, too_many_*).",
    ["reason"],
    registry=REGISTRY,
)
DEFERRED = Counter(
    "maild_messages_deferred",
    "Messages answered 451 because maild could not store them (the sender retries).",
    ["reason"],
    registry=REGISTRY,
)
PROCESSED = Counter(
    "maild_messages_processed",
    "Accepted messages filed, by outcome (created, threaded, duplicate, bounce, dropped, failed).",
    ["outcome"],
    registry=REGISTRY,
)
TICKETS = Counter(
    "maild_tickets_created",
    "Tickets created, by type and priority.",
    ["type", "priority"],
    registry=REGISTRY,
)
PROCESSING_SECONDS = Histogram(
    "maild_processing_seconds",
    "From a message's 250 to its ticket being stored.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
PAGES = Counter(
    "maild_pages",
    "Pages (PagerDuty events) by action and result (sent, failed, withheld, retried).",
    ["action", "result"],
    registry=REGISTRY,
)
ACKS = Counter(
    "maild_acknowledgements",
    "Acknowledgements by result (queued, withheld, sent, failed, retried).",
    ["result"],
    registry=REGISTRY,
)
MAIL = Counter(
    "maild_mail",
    "Mail maild sends, by kind (ack, agent, copy, notify, solved) and result (queued, "
    "withheld, sent, failed, retried).",
    ["kind", "result"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "maild_webhook_events",
    "Webhook events by [[webhook]] name, event (ticket.created, ...) and result (sent, "
    "failed, retried).",
    ["webhook", "event", "result"],
    registry=REGISTRY,
)
HYGIENE = Counter(
    "maild_messages_flagged",
    "Accepted messages that are not a person's mail, by kind (auto, bounce, loop).",
    ["kind"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "maild_rules_reloads",
    "Rules table reloads by trigger (sighup: SIGHUP or systemctl reload; watch: the "
    "[rules] watch file watcher) and result (ok, failed).",
    ["trigger", "result"],
    registry=REGISTRY,
)
MESSAGES_REFUSED = Counter(
    "maild_messages_refused",
    "Messages refused after RCPT, by reason (too_large).",
    ["reason"],
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "maild_backlog",
    "Work waiting, read at scrape time: inbound (accepted, not processed), "
    "failed (kept for reprocess), pages (pending), acknowledgements (mail not sent yet), "
    "webhooks (events not sent yet).",
    ["queue"],
    registry=REGISTRY,
)
HTTP_REFUSED = Counter(
    "maild_http_refused",
    "HTTP connections and requests refused by a limit, by reason (too_many_connections, "
    "header_timeout, body_timeout, body_too_large, auth_failed, auth_rate_limited).",
    ["reason"],
    registry=REGISTRY,
)
UP = Gauge(
    "maild_listener_up", "1 while a listener accepts connections.", ["protocol"], registry=REGISTRY
)


def generate() -> bytes:
    return _generate(REGISTRY)
