"""The desk console in a real browser: Debian's chromium, driven by chromedriver through
Selenium, against the running daemon with a real smarthost (tests/sink.py) and the
Events API stand-in. Nothing is downloaded: Selenium Manager is kept offline.

The screenshots of docs/ are made here: with MAILD_SCREENSHOTS=docs the queue's and a
ticket's are written to docs/console-queue.png and docs/console-ticket.png.

Skipped, saying so, only when chromium or chromedriver is not installed (.ci/run and
`make browser-deps` install them from Debian).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from maild.store.models import Message, Ticket
from tests.conftest import RunningMaild, mail, wait_until
from tests.console.conftest import JO, PASSWORD
from tests.fake_events import FakeEvents
from tests.http.conftest import http_url
from tests.outbound.test_correspondence import drain
from tests.sink import SmtpSink

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"no browser: {', '.join(MISSING)} not installed "
        "(Debian packages chromium and chromium-driver; .ci/run installs them)",
    ),
]

HOSTING = "hosting@altis-dxp.com"
ALICE = "alice@customer.example"
BOB = "bob@customer.example"
CAROL = "carol@customer.example"
DOCS = Path(__file__).resolve().parents[2] / "docs"

if not MISSING:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import Select, WebDriverWait


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[WebDriver]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.implicitly_wait(5)
    browser.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield browser
    finally:
        browser.quit()


def submit(driver: WebDriver, button: str, by: str = "id") -> None:
    """Click a form's button (or a link) and wait until the next page has replaced this one."""
    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(by, button).click()
    # Asked mid-navigation, chromedriver may answer "Node with given id does not belong to
    # the document" (a WebDriverException) rather than that the element is stale: ask again.
    WebDriverWait(driver, 20, ignored_exceptions=[WebDriverException]).until(staleness_of(page))


def sign_in(driver: WebDriver, base: str, email: str = JO, password: str = PASSWORD) -> None:
    driver.get(f"{base}/console/sign-in")
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.ID, "password").send_keys(password)
    submit(driver, "sign-in")


def screenshot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    """The page as a PNG; also into docs/ with MAILD_SCREENSHOTS=docs."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a page, not a blank
    if os.environ.get("MAILD_SCREENSHOTS") == "docs":
        shutil.copyfile(path, DOCS / name)
    return path


def incident(subject: str) -> EmailMessage:
    message = mail(subject, to=HOSTING, body="Checkout fails for some customers since 09:00.")
    message["Cc"] = f"Bob <{BOB}>"
    message.add_attachment(
        b"2026-12-03 09:00:01 ERROR payment timeout\n",
        maintype="text",
        subtype="plain",
        filename="checkout.log",
    )
    return message


def test_an_agent_works_a_ticket_from_arrival_to_solved(
    console: RunningMaild,
    driver: WebDriver,
    sink: SmtpSink,
    events: FakeEvents,
    tmp_path: Path,
) -> None:
    """Sign in, see the mail that just arrived, reply with an extra CC (mail to all three),
    raise it to urgent (a page), solve it (a resolve and the solved notice), search, download
    the attachment, sign out."""
    base = http_url(console)
    for n in range(3):  # a queue with something in it
        console.send(mail(f"Question {n}: DNS for shop{n}.example"), ["support@altis-dxp.com"])
    console.send(incident("Checkout errors on production"), [HOSTING], sender=ALICE)
    console.settle()
    drain(console, sink, 4)  # the acknowledgements
    sign_in(driver, base)
    assert driver.current_url.endswith("/console/tickets")
    driver.find_element(By.LINK_TEXT, "Checkout errors on production")
    screenshot(driver, tmp_path, "console-queue.png")
    submit(driver, "Checkout errors on production", By.LINK_TEXT)
    assert (
        "Checkout fails for some customers" in driver.find_element(By.CSS_SELECTOR, "pre.text").text
    )
    ticket_id = int(driver.current_url.rstrip("/").split("/")[-1].split("?")[0])

    # A public reply with Carol added: Alice, Bob and Carol get it.
    driver.find_element(By.ID, "kind-reply").click()
    driver.find_element(By.ID, "body").send_keys("We are on it: the payment provider times out.")
    driver.find_element(By.ID, "cc").send_keys(CAROL)
    submit(driver, "send")
    assert "Your reply is stored" in driver.find_element(By.ID, "notice").text
    (reply,) = drain(console, sink, 1)
    assert sorted(reply.rcpt_tos) == [ALICE, BOB, CAROL]
    assert "payment provider times out" in reply.body

    # Raised to urgent: on-call is paged.
    Select(driver.find_element(By.ID, "change-priority")).select_by_visible_text("urgent")
    submit(driver, "save")
    assert "The ticket is changed." in driver.find_element(By.ID, "notice").text
    events.wait_for_requests(1)
    assert [e["event_action"] for e in events.events] == ["trigger"]
    driver.get(f"{base}/console/tickets/{ticket_id}")  # from the top, not the form's anchor
    screenshot(driver, tmp_path, "console-ticket.png")

    # Solved: the incident is resolved and the requester told.
    Select(driver.find_element(By.ID, "change-status")).select_by_visible_text("solved")
    submit(driver, "save")
    assert driver.find_element(By.ID, "status").text == "solved"
    events.wait_for_requests(2)
    assert [e["event_action"] for e in events.events] == ["trigger", "resolve"]
    (notice,) = drain(console, sink, 1)
    assert notice.rcpt_tos == [ALICE]

    # Search finds it among the solved; its attachment downloads.
    driver.get(f"{base}/console/tickets?status=all")
    box = driver.find_element(By.ID, "q")
    box.send_keys("payment")
    submit(driver, "filter")
    assert "q=payment" in driver.current_url
    links = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "td.subject a")]
    assert links == ["Checkout errors on production"]
    submit(driver, "Checkout errors on production", By.LINK_TEXT)
    driver.find_element(By.LINK_TEXT, "checkout.log").click()  # a download: the page stays
    downloaded = driver.downloads / "checkout.log"  # type: ignore[attr-defined]
    wait_until(downloaded.exists, 20, "the attachment downloaded")
    assert downloaded.read_bytes() == b"2026-12-03 09:00:01 ERROR payment timeout\n"

    # Signed out, the pages are closed.
    submit(driver, "sign-out")
    assert "/console/sign-in" in driver.current_url
    driver.get(f"{base}/console/tickets/{ticket_id}")
    assert "/console/sign-in" in driver.current_url
    ticket = console.service.database.run_read(lambda s: s.get(Ticket, ticket_id))
    assert (ticket.status, ticket.priority) == ("solved", "urgent")


def test_a_bad_password_is_refused(console: RunningMaild, driver: WebDriver) -> None:
    sign_in(driver, http_url(console), JO, "not the password")
    assert "/console/sign-in" in driver.current_url
    error = driver.find_element(By.ID, "sign-in-error").text
    assert error == "That email address and password do not match."
    driver.get(f"{http_url(console)}/console/tickets")
    assert "/console/sign-in" in driver.current_url


class _Attacker(BaseHTTPRequestHandler):
    """Another origin's page: a form that posts a note to the console, without the token."""

    target = ""

    def do_GET(self) -> None:
        page = (
            "<!doctype html><title>prize</title>"
            f'<form method="post" action="{self.target}">'
            '<input type="hidden" name="kind" value="note">'
            '<input type="hidden" name="body" value="planted by another site">'
            '<button id="win" type="submit">Claim your prize</button></form>'
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def attacker() -> Iterator[Callable[[str], str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def page(target: str) -> str:
        _Attacker.target = target
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield page
    server.shutdown()
    server.server_close()


def test_a_cross_site_post_without_the_token_is_refused(
    console: RunningMaild, driver: WebDriver, attacker: Callable[[str], str]
) -> None:
    """Signed in, the agent visits another site whose form posts to the console: the
    browser sends the session cookie (the same site, another port), not the CSRF token."""
    console.send(mail("Target ticket"), ["support@altis-dxp.com"])
    console.settle()
    (ticket,) = console.tickets()
    base = http_url(console)
    sign_in(driver, base)
    driver.get(attacker(f"{base}/console/tickets/{ticket['id']}/reply"))
    submit(driver, "win")
    wait_until(lambda: "did not come from this page" in driver.page_source, 10, "the refusal")
    texts = console.service.database.run_read(
        lambda s: [m.text for m in s.exec(select(Message)).all()]
    )
    assert not any("planted by another site" in (t or "") for t in texts)


def test_mail_holding_script_shows_as_text_and_runs_nothing(
    console: RunningMaild, driver: WebDriver
) -> None:
    subject = "<script>alert('subject')</script>"
    body = "<script>alert('body')</script><img src=x onerror=alert('img')>"
    console.send(mail(subject, body=body), ["support@altis-dxp.com"])
    console.settle()
    (ticket,) = console.tickets()
    sign_in(driver, http_url(console))
    assert subject in driver.find_element(By.CSS_SELECTOR, "td.subject a").text
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (raises when no alert is open)
    driver.get(f"{http_url(console)}/console/tickets/{ticket['id']}")
    assert driver.find_element(By.TAG_NAME, "h1").text == f"#{ticket['id']} {subject}"
    assert body in driver.find_element(By.CSS_SELECTOR, "pre.text").text
    assert driver.find_elements(By.CSS_SELECTOR, "pre.text img") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def test_the_queue_and_a_ticket_fit_a_phone_screen(
    console: RunningMaild, driver: WebDriver
) -> None:
    """At 390 × 844 CSS pixels nothing is wider than the screen: no sideways scrolling."""
    console.send(mail("A long subject " * 6, body="word " * 400), ["support@altis-dxp.com"])
    console.settle()
    (ticket,) = console.tickets()
    driver.set_window_size(390, 844)
    sign_in(driver, http_url(console))
    for path in ("/console/tickets", f"/console/tickets/{ticket['id']}", "/console/rules"):
        driver.get(f"{http_url(console)}{path}")
        width = driver.execute_script("return document.documentElement.clientWidth")
        scrolled = driver.execute_script("return document.documentElement.scrollWidth")
        assert scrolled <= width, (path, scrolled, width)
