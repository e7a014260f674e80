"""The ASGI application: the operational routes, and the API under /api/v1.

    app = build_app(ops, api, settings.http, routers=[tickets.router])

- `/metrics`, `/healthz`, `/readyz`: exactly as the hand-written listener answered
  them (status codes, bodies, content types; GET and HEAD), no authentication.
- `/api/v1/...`: FastAPI routes. Each router in `routers` (an `APIRouter` without a
  prefix) is mounted under /api/v1; its routes take the principal and the
  context as parameters:

      router = APIRouter(tags=["tickets"], responses=PROBLEM_RESPONSES)

      @router.get("/tickets/{ticket_id}")
      async def ticket(ticket_id: int, who: Reader, api: Api) -> dict[str, Any]:
          view = await api.database.read(lambda s: show_ticket(s, ticket_id))
          if not who.sees(participants_of(view)):
              raise ProblemError(404, f"no ticket {ticket_id}")
          return view

  Database work is blocking: run it with `api.database.read(fn)` (a worker thread)
  or `api.database.write(fn)` (the writer thread, one committed transaction),
  `fn(session)` doing the work; never call the engine inside the coroutine.
- `/api/v1/openapi.json`: the OpenAPI document (FastAPI's); no HTML docs pages,
  which would load scripts from a CDN.
- `/api/v1/whoami`: the token's name, scope and customer; proves the token.

Middleware, outermost first: trusted proxies' X-Forwarded-For/-Proto (only when
`[http] trusted_proxies` is set, and only from those peers), the API's request
log, the head and body limits. Errors are problem+json (problems.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from maild import __version__, metrics
from maild.config import HttpSettings, Settings
from maild.desk.actions import DeskContext
from maild.http import problems
from maild.http.auth import Authenticator, Reader
from maild.http.limits import MAX_HEAD, RequestLimits
from maild.routing.rules import RuleTable
from maild.store.database import Database

log = structlog.get_logger("maild.http")

API_V1 = "/api/v1"
CONSOLE = "/console"

Check = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Ops:
    """What the operational routes report, from the service."""

    health: Check  # /healthz: {"status": "ok" | "failing", "checks": ..., ...}
    ready: Check  # /readyz: {"status": "ready" | "not ready", "reason": ...}
    backlog: Callable[[], Awaitable[dict[str, int]]]  # maild_backlog, read at scrape time


@dataclass(frozen=True)
class ApiContext:
    """What API routes work with, wired by the service (maild/service.py)."""

    database: Database
    settings: Settings
    rules: Callable[[], RuleTable]  # the table in force now (reloads swap it)
    queued: Callable[[], None]  # wake the pager and mailer after writing outbox rows
    # the desk's actions' context with the rules and templates in force now (Service.desk);
    # None: built from the settings at each call
    desk: Callable[[], DeskContext] | None = None

    def desk_context(self) -> DeskContext:
        """The rules, paging policy, agents and desk mail policy in force now."""
        if self.desk is not None:
            return self.desk()
        return DeskContext.from_settings(self.settings, self.rules())


def api_context(request: Request) -> ApiContext:
    context = request.app.state.api
    assert isinstance(context, ApiContext)
    return context


Api = Annotated[ApiContext, Depends(api_context)]


def _ops_routes(app: FastAPI, ops: Ops) -> None:
    async def metrics_route(request: Request) -> Response:
        for queue, count in (await ops.backlog()).items():
            metrics.BACKLOG.labels(queue).set(count)
        return Response(metrics.generate(), headers={"content-type": CONTENT_TYPE_LATEST})

    def report(check: Check, good: str) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            answer = await check()
            return Response(
                json.dumps(answer).encode() + b"\n",
                status_code=200 if answer["status"] == good else 503,
                headers={"content-type": "application/json"},
            )

        return route

    # Starlette routes (not in the OpenAPI document); GET routes answer HEAD too.
    app.add_route("/metrics", metrics_route, methods=["GET"], include_in_schema=False)
    app.add_route("/healthz", report(ops.health, "ok"), methods=["GET"], include_in_schema=False)
    app.add_route("/readyz", report(ops.ready, "ready"), methods=["GET"], include_in_schema=False)


whoami_router = APIRouter(tags=["tokens"], responses=problems.PROBLEM_RESPONSES)


@whoami_router.get("/whoami", summary="The token's name, scope and customer")
async def whoami(who: Reader) -> dict[str, Any]:
    return who.as_json()


class ApiLog:
    """One log line per /api/ request: method, path, status, client, token, milliseconds.
    The operational routes are scraped every few seconds and are not logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(problems.API_PREFIX):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            client = scope.get("client")
            log.info(
                "api request",
                method=scope["method"],
                path=scope["path"][:200],
                status=status,
                client=client[0] if client else None,
                token=state.get("token"),
                ms=round((time.perf_counter() - started) * 1000, 1),
            )


def build_app(
    ops: Ops,
    api: ApiContext,
    settings: HttpSettings,
    *,
    authenticator: Authenticator | None = None,
    routers: Sequence[APIRouter] = (),
    console: ASGIApp | None = None,
) -> FastAPI:
    """The whole HTTP application; `routers` are mounted under /api/v1, the `console`
    (maild/console, when [console] enabled) under /console."""
    app = FastAPI(
        title="maild",
        version=__version__,
        summary="The support desk's tickets over HTTP",
        openapi_url=f"{API_V1}/openapi.json",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.api = api
    app.state.authenticator = authenticator or Authenticator(api.database)
    problems.install(app)
    app.include_router(whoami_router, prefix=API_V1)
    for router in routers:
        app.include_router(router, prefix=API_V1)
    _ops_routes(app, ops)
    if console is not None:
        app.mount(CONSOLE, console)
    # add_middleware puts each outside the ones added before it.
    app.add_middleware(RequestLimits, max_size=settings.max_body_size, max_head=MAX_HEAD)
    app.add_middleware(ApiLog)
    if settings.trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))
    return app
