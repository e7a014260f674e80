"""The API's front door: bearer tokens, scopes, problem+json for every error, the failed-
authentication limit per client address, and trusted proxies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import select

from maild.http.auth import Reader, Writer
from maild.http.limits import FailureLimiter, client_key
from maild.http.problems import PROBLEM_RESPONSES
from maild.store.models import ApiToken
from tests.conftest import RunningMaild, wait_until
from tests.http.conftest import AppServer, bearer, http_url, make_token, problem

WHOAMI = "/api/v1/whoami"


# Routes as the ticket routes will plug in: a router without prefix, mounted at /api/v1.
router = APIRouter(tags=["test"], responses=PROBLEM_RESPONSES)


class Person(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str = ""


class Form(BaseModel):
    requester: Person
    subject: str = Field(min_length=1)


@router.post("/forms", status_code=201)
async def post_form(form: Form, who: Writer) -> dict[str, Any]:
    return {"subject": form.subject, "by": who.name}


@router.get("/counted")
async def counted(limit: int, who: Reader) -> dict[str, Any]:
    return {"limit": limit, "customer": who.customer}


# Over the running daemon.


def test_whoami_names_the_token_its_scope_and_customer(
    served: RunningMaild, client: httpx2.Client
) -> None:
    """A valid token gets 200 and what it is."""
    token = make_token(served.service.database, "portal", "write", "*@customer.example")
    response = client.get(WHOAMI, headers=bearer(token))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"name": "portal", "scope": "write", "customer": "*@customer.example"}


@pytest.mark.parametrize(
    ("headers", "kind", "challenge"),
    [
        ({}, "missing-token", 'Bearer realm="maild"'),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing-token", 'Bearer realm="maild"'),
        ({"Authorization": "Bearer"}, "missing-token", 'Bearer realm="maild"'),
        (
            {"Authorization": "Bearer maild_" + "A" * 43},
            "invalid-token",
            'Bearer realm="maild", error="invalid_token"',
        ),
        (
            {"Authorization": "Bearer not-even-shaped-like-one"},
            "invalid-token",
            'Bearer realm="maild", error="invalid_token"',
        ),
    ],
)
def test_missing_or_bad_tokens_get_401_with_a_bearer_challenge(
    client: httpx2.Client, headers: dict[str, str], kind: str, challenge: str
) -> None:
    """No token, another scheme, an empty or an unknown token: 401, WWW-Authenticate: Bearer,
    and a problem naming which."""
    response = client.get(WHOAMI, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == challenge
    body = problem(response)
    assert (body["type"], body["title"]) == (f"urn:maild:problem:{kind}", "Unauthorized")


def test_unknown_api_routes_and_methods_are_problems(client: httpx2.Client) -> None:
    """Under /api/, 404 and 405 are problem+json (405 with Allow); elsewhere they stay the
    operational listener's plain text."""
    missing = client.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert problem(missing)["detail"] == "no such resource: /api/v1/nothing-here"
    wrong = client.delete(WHOAMI)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET"
    assert problem(wrong)["detail"].startswith("DELETE is not allowed on /api/v1/whoami")
    outside = client.get("/nothing-here")
    assert (outside.status_code, outside.headers["content-type"]) == (404, "text/plain")


def test_the_openapi_document_lists_the_api_and_its_bearer_scheme(client: httpx2.Client) -> None:
    """/api/v1/openapi.json is served without a token; the operational routes are not in it."""
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert "/api/v1/whoami" in document["paths"]
    assert "/metrics" not in document["paths"]
    schemes = document["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    whoami = document["paths"]["/api/v1/whoami"]["get"]
    assert "401" in whoami["responses"]
    assert client.get("/docs").status_code == 404  # no pages that load scripts from a CDN


def test_failed_authentications_are_limited_per_address(
    served: RunningMaild, client: httpx2.Client
) -> None:
    """Ten wrong tokens in a minute, then 429 with Retry-After for every request from that
    address, a valid token included; another address is not affected."""
    good = make_token(served.service.database, "portal", "read")
    wrong = bearer("maild_" + "B" * 43)
    for _ in range(10):
        assert client.get(WHOAMI, headers=wrong).status_code == 401
    limited = client.get(WHOAMI, headers=wrong)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert problem(limited)["type"] == "urn:maild:problem:too-many-failures"
    assert client.get(WHOAMI, headers=bearer(good)).status_code == 429
    other = httpx2.HTTPTransport(local_address="127.0.0.2")
    with httpx2.Client(base_url=http_url(served), transport=other, timeout=30) as elsewhere:
        assert elsewhere.get(WHOAMI, headers=bearer(good)).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes never need a token


def test_a_forged_x_forwarded_for_from_an_untrusted_peer_changes_nothing(
    client: httpx2.Client,
) -> None:
    """Without [http] trusted_proxies, a client naming a new address in X-Forwarded-For on
    every attempt is still counted as itself, and limited after ten."""
    wrong = bearer("maild_" + "C" * 43)
    codes = [
        client.get(WHOAMI, headers={**wrong, "X-Forwarded-For": f"203.0.113.{i}"}).status_code
        for i in range(11)
    ]
    assert codes == [401] * 10 + [429]


def test_a_trusted_proxy_names_the_client(
    http_config: Callable[..., Any],
) -> None:
    """With the peer in [http] trusted_proxies, X-Forwarded-For names the client: failures
    count per forwarded address; an untrusted peer's header is still ignored."""
    from maild.config import load_settings

    config = http_config('trusted_proxies = ["127.0.0.1/32", "10.0.0.0/8"]')
    with RunningMaild(load_settings(config)) as maild:
        wrong = bearer("maild_" + "D" * 43)
        with httpx2.Client(base_url=http_url(maild), timeout=30) as proxy:
            spread = [
                proxy.get(WHOAMI, headers={**wrong, "X-Forwarded-For": f"203.0.113.{i}"})
                for i in range(12)
            ]
            assert {r.status_code for r in spread} == {401}
            one = [
                proxy.get(WHOAMI, headers={**wrong, "X-Forwarded-For": "198.51.100.7"})
                for _ in range(11)
            ]
            assert [r.status_code for r in one] == [401] * 10 + [429]
            # the proxy itself (and the clients it names otherwise) are not limited
            assert proxy.get(WHOAMI, headers=wrong).status_code == 401
        untrusted = httpx2.HTTPTransport(local_address="127.0.0.2")
        with httpx2.Client(base_url=http_url(maild), transport=untrusted, timeout=30) as peer:
            codes = [
                peer.get(WHOAMI, headers={**wrong, "X-Forwarded-For": f"192.0.2.{i}"}).status_code
                for i in range(11)
            ]
        assert codes == [401] * 10 + [429]


# Over the application alone, with routers plugged in as the ticket routes will be.


def test_a_read_token_gets_403_on_a_write_route(app_server: Callable[..., AppServer]) -> None:
    """Scope is checked after the token: a read token on a Writer route gets 403 with an
    insufficient_scope challenge; a write token passes."""
    server = app_server([router])
    read = make_token(server.database, "reader", "read")
    write = make_token(server.database, "writer", "write")
    form = {"requester": {"email": "alice@customer.example"}, "subject": "Site down"}
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        refused = http.post("/api/v1/forms", json=form, headers=bearer(read))
        accepted = http.post("/api/v1/forms", json=form, headers=bearer(write))
    assert refused.status_code == 403
    assert refused.headers["www-authenticate"] == (
        'Bearer realm="maild", error="insufficient_scope", scope="write"'
    )
    assert problem(refused)["type"] == "urn:maild:problem:insufficient-scope"
    assert (accepted.status_code, accepted.json()) == (
        201,
        {"subject": "Site down", "by": "writer"},
    )


def test_validation_errors_name_the_field_at_fault(app_server: Callable[..., AppServer]) -> None:
    """FastAPI's own 422s are problems whose `errors` name each field and where it was."""
    server = app_server([router])
    token = bearer(make_token(server.database, "writer", "write"))
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        query = http.get("/api/v1/counted?limit=many", headers=token)
        body = http.post(
            "/api/v1/forms",
            json={"requester": {"email": "no at sign"}, "subject": ""},
            headers=token,
        )
        broken = http.post(
            "/api/v1/forms",
            content=b"{not json",
            headers={**token, "content-type": "application/json"},
        )
    assert query.status_code == 422
    details = problem(query)
    assert details["type"] == "urn:maild:problem:invalid-request"
    assert [(e["field"], e["in"]) for e in details["errors"]] == [("limit", "query")]
    assert details["detail"].startswith("limit: ")
    assert body.status_code == 422
    fields = [(e["field"], e["in"]) for e in problem(body)["errors"]]
    assert fields == [("requester.email", "body"), ("subject", "body")]
    assert problem(body)["detail"].endswith("(and 1 more)")
    assert broken.status_code == 422
    assert problem(broken)["errors"][0]["in"] == "body"


def test_a_customer_token_knows_its_customer(app_server: Callable[..., AppServer]) -> None:
    """The principal carries the customer pattern routes filter tickets by."""
    server = app_server([router])
    token = make_token(server.database, "acme", "read", "*@acme.example")
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        response = http.get("/api/v1/counted?limit=3", headers=bearer(token))
    assert response.json() == {"limit": 3, "customer": "*@acme.example"}


def test_last_used_is_written_at_most_once_a_minute(
    app_server: Callable[..., AppServer],
) -> None:
    """The first request marks last_used_at; more within a minute write nothing; the first
    after the minute marks it again."""
    now = [1000.0]
    server = app_server([router], authenticator_clock=lambda: now[0])
    token = bearer(make_token(server.database, "portal", "read"))

    def last_used() -> Any:
        return server.database.run_read(
            lambda s: s.exec(select(ApiToken.last_used_at).where(ApiToken.name == "portal")).one()
        )

    with httpx2.Client(base_url=server.url, timeout=30) as http:
        assert http.get(WHOAMI, headers=token).status_code == 200
        first = wait_until(last_used, 10, "the first mark")
        for _ in range(5):
            assert http.get(WHOAMI, headers=token).status_code == 200
        server.call(_settle())
        assert last_used() == first
        now[0] += 61
        assert http.get(WHOAMI, headers=token).status_code == 200
        wait_until(lambda: last_used() != first, 10, "the second mark")


async def _settle() -> None:
    """Let tasks the last requests started (a mark, had there been one) run."""
    import asyncio

    for _ in range(20):
        await asyncio.sleep(0.01)


@router.get("/broken")
async def broken(who: Reader) -> None:
    raise RuntimeError("a bug")


def test_an_unexpected_error_is_a_500_problem_and_logged(
    app_server: Callable[..., AppServer],
) -> None:
    """A bug in a route answers 500 problem+json naming no internals beyond the error's
    type, and logs the traceback."""
    from structlog.testing import capture_logs

    server = app_server([router])
    token = bearer(make_token(server.database, "reader", "read"))
    with capture_logs() as logs, httpx2.Client(base_url=server.url, timeout=30) as http:
        response = http.get("/api/v1/broken", headers=token)
    assert response.status_code == 500
    assert problem(response)["detail"] == "internal error (RuntimeError); see maild's log"
    assert [e["path"] for e in logs if e["event"] == "HTTP request failed"] == ["/api/v1/broken"]


def test_the_failure_limit_forgets_after_its_window_and_groups_ipv6_by_64() -> None:
    """Ten failures within a minute limit an address until the oldest is a minute old;
    addresses in one IPv6 /64 count together; an IPv4-mapped address counts as IPv4; the
    table forgets the least recent addresses past its size."""
    now = [0.0]
    limiter = FailureLimiter(limit=10, window=60, max_clients=3, clock=lambda: now[0])
    for second in range(10):
        now[0] = float(second)
        limiter.failed("2001:db8::1" if second % 2 else "2001:db8::ffff")
    assert limiter.retry_after("2001:db8::42") == pytest.approx(60 - 9)
    assert limiter.retry_after("2001:db8:0:1::1") is None
    now[0] = 60.5
    assert limiter.retry_after("2001:db8::1") is None  # the failure at 0 s left the window
    limiter.failed("::ffff:192.0.2.1")
    assert limiter.retry_after("192.0.2.1") is None
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    for address in ("192.0.2.2", "192.0.2.3", "192.0.2.4"):
        limiter.failed(address)
    assert len(limiter._failures) == 3
