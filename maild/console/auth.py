"""Who is signed in to the console, and the checks every request passes.

- A session is a cookie (`maild_console`: HttpOnly, SameSite=Lax, Path=/console,
  Secure when the listener has TLS or a trusted proxy says the request came over
  https) whose SHA-256 finds its row (store/agents.py). Idle past
  `[console] idle_timeout` or older than `max_age`, its agent disabled or its
  password changed: signed out.
- Every POST carries the session's CSRF token in a form field `csrf`; without it,
  or with another, 403 and nothing done. The sign-in form, before any session,
  carries a token that is also in a short-lived cookie (double submit), so a
  cross-site page cannot sign a browser in to an account of its choosing.
- Failed sign-ins count per account and per client address (`max_failed_sign_ins`
  in 15 minutes, each); past either, the form answers 429 before checking any
  password. Every failure says the same words whether the account exists or not,
  and an unknown account costs one argon2 check like a known one.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import Response

from maild.config import ConsoleSettings
from maild.http.limits import FailureLimiter
from maild.store.agents import SignedIn, find_session, touch_session
from maild.store.database import Database
from maild.store.models import utcnow

COOKIE = "maild_console"
SIGN_IN_COOKIE = "maild_console_sign_in"  # the sign-in form's CSRF token (double submit)
PATH = "/console"
SIGN_IN_WINDOW = 15 * 60.0  # seconds: the failed sign-in limits' window


def secure(request: Request) -> bool:
    """The request came over HTTPS (the listener's TLS, or a trusted proxy's word)."""
    return request.url.scheme == "https"


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        secure=secure(request),
        httponly=True,
        samesite="lax",
    )


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a form's token with the one expected."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class Sessions:
    """The console's sessions and sign-in limits, one per process."""

    database: Database
    settings: ConsoleSettings

    def __post_init__(self) -> None:
        limit = self.settings.max_failed_sign_ins
        self.by_account = FailureLimiter(limit=limit, window=SIGN_IN_WINDOW)
        self.by_address = FailureLimiter(limit=limit, window=SIGN_IN_WINDOW)

    @property
    def idle(self) -> timedelta:
        return timedelta(seconds=self.settings.idle_timeout)

    @property
    def max_age(self) -> timedelta:
        return timedelta(seconds=self.settings.max_age)

    async def current(self, request: Request) -> SignedIn | None:
        """The signed-in agent of this request, or None."""
        token = request.cookies.get(COOKIE, "")
        if not token:
            return None
        now = utcnow()
        signed, stale = await self.database.read(
            lambda s: find_session(s, token, now, self.idle, self.max_age)
        )
        if signed is not None and stale:
            await self.database.write(lambda s: touch_session(s, token, now))
        return signed

    def retry_after(self, account: str, client: str) -> float | None:
        waits = [
            wait
            for wait in (
                self.by_account.retry_after(f"account:{account.strip().lower()}"),
                self.by_address.retry_after(client),
            )
            if wait is not None
        ]
        return max(waits) if waits else None

    def failed(self, account: str, client: str) -> None:
        self.by_account.failed(f"account:{account.strip().lower()}")
        self.by_address.failed(client)
