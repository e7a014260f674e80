"""The HTTP API's bearer tokens: made, listed and revoked by `maild tokens`, looked up by
maild/http/auth.py.

A token is `maild_` and 43 characters of URL-safe base64: 256 random bits from
`secrets`. The prefix lets secret scanners (and people) recognise a leaked one.
Only its SHA-256 is stored, in a unique (indexed) column, and a request's token
is found by the hash of what it sent: nothing ever compares the secret itself,
so there is no timing oracle on it, and a stolen database gives no token.

A plain SHA-256 is enough here. Slow password hashes (argon2, bcrypt) exist
because passwords are guessable: they make each guess against a stolen hash
cost. A 256-bit random token cannot be guessed however fast the hash is, and a
fast hash lets every request be checked with one indexed lookup.

Revoked tokens keep their row (with `revoked_at`) for audit, so a name is never
reused.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from maild.errors import MaildError
from maild.mail.addresses import is_sender_pattern
from maild.store.models import ApiToken, as_utc, table_of, utcnow

TOKEN_PREFIX = "maild_"  # noqa: S105 (the prefix every token starts with, not a secret)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}$")


class Scope(StrEnum):
    """What a token may do: read (GET), or write (read, and create and change)."""

    READ = "read"
    WRITE = "write"

    def allows(self, needed: Scope) -> bool:
        return self is Scope.WRITE or needed is Scope.READ


class TokenError(MaildError):
    """A `maild tokens` request that cannot be done (the message says why)."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def looks_like_token(text: str) -> bool:
    """Whether `text` has the shape of a maild token (before any lookup)."""
    return bool(_TOKEN.match(text))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise TokenError(
            f"{name!r} is not a token name: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_customer(customer: str | None) -> str | None:
    """An address or `*@domain`, lower-cased; None for a token that sees every ticket."""
    if customer is None:
        return None
    if not is_sender_pattern(customer):
        raise TokenError(f"--customer {customer!r} is not an address or *@domain")
    return customer.strip().lower()


def create_token(
    session: Session, name: str, scope: Scope, customer: str | None = None
) -> tuple[ApiToken, str]:
    """A new token row and the token itself (shown once, never stored)."""
    check_name(name)
    customer = check_customer(customer)
    existing = session.exec(select(ApiToken).where(ApiToken.name == name)).first()
    if existing is not None:
        raise TokenError(_exists(existing))
    token = new_token()
    row = ApiToken(name=name, token_hash=token_hash(token), scope=scope.value, customer=customer)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # created by someone else since the check above
        raise TokenError(f"a token named {name!r} already exists") from None
    return row, token


def _exists(row: ApiToken) -> str:
    if row.revoked_at is not None:
        return (
            f"a token named {row.name!r} already exists (revoked "
            f"{as_utc(row.revoked_at):%Y-%m-%d %H:%M}; names are kept for audit): choose "
            "another name"
        )
    return f"a token named {row.name!r} already exists"


def token_view(row: ApiToken) -> dict[str, Any]:
    """A token as `tokens list` shows it: never the token or its hash."""
    return {
        "name": row.name,
        "scope": row.scope,
        "customer": row.customer,
        "created_at": as_utc(row.created_at).isoformat(),
        "last_used_at": as_utc(row.last_used_at).isoformat() if row.last_used_at else None,
        "revoked_at": as_utc(row.revoked_at).isoformat() if row.revoked_at else None,
    }


def list_tokens(session: Session) -> list[dict[str, Any]]:
    rows = session.exec(select(ApiToken).order_by(col(ApiToken.name))).all()
    return [token_view(row) for row in rows]


def revoke_token(session: Session, name: str) -> ApiToken:
    """Mark the token revoked (at once for every request after the commit); the row stays."""
    row = session.exec(select(ApiToken).where(ApiToken.name == name)).first()
    if row is None:
        raise TokenError(f"no token named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
    return row


def find_token(session: Session, token: str) -> ApiToken | None:
    """The live (not revoked) token row for a presented token, found by its hash."""
    if not looks_like_token(token):
        return None
    digest = token_hash(token)
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or row.revoked_at is not None:
        return None
    # The index lookup already matched; compare again in constant time all the same.
    return row if secrets.compare_digest(row.token_hash, digest) else None


_TOKENS = table_of(ApiToken)


def mark_used(session: Session, token_id: int, at: datetime) -> None:
    session.execute(update(_TOKENS).where(_TOKENS.c.id == token_id).values(last_used_at=at))


__all__ = [
    "TOKEN_PREFIX",
    "Scope",
    "TokenError",
    "create_token",
    "find_token",
    "list_tokens",
    "mark_used",
    "revoke_token",
    "token_hash",
    "token_view",
]
