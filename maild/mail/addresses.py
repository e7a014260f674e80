"""Email addresses as maild compares them.

Routing compares envelope recipients case-insensitively and ignores a `+tag`
subaddress (`support+billing@altis-dxp.com` is `support@altis-dxp.com`).
Participants are compared by the whole address, lower-cased.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Address:
    """A display name and an address, as read from a header."""

    name: str
    email: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "email": self.email}


def normalize(address: str) -> str:
    """Lower-case, trimmed, without surrounding angle brackets."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text.lower()


def split(address: str) -> tuple[str, str]:
    """(local part, domain) of a normalised address; domain is "" when there is none."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain


def route_key(address: str) -> str:
    """The form routing matches on: normalised, `+tag` removed from the local part."""
    local, domain = split(normalize(address))
    base = _untagged(local)[0]
    return f"{base}@{domain}" if domain else base


def subaddress(address: str) -> str:
    """The `+tag` part of an address (empty when there is none)."""
    return _untagged(split(normalize(address))[0])[1]


def _untagged(local: str) -> tuple[str, str]:
    """`support+billing` → (`support`, `billing`); a local part starting with `+` has no tag."""
    if local.startswith("+"):
        return local, ""
    base, _, tag = local.partition("+")
    return base, tag


def domain_of(address: str) -> str:
    return split(normalize(address))[1]


def is_domain(text: str) -> bool:
    """A domain as a route, a rule or an allow-list may name one (`altis-dxp.com`)."""
    return bool(_DOMAIN.match(text))


def is_sender_pattern(text: str) -> bool:
    """An address (`ops@example.com`) or a whole domain (`*@example.com`), as the rules'
    `senders` and `[escalation] allowed_senders` take them."""
    text = text.strip().lower()
    local, at, domain = text.rpartition("@")
    if not at or not local or not is_domain(domain) or len(text.split()) != 1:
        return False
    return local == "*" or "*" not in local


def is_address(text: str) -> bool:
    """One plain address (`jo@altis-dxp.com`): no pattern, no display name, no spaces or
    control characters, at most 320 characters (what an address column holds)."""
    text = text.strip()
    if len(text) > 320 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        return False
    return is_sender_pattern(text) and not text.startswith("*@") and "<" not in text


def sender_matches(pattern: str, sender: str) -> bool:
    """Whether `sender` is the address, or in the domain, a sender pattern names."""
    pattern, sender = pattern.strip().lower(), normalize(sender)
    if pattern.startswith("*@"):
        return domain_of(sender) == pattern[2:]
    return sender == pattern
