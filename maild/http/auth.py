"""Who is asking: `Authorization: Bearer maild_…` → the token's `Principal`.

    from maild.http.auth import Reader, Writer

    @router.get("/tickets/{ticket_id}")
    async def ticket(ticket_id: int, who: Reader, api: Api) -> dict[str, Any]:
        ...  # who.name, who.scope, who.customer; who.sees(addresses)

- No Authorization header, another scheme, or a token that is not a live one:
  401 with `WWW-Authenticate: Bearer` (RFC 6750; `error="invalid_token"` for a
  wrong one) and a problem body.
- A read token on a write route: 403 (`error="insufficient_scope"`).
- Wrong tokens count against the client's address (after trusted proxies'
  X-Forwarded-For, see app.py): past 10 a minute, every attempt from it gets 429
  with Retry-After, before any lookup (limits.FailureLimiter).
- A token is found by the SHA-256 of what was sent, in the unique index of
  api_token (store/tokens.py): one indexed read off the event loop, no
  comparison of secrets, and a revoked token fails on the very next request.
- `last_used_at` is written at most once a minute per token and process, by the
  database's writer thread, after the answer; never a write per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError

from maild import metrics
from maild.http.limits import FailureLimiter
from maild.http.problems import ProblemError
from maild.mail.addresses import sender_matches
from maild.store.database import Database
from maild.store.models import utcnow
from maild.store.tokens import Scope, find_token, mark_used

log = structlog.get_logger("maild.http")

MARK_INTERVAL = 60.0  # seconds between two last_used_at writes of one token


@dataclass(frozen=True)
class Principal:
    """A request's token: its name, scope, and the customer it acts for (None: every one)."""

    name: str
    scope: Scope
    customer: str | None = None  # an address or *@domain

    def allows(self, needed: Scope) -> bool:
        return self.scope.allows(needed)

    def sees(self, addresses: Iterable[str]) -> bool:
        """Whether a ticket with these participants is this token's to see: always for a
        token without a customer, else when one address matches its pattern."""
        if self.customer is None:
            return True
        return any(sender_matches(self.customer, address) for address in addresses)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope.value, "customer": self.customer}


def client_address(request: Request) -> str:
    """The client's address as the app sees it: the peer, or what a trusted proxy said."""
    return request.client.host if request.client else "unknown"


class Authenticator:
    """Turns a request's bearer token into a Principal, or raises the problem."""

    def __init__(
        self,
        database: Database,
        limiter: FailureLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.limiter = limiter or FailureLimiter()
        self._clock = clock
        self._marked: dict[int, float] = {}  # token id → when last_used_at was last written
        self._marking: set[asyncio.Task[None]] = set()

    async def authenticate(self, request: Request) -> Principal:
        client = client_address(request)
        wait = self.limiter.retry_after(client)
        if wait is not None:
            metrics.HTTP_REFUSED.labels("auth_rate_limited").inc()
            seconds = math.ceil(wait)
            raise ProblemError(
                429,
                f"too many failed authentications from {client}; try again in {seconds} s",
                kind="too-many-failures",
                headers={"Retry-After": str(seconds)},
            )
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header:
            raise _unauthorized("send Authorization: Bearer <token> (maild tokens create)", None)
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("only Authorization: Bearer <token> is accepted", None)
        try:
            row = await self.database.read(lambda session: find_token(session, token))
        except SQLAlchemyError as exc:
            log.error("token lookup failed", error=f"{type(exc).__name__}: {exc}"[:300])
            raise ProblemError(
                503,
                "the token cannot be checked now: the database does not answer",
                kind="unavailable",
                headers={"Retry-After": "5"},
            ) from None
        if row is None or row.id is None:
            metrics.HTTP_REFUSED.labels("auth_failed").inc()
            if self.limiter.failed(client):
                log.warning(
                    "failed authentications over the limit; refusing this address for a while",
                    client=client,
                    limit=self.limiter.limit,
                    window=self.limiter.window,
                )
            else:
                log.info("HTTP authentication failed", client=client, path=request.url.path)
            raise _unauthorized("the bearer token is not valid (or was revoked)", "invalid_token")
        self._mark_used(row.id)
        request.state.token = row.name  # for the request log
        return Principal(row.name, Scope(row.scope), row.customer)

    def _mark_used(self, token_id: int) -> None:
        now = self._clock()
        if now - self._marked.get(token_id, -math.inf) < MARK_INTERVAL:
            return
        self._marked[token_id] = now
        task = asyncio.create_task(self._write_used(token_id), name="maild-token-used")
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def _write_used(self, token_id: int) -> None:
        at = utcnow()
        try:
            await self.database.write(lambda session: mark_used(session, token_id, at))
        except Exception as exc:  # only bookkeeping: the request was answered
            self._marked.pop(token_id, None)
            log.warning("could not record a token's last use", error=str(exc)[:300])


def _unauthorized(detail: str, error: str | None) -> ProblemError:
    challenge = 'Bearer realm="maild"' + (f', error="{error}"' if error else "")
    return ProblemError(
        401,
        detail,
        kind="invalid-token" if error else "missing-token",
        headers={"WWW-Authenticate": challenge},
    )


# The OpenAPI document shows the bearer scheme; the header itself is read above.
_bearer = HTTPBearer(auto_error=False, description="a token from `maild tokens create`")


def authenticator(request: Request) -> Authenticator:
    auth = request.app.state.authenticator
    assert isinstance(auth, Authenticator)
    return auth


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the request's principal, whose scope must allow `scope` (else 403)."""

    async def dependency(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Principal:
        principal = await authenticator(request).authenticate(request)
        if not principal.allows(scope):
            raise ProblemError(
                403,
                f"token {principal.name!r} has scope {principal.scope.value}; this needs "
                f"{scope.value}",
                kind="insufficient-scope",
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="maild", error="insufficient_scope", scope="{scope.value}"'
                    )
                },
            )
        return principal

    return dependency


Reader = Annotated[Principal, Depends(require(Scope.READ))]
Writer = Annotated[Principal, Depends(require(Scope.WRITE))]
