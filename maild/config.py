"""Settings: one TOML file, validated once at load, unknown keys refused by name.

Relative paths in the file (rules folder, CA file, a SQLite database path)
resolve against the folder that holds the file, so a config works wherever it
is started from.
"""

from __future__ import annotations

import email.utils
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from maild.errors import ConfigError
from maild.mail.addresses import is_sender_pattern
from maild.tomllines import TomlLines

DEFAULT_CONFIG = "/etc/maild/config.toml"
# systemd's LoadCredential=pagerduty-routing-key:... puts the key here, read when the
# config names no key of its own.
CREDENTIAL_NAME = "pagerduty-routing-key"
OUTBOUND_SECRET_CREDENTIAL = "outbound-secret"  # noqa: S105 (a file name)
SMARTHOST_PASSWORD_CREDENTIAL = "smarthost-password"  # noqa: S105 (a file name)
MIN_SECRET_LENGTH = 16
MIB = 1024 * 1024

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "25 MiB" or "10MB"."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as 26214400 or "25 MiB"')
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f'{value!r} is not a size such as 26214400 or "25 MiB"')
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[(unit or "").lower()])
    if size <= 0:
        raise ValueError("must be positive")
    return size


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30 or "5m"')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f'{value!r} is not a duration such as 30, "30s", "5m" or "1h"')
        number, unit = match.groups()
        seconds = float(number) * _DURATION_UNITS[(unit or "").lower()]
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


def parse_hostport(value: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'{value!r} is not "host:port" (for example "127.0.0.1:2525")')
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmtpSettings(_Section):
    listen: str = "127.0.0.1:2525"
    hostname: str = ""  # "" means this host's fully qualified name, looked up at start
    max_message_size: int = 25 * MIB
    timeout: float = 300.0
    shutdown_timeout: float = 30.0
    # Abuse limits, 0 for none (see maild/smtp.py). Strict ints: true, 1.5 or "100" are refused.
    max_connections: int = Field(default=100, ge=0, strict=True)  # open, per listener
    max_connections_per_ip: int = Field(default=20, ge=0, strict=True)  # the same, per client IP
    max_recipients: int = Field(default=100, ge=0, strict=True)  # per transaction
    max_errors: int = Field(default=10, ge=0, strict=True)  # 5xx replies to commands
    # NOOP, RSET, HELP, VRFY, EXPN, extra HELO/EHLO since the connection's last accepted message
    max_junk_commands: int = Field(default=20, ge=0, strict=True)
    max_session_time: float = 1800.0  # a connection's whole life; closed between transactions
    max_data_memory: int = 256 * MIB  # message bytes held by all DATA transfers at once

    _size = field_validator("max_message_size", "max_data_memory", mode="before")(parse_size)
    _duration = field_validator("timeout", "shutdown_timeout", "max_session_time", mode="before")(
        parse_duration
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_hostport(value)
        return value


def _url_template(value: str) -> str:
    """A link to a ticket: "" or a URL with {id} in it."""
    if value:
        try:
            value.format(id=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{value!r} is not a template with {{id}} (for example "
                f'"https://desk.example/tickets/{{id}}"): {exc}'
            ) from None
        if "{id}" not in value:
            raise ValueError(f"{value!r} does not contain {{id}}")
    return value


def _optional_hostport(value: str | None) -> str | None:
    if value is not None:
        parse_hostport(value)
    return value


class LmtpSettings(_Section):
    listen: str | None = None

    _listen = field_validator("listen")(_optional_hostport)


def _proxy_networks(values: list[str]) -> list[str]:
    """Trusted proxies: IP addresses or networks ("10.0.0.0/8"), normalised."""
    result = []
    for value in values:
        try:
            result.append(str(ipaddress.ip_network(value.strip(), strict=True)))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address or network: {exc}") from None
    return result


class HttpSettings(_Section):
    """The HTTP listener: /metrics, /healthz, /readyz and the API (maild/http)."""

    listen: str | None = None
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, HTTPS only
    tls_key: Path | None = Field(default=None, validate_default=True)
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed; nobody else's are.
    trusted_proxies: list[str] = Field(default_factory=list)
    max_body_size: int = 35 * MIB  # a request body, attachments (base64) included
    max_connections: int = Field(default=100, ge=1, le=10_000, strict=True)
    header_timeout: float = 10.0  # a request's line and headers must arrive within this
    body_timeout: float = 30.0  # the longest pause while a request body arrives
    keep_alive_timeout: float = 5.0  # an idle connection between requests is closed after it

    _listen = field_validator("listen")(_optional_hostport)
    _proxies = field_validator("trusted_proxies")(_proxy_networks)
    _size = field_validator("max_body_size", mode="before")(parse_size)
    _duration = field_validator(
        "header_timeout", "body_timeout", "keep_alive_timeout", mode="before"
    )(parse_duration)

    @field_validator("tls_key")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (info.data.get("tls_cert") is None) != (value is None):
            raise ValueError("tls_cert and tls_key go together: set both, or neither")
        return value


class DatabaseSettings(_Section):
    url: str = ""  # filled in by load_settings: a SQLite file in the data folder
    busy_timeout: float = 5.0

    _duration = field_validator("busy_timeout", mode="before")(parse_duration)


class RulesSettings(_Section):
    path: Path = Path("rules")
    watch: bool = True  # reload when a *.toml in the folder changes (SIGHUP always does)


class ProcessingSettings(_Section):
    workers: int = Field(default=0, ge=0, le=64)  # 0: one per spare CPU core, at least two
    parse_timeout: float = 60.0
    poll_interval: float = 5.0

    _duration = field_validator("parse_timeout", "poll_interval", mode="before")(parse_duration)

    def worker_count(self) -> int:
        """`workers`, or one per core beyond the first and at least two: filing waits on
        the database as well as using the CPU, so two overlap even on two cores (measured:
        docs/benchmarks.md, "Measured decisions")."""
        return self.workers or max(2, (os.cpu_count() or 2) - 1)


class LogSettings(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class PagerDutySettings(_Section):
    """How pages reach PagerDuty's Events API v2 (see maild/pager.py)."""

    enabled: bool = True
    routing_key: SecretStr | None = None  # SecretStr: never shown in a repr or a log line
    routing_key_file: Path | None = None  # read at load; for systemd credentials
    events_url: str = "https://events.pagerduty.com"
    ca_file: Path | None = None
    source: str = ""  # payload.source; "" means this host's fully qualified name
    ticket_url: str = ""  # e.g. "https://desk.example/tickets/{id}", linked from the page
    give_up_after: float = 3600.0
    timeout: float = 10.0  # one HTTP attempt
    retry_initial: float = 2.0  # the first wait after a failed attempt; doubles each time
    retry_max: float = 300.0  # the longest wait between attempts

    _duration = field_validator(
        "give_up_after", "timeout", "retry_initial", "retry_max", mode="before"
    )(parse_duration)

    @field_validator("routing_key")
    @classmethod
    def _routing_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_routing_key(value.get_secret_value())
        return value

    @field_validator("events_url")
    @classmethod
    def _events_url(cls, value: str) -> str:
        if not re.match(r"^https://[^/\s]+", value):
            raise ValueError(f"{value!r} must be an https:// URL")
        return value.rstrip("/")

    _ticket_url = field_validator("ticket_url")(_url_template)

    def key(self) -> str | None:
        return self.routing_key.get_secret_value() if self.routing_key else None


def _check_routing_key(key: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9]{32}", key):
        raise ValueError(
            f"an Events API v2 routing key is 32 letters and digits; this one has {len(key)} "
            "characters (copy the service integration's key again)"
        )


def _sender_patterns(values: list[str]) -> list[str]:
    result = []
    for value in values:
        if not is_sender_pattern(value):
            raise ValueError(f"{value!r} is not an address or *@domain")
        result.append(value.strip().lower())
    return result


def resolver_address(text: str) -> tuple[str, int]:
    """`[desk] dns_resolver` as (IP address, port): "10.0.0.53", "10.0.0.53:5353", "::1",
    "[::1]:5353" (dnspython asks addresses, not names). ValueError for anything else;
    mail/authenticity.py reads the setting with it too."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not host or host:port: {text!r}")
        if rest:
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = int(number)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return host, port


def _resolver_address(value: str | None) -> str | None:
    if value is not None:
        try:
            resolver_address(value)
        except ValueError:
            raise ValueError(
                f'{value!r} is not an IP address or "address:port" (for example '
                '"127.0.0.1:53"; the resolver is asked by address)'
            ) from None
    return value


class EscalationSettings(_Section):
    """Who may page on-call, and how often."""

    allowed_senders: list[str] = Field(default_factory=list)  # empty: anyone
    max_pages_per_sender_per_hour: int = Field(default=10, ge=0)  # 0: no limit

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, values: list[str]) -> list[str]:
        return _sender_patterns(values)


class OutboundSettings(_Section):
    """Mail maild sends (acknowledgements): the smarthost, the sender, the reply-address key."""

    smarthost: str | None = None  # "host:port"; unset: no acknowledgements are sent
    tls: Literal["none", "starttls", "implicit"] = "none"
    ca_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None  # read at load; for systemd credentials
    from_: str = Field(default="", alias="from")  # "Altis Support <support@altis-dxp.com>"
    secret: SecretStr | None = None  # HMAC key of the +token reply addresses
    secret_file: Path | None = None
    templates: Path = Path("templates")
    message_id_domain: str = ""  # "" means the domain of `from`
    max_acks_per_sender_per_hour: int = Field(default=5, ge=0)  # 0: no limit
    # addresses one outgoing mail reaches, and participants one inbound message adds
    max_recipients: int = Field(default=20, ge=1, le=1000, strict=True)
    # RFC 5321 4.5.3.2's timeouts, connecting kept apart from the replies (maild/mailer.py)
    timeout: float = 30.0  # the TCP connection, TLS and the greeting
    command_timeout: float = 300.0  # each reply to EHLO, STARTTLS, AUTH, MAIL, RCPT
    data_timeout: float = 600.0  # the reply to DATA and to the end of the message
    give_up_after: float = 86400.0
    retry_initial: float = 30.0
    retry_max: float = 1800.0

    _smarthost = field_validator("smarthost")(_optional_hostport)
    _duration = field_validator(
        "timeout",
        "command_timeout",
        "data_timeout",
        "give_up_after",
        "retry_initial",
        "retry_max",
        mode="before",
    )(parse_duration)

    def attempt_limit(self) -> float:
        """The longest one SMTP attempt may take: connecting, two slow replies, the data."""
        return self.timeout + 2 * self.command_timeout + self.data_timeout

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str) -> str:
        if value:
            _, address = email.utils.parseaddr(value)
            if "@" not in address or any(c in value for c in "\r\n"):
                raise ValueError(f'{value!r} is not an address such as "Support <support@x.com>"')
        return value

    @field_validator("message_id_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError(f"{value!r} is not a domain name")
        return value.lower()

    @property
    def enabled(self) -> bool:
        return self.smarthost is not None

    def from_address(self) -> str:
        return email.utils.parseaddr(self.from_)[1].lower()


class DeskSettings(_Section):
    """The desk's two-way mail: who is staff, how their mail is verified, what is copied."""

    # staff: addresses and *@domain patterns (the same matcher as allowed_senders); their
    # mail to a ticket is an agent reply, relayed to the participants, once verified
    agents: list[str] = Field(default_factory=list)
    # the receiving MTA whose Authentication-Results header maild trusts (dkim=/dmarc=pass)
    trusted_authserv_id: str | None = None
    verify_dkim: bool = True  # check an agent's DKIM signature itself (dkimpy)
    dns_resolver: str | None = None  # "IP[:port]" for DKIM key lookups; unset: the system's
    dns_timeout: float = 5.0
    name: str = ""  # "Altis Support": the desk's display name; "" means `from`'s display name
    ticket_url: str = ""  # "https://desk.example/tickets/{id}"; "" falls back to [pagerduty]'s
    copy_participants: bool = True  # participants get copies of each other's mail
    copy_attachments_max: int = 10 * MIB  # attachments a copy carries, in total
    max_copies_per_address_per_hour: int = Field(default=20, ge=0)  # 0: no limit

    _duration = field_validator("dns_timeout", mode="before")(parse_duration)
    _size = field_validator("copy_attachments_max", mode="before")(parse_size)
    _resolver = field_validator("dns_resolver")(_resolver_address)

    @field_validator("agents")
    @classmethod
    def _agents(cls, values: list[str]) -> list[str]:
        return _sender_patterns(values)

    _ticket_url = field_validator("ticket_url")(_url_template)


WEBHOOK_EVENTS = (
    "ticket.created",
    "ticket.updated",
    "message.created",
    "page.sent",
    "page.failed",
)
_WEBHOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOOPBACK_NAMES = frozenset({"localhost"})


def _webhook_url(value: str) -> str:
    """An https:// URL; http:// only to this host (127.0.0.0/8, ::1, localhost)."""
    from urllib.parse import urlsplit

    if any(c.isspace() or ord(c) < 0x20 for c in value):
        raise ValueError(f"{value!r} is not a URL (it has spaces or control characters)")
    parts = urlsplit(value)
    try:
        host, _ = parts.hostname, parts.port  # port: a bad one raises ValueError
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(f"{value!r} must be an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{value!r}: put no user or password in the URL; the secret signs")
    if parts.scheme == "http" and not _loopback(host):
        raise ValueError(
            f"{value!r}: http:// is only for a receiver on this host (127.0.0.1, ::1, "
            "localhost); use https://"
        )
    return value


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookSettings(_Section):
    """One `[[webhook]]`: a URL told of the events it subscribes to (maild/outbound/webhooks.py)."""

    name: str = ""  # "" means the URL's host; names the rows, logs and metrics
    url: str
    events: list[str]
    secret: SecretStr | None = None  # the HMAC-SHA256 key of the Maild-Signature header
    secret_file: Path | None = None  # read at load; for systemd credentials
    format: Literal["maild", "slack"] = "maild"  # slack: {"text": ...}, an incoming webhook
    ca_file: Path | None = None  # a private CA the receiver's certificate is signed by
    timeout: float = 10.0  # one POST, from connecting to the answer's head
    give_up_after: float = 86400.0  # since the event was queued
    retry_initial: float = 5.0  # the first wait after a failed attempt; doubles each time
    retry_max: float = 600.0  # the longest wait between attempts

    _url = field_validator("url")(_webhook_url)
    _duration = field_validator(
        "timeout", "give_up_after", "retry_initial", "retry_max", mode="before"
    )(parse_duration)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not _WEBHOOK_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a name: letters, digits, '.', '_' and '-', at most 64"
            )
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError(f"lists no event; subscribe to some of {', '.join(WEBHOOK_EVENTS)}")
        for value in values:
            if value not in WEBHOOK_EVENTS:
                raise ValueError(
                    f"{value!r} is not an event; the events are {', '.join(WEBHOOK_EVENTS)}"
                )
        if len(set(values)) != len(values):
            raise ValueError("lists an event twice")
        return values

    def default_name(self) -> str:
        """The URL's host (and port when given), as a name: "hooks.slack.com"."""
        from urllib.parse import urlsplit

        host = urlsplit(self.url).netloc.rsplit("@", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", host).strip("-.")[:64]

    def key(self) -> bytes:
        assert self.secret is not None, "load_settings reads the secret"
        return self.secret.get_secret_value().encode()


class ConsoleSettings(_Section):
    """The desk console (maild/console): web pages for agents, on [http] listen."""

    enabled: bool = False
    idle_timeout: float = 8 * 3600.0  # a session unused this long is signed out
    max_age: float = 7 * 86400.0  # and any session this old
    # failed sign-ins, per account and per client address, in any 15 minutes
    max_failed_sign_ins: int = Field(default=10, ge=1, le=10_000, strict=True)

    _duration = field_validator("idle_timeout", "max_age", mode="before")(parse_duration)


class Settings(_Section):
    """Everything maild reads from its config file."""

    source: Path | None = None  # the file these settings came from
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    lmtp: LmtpSettings = Field(default_factory=LmtpSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    rules: RulesSettings = Field(default_factory=RulesSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    pagerduty: PagerDutySettings = Field(default_factory=PagerDutySettings)
    escalation: EscalationSettings = Field(default_factory=EscalationSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    desk: DeskSettings = Field(default_factory=DeskSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    webhook: list[WebhookSettings] = Field(default_factory=list)  # [[webhook]], in order


def default_config_path() -> Path:
    return Path(os.environ.get("MAILD_CONFIG") or DEFAULT_CONFIG)


def _line_of(text: str, section: str | None, key: str | None) -> int | None:
    """The line number of `key` inside `[section]` (or of the section), if found.

    A key that is itself a table is found as `key = {...}`, `key.sub = ...` or
    its own `[section.key]` header.
    """
    toml = TomlLines(text)
    if key is None:
        table = toml.table(section or "")
        return table.line if table else None
    own = toml.table(f"{section}.{key}" if section else key)
    if own is not None:
        return own.line
    if section is None:
        return toml.key(key, 1, toml.top_end)
    for table in toml.tables:
        if table.name == section and (line := toml.key(key, table.line + 1, table.end)):
            return line
    return None


def _array_where(path: Path, text: str, array: str, index: int, key: str | None) -> str:
    """`FILE:LINE: [[array]] #N key`: the line of the key in the array's Nth table (from 0),
    else the table's own line."""
    tables = TomlLines(text).array(array)
    table = tables[index] if 0 <= index < len(tables) else None
    line = None
    if table is not None:
        line = (TomlLines(text).key(key, table.line + 1, table.end) if key else None) or table.line
    name = f"[[{array}]] #{index + 1}" + (f" {key}" if key else "")
    return f"{path}:{line}: {name}" if line else f"{path}: {name}"


def _describe_array_item(path: Path, text: str, item: Any) -> str | None:
    """An error inside one `[[webhook]]` table, named by its number, line and key."""
    loc = item["loc"]
    if len(loc) < 2 or loc[0] != "webhook" or not isinstance(loc[1], int):
        return None
    key = str(loc[2]) if len(loc) > 2 else None
    where = _array_where(path, text, "webhook", loc[1], key)
    if item["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if item["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {item['msg'].removeprefix('Value error, ')}"


def _describe(path: Path, text: str, data: dict[str, Any], error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        in_array = _describe_array_item(path, text, item)
        if in_array is not None:
            lines.append(in_array)
            continue
        if tuple(item["loc"]) == ("webhook",) and isinstance(data.get("webhook"), dict):
            where = _line_of(text, "webhook", None)
            message = "[webhook]: write [[webhook]], one table per webhook"
            lines.append(f"{path}:{where}: {message}" if where else f"{path}: {message}")
            continue
        loc = [str(part) for part in item["loc"]]
        section = loc[0] if len(loc) > 1 else None
        key = loc[1] if len(loc) > 1 else loc[0] if loc else None
        if section is None and key is not None and item["type"] == "extra_forbidden":
            if isinstance(data.get(key), dict):
                where = _line_of(text, key, None)
                message = f"[{key}]: unknown section"
            else:  # a key above every section, often a forgotten [section] header
                where = _line_of(text, None, key)
                message = f"{key}: unknown key"
        else:
            where = _line_of(text, section, key)
            name = f"[{section}] {key}" if section else str(key)
            message = (
                f"{name}: unknown key"
                if item["type"] == "extra_forbidden"
                else f"{name}: {item['msg'].removeprefix('Value error, ')}"
            )
        lines.append(f"{path}:{where}: {message}" if where else f"{path}: {message}")
    return "\n".join(lines)


def _resolve(base: Path, value: Path) -> Path:
    return value if value.is_absolute() else (base / value).resolve()


def default_data_folder(base: Path) -> Path:
    """Where the default SQLite database lives, for a config file in folder `base`:
    systemd's $STATE_DIRECTORY when set; else, for a config in `<root>/etc/<name>`
    (/etc/maild), `<root>/var/lib/<name>` (/var/lib/maild, the unit's StateDirectory),
    so a command run by hand on the mail host opens the service's database; else
    `data` beside the config (a checkout, `make run`)."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return _resolve(base, Path(state))
    base = base.resolve()
    if base.parent.name == "etc":
        return base.parent.parent / "var" / "lib" / base.name
    return base / "data"


def _resolve_database_url(base: Path, url: str) -> str:
    if not url:
        return f"sqlite:///{default_data_folder(base) / 'maild.db'}"
    match = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", url)
    if match and ":memory:" not in url:
        return match.group(1) + str(_resolve(base, Path(match.group(2))))
    return url


def _where(path: Path, text: str, section: str, key: str | None = None) -> str:
    """`FILE:LINE: [section] key`, for an error about that key (the line when it is written)."""
    line = _line_of(text, section, key)
    name = f"[{section}] {key}" if key else f"[{section}]"
    return f"{path}:{line}: {name}" if line else f"{path}: {name}"


def _credential(name: str) -> Path | None:
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if folder and (Path(folder) / name).is_file():
        return Path(folder) / name
    return None


def _read_secret(
    path: Path,
    text: str,
    base: Path,
    section: str,
    key: str,
    inline: SecretStr | None,
    file: Path | None,
    credential: str,
    where_is: Callable[[str], str] | None = None,
) -> tuple[SecretStr | None, Path | None]:
    """A secret given inline, as `<key>_file`, or as the systemd credential (read now, trimmed).

    Returns the secret and the file it came from; ConfigError names the key at fault
    (`where_is(key)` says where a key is, when not in `[section]`).
    """
    if inline is None and file is None:
        file = _credential(credential)
    if file is None:
        return inline, None
    where = (where_is or (lambda k: _where(path, text, section, k)))(f"{key}_file")
    if inline is not None:
        raise ConfigError(f"{where}: set {key} or {key}_file, not both")
    resolved = _resolve(base, file)
    try:
        value = resolved.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}: {resolved}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError(f"{where}: {resolved} is empty")
    return SecretStr(value), resolved


def _resolve_pagerduty(
    path: Path, text: str, base: Path, pagerduty: PagerDutySettings
) -> PagerDutySettings:
    """Paths resolved against the config folder; the routing key file read now."""
    key, key_file = _read_secret(
        path,
        text,
        base,
        "pagerduty",
        "routing_key",
        pagerduty.routing_key,
        pagerduty.routing_key_file,
        CREDENTIAL_NAME,
    )
    if key_file is not None and key is not None:
        try:
            _check_routing_key(key.get_secret_value())
        except ValueError as exc:
            where = _where(path, text, "pagerduty", "routing_key_file")
            raise ConfigError(f"{where}: {key_file}: {exc}") from None
    return pagerduty.model_copy(
        update={
            "routing_key": key,
            "routing_key_file": key_file,
            # read by `maild serve`
            "ca_file": _resolve(base, pagerduty.ca_file) if pagerduty.ca_file else None,
        }
    )


def _resolve_outbound(
    path: Path, text: str, base: Path, outbound: OutboundSettings
) -> OutboundSettings:
    """Paths resolved, secret files read, and what acknowledgements need checked."""
    secret, secret_file = _read_secret(
        path,
        text,
        base,
        "outbound",
        "secret",
        outbound.secret,
        outbound.secret_file,
        OUTBOUND_SECRET_CREDENTIAL,
    )
    password, password_file = _read_secret(
        path,
        text,
        base,
        "outbound",
        "password",
        outbound.password,
        outbound.password_file,
        SMARTHOST_PASSWORD_CREDENTIAL,
    )

    def where(key: str | None) -> str:
        return _where(path, text, "outbound", key)

    if outbound.enabled:
        if not outbound.from_:
            raise ConfigError(
                f"{where('smarthost')}: acknowledgements need a sender: set "
                '[outbound] from = "Support <support@your-domain>"'
            )
        if secret is None:
            raise ConfigError(
                f"{where('smarthost')}: acknowledgements need [outbound] secret (or secret_file, "
                f"or the systemd credential {OUTBOUND_SECRET_CREDENTIAL}): the key that signs "
                "reply addresses; any random string of 16 characters or more"
            )
    if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{where('secret_file' if secret_file else 'secret')}: too short "
            f"({len(secret.get_secret_value())} characters; use {MIN_SECRET_LENGTH} or more)"
        )
    if (outbound.username is None) != (password is None):
        key = "password" if outbound.username is not None else "username"
        raise ConfigError(f"{where(None)}: username and password go together; set {key} too")
    return outbound.model_copy(
        update={
            "secret": secret,
            "secret_file": secret_file,
            "password": password,
            "password_file": password_file,
            "templates": _resolve(base, outbound.templates),
            "ca_file": _resolve(base, outbound.ca_file) if outbound.ca_file else None,
        }
    )


def _resolve_webhooks(
    path: Path, text: str, base: Path, webhooks: list[WebhookSettings]
) -> list[WebhookSettings]:
    """Each webhook named (its URL's host by default; names unique), its secret read (inline,
    `secret_file`, or the systemd credential `webhook-<name>`), its CA file resolved."""
    resolved = []
    seen: dict[str, int] = {}
    for index, hook in enumerate(webhooks):

        def where(key: str | None, index: int = index) -> str:
            return _array_where(path, text, "webhook", index, key)

        name = hook.name or hook.default_name()
        if not _WEBHOOK_NAME.fullmatch(name):
            raise ConfigError(f'{where("url")}: its host makes no name; set name = "..."')
        if name in seen:
            raise ConfigError(
                f"{where('name' if hook.name else 'url')}: the name {name!r} is taken by "
                f'[[webhook]] #{seen[name] + 1}; give each webhook its own name = "..."'
            )
        seen[name] = index
        secret, secret_file = _read_secret(
            path,
            text,
            base,
            "webhook",
            "secret",
            hook.secret,
            hook.secret_file,
            f"webhook-{name}",
            where_is=where,
        )
        if secret is None:
            raise ConfigError(
                f"{where(None)}: needs secret_file (or secret, or the systemd credential "
                f"webhook-{name}): the key every event is signed with; any random string of "
                f"{MIN_SECRET_LENGTH} characters or more"
            )
        if len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"{where('secret_file' if secret_file else 'secret')}: too short "
                f"({len(secret.get_secret_value())} characters; use {MIN_SECRET_LENGTH} or more)"
            )
        resolved.append(
            hook.model_copy(
                update={
                    "name": name,
                    "secret": secret,
                    "secret_file": secret_file,
                    "ca_file": _resolve(base, hook.ca_file) if hook.ca_file else None,
                }
            )
        )
    return resolved


def load_settings(path: Path) -> Settings:
    """Read, validate and resolve the settings in `path`; ConfigError names what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (set --config or MAILD_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "source" in data:
        raise ConfigError(f"{path}:{_line_of(text, None, 'source')}: source: unknown key")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, text, data, exc)) from None
    if settings.smtp.max_data_memory < settings.smtp.max_message_size:
        raise ConfigError(
            f"{_where(path, text, 'smtp', 'max_data_memory')}: "
            f"{settings.smtp.max_data_memory} bytes is less than [smtp] max_message_size "
            f"({settings.smtp.max_message_size} bytes): no message of the largest size "
            "could ever be received"
        )
    base = path.resolve().parent
    pagerduty = _resolve_pagerduty(path, text, base, settings.pagerduty)
    return settings.model_copy(
        update={
            "source": path.resolve(),
            "rules": settings.rules.model_copy(
                update={"path": _resolve(base, settings.rules.path)}
            ),
            "database": settings.database.model_copy(
                update={"url": _resolve_database_url(base, settings.database.url)}
            ),
            "pagerduty": pagerduty,
            "outbound": _resolve_outbound(path, text, base, settings.outbound),
            "webhook": _resolve_webhooks(path, text, base, settings.webhook),
            "http": settings.http.model_copy(
                update={
                    key: _resolve(base, value)
                    for key in ("tls_cert", "tls_key")
                    if (value := getattr(settings.http, key)) is not None
                }
            ),
        }
    )
