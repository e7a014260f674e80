"""Hypothesis against the running daemon's API: JSON bodies, raw bodies, query strings and
path segments of every ticket route never get a 500, and the daemon keeps answering."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from maild.http.tickets import _SURROGATE
from tests.conftest import RunningMaild
from tests.http.conftest import ALICE, JO, SUPPORT, Api, new_ticket

TICKETS = "/api/v1/tickets"
JSON = {"content-type": "application/json"}  # bodies sent as json.dumps writes them
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text as JSON can carry it: NUL, controls and lone surrogates (as \udxxx escapes) too.
raw_text = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(
    ["\x00", "a\x00b", "\ud800", "x\udfffy", "\r\n", "\u2028"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | raw_text
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
addresses = st.sampled_from(
    [ALICE, ALICE, "erin@customer.example", JO, JO, SUPPORT, "x@y", "", "a@b@c.d", "Jo <jo@x.com>"]
) | st.text(max_size=30)
base64ish = st.sampled_from(["", "aGk=", "aGk=", "aGk", "!!", "aGk=\n", "=" * 8]) | st.text(
    max_size=20
)


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(value, value, value, anything)


@st.composite
def mutated(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A body whose every member is plausible, then up to two members replaced by anything,
    removed, or added: most reach the code behind validation."""
    body = {name: draw(strategy) for name, strategy in fields.items()}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([*fields, "extra"]))
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(anything)
    return body


# Printable text without controls: what a form's fields mostly hold.
words = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"]),
    min_size=1,
    max_size=80,
)
files = st.lists(
    st.fixed_dictionaries(
        {
            "filename": maybe(st.text(max_size=30)),
            "content_type": maybe(
                st.sampled_from(["text/plain", "image/png", "text/html", "multipart/mixed", "x"])
            ),
            "content_base64": maybe(base64ish),
        },
    ),
    max_size=3,
)
good = st.sampled_from([ALICE, "erin@customer.example", JO, "dana@other.example"])
people = st.fixed_dictionaries(
    {"email": st.one_of(good, good, good, addresses)}, optional={"name": maybe(words)}
)
ticket_forms = mutated(
    {
        "requester": people,
        "type": st.sampled_from(["question", "question", "incident", "problem", "Bug"]),
        "priority": st.sampled_from(["normal", "normal", "urgent", "low", "0"]),
        "application": words | st.text(max_size=30),
        "subject": words | st.text(max_size=60),
        "description": words | st.text(max_size=200),
        "cc": st.lists(good | addresses, max_size=3),
        "attachments": files,
    }
)
message_forms = mutated(
    {
        "author": people,
        "body": words | st.text(max_size=200),
        "cc": st.lists(addresses, max_size=3),
        "internal": st.booleans(),
        "attachments": files,
    }
)
changes = mutated(
    {
        "by": st.just(JO) | addresses,
        "status": st.sampled_from(["open", "pending", "solved", "closed", "gone"]),
        "priority": st.sampled_from(["low", "urgent", "x"]),
        "type": st.sampled_from(["task", "incident", "x"]),
        "application": words | st.text(max_size=30),
        "assignee": addresses | st.none(),
    }
)
query_values = (
    st.text(max_size=40)
    | raw_text.filter(lambda t: not _SURROGATE.search(t))  # a URL carries UTF-8 only
    | st.datetimes(timezones=st.timezones() | st.none()).map(lambda d: d.isoformat())
    | st.builds(
        lambda d, n: base64.urlsafe_b64encode(f"{d.isoformat()}|{n}".encode()).decode(),
        st.datetimes(timezones=st.timezones() | st.none()),
        st.integers(-(2**40), 2**40),
    )
) | st.sampled_from(
    ["0", "1", "201", "-5", "true", "open", "2026-01-01T00:00:00+00:00", "incident", ALICE]
)
queries = st.dictionaries(
    st.sampled_from(
        [
            "status",
            "type",
            "priority",
            "application",
            "requester",
            "participant",
            "assignee",
            "unassigned",
            "q",
            "updated_since",
            "cursor",
            "limit",
            "other",
        ]
    ),
    query_values,
    max_size=5,
)
segments = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="/?#"), min_size=1, max_size=25
) | st.integers(min_value=-(2**70), max_value=2**70).map(str)


@pytest.fixture
def fuzzed(desk: RunningMaild) -> Iterator[tuple[Api, list[dict[str, str]], int]]:
    """The daemon with a ticket, a desk token and a customer's token."""
    with Api(desk) as api:
        tid = new_ticket(desk, "Fuzz target")
        yield api, [api.token("write"), api.token("write", "*@customer.example")], tid
        assert api.http.get("/healthz").status_code == 200


def checked(response: httpx2.Response) -> None:
    """Never a server error; every error an RFC 9457 problem."""
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json", response.text
        assert response.json()["status"] == response.status_code


@FUZZ
@given(
    body=ticket_forms,
    which=st.integers(0, 1),
    key=st.none() | st.text("abc", min_size=1, max_size=2),
)
def test_new_ticket_bodies_never_get_a_500(
    fuzzed: tuple[Api, list[dict[str, str]], int], body: dict[str, Any], which: int, key: str | None
) -> None:
    """Any JSON to POST /tickets, with or without an Idempotency-Key: a 201 or a 4xx problem."""
    api, tokens, _ = fuzzed
    headers = tokens[which] | ({"Idempotency-Key": key} if key else {})
    checked(api.http.post(TICKETS, content=json.dumps(body), headers=headers | JSON))


@FUZZ
@given(body=message_forms, which=st.integers(0, 1))
def test_message_bodies_never_get_a_500(
    fuzzed: tuple[Api, list[dict[str, str]], int], body: dict[str, Any], which: int
) -> None:
    """Any JSON to POST /tickets/{id}/messages: a 201 or a 4xx problem."""
    api, tokens, tid = fuzzed
    checked(
        api.http.post(
            f"{TICKETS}/{tid}/messages", content=json.dumps(body), headers=tokens[which] | JSON
        )
    )


@FUZZ
@given(body=changes)
def test_change_bodies_never_get_a_500(
    fuzzed: tuple[Api, list[dict[str, str]], int], body: dict[str, Any]
) -> None:
    """Any JSON to PATCH /tickets/{id}: a 200 or a 4xx problem."""
    api, tokens, tid = fuzzed
    checked(api.http.patch(f"{TICKETS}/{tid}", content=json.dumps(body), headers=tokens[0] | JSON))


@FUZZ
@given(raw=st.binary(max_size=200) | anything.map(lambda v: json.dumps(v).encode()))
def test_raw_bodies_never_get_a_500(
    fuzzed: tuple[Api, list[dict[str, str]], int], raw: bytes
) -> None:
    """Bytes that may not be JSON at all, to each write route: a 4xx problem (or success)."""
    api, tokens, tid = fuzzed
    headers = tokens[0] | {"content-type": "application/json"}
    for method, path in (
        ("POST", TICKETS),
        ("POST", f"{TICKETS}/{tid}/messages"),
        ("PATCH", f"{TICKETS}/{tid}"),
    ):
        checked(api.http.request(method, path, content=raw, headers=headers))


@FUZZ
@given(params=queries, which=st.integers(0, 1))
def test_list_queries_never_get_a_500(
    fuzzed: tuple[Api, list[dict[str, str]], int], params: dict[str, str], which: int
) -> None:
    """Any query string to GET /tickets: a page or a 4xx problem."""
    api, tokens, _ = fuzzed
    response = api.http.get(TICKETS, params=params, headers=tokens[which])
    checked(response)
    if response.status_code == 200:
        assert set(response.json()) == {"tickets", "next_cursor"}


@FUZZ
@given(ticket=segments, number=segments, address=st.text(max_size=40))
def test_path_segments_never_get_a_500(
    fuzzed: tuple[Api, list[dict[str, str]], int], ticket: str, number: str, address: str
) -> None:
    """Any ticket id or attachment number in the path, any address to /rules/test."""
    api, tokens, _ = fuzzed
    ticket, number = quote(ticket, safe=""), quote(number, safe="")
    for path in (f"{TICKETS}/{ticket}", f"{TICKETS}/{ticket}/attachments/{number}"):
        checked(api.http.get(path, headers=tokens[1]))
    checked(api.http.get("/api/v1/rules/test", params={"address": address}, headers=tokens[0]))
