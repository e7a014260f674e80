"""Writing over HTTP: opening tickets (filed as mail, acknowledged, paging), replies and
notes, a customer's reply from the dashboard, changes, and Idempotency-Key, against the
running daemon with a real smarthost (tests/sink.py) and Events API (tests/fake_events.py)."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme
from sqlmodel import select

from maild.config import load_settings
from maild.enums import TicketStatus
from maild.store.models import Inbound, Ticket
from tests.conftest import RunningMaild, wait_until
from tests.fake_events import FakeEvents
from tests.http.conftest import (
    ALICE,
    BOB,
    CAROL,
    DANA,
    JO,
    SUPPORT,
    SYSOPS,
    Api,
    bearer,
    http_url,
    make_token,
    new_ticket,
    problem,
)
from tests.outbound.test_correspondence import drain
from tests.sink import SmtpSink

TICKETS = "/api/v1/tickets"


def form(**changes: Any) -> dict[str, Any]:
    """The dashboard's new-ticket form: a normal question from Dana's colleague Erin."""
    body: dict[str, Any] = {
        "requester": {"email": "erin@customer.example", "name": "Erin"},
        "type": "question",
        "priority": "normal",
        "application": "shop-staging",
        "subject": "How do I add a domain?",
        "description": "We bought shop.example and want it on staging.",
        "cc": [],
        "attachments": [],
    }
    body.update(changes)
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def inbound_rows(maild: RunningMaild) -> list[Inbound]:
    return list(maild.service.database.run_read(lambda s: s.exec(select(Inbound)).all()))


# Opening a ticket.


def test_a_new_ticket_is_filed_as_mail_and_acknowledged(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """201 with the ticket as GET shows it (Location too): requester, type, priority, the
    application asked for, the route that makes them; stored as an inbound delivery of
    protocol api (its message kept, marked X-Maild-Via) and acknowledged like mail."""
    headers = api.token("write")
    response = api.http.post(TICKETS, json=form(), headers=headers)
    assert response.status_code == 201, response.text
    ticket = response.json()
    assert response.headers["location"] == f"{TICKETS}/{ticket['id']}"
    assert (ticket["type"], ticket["priority"], ticket["status"], ticket["rule"]) == (
        "question",
        "normal",
        "open",
        "support",
    )
    assert ticket["application"] == "shop-staging"
    assert ticket["requester"] == "erin@customer.example"
    assert ticket["participants"] == [
        {"email": "erin@customer.example", "name": "Erin", "role": "requester"}
    ]
    (message,) = [m for m in ticket["messages"] if m["kind"] == "human"]
    assert message["from"] == {"name": "Erin", "email": "erin@customer.example"}
    assert message["text"] == "We bought shop.example and want it on staging."
    assert message["message_id"].startswith("<api.")
    (row,) = inbound_rows(desk)
    assert (row.protocol, row.status, row.rcpt_tos, row.mail_from) == (
        "api",
        "processed",
        [SUPPORT],
        "erin@customer.example",
    )
    assert b"X-Maild-Via: api; token=t1-write" in row.raw
    (ack,) = drain(desk, sink, 1)
    assert ack.rcpt_tos == ["erin@customer.example"]
    assert ack.header("Subject") == f"[#{ticket['id']}] How do I add a domain?"
    shown = api.http.get(f"{TICKETS}/{ticket['id']}", headers=headers).json()
    assert {k: v for k, v in shown.items() if k != "acknowledgements"} == {
        k: v for k, v in ticket.items() if k != "acknowledgements"
    }


def test_an_urgent_incident_pages_once_with_the_requester_as_sender(
    desk: RunningMaild, api: Api, events: FakeEvents
) -> None:
    """An incident at urgent goes to sysops@: the Events API stand-in gets exactly one
    trigger, naming the requester and the route, as sysops@ mail would."""
    response = api.http.post(
        TICKETS,
        json=form(
            type="incident",
            priority="urgent",
            subject="Checkout returns 500",
            cc=[BOB],
            requester={"email": "dana@customer.example", "name": "Dana"},
        ),
        headers=api.token("write"),
    )
    assert response.status_code == 201, response.text
    ticket = response.json()
    assert (ticket["rule"], ticket["page"]["status"]) == ("sysops", "pending")
    (event,) = events.wait_for(1)
    details = event["payload"]["custom_details"]
    assert (details["ticket"], details["route"], details["recipients"]) == (
        ticket["id"],
        "sysops",
        [SYSOPS],
    )
    assert "dana@customer.example" in details["sender"]
    assert "Checkout returns 500" in event["payload"]["summary"]
    wait_until(lambda: desk.ticket(ticket["id"])["pages"][0]["status"] == "sent")
    time.sleep(0.5)
    assert len(events.events) == 1
    people = {p["email"] for p in desk.ticket(ticket["id"])["participants"]}
    assert people == {"dana@customer.example", BOB}


def test_the_allow_list_holds_for_the_api_as_for_mail(
    desk_config: Callable[..., Path], events: FakeEvents, quiet_logging: None
) -> None:
    """With [escalation] allowed_senders naming only ops@, an urgent incident opened for
    Dana is filed and its page withheld, as her mail to sysops@ would be."""
    config = desk_config('[escalation]\nallowed_senders = ["ops@customer.example"]\n')
    with RunningMaild(load_settings(config)) as maild, Api(maild) as api:
        body = form(type="incident", priority="urgent", requester={"email": DANA})
        ticket = api.http.post(TICKETS, json=body, headers=api.token()).json()
    assert ticket["page"]["status"] == "withheld"
    assert "allowed_senders" in ticket["page"]["reason"]
    assert events.events == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"type": "problem"}, "type"),
        ({"type": "incident", "priority": "low"}, "priority"),
        ({"type": "bug"}, "type"),
        ({"requester": {"email": "not an address"}}, "requester.email"),
        ({"requester": {"email": "SYSOPS+x@altis-dxp.com"}}, "requester.email"),
        ({"requester": {"email": ALICE, "name": "A\r\nBcc: x@y.z"}}, "requester.name"),
        ({"subject": ""}, "subject"),
        ({"subject": "two\nlines"}, "subject"),
        ({"description": "   "}, "description"),
        ({"description": "a\x00b"}, "description"),
        ({"description": "a\ud800b"}, "description"),
        ({"requester": {"email": ALICE, "name": "\udfff"}}, "requester.name"),
        ({"attachments": [{"filename": "\x00", "content_base64": ""}]}, "attachments.0.filename"),
        ({"cc": ["support@altis-dxp.com"]}, "cc.0"),
        ({"cc": [ALICE, "nope"]}, "cc.1"),
        (
            {"attachments": [{"filename": "a.txt", "content_base64": "!!!"}]},
            "attachments.0.content_base64",
        ),
        (
            {"attachments": [{"filename": "a", "content_type": "nonsense", "content_base64": ""}]},
            "attachments.0.content_type",
        ),
        ({"tags": ["vip"]}, "tags"),
    ],
)
def test_a_bad_form_is_422_naming_the_field(api: Api, changes: dict[str, Any], field: str) -> None:
    """Each mistake in the form: 422, the problem's errors naming the field, nothing filed."""
    headers = api.token() | {"content-type": "application/json"}
    # json.dumps escapes lone surrogates as JSON can (httpx's json= cannot send them)
    response = api.http.post(TICKETS, content=json.dumps(form(**changes)), headers=headers)
    assert response.status_code == 422, response.text
    body = problem(response)
    assert body["errors"][0]["field"] == field
    assert body["errors"][0]["in"] == "body"
    assert inbound_rows(api.maild) == []


def test_no_route_for_the_type_or_priority_says_which_exist(api: Api) -> None:
    """The problem names what the routes do make."""
    body = problem(
        api.http.post(TICKETS, json=form(type="incident", priority="low"), headers=api.token())
    )
    assert body["type"] == "urn:maild:problem:no-route"
    assert body["detail"] == (
        "priority: no route of the desk makes incident tickets at priority low; it makes them "
        "at normal (hosting@altis-dxp.com, hosting@humanmade.com); urgent "
        "(sysops@altis-dxp.com, sysops@humanmade.com)"
    )


def test_attachments_travel_exactly_and_are_capped(
    desk_config: Callable[..., Path], quiet_logging: None
) -> None:
    """A file sent in base64 (plain or wrapped in lines) comes back byte for byte; more
    than [smtp] max_message_size in all is 422 naming attachments."""
    data = bytes(range(256)) * 40
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    config = desk_config()
    config.write_text(
        config.read_text().replace("[smtp]\n", "[smtp]\nmax_message_size = 30000\n", 1)
    )
    with RunningMaild(load_settings(config)) as maild, Api(maild) as api:
        headers = api.token()
        files = [
            {"filename": "dump.bin", "content_base64": b64(data)},
            {
                "filename": "../r\u00e9sum\u00e9.txt",
                "content_type": "text/plain; charset=utf-8",
                "content_base64": wrapped,
            },
        ]
        posted = api.http.post(TICKETS, json=form(attachments=files), headers=headers)
        assert posted.status_code == 201, posted.text
        ticket = posted.json()
        shown = [a for m in ticket["messages"] for a in m["attachments"]]
        got = [
            api.http.get(f"{TICKETS}/{ticket['id']}/attachments/{n}", headers=headers)
            for n in (1, 2)
        ]
        too_big = api.http.post(
            TICKETS,
            json=form(attachments=[{"filename": "big", "content_base64": b64(b"x" * 30001)}]),
            headers=headers,
        )
    assert [(a["filename"], a["content_type"], a["size"]) for a in shown] == [
        ("dump.bin", "application/octet-stream", len(data)),
        ("r\u00e9sum\u00e9.txt", "text/plain", len(data)),
    ]
    assert [r.content for r in got] == [data, data]
    assert problem(too_big)["errors"][0]["field"] == "attachments"


def test_a_customer_token_opens_tickets_only_for_its_customer(api: Api) -> None:
    """A token for *@customer.example opens Erin's ticket and sees it; Dana's is 403,
    naming requester.email."""
    scoped = api.token("write", "*@customer.example")
    ok = api.http.post(TICKETS, json=form(), headers=scoped)
    assert ok.status_code == 201
    refused = api.http.post(TICKETS, json=form(requester={"email": DANA}), headers=scoped)
    assert refused.status_code == 403
    assert problem(refused)["errors"][0]["field"] == "requester.email"


# Replies and notes.


def test_an_agent_reply_is_mailed_as_tickets_reply_mails_it(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """POST messages as an agent: one mail to the requester and the CC, From the desk in
    the agent's name, threaded; 201 with `tickets reply --json`'s object; the status stays."""
    tid = new_ticket(desk, "Staging is slow", Cc=BOB)
    drain(desk, sink, 1)
    body = {
        "author": {"email": JO, "name": "Jo Bloggs"},
        "body": "We purged the cache.",
        "cc": [CAROL],
        "attachments": [
            {"filename": "log.txt", "content_type": "text/plain", "content_base64": b64(b"ok\n")}
        ],
    }
    response = api.http.post(f"{TICKETS}/{tid}/messages", json=body, headers=api.token())
    assert response.status_code == 201, response.text
    result = response.json()
    assert response.headers["location"] == f"{TICKETS}/{tid}"
    assert (result["ticket"], result["kind"], result["status"]) == (tid, "agent", "pending")
    assert result["added_participants"] == [CAROL]
    assert [r["email"] for r in result["recipients"]] == [ALICE, BOB, CAROL]
    assert [m["kind"] for m in result["mail"]] == ["agent"]
    (sent,) = drain(desk, sink, 1)
    assert sent.rcpt_tos == [ALICE, BOB, CAROL]
    assert sent.header("From") == f"Jo Bloggs via Altis Support <{SUPPORT}>"
    assert sent.header("Subject") == f"[#{tid}] Staging is slow"
    assert sent.body.replace("\r\n", "\n").startswith("We purged the cache.\n")
    view = desk.ticket(tid)
    assert view["messages"][-1]["kind"] == "agent"
    assert view["messages"][-1]["attachments"][0]["filename"] == "log.txt"
    assert view["status"] == "open"


def test_an_internal_note_is_stored_and_never_mailed(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """internal: a note (direction internal), nothing mailed; a non-agent cannot write one
    (422), a customer's token neither (403)."""
    tid = new_ticket(desk, "Slow")
    drain(desk, sink, 1)
    note = {"author": {"email": JO}, "body": "Check billing.", "internal": True}
    response = api.http.post(f"{TICKETS}/{tid}/messages", json=note, headers=api.token())
    assert response.status_code == 201
    assert (response.json()["kind"], response.json()["mail"]) == ("note", [])
    time.sleep(1.5)  # the mailer polls every second
    assert sink.received == []
    assert desk.ticket(tid)["messages"][-1]["direction"] == "internal"
    by_customer = dict(note, author={"email": ALICE})
    refused = api.http.post(f"{TICKETS}/{tid}/messages", json=by_customer, headers=api.token())
    assert (refused.status_code, problem(refused)["errors"][0]["field"]) == (422, "internal")
    scoped = api.token("write", ALICE)
    refused = api.http.post(f"{TICKETS}/{tid}/messages", json=by_customer, headers=scoped)
    assert (refused.status_code, problem(refused)["errors"][0]["field"]) == (403, "internal")


def test_a_customer_reply_reopens_and_is_copied_to_the_others(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """A customer's reply through the dashboard is filed as a mail reply: it threads into
    the ticket, reopens it, makes its CC a participant, and is copied to Bob and the CC."""
    tid = new_ticket(desk, "Staging is slow", Cc=BOB)
    drain(desk, sink, 1)
    desk.change(tid, status=TicketStatus.SOLVED)
    drain(desk, sink, 1)  # the solved notice
    reply = {
        "author": {"email": ALICE, "name": "Alice"},
        "body": "It is slow again.",
        "cc": [CAROL],
    }
    response = api.http.post(
        f"{TICKETS}/{tid}/messages", json=reply, headers=api.token("write", ALICE)
    )
    assert response.status_code == 201, response.text
    result = response.json()
    assert (result["ticket"], result["kind"], result["added_participants"]) == (
        tid,
        "human",
        [CAROL],
    )
    assert [m["kind"] for m in result["mail"]] == ["copy"]
    assert [r["email"] for r in result["mail"][0]["recipients"]] == [BOB, CAROL]
    (copy,) = drain(desk, sink, 1)
    assert copy.rcpt_tos == [BOB, CAROL]
    assert "It is slow again." in copy.body
    view = desk.ticket(tid)
    assert view["status"] == "open"
    last = [m for m in view["messages"] if m["direction"] == "inbound"][-1]
    assert (last["kind"], last["direction"], last["text"]) == (
        "human",
        "inbound",
        "It is slow again.",
    )
    (row,) = [r for r in inbound_rows(desk) if r.protocol == "api"]
    assert row.ticket_id == tid


def test_customer_tokens_post_only_as_their_customer_on_their_tickets(
    desk: RunningMaild, api: Api
) -> None:
    """Alice's token: posting as Bob or as an agent is 403 naming author.email; on Dana's
    ticket it is 404, as if there were none."""
    own = new_ticket(desk, "Ours")
    dana = new_ticket(desk, "Dana's", frm=DANA)
    scoped = api.token("write", ALICE)
    for author in (BOB, JO):
        body = {"author": {"email": author}, "body": "Hi"}
        refused = api.http.post(f"{TICKETS}/{own}/messages", json=body, headers=scoped)
        assert (refused.status_code, problem(refused)["errors"][0]["field"]) == (
            403,
            "author.email",
        )
    ours = {"author": {"email": SUPPORT}, "body": "Hi"}
    refused = api.http.post(f"{TICKETS}/{own}/messages", json=ours, headers=api.token())
    assert (refused.status_code, problem(refused)["errors"][0]["field"]) == (422, "author.email")
    hidden = api.http.post(
        f"{TICKETS}/{dana}/messages",
        json={"author": {"email": ALICE}, "body": "Hi"},
        headers=scoped,
    )
    assert hidden.status_code == 404
    assert len(desk.ticket(dana)["messages"]) == 2  # hers and its acknowledgement


def test_without_mail_an_agent_reply_is_409_and_a_customer_s_still_threads(
    http_config: Callable[..., Path], quiet_logging: None
) -> None:
    """Without a smarthost an agent's public reply cannot be sent: 409 mail-off. A
    customer's reply, with no reply address to go to, threads by In-Reply-To."""
    config = http_config(extra='[desk]\nagents = ["*@altis-dxp.com"]\n')
    with RunningMaild(load_settings(config)) as maild, Api(maild) as api:
        tid = new_ticket(maild, "Hello")
        body = {"author": {"email": JO}, "body": "Hi"}
        response = api.http.post(f"{TICKETS}/{tid}/messages", json=body, headers=api.token())
        customer = {"author": {"email": ALICE}, "body": "Any news?"}
        threaded = api.http.post(f"{TICKETS}/{tid}/messages", json=customer, headers=api.token())
        texts = [m["text"] for m in maild.ticket(tid)["messages"]]
    assert (response.status_code, problem(response)["type"]) == (409, "urn:maild:problem:mail-off")
    assert (threaded.status_code, threaded.json()["mail"]) == (201, [])
    assert texts == ["Hello, our site is slow.", "Any news?"]


def test_the_api_over_tls(
    desk_config: Callable[..., Path], tmp_path: Path, quiet_logging: None
) -> None:
    """With [http] tls_cert and tls_key a ticket is opened, read and its attachment
    downloaded over HTTPS, the client verifying the certificate."""
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    chain, key = tmp_path / "http-cert.pem", tmp_path / "http-key.pem"
    chain.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    config = desk_config(http=f'tls_cert = "{chain}"\ntls_key = "{key}"')
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    with RunningMaild(load_settings(config)) as maild:
        token = bearer(make_token(maild.service.database, "portal", "write"))
        with httpx2.Client(base_url=http_url(maild, "https"), verify=trusted, timeout=30) as http:
            files = [{"filename": "a.bin", "content_base64": b64(b"\x00secret\xff")}]
            made = http.post(TICKETS, json=form(attachments=files), headers=token)
            assert made.status_code == 201, made.text
            tid = made.json()["id"]
            assert http.get(f"{TICKETS}/{tid}", headers=token).json()["id"] == tid
            got = http.get(f"{TICKETS}/{tid}/attachments/1", headers=token)
    assert got.content == b"\x00secret\xff"


# Changes.


def test_patch_changes_as_tickets_set_and_records_the_token(
    desk: RunningMaild, api: Api, sink: SmtpSink, events: FakeEvents
) -> None:
    """PATCH priority urgent + type incident pages once (by the agent); solved resolves and
    mails the solved notice; assignee null unassigns; each change an event 'by (token)'."""
    tid = new_ticket(desk, "Checkout fails")
    drain(desk, sink, 1)
    headers = api.token()
    raised = api.http.patch(
        f"{TICKETS}/{tid}",
        json={"by": JO, "type": "incident", "priority": "urgent", "assignee": JO},
        headers=headers,
    )
    assert raised.status_code == 200, raised.text
    ticket = raised.json()
    assert (ticket["type"], ticket["priority"], ticket["assignee"]) == ("incident", "urgent", JO)
    assert [e["by"] for e in ticket["events"]] == [f"{JO} (token t1-write)"] * 3
    (trigger,) = events.wait_for(1)
    assert JO in trigger["payload"]["custom_details"]["sender"]
    solved = api.http.patch(
        f"{TICKETS}/{tid}", json={"by": JO, "status": "solved", "assignee": None}, headers=headers
    ).json()
    assert (solved["status"], solved["assignee"]) == ("solved", None)
    (notice,) = drain(desk, sink, 1)
    assert notice.rcpt_tos == [ALICE]
    resolve = events.wait_for(2)[1]
    assert resolve["event_action"] == "resolve"
    unchanged = api.http.patch(
        f"{TICKETS}/{tid}", json={"by": JO, "status": "solved"}, headers=headers
    )
    assert unchanged.status_code == 200
    assert len(unchanged.json()["events"]) == len(solved["events"])


def test_patch_takes_a_cc_off_the_ticket_and_its_copies_stop(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """remove_cc: Bob is no longer a participant (an event says so); the next reply goes to
    Alice alone; the requester cannot be removed that way (no change)."""
    tid = new_ticket(desk, "Copies", Cc=f"Bob <{BOB}>")
    drain(desk, sink, 1)
    headers = api.token()
    answer = api.http.patch(
        f"{TICKETS}/{tid}", json={"by": JO, "remove_cc": [BOB, ALICE]}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    ticket = answer.json()
    assert [p["email"] for p in ticket["participants"]] == [ALICE]
    assert [(e["field"], e["old"], e["new"]) for e in ticket["events"]] == [("cc", BOB, None)]
    reply = api.http.post(
        f"{TICKETS}/{tid}/messages",
        json={"author": {"email": JO, "name": "Jo"}, "body": "Only Alice now."},
        headers=headers,
    )
    assert reply.status_code == 201, reply.text
    (sent,) = drain(desk, sink, 1)
    assert sent.rcpt_tos == [ALICE]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"by": JO, "remove_cc": ["not an address"]}, 422, "remove_cc.0"),
        ({"status": "solved"}, 422, "by"),
        ({"by": "stranger@customer.example", "status": "solved"}, 422, "by"),
        ({"by": JO}, 422, ""),
        ({"by": JO, "status": None}, 422, "status"),
        ({"by": JO, "status": "gone"}, 422, "status"),
        ({"by": JO, "assignee": "stranger@customer.example"}, 422, "assignee"),
        ({"by": JO, "application": "a\nb"}, 422, "application"),
        ({"by": JO, "colour": "red"}, 422, "colour"),
    ],
)
def test_a_bad_change_is_422_naming_the_field(
    desk: RunningMaild, api: Api, body: dict[str, Any], status: int, field: str
) -> None:
    """Each mistake in a PATCH: its status, the problem naming the field, nothing changed."""
    tid = new_ticket(desk, "Hello")
    response = api.http.patch(f"{TICKETS}/{tid}", json=body, headers=api.token())
    assert response.status_code == status, response.text
    assert problem(response)["errors"][0]["field"] == field
    assert desk.ticket(tid)["events"] == []


def test_customer_tokens_cannot_change_tickets_and_unknown_ones_are_404(
    desk: RunningMaild, api: Api
) -> None:
    """PATCH with a customer's token: 403, even on its own ticket; no ticket 999: 404."""
    own = new_ticket(desk, "Ours")
    scoped = api.token("write", ALICE)
    body = {"by": JO, "status": "solved"}
    assert api.http.patch(f"{TICKETS}/{own}", json=body, headers=scoped).status_code == 403
    assert api.http.patch(f"{TICKETS}/999", json=body, headers=api.token()).status_code == 404
    assert desk.ticket(own)["status"] == "open"


# Idempotency-Key.


def tickets_made(maild: RunningMaild) -> int:
    return len(maild.service.database.run_read(lambda s: s.exec(select(Ticket.id)).all()))


def test_a_retried_post_with_the_same_key_makes_one_ticket(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """The same POST with the same Idempotency-Key: the first answer again (marked
    Idempotent-Replayed), one ticket, one acknowledgement; another body with that key is
    422; another token's same key is its own."""
    headers = api.token() | {"Idempotency-Key": "form-42"}
    first = api.http.post(TICKETS, json=form(), headers=headers)
    again = api.http.post(TICKETS, json=form(), headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert "idempotent-replayed" not in first.headers
    assert tickets_made(desk) == 1
    drain(desk, sink, 1)
    other = api.http.post(TICKETS, json=form(subject="Another"), headers=headers)
    assert other.status_code == 422
    assert problem(other)["errors"][0] == {
        "field": "Idempotency-Key",
        "in": "header",
        "message": "this key was used for another request (method, path or body): use a new key",
    }
    elsewhere = api.token() | {"Idempotency-Key": "form-42"}
    assert api.http.post(TICKETS, json=form(), headers=elsewhere).status_code == 201
    assert tickets_made(desk) == 2


def test_a_retried_reply_with_the_same_key_is_mailed_once(
    desk: RunningMaild, api: Api, sink: SmtpSink
) -> None:
    """An agent's reply posted twice under one key: one message, one mail."""
    tid = new_ticket(desk, "Hello")
    drain(desk, sink, 1)
    headers = api.token() | {"Idempotency-Key": "reply-1"}
    body = {"author": {"email": JO}, "body": "Done."}
    answers = [
        api.http.post(f"{TICKETS}/{tid}/messages", json=body, headers=headers) for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [201] * 3
    assert answers[1].json() == answers[0].json() == answers[2].json()
    drain(desk, sink, 1)
    assert [m["kind"] for m in desk.ticket(tid)["messages"]] == ["human", "ack", "agent"]


def test_concurrent_posts_with_one_key_make_one_ticket(desk: RunningMaild, api: Api) -> None:
    """Eight clients send the same POST with one key at once: every answer is 201 with the
    same ticket (or 409, to be retried), and one ticket exists."""
    headers = api.token() | {"Idempotency-Key": "race"}
    url = api.http.base_url
    barrier = threading.Barrier(8)
    answers: list[httpx2.Response] = []

    def post() -> None:
        with httpx2.Client(base_url=url, timeout=30) as client:
            barrier.wait()
            answers.append(client.post(TICKETS, json=form(), headers=headers))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 8
    made = [a.json()["id"] for a in answers if a.status_code == 201]
    assert {a.status_code for a in answers} <= {201, 409}
    assert len(set(made)) == 1
    assert tickets_made(desk) == 1
    assert (
        sum(1 for a in answers if "idempotent-replayed" not in a.headers and a.status_code == 201)
        == 1
    )


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "\u00e9t\u00e9"])
def test_a_malformed_key_is_422_naming_the_header(api: Api, key: str) -> None:
    """An empty, over-long or non-ASCII key: 422 naming Idempotency-Key in the header."""
    headers = {**api.token(), "Idempotency-Key": key.encode()}
    response = api.http.post(TICKETS, json=form(), headers=headers)
    assert response.status_code == 422
    assert problem(response)["errors"][0]["field"] == "Idempotency-Key"
    assert tickets_made(api.maild) == 0
