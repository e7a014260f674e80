"""Reading tickets over HTTP: the list (filters, cursor pages, a customer's scope), one
ticket, its attachments' bytes, and /rules/test, against the running daemon."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from maild.cli import main
from maild.enums import Priority, TicketStatus
from maild.store.models import Ticket, table_of
from maild.store.tickets import list_tickets, show_ticket
from tests.conftest import RunningMaild, mail, wait_until
from tests.http.conftest import (
    ALICE,
    BOB,
    CAROL,
    DANA,
    JO,
    SUPPORT,
    Api,
    new_ticket,
    problem,
)

TICKETS = "/api/v1/tickets"


def listed(api: Api, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    """Every ticket the list gives, following its cursors."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = api.http.get(TICKETS, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"tickets", "next_cursor"}
        found += body["tickets"]
        cursor = body["next_cursor"]
        if cursor is None:
            return found


def ids(views: list[dict[str, Any]]) -> list[int]:
    return [v["id"] for v in views]


def with_attachments(
    subject: str, frm: str = ALICE, *files: tuple[str, str, bytes]
) -> EmailMessage:
    message = mail(subject, frm=frm)
    for filename, content_type, data in files:
        maintype, _, subtype = content_type.partition("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


# The list.


def test_the_list_has_the_cli_shape_newest_first(desk: RunningMaild, api: Api) -> None:
    """GET /tickets answers `tickets list --status all --json`'s objects, most recently
    updated first, with next_cursor null when they all fit."""
    for n in range(3):
        new_ticket(desk, f"Ticket {n}")
    response = api.http.get(TICKETS, headers=api.token("read"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    expected = desk.service.database.run_read(lambda s: list_tickets(s, status="all"))
    assert body == {"tickets": expected, "next_cursor": None}
    assert [t["subject"] for t in body["tickets"]] == ["Ticket 2", "Ticket 1", "Ticket 0"]


def test_cursor_pages_cover_every_ticket_once_in_order(desk: RunningMaild, api: Api) -> None:
    """limit=2 over seven tickets: four pages, each ticket once, newest first, the last
    page's next_cursor null; tickets updated in one instant are ordered by id."""
    made = [new_ticket(desk, f"Paged {n}") for n in range(7)]
    same = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)  # three tickets with one updated_at
    moved = update(table_of(Ticket)).where(table_of(Ticket).c.id.in_(made[1:4]))
    desk.service.database.run_write(lambda s: s.execute(moved.values(updated_at=same)))
    headers = api.token("read")
    pages = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = api.http.get(TICKETS, params=params, headers=headers).json()
        pages.append(ids(body["tickets"]))
        cursor = body["next_cursor"]
        if cursor is None:
            break
    expected = [made[6], made[5], made[4], made[0], made[3], made[2], made[1]]
    assert pages == [expected[0:2], expected[2:4], expected[4:6], expected[6:]]


def test_filters_combine_as_the_cli_s(desk: RunningMaild, api: Api) -> None:
    """status, type, priority, application, requester, participant, assignee, unassigned, q
    and updated_since each select what they name."""
    first = new_ticket(desk, "Staging is slow", Cc=CAROL)
    second = new_ticket(desk, "Invoice question about zebras", frm=BOB)
    desk.change(first, assignee=JO, application="shop-prod")
    desk.change(second, status=TicketStatus.SOLVED)
    headers = api.token("read")

    def find(**params: Any) -> list[int]:
        return ids(listed(api, headers, **params))

    assert find() == [second, first]
    assert find(status="open") == [first]
    assert find(status="closed") == [second]
    assert find(status="solved") == [second]
    assert find(type="question", priority="normal") == [second, first]
    assert find(type="incident") == []
    assert find(application="shop-prod") == [first]
    assert find(requester="BOB@customer.example") == [second]
    assert find(participant=CAROL) == [first]
    assert find(assignee=JO) == [first]
    assert find(unassigned="true") == [second]
    assert find(q="zebras invoice") == [second]
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert find(updated_since=later.isoformat()) == []
    assert find(updated_since="2000-01-01T00:00:00") == [second, first]  # naive: UTC


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "201"}, "limit"),
        ({"status": "lost"}, "status"),
        ({"type": "bug"}, "type"),
        ({"priority": "asap"}, "priority"),
        ({"updated_since": "yesterday"}, "updated_since"),
        ({"updated_since": "0001-01-01T00:00:00+01:00"}, "updated_since"),
        ({"updated_since": "9999-12-31T23:59:59-10:00"}, "updated_since"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"2026-01-01T00:00:00|7").decode()}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"0001-01-01T00:00:00+01:00|7").decode()}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|0").decode()}, "cursor"),
        ({"q": " ".join(f"w{n}" for n in range(33))}, "q"),
        ({"assignee": JO, "unassigned": "true"}, "unassigned"),
        ({"application": "a\x00b"}, "application"),
        ({"requester": "a\x00@b.c"}, "requester"),
        ({"participant": "\x00"}, "participant"),
        ({"assignee": "\x00"}, "assignee"),
        ({"q": "word\x00"}, "q"),
    ],
)
def test_bad_query_parameters_are_422_naming_them(
    api: Api, params: dict[str, str], field: str
) -> None:
    """Each bad query parameter: 422, a problem whose errors name it, in the query."""
    response = api.http.get(TICKETS, params=params, headers=api.token("read"))
    assert response.status_code == 422
    body = problem(response)
    assert {"field": field, "in": "query"} == {k: body["errors"][0][k] for k in ("field", "in")}


def test_a_customer_token_lists_only_its_customer_s_tickets(desk: RunningMaild, api: Api) -> None:
    """A token for *@customer.example lists the tickets where such an address takes part
    (requester or CC), not Dana's; page by page too, so the scope is in the query, not
    a filter on a page already read."""
    own = new_ticket(desk, "Ours")
    dana_cc = new_ticket(desk, "Dana's, Bob copied", frm=DANA, Cc=BOB)
    for n in range(4):
        new_ticket(desk, f"Dana's own {n}", frm=DANA)
    scoped = api.token("read", "*@customer.example")
    assert ids(listed(api, scoped)) == [dana_cc, own]
    first = api.http.get(TICKETS, params={"limit": 1}, headers=scoped).json()
    assert ids(first["tickets"]) == [dana_cc]
    assert ids(listed(api, scoped, limit=1)) == [dana_cc, own]
    assert ids(listed(api, api.token("read", ALICE))) == [own]
    assert ids(listed(api, api.token("read", "nobody@customer.example"))) == []


def test_internal_notes_are_hidden_from_customer_tokens(desk: RunningMaild, api: Api) -> None:
    """A customer's token does not see an internal note, its attachment, or find the ticket
    by the note's words or its writer; a desk token does."""
    tid = new_ticket(desk, "Slow site")
    note = {
        "author": {"email": JO, "name": "Jo"},
        "body": "Customer is on the legacy plan: platypus.",
        "internal": True,
        "attachments": [
            {"filename": "notes.txt", "content_base64": base64.b64encode(b"x").decode()}
        ],
    }
    desk_token = api.token("write")
    assert (
        api.http.post(f"{TICKETS}/{tid}/messages", json=note, headers=desk_token).status_code == 201
    )
    scoped = api.token("read", ALICE)
    shown = api.http.get(f"{TICKETS}/{tid}", headers=scoped).json()
    assert [m["kind"] for m in shown["messages"]] == ["human", "ack"]
    assert shown["message_count"] == 2
    assert listed(api, scoped)[0]["message_count"] == 2
    assert api.http.get(f"{TICKETS}/{tid}/attachments/1", headers=scoped).status_code == 404
    assert ids(listed(api, scoped, q="platypus")) == []
    assert ids(listed(api, scoped, participant=JO)) == []
    everything = api.http.get(f"{TICKETS}/{tid}", headers=desk_token).json()
    assert [m["kind"] for m in everything["messages"]] == ["human", "ack", "note"]
    assert ids(listed(api, desk_token, q="platypus")) == [tid]
    assert api.http.get(f"{TICKETS}/{tid}/attachments/1", headers=desk_token).content == b"x"


# One ticket.


def test_a_ticket_is_shown_as_tickets_show_json(desk: RunningMaild, api: Api) -> None:
    """GET /tickets/{id}: messages, participants, events, pages and acknowledgements, the
    very object `tickets show --json` prints."""
    tid = new_ticket(desk, "Show me", Cc=BOB)
    desk.change(tid, priority=Priority.HIGH)
    wait_until(lambda: desk.ticket(tid)["acknowledgements"][0]["status"] == "sent")
    response = api.http.get(f"{TICKETS}/{tid}", headers=api.token("read"))
    assert response.status_code == 200
    body = response.json()
    assert body == desk.service.database.run_read(lambda s: show_ticket(s, tid))
    assert {"messages", "participants", "events", "pages", "acknowledgements"} <= body.keys()
    assert [e["field"] for e in body["events"]] == ["priority"]


def test_unknown_and_other_customers_tickets_are_404_alike(desk: RunningMaild, api: Api) -> None:
    """No ticket 999 and Dana's ticket for Alice's token: the same 404 problem, so a token
    cannot learn which tickets exist; ids out of range are 422."""
    dana = new_ticket(desk, "Dana's", frm=DANA)
    scoped = api.token("read", ALICE)
    for path in (f"{TICKETS}/{dana}", f"{TICKETS}/999", f"{TICKETS}/{dana}/attachments/1"):
        response = api.http.get(path, headers=scoped)
        assert response.status_code == 404, path
        assert problem(response)["type"] == "about:blank"
    assert problem(api.http.get(f"{TICKETS}/{dana}", headers=scoped))["detail"] == (
        f"no ticket {dana}"
    )
    for bad in ("0", "-1", str(2**31), str(2**63), "abc"):
        assert api.http.get(f"{TICKETS}/{bad}", headers=scoped).status_code == 422


# Attachments.


def test_an_attachment_s_exact_bytes_with_a_safe_name_and_type(
    desk: RunningMaild, api: Api
) -> None:
    """Each attachment comes back byte for byte, as an attachment download, never sniffed;
    HTML and SVG are served as plain bytes; names keep no folders, quotes or line breaks,
    and non-ASCII names travel in filename*."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    files = [
        ("report.pdf", "application/pdf", b"%PDF-1.4 \x00\xff"),
        ("page.html", "text/html", b"<script>alert(1)</script>"),
        ('r\u00e9sum\u00e9 "final".png', "image/png", png),
        ("logo.svg", "image/svg+xml", b"<svg onload=alert(1)></svg>"),
    ]
    message = with_attachments("Files", ALICE, *files)
    desk.send(message, [SUPPORT], sender=ALICE)
    desk.settle()
    (ticket,) = desk.tickets()
    headers = api.token("read", ALICE)
    got = [
        api.http.get(f"{TICKETS}/{ticket['id']}/attachments/{n}", headers=headers)
        for n in (1, 2, 3, 4)
    ]
    assert [r.status_code for r in got] == [200] * 4
    assert [r.content for r in got] == [data for _, _, data in files]
    assert [r.headers["content-type"] for r in got] == [
        "application/pdf",
        "application/octet-stream",
        "image/png",
        "application/octet-stream",
    ]
    for response in got:
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-disposition"].startswith("attachment; ")
        assert "sandbox" in response.headers["content-security-policy"]
    assert got[0].headers["content-disposition"] == 'attachment; filename="report.pdf"'
    assert got[2].headers["content-disposition"] == (
        'attachment; filename="r_sum_ _final_.png"; '
        "filename*=UTF-8''r%C3%A9sum%C3%A9%20_final_.png"
    )
    missing = api.http.get(f"{TICKETS}/{ticket['id']}/attachments/5", headers=headers)
    assert missing.status_code == 404
    assert problem(missing)["detail"] == f"ticket {ticket['id']} has no attachment 5"


@pytest.mark.parametrize(
    ("stored", "header"),
    [
        ("report.pdf", 'attachment; filename="report.pdf"'),
        ("../../etc/passwd", 'attachment; filename="passwd"'),
        ("C:\\temp\\x.exe", 'attachment; filename="x.exe"'),
        ('a"b\\c.txt', 'attachment; filename="c.txt"'),
        ("evil\r\nSet-Cookie: x=1.txt", 'attachment; filename="evilSet-Cookie: x=1.txt"'),
        ("100%.txt", "attachment; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
        (".htaccess", 'attachment; filename="htaccess"'),
        ("", 'attachment; filename="attachment-3"'),
        (
            "\u65e5\u672c.txt",
            "attachment; filename=\"__.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt",
        ),
    ],
)
def test_content_disposition_never_carries_a_path_a_quote_or_a_line_break(
    stored: str, header: str
) -> None:
    """The download's name as the header gives it, whatever the mail called the file."""
    from maild.http.tickets import content_disposition

    assert content_disposition(stored, 3) == header


# The routing table.


def test_rules_test_answers_as_the_cli(desk: RunningMaild, api: Api, tmp_path: Path) -> None:
    """GET /rules/test gives `rules test --json`'s object, accepted or refused (200 both);
    a customer's token gets 403; no address is 422."""
    config = tmp_path / "config.toml"
    headers = api.token("read")
    for address, sender in (
        ("sysops@altis-dxp.com", "ops@customer.example"),
        ("x@elsewhere.example", ""),
    ):
        response = api.http.get(
            "/api/v1/rules/test",
            params={"address": address, "from": sender, "subject": "Down"},
            headers=headers,
        )
        assert response.status_code == 200
        cli = CliRunner().invoke(
            main,
            [
                "rules",
                "test",
                address,
                "--from",
                sender,
                "--subject",
                "Down",
                "--json",
                "--config",
                str(config),
            ],
        )
        assert response.json() == json.loads(cli.stdout)
    scoped = api.http.get(
        "/api/v1/rules/test", params={"address": SUPPORT}, headers=api.token("read", ALICE)
    )
    assert scoped.status_code == 403
    missing = api.http.get("/api/v1/rules/test", headers=headers)
    assert problem(missing)["errors"][0]["field"] == "address"
    bad = api.http.get(
        "/api/v1/rules/test", params={"address": SUPPORT, "header": "nonsense"}, headers=headers
    )
    assert problem(bad)["errors"][0] == {
        "field": "header.0",
        "in": "query",
        "message": "write NAME=VALUE, for example X-Priority=1",
    }


# The front door on every route.


ROUTES = [
    ("GET", TICKETS, None),
    ("GET", f"{TICKETS}/1", None),
    ("GET", f"{TICKETS}/1/attachments/1", None),
    ("GET", "/api/v1/rules/test?address=support@altis-dxp.com", None),
    ("POST", TICKETS, {}),
    ("POST", f"{TICKETS}/1/messages", {}),
    ("PATCH", f"{TICKETS}/1", {}),
]


def test_every_route_wants_a_token_and_writes_want_write(api: Api) -> None:
    """Without a token every route is 401; a read token on a write route is 403."""
    read = api.token("read")
    for method, path, body in ROUTES:
        response = api.http.request(method, path, json=body)
        assert response.status_code == 401, (method, path)
        assert problem(response)["type"] == "urn:maild:problem:missing-token"
        if method != "GET":
            refused = api.http.request(method, path, json=body, headers=read)
            assert refused.status_code == 403, (method, path)
            assert problem(refused)["type"] == "urn:maild:problem:insufficient-scope"


def test_the_openapi_document_lists_the_ticket_routes(api: Api) -> None:
    """/api/v1/openapi.json has every route of the API, with its problems."""
    document = api.http.get("/api/v1/openapi.json").json()
    paths = document["paths"]
    assert set(paths[TICKETS]) == {"get", "post"}
    assert set(paths[f"{TICKETS}/{{ticket_id}}"]) == {"get", "patch"}
    assert f"{TICKETS}/{{ticket_id}}/messages" in paths
    assert f"{TICKETS}/{{ticket_id}}/attachments/{{number}}" in paths
    assert "/api/v1/rules/test" in paths
    assert "404" in paths[f"{TICKETS}/{{ticket_id}}"]["get"]["responses"]
