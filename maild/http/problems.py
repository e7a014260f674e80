"""Errors over HTTP: RFC 9457 problem details (`application/problem+json`).

Every error under /api/ is one JSON object:

    {"type": "urn:maild:problem:invalid-token", "title": "Unauthorized",
     "status": 401, "detail": "the bearer token is not valid (or was revoked)"}

`type` is `about:blank` when the status says it all (404, 405), else a
`urn:maild:problem:<kind>` a client can branch on. A request field at fault is
named in `errors`: `[{"field": "requester.email", "in": "body", "message": ...}]`
(`in` is body, query, path or header), FastAPI's own validation errors included.

Routes raise `ProblemError`; the handlers installed here turn it, Starlette's
HTTPException (unknown routes, wrong methods), validation errors and any
unexpected exception into that shape. Outside /api/ the operational routes keep
their plain-text 404 and 405 answers.
"""

from __future__ import annotations

import http
import json
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response

log = structlog.get_logger("maild.http")

PROBLEM_JSON = "application/problem+json"
API_PREFIX = "/api/"
# The operational routes' answers for other paths, as the hand-written listener gave them.
OPS_NOT_FOUND = b"not found: try /metrics, /healthz or /readyz\n"
OPS_METHOD = b"GET only\n"


class Problem(BaseModel):
    """RFC 9457 problem details, as every /api/ error is answered (for the OpenAPI schema)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class ProblemError(HTTPException):
    """Raise from a route (or a dependency) to answer with a problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.kind = kind
        self.errors = [dict(e) for e in errors] if errors else None


def problem_body(
    status: int,
    detail: str,
    kind: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:maild:problem:{kind}" if kind else "about:blank",
        "title": _phrase(status),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [dict(e) for e in errors]
    return body


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = json.dumps(problem_body(status, detail, kind, errors), ensure_ascii=False)
    return Response(
        body.encode("utf-8"),
        status_code=status,
        headers={**(headers or {}), "content-type": PROBLEM_JSON},
    )


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def field_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's validation errors as `errors` entries: the field's dotted path, where it
    was (body, query, path, header) and the message."""
    result = []
    for item in error.errors():
        loc = [str(part) for part in item.get("loc", ())]
        where = loc[0] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else None
        path = loc[1:] if where else loc
        result.append(
            {
                "field": ".".join(path) or (where or ""),
                "in": where,
                "message": str(item.get("msg", "invalid")),
            }
        )
    return result


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(
        exc.status_code, exc.detail, kind=exc.kind, errors=exc.errors, headers=exc.headers
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(API_PREFIX) or exc.status_code not in (404, 405):
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"no such resource: {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow", "")
            detail = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return problem_response(exc.status_code, str(detail), headers=exc.headers)
    body = OPS_NOT_FOUND if exc.status_code == 404 else OPS_METHOD
    headers = {**(exc.headers or {}), "content-type": "text/plain"}
    return Response(body, status_code=exc.status_code, headers=headers)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc)
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    where = f"{first['field']}: " if first["field"] else ""
    detail = f"{where}{first['message']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem_response(422, detail, kind="invalid-request", errors=errors)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette raises the exception again after this answer: uvicorn logs its traceback.
    log.error(
        "HTTP request failed",
        method=request.method,
        path=request.url.path,
        error=f"{type(exc).__name__}: {exc}"[:500],
    )
    if not request.url.path.startswith(API_PREFIX):  # a probe must get an answer
        body = f"internal error: {type(exc).__name__}\n".encode()
        return Response(body, status_code=500, headers={"content-type": "text/plain"})
    return problem_response(500, f"internal error ({type(exc).__name__}); see maild's log")


def install(app: FastAPI) -> None:
    """Answer every error of `app` as a problem (under /api/)."""
    app.add_exception_handler(ProblemError, _problem)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)


# For the OpenAPI document: what every /api/ route may answer besides its own result.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description}
    for status, description in (
        (401, "no token, or not a valid one (WWW-Authenticate: Bearer)"),
        (403, "the token's scope does not allow this"),
        (413, "the request body is over [http] max_body_size"),
        (422, "a request field is wrong: `errors` names it"),
        (429, "too many failed authentications from this address (Retry-After)"),
    )
}
