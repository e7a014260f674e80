"""The desk console over HTTP, against the running daemon: signing in and its limits,
CSRF, the answer headers, the queue, a ticket and its actions (mail to the sink, pages
to the Events API stand-in), downloads, the rules page."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlmodel import select

from maild.config import load_settings
from maild.errors import ConfigError
from maild.store.agents import disable_agent, set_password
from maild.store.models import ConsoleSession, Message, Ticket
from tests.conftest import RunningMaild, mail
from tests.console.conftest import JO, KIM, PASSWORD, Browser, add_accounts, csrf_of
from tests.fake_events import FakeEvents
from tests.http.conftest import http_url
from tests.outbound.test_correspondence import drain
from tests.sink import SmtpSink

SUPPORT = "support@altis-dxp.com"
HOSTING = "hosting@altis-dxp.com"
ALICE = "alice@customer.example"
BOB = "bob@customer.example"


def filed(
    maild: RunningMaild, subject: str, to: str = SUPPORT, sender: str = ALICE, **headers: str
) -> int:
    """A customer's mail over SMTP; the ticket it made."""
    maild.send(mail(subject, **headers), [to], sender=sender)
    maild.settle()
    (ticket,) = [t for t in maild.tickets() if t["subject"] == subject]
    return int(ticket["id"])


def messages_of(maild: RunningMaild, ticket_id: int) -> list[Message]:
    return list(
        maild.service.database.run_read(
            lambda s: s.exec(select(Message).where(Message.ticket_id == ticket_id)).all()
        )
    )


# Signing in.


def test_signing_in_sets_a_session_cookie_that_scripts_cannot_read(console: RunningMaild) -> None:
    browser = Browser(console)
    answer = browser.sign_in()
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/tickets"
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("maild_console=")
    )
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= flags
    assert "samesite=lax" in cookie.lower()
    assert "path=/console" in cookie.lower()
    assert "secure" not in flags  # plain HTTP here; test_the_cookie_is_secure_under_tls
    queue = browser.get("/console/tickets")
    assert queue.status_code == 200
    assert "Jo Agent" in queue.text


def test_a_bad_password_and_an_unknown_account_get_the_same_answer(console: RunningMaild) -> None:
    browser = Browser(console)
    wrong = browser.sign_in(JO, "not the password at all")
    unknown = browser.sign_in("nobody@altis-dxp.com", PASSWORD)
    assert wrong.status_code == unknown.status_code == 401
    said = [re.search(r'id="sign-in-error">([^<]+)<', r.text) for r in (wrong, unknown)]
    assert [m.group(1) for m in said if m] == ["That email address and password do not match."] * 2
    assert "maild_console=" not in " ".join(wrong.headers.get_list("set-cookie"))
    assert browser.get("/console/tickets").status_code == 303  # still signed out


def test_every_page_needs_a_session_and_sends_back_after_signing_in(
    console: RunningMaild,
) -> None:
    browser = Browser(console)
    answer = browser.get("/console/tickets?status=all&q=disk")
    assert answer.status_code == 303
    assert answer.headers["location"] == (
        "/console/sign-in?next=%2Fconsole%2Ftickets%3Fstatus%3Dall%26q%3Ddisk"
    )
    form = browser.get(answer.headers["location"])
    signed = browser.post(
        "/console/sign-in",
        data={
            "email": JO,
            "password": PASSWORD,
            "csrf": csrf_of(form.text),
            "next": "/console/tickets?status=all&q=disk",
        },
    )
    assert signed.headers["location"] == "/console/tickets?status=all&q=disk"


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/console\\@evil", "/elsewhere"]
)
def test_the_next_page_is_always_inside_the_console(console: RunningMaild, target: str) -> None:
    browser = Browser(console)
    form = browser.get("/console/sign-in")
    signed = browser.post(
        "/console/sign-in",
        data={"email": JO, "password": PASSWORD, "csrf": csrf_of(form.text), "next": target},
    )
    assert signed.status_code == 303
    assert signed.headers["location"] == "/console/tickets"


def test_failed_sign_ins_are_limited_per_account_and_per_address(
    console_config: Callable[..., Path], quiet_logging: None
) -> None:
    config = console_config("max_failed_sign_ins = 3\n")
    with RunningMaild(load_settings(config)) as maild:
        add_accounts(maild)
        first = Browser(maild, "127.0.0.1")
        for _ in range(3):
            assert first.sign_in(JO, "wrong password, surely").status_code == 401
        # Jo's account: refused from anywhere, the right password included, before any check
        refused = Browser(maild, "127.0.0.2").sign_in(JO, PASSWORD)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        # the address: refused for any account
        assert first.sign_in(KIM, PASSWORD).status_code == 429
        # another account from another address is not held up
        assert Browser(maild, "127.0.0.3").sign_in(KIM, PASSWORD).status_code == 303


def test_the_sign_in_form_needs_its_own_token(console: RunningMaild) -> None:
    """A cross-site page cannot sign a browser in: the form's token must match its cookie."""
    answer = httpx2.post(
        f"{http_url(console)}/console/sign-in",
        data={"email": JO, "password": PASSWORD, "csrf": "forged", "next": ""},
    )
    assert answer.status_code == 403
    assert "maild_console=" not in " ".join(answer.headers.get_list("set-cookie"))


def test_an_account_desk_agents_no_longer_lists_cannot_sign_in(
    console_config: Callable[..., Path], quiet_logging: None
) -> None:
    """[desk] agents narrowed to *@altis-dxp.com: Kim's humanmade.com account is refused."""
    config = console_config()
    text = config.read_text().replace('"*@altis-dxp.com", "*@humanmade.com"', '"*@altis-dxp.com"')
    config.write_text(text)
    with RunningMaild(load_settings(config)) as maild:
        from maild.store.agents import add_agent

        maild.service.database.run_write(lambda s: add_agent(s, KIM, "Kim", PASSWORD))
        assert Browser(maild).sign_in(KIM, PASSWORD).status_code == 401


# Sessions ending.


def test_signing_out_ends_the_session_for_good(browser: Browser, console: RunningMaild) -> None:
    cookie = browser.client.cookies["maild_console"]
    out = browser.post("/console/sign-out", data={"csrf": browser.csrf()})
    assert out.status_code == 303
    assert out.headers["location"] == "/console/sign-in"
    replay = httpx2.get(f"{http_url(console)}/console/tickets", cookies={"maild_console": cookie})
    assert replay.status_code == 303  # the old cookie finds no session
    count = console.service.database.run_read(lambda s: len(s.exec(select(ConsoleSession)).all()))
    assert count == 0


@pytest.mark.parametrize("how", ["disabled", "new password"])
def test_disabling_an_agent_or_changing_its_password_signs_it_out(
    browser: Browser, console: RunningMaild, how: str
) -> None:
    assert browser.get("/console/tickets").status_code == 200
    database = console.service.database
    if how == "disabled":
        database.run_write(lambda s: disable_agent(s, JO))
    else:
        database.run_write(lambda s: set_password(s, JO, "another long password"))
    assert browser.get("/console/tickets").status_code == 303
    assert Browser(console).sign_in(JO, PASSWORD).status_code == 401


def test_an_idle_session_expires(console_config: Callable[..., Path], quiet_logging: None) -> None:
    with RunningMaild(load_settings(console_config('idle_timeout = "1s"\n'))) as maild:
        add_accounts(maild)
        browser = Browser(maild)
        assert browser.sign_in().status_code == 303
        assert browser.get("/console/tickets").status_code == 200
        time.sleep(1.5)
        assert browser.get("/console/tickets").status_code == 303


# CSRF and headers.


def test_a_post_without_the_csrf_token_does_nothing(
    browser: Browser, console: RunningMaild
) -> None:
    """A cross-site form carries the session cookie (a top-level POST) but not the token."""
    ticket_id = filed(console, "Disk full")
    before = len(messages_of(console, ticket_id))
    for data in ({"body": "hi", "kind": "note"}, {"body": "hi", "kind": "note", "csrf": "x" * 43}):
        answer = browser.post(f"/console/tickets/{ticket_id}/reply", data=data)
        assert answer.status_code == 403
        assert "did not come from this page" in answer.text
    changed = browser.post(f"/console/tickets/{ticket_id}/change", data={"status": "solved"})
    assert changed.status_code == 403
    assert len(messages_of(console, ticket_id)) == before
    status = console.service.database.run_read(lambda s: s.get(Ticket, ticket_id).status)
    assert status == "open"


@pytest.mark.parametrize(
    "path", ["/console/sign-in", "/console/tickets", "/console/tickets/999999", "/console/rules"]
)
def test_every_answer_forbids_inline_script_framing_and_sniffing(
    browser: Browser, console: RunningMaild, path: str
) -> None:
    answer = (Browser(console) if path.endswith("sign-in") else browser).get(path)
    assert answer.status_code in (200, 404)
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in answer.text  # the only script is the external console.js
    assert re.findall(r"<script[^>]*>", answer.text) == [
        '<script src="/console/static/console.js" defer>'
    ]


def test_the_console_is_off_unless_enabled(
    desk_config: Callable[..., Path], quiet_logging: None
) -> None:
    with RunningMaild(load_settings(desk_config())) as maild:
        assert httpx2.get(f"{http_url(maild)}/console/sign-in").status_code == 404
        assert httpx2.get(f"{http_url(maild)}/healthz").status_code == 200


def test_enabled_without_an_http_listener_serve_refuses_naming_both(
    make_config: Callable[..., Path], quiet_logging: None
) -> None:
    config = make_config("[console]\nenabled = true\n")
    with pytest.raises(ConfigError) as info, RunningMaild(load_settings(config)):
        pass
    assert "[console] enabled = true needs [http] listen" in str(info.value)


# The queue.


def test_the_queue_lists_filters_counts_and_pages_with_the_filters_in_the_url(
    browser: Browser, console: RunningMaild
) -> None:
    ids = [filed(console, f"Queue item {n}") for n in range(3)]
    incident = filed(console, "Staging slow", to=HOSTING)
    page = browser.get("/console/tickets")
    assert all(f'href="/console/tickets/{i}"' in page.text for i in [*ids, incident])
    assert re.search(r"open \+ pending <span class=\"count\">4</span>", page.text)
    only = browser.get("/console/tickets?type=incident")
    assert f'href="/console/tickets/{incident}"' in only.text
    assert f'href="/console/tickets/{ids[0]}"' not in only.text
    searched = browser.get("/console/tickets", params={"q": "Staging"})
    assert f'href="/console/tickets/{incident}"' in searched.text
    assert f'href="/console/tickets/{ids[0]}"' not in searched.text
    mine = browser.get("/console/tickets?mine=1")
    assert "No tickets match." in mine.text
    # the filters survive in the status links
    assert 'href="/console/tickets?status=all&amp;type=incident"' in only.text


def test_the_queue_pages_newest_first(browser: Browser, console: RunningMaild) -> None:
    from maild.console import app

    ids = [filed(console, f"Paged {n}") for n in range(4)]
    original = app.PAGE_SIZE
    app.PAGE_SIZE = 3
    try:
        first = browser.get("/console/tickets")
        found = re.search(r'href="([^"]+)" rel="next"', first.text)
        assert found
        second = browser.get(found.group(1).replace("&amp;", "&"))
    finally:
        app.PAGE_SIZE = original
    listed = [int(n) for n in re.findall(r'<td><a href="/console/tickets/(\d+)">', first.text)]
    rest = [int(n) for n in re.findall(r'<td><a href="/console/tickets/(\d+)">', second.text)]
    assert listed + rest == sorted(ids, reverse=True)


# A ticket.


def test_mail_with_script_in_its_subject_and_body_shows_as_text(
    browser: Browser, console: RunningMaild
) -> None:
    subject = '<script>alert("subject")</script>'
    console.send(
        mail(subject, body='<script>alert("body")</script> <img src=x onerror=alert(1)>'),
        [SUPPORT],
        sender=ALICE,
    )
    console.settle()
    (ticket,) = console.tickets()
    page = browser.get(f"/console/tickets/{ticket['id']}")
    assert "&lt;script&gt;alert(&#34;subject&#34;)&lt;/script&gt;" in page.text
    assert "&lt;script&gt;alert(&#34;body&#34;)&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "<script>alert" not in page.text
    assert "<img src=x" not in page.text
    queue = browser.get("/console/tickets")
    assert "<script>alert" not in queue.text


def test_a_reply_with_an_extra_cc_is_mailed_to_all_and_a_note_to_nobody(
    browser: Browser, console: RunningMaild, sink: SmtpSink
) -> None:
    ticket_id = filed(console, "Cannot deploy")
    drain(console, sink, 1)  # the acknowledgement
    token = browser.csrf(f"/console/tickets/{ticket_id}")
    answer = browser.post(
        f"/console/tickets/{ticket_id}/reply",
        data={"csrf": token, "kind": "reply", "body": "Fixed it.", "cc": BOB},
        files={"attachments": ("log.txt", b"line 1\n", "text/plain")},
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/console/tickets/{ticket_id}?done=reply#actions"
    (sent,) = drain(console, sink, 1)
    assert sorted(sent.rcpt_tos) == [ALICE, BOB]
    assert "Fixed it." in sent.body
    note = browser.post(
        f"/console/tickets/{ticket_id}/reply",
        data={"csrf": token, "kind": "note", "body": "Customer was on the old release."},
    )
    assert note.status_code == 303
    drain(console, sink, 0)
    page = browser.get(f"/console/tickets/{ticket_id}")
    assert "Your internal note is stored" in browser.get(note.headers["location"]).text
    assert "Customer was on the old release." in page.text
    assert f"{BOB}" in page.text
    assert "log.txt" in page.text
    kinds = [m.kind for m in messages_of(console, ticket_id)]
    assert kinds == ["human", "ack", "agent", "note"]
    authors = [m.from_email for m in messages_of(console, ticket_id)]
    assert authors[2:] == [JO, JO]


def test_a_bad_reply_is_refused_with_the_reason_on_the_page(
    browser: Browser, console: RunningMaild
) -> None:
    ticket_id = filed(console, "Bad reply")
    token = browser.csrf(f"/console/tickets/{ticket_id}")
    answer = browser.post(
        f"/console/tickets/{ticket_id}/reply",
        data={"csrf": token, "kind": "reply", "body": "x", "cc": SUPPORT},
    )
    page = browser.get(answer.headers["location"])
    assert "CC: support@altis-dxp.com is one of the desk&#39;s own addresses" in page.text


def test_raising_to_urgent_pages_and_solving_resolves_and_tells_the_requester(
    browser: Browser, console: RunningMaild, sink: SmtpSink, events: FakeEvents
) -> None:
    ticket_id = filed(console, "Checkout errors", to=HOSTING)
    drain(console, sink, 1)
    token = browser.csrf(f"/console/tickets/{ticket_id}")
    raised = browser.post(
        f"/console/tickets/{ticket_id}/change",
        data={
            "csrf": token,
            "status": "open",
            "priority": "urgent",
            "type": "incident",
            "application": "",
            "assignee": JO,
        },
    )
    assert raised.status_code == 303
    events.wait_for_requests(1)
    assert [e["event_action"] for e in events.events] == ["trigger"]
    solved = browser.post(
        f"/console/tickets/{ticket_id}/change",
        data={
            "csrf": token,
            "status": "solved",
            "priority": "urgent",
            "type": "incident",
            "assignee": JO,
        },
    )
    assert solved.status_code == 303
    events.wait_for_requests(2)
    assert [e["event_action"] for e in events.events] == ["trigger", "resolve"]
    (notice,) = drain(console, sink, 1)
    assert notice.rcpt_tos == [ALICE]
    page = browser.get(f"/console/tickets/{ticket_id}")
    assert "priority: normal → urgent" in page.text.replace("(none)", "")
    assert f"{JO} (console)" in page.text
    ticket = console.service.database.run_read(lambda s: s.get(Ticket, ticket_id))
    assert (ticket.status, ticket.priority, ticket.assignee) == ("solved", "urgent", JO)


def test_a_cc_can_be_taken_off_the_ticket(
    browser: Browser, console: RunningMaild, sink: SmtpSink
) -> None:
    ticket_id = filed(console, "Copies", Cc=f"Bob <{BOB}>")
    drain(console, sink, 1)
    token = browser.csrf(f"/console/tickets/{ticket_id}")
    answer = browser.post(
        f"/console/tickets/{ticket_id}/change",
        data={"csrf": token, "remove_cc": BOB},
    )
    assert answer.status_code == 303
    browser.post(
        f"/console/tickets/{ticket_id}/reply",
        data={"csrf": token, "kind": "reply", "body": "Only to Alice now."},
    )
    (sent,) = drain(console, sink, 1)
    assert sent.rcpt_tos == [ALICE]
    page = browser.get(f"/console/tickets/{ticket_id}")
    assert f"cc: {BOB} → (none)" in page.text


def test_an_attachment_downloads_as_its_exact_bytes_never_rendered(
    browser: Browser, console: RunningMaild
) -> None:
    ticket_id = filed(console, "With a file")
    token = browser.csrf(f"/console/tickets/{ticket_id}")
    html = b"<html><script>alert(1)</script></html>"
    browser.post(
        f"/console/tickets/{ticket_id}/reply",
        data={"csrf": token, "kind": "note", "body": "see file"},
        files={"attachments": ('../../evil".html', html, "text/html")},
    )
    answer = browser.get(f"/console/tickets/{ticket_id}/attachments/1")
    assert answer.status_code == 200
    assert answer.content == html
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"].startswith("attachment; filename=")
    assert "/" not in answer.headers["content-disposition"].split("filename=")[1].split(";")[0]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert browser.get(f"/console/tickets/{ticket_id}/attachments/2").status_code == 404


# The rules.


def test_the_rules_page_shows_the_table_and_tests_an_address(browser: Browser) -> None:
    page = browser.get("/console/rules")
    assert "sysops" in page.text
    assert ".toml:" in page.text
    assert "The last reload succeeded." in page.text
    tested = browser.get(
        "/console/rules", params={"address": "sysops@altis-dxp.com", "from": ALICE}
    )
    result = re.search(r'<div class="result" id="result">(.*?)</div>', tested.text, re.S)
    assert result
    assert "pages on-call" in result.group(1)
    refused = browser.get("/console/rules", params={"address": "x@elsewhere.example"})
    assert "Refused:" in refused.text
    assert "550 5.7.1" in refused.text


def test_an_unsigned_visitor_gets_nothing_but_the_sign_in_page(console: RunningMaild) -> None:
    base = http_url(console)
    for path in ("/console/rules", "/console/tickets/1", "/console/tickets/1/attachments/1"):
        answer = httpx2.get(base + path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/console/sign-in"), path


def test_over_tls_the_session_cookie_is_secure(
    console_config: Callable[..., Path], tmp_path: Path, quiet_logging: None
) -> None:
    """With [http] tls_cert and tls_key the console answers over HTTPS and its cookies
    carry Secure: a browser never sends the session over plain HTTP."""
    import ssl

    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    chain, key = tmp_path / "http-cert.pem", tmp_path / "http-key.pem"
    chain.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    config = console_config(http=f'tls_cert = "{chain}"\ntls_key = "{key}"')
    with RunningMaild(load_settings(config)) as maild:
        add_accounts(maild)
        base = http_url(maild, "https")
        with httpx2.Client(base_url=base, verify=trusted, timeout=30) as client:
            form = client.get("/console/sign-in")
            sign_in_cookie = form.headers["set-cookie"]
            signed = client.post(
                "/console/sign-in",
                data={"email": JO, "password": PASSWORD, "csrf": csrf_of(form.text), "next": ""},
            )
            assert signed.status_code == 303
            session = next(
                c for c in signed.headers.get_list("set-cookie") if c.startswith("maild_console=")
            )
            assert client.get("/console/tickets").status_code == 200
    for cookie in (sign_in_cookie, session):
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert "secure" in flags, cookie
        assert "httponly" in flags, cookie


def test_password_checks_run_one_at_a_time(
    console: RunningMaild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sign-ins from many addresses (which the limits do not stop) queue for the argon2
    check: it never runs twice at once, so a flood takes one core, never the mail's."""
    import threading

    from maild.console import app

    running = 0
    most = 0
    lock = threading.Lock()
    real = app.password_matches

    def counted(stored: str | None, password: str) -> tuple[bool, str | None]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real(stored, password)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(app, "password_matches", counted)
    answers: list[int] = []

    def attempt(n: int) -> None:
        answers.append(
            Browser(console, f"127.0.1.{n}").sign_in(JO, f"wrong password {n}").status_code
        )

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [401] * 4
    assert most == 1


def test_expired_sessions_are_deleted_at_the_next_sign_in(console: RunningMaild) -> None:
    """A session idle past idle_timeout (or older than max_age) is a dead row: the next
    sign-in deletes it, so the table holds live sessions, not every one ever made."""
    from datetime import timedelta

    from maild.store.models import utcnow

    assert Browser(console).sign_in().status_code == 303
    old = utcnow() - timedelta(days=30)

    def age(session: Any) -> None:
        for row in session.exec(select(ConsoleSession)).all():
            row.seen_at = row.created_at = old
            session.add(row)

    database = console.service.database
    database.run_write(age)
    assert Browser(console).sign_in(KIM).status_code == 303
    rows = database.run_read(lambda s: s.exec(select(ConsoleSession)).all())
    assert [r.created_at > old for r in rows] == [True]
