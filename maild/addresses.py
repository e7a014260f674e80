"""Email addresses as maild compares them.

Routing compares envelope recipients case-insensitively and ignores a `+tag`
subaddress (`support+billing@altis-dxp.com` is `support@altis-dxp.com`).
Participants are compared by the whole address, lower-cased.
"""

from __future__ import annotations

from dataclasses import dataclass


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
