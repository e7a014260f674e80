"""Settings: one TOML file, validated once at load, unknown keys refused by name.

Relative paths in the file (rules folder, CA file, a SQLite database path)
resolve against the folder that holds the file, so a config works wherever it
is started from.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maild.errors import ConfigError

DEFAULT_CONFIG = "/etc/maild/config.toml"
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

    _size = field_validator("max_message_size", mode="before")(parse_size)
    _duration = field_validator("timeout", "shutdown_timeout", mode="before")(parse_duration)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_hostport(value)
        return value


class LmtpSettings(_Section):
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value


class DatabaseSettings(_Section):
    url: str = ""  # filled in by load_settings: a SQLite file in the data folder
    busy_timeout: float = 5.0

    _duration = field_validator("busy_timeout", mode="before")(parse_duration)


class RulesSettings(_Section):
    path: Path = Path("rules")


class ProcessingSettings(_Section):
    workers: int = Field(default=0, ge=0, le=64)  # 0: one per spare CPU core, at least one
    parse_timeout: float = 60.0
    poll_interval: float = 5.0

    _duration = field_validator("parse_timeout", "poll_interval", mode="before")(parse_duration)

    def worker_count(self) -> int:
        return self.workers or max(1, (os.cpu_count() or 2) - 1)


class LogSettings(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class PagerDutySettings(_Section):
    enabled: bool = True
    routing_key: str | None = None
    events_url: str = "https://events.pagerduty.com"
    ca_file: Path | None = None


class Settings(_Section):
    """Everything maild reads from its config file."""

    source: Path | None = None  # the file these settings came from
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    lmtp: LmtpSettings = Field(default_factory=LmtpSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    rules: RulesSettings = Field(default_factory=RulesSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    pagerduty: PagerDutySettings = Field(default_factory=PagerDutySettings)


def default_config_path() -> Path:
    return Path(os.environ.get("MAILD_CONFIG") or DEFAULT_CONFIG)


def _line_of(text: str, section: str | None, key: str | None) -> int | None:
    """The line number of `key` inside `[section]` (or of the section), if found.

    A key that is itself a table is found as `key = {...}`, `key.sub = ...` or
    its own `[section.key]` header.
    """
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\[?\s*([A-Za-z0-9_.-]+)\s*\]", stripped)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            if key is not None and current == (f"{section}.{key}" if section else key):
                return number
            continue
        if (
            key is not None
            and current == section
            and re.match(rf"^\"?{re.escape(key)}\"?\s*[=.]", stripped)
        ):
            return number
    return None


def _describe(path: Path, text: str, data: dict[str, Any], error: ValidationError) -> str:
    lines = []
    for item in error.errors():
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


def _resolve_database_url(base: Path, url: str) -> str:
    if not url:
        data = Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or base / "data")
        return f"sqlite:///{_resolve(base, data) / 'maild.db'}"
    match = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", url)
    if match and ":memory:" not in url:
        return match.group(1) + str(_resolve(base, Path(match.group(2))))
    return url


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
    base = path.resolve().parent
    pagerduty = settings.pagerduty
    if pagerduty.ca_file is not None:
        pagerduty = pagerduty.model_copy(update={"ca_file": _resolve(base, pagerduty.ca_file)})
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
        }
    )
