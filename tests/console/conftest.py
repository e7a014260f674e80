"""The console's fixtures: the desk's daemon with [console] enabled, agents, and a
signed-in browser-like client (cookies kept, forms posted)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import httpx2
import pytest

from maild.config import load_settings
from maild.store.agents import add_agent
from tests.conftest import RunningMaild
from tests.http.conftest import desk_config, events, http_config, http_url, sink  # noqa: F401

JO = "jo@altis-dxp.com"  # an agent ([desk] agents = *@altis-dxp.com, *@humanmade.com)
KIM = "kim@humanmade.com"  # another
PASSWORD = "correct horse battery staple"
CONSOLE = "[console]\nenabled = true\n"


@pytest.fixture
def console_config(desk_config: Callable[..., Path]) -> Callable[..., Path]:  # noqa: F811
    def make(extra: str = "", http: str = "") -> Path:
        return desk_config(CONSOLE + extra, http)

    return make


@pytest.fixture
def console(console_config: Callable[..., Path], quiet_logging: None) -> Iterator[RunningMaild]:
    """The running daemon with the console on, and Jo's and Kim's accounts."""
    with RunningMaild(load_settings(console_config())) as running:
        add_accounts(running)
        yield running


def add_accounts(maild: RunningMaild) -> None:
    database = maild.service.database
    database.run_write(lambda s: add_agent(s, JO, "Jo Agent", PASSWORD))
    database.run_write(lambda s: add_agent(s, KIM, "Kim", PASSWORD))


def csrf_of(html: str) -> str:
    """The CSRF token in a page's forms."""
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


class Browser:
    """An HTTP client that keeps cookies and posts forms as a browser does; closed at the
    end of the test that made it (_close_browsers)."""

    made: ClassVar[list[Browser]] = []

    def __init__(self, maild: RunningMaild, source: str = "127.0.0.1") -> None:
        Browser.made.append(self)
        self.base = http_url(maild)
        transport = httpx2.HTTPTransport(local_address=source)
        self.client = httpx2.Client(
            base_url=self.base, timeout=30, follow_redirects=False, transport=transport
        )

    def get(self, path: str, **kwargs: object) -> httpx2.Response:
        return self.client.get(path, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx2.Response:
        return self.client.post(path, **kwargs)  # type: ignore[arg-type]

    def sign_in(self, email: str = JO, password: str = PASSWORD) -> httpx2.Response:
        form = self.get("/console/sign-in")
        return self.post(
            "/console/sign-in",
            data={"email": email, "password": password, "csrf": csrf_of(form.text), "next": ""},
        )

    def csrf(self, path: str = "/console/tickets") -> str:
        page = self.get(path)
        assert page.status_code == 200, page.text[:500]
        return csrf_of(page.text)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def browser(console: RunningMaild) -> Iterator[Browser]:
    """Jo, signed in."""
    client = Browser(console)
    answer = client.sign_in()
    assert answer.status_code == 303, answer.text[:500]
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _close_browsers() -> Iterator[None]:
    yield
    while Browser.made:
        Browser.made.pop().close()
