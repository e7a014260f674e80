"""The HTTP stack itself: the operational routes as before, readiness that asks the
database, TLS, and the limits that keep slow or hostile clients from costing memory,
connections or SMTP's time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import shutil
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST

from maild.config import load_settings
from maild.errors import ConfigError
from maild.http.auth import Writer
from maild.service import Service
from tests.conftest import PG_URL, RunningMaild, mail, postgres_schema, wait_until
from tests.daemon import Daemon
from tests.http.conftest import (
    AppServer,
    Proxy,
    bearer,
    http_url,
    make_token,
    problem,
    raw_connection,
    rss,
)

GIB = 1024**3
MIB = 1024**2
CHUNK = b"x" * (64 * 1024)

uploads = APIRouter()


@uploads.post("/upload")
async def upload(request: Request, who: Writer) -> dict[str, int]:
    """Reads the body as a ticket form with attachments would, discarding it."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return {"size": size}


def closed(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# The operational routes.


def test_the_operational_routes_keep_their_content_types(
    served: RunningMaild, client: httpx2.Client
) -> None:
    """/metrics in Prometheus' text type, /healthz and /readyz as JSON lines; HEAD answers
    without a body; no Server header names the software."""
    metrics = client.get("/metrics")
    assert (metrics.status_code, metrics.headers["content-type"]) == (200, CONTENT_TYPE_LATEST)
    assert "maild_http_refused_total" in metrics.text or "maild_listener_up" in metrics.text
    health = client.get("/healthz")
    assert (health.status_code, health.headers["content-type"]) == (200, "application/json")
    assert health.text.endswith("}\n")
    ready = client.get("/readyz")
    assert (ready.status_code, ready.text) == (200, '{"status": "ready"}\n')
    head = client.head("/readyz")
    assert (head.status_code, head.content) == (200, b"")
    assert "server" not in health.headers


@pytest.fixture
def proxied(http_config: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, Proxy]]:
    """A config whose PostgreSQL is reached through a proxy that can refuse connections."""
    if not PG_URL:
        pytest.skip("a database that refuses connections: needs MAILD_TEST_DATABASE_URL")
    from sqlalchemy.engine import make_url

    real = make_url(PG_URL)
    proxy = Proxy((real.host or "127.0.0.1", real.port or 5432))
    with postgres_schema(PG_URL) as url:
        config = http_config()
        through = make_url(url).set(host="127.0.0.1", port=proxy.port)
        text = config.read_text()
        start = text.index('url = "') + len('url = "')
        end = text.index('"', start)
        config.write_text(
            text[:start]
            + through.render_as_string(hide_password=False)
            + text[end:].replace('busy_timeout = "2s"', 'busy_timeout = "1s"')
        )
        yield config, proxy
    proxy.cut()


@pytest.mark.postgres
def test_readyz_says_not_ready_while_the_database_refuses_connections(
    proxied: tuple[Path, Proxy],
) -> None:
    """No mail needs to fail first: /readyz and /healthz ask the database themselves and
    answer 503 within seconds of it refusing connections, and 200 once it takes them."""
    config, proxy = proxied
    with (
        RunningMaild(load_settings(config)) as maild,
        httpx2.Client(base_url=http_url(maild), timeout=30) as http,
    ):
        assert http.get("/readyz").status_code == 200
        proxy.cut()
        refused = wait_until(
            lambda: (r := http.get("/readyz")).status_code == 503 and r, 15, "readyz 503"
        )
        reason = refused.json()["reason"]
        assert reason.startswith("mail cannot be stored: the database does not answer: "), reason
        health = http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["checks"]["database"] != "ok"
        proxy.restore()
        wait_until(lambda: http.get("/readyz").status_code == 200, 30, "readyz 200 again")


def test_a_probe_storm_asks_the_database_about_once_a_second(served: RunningMaild) -> None:
    """200 probes at once share one database check; the answer is kept for a second."""
    calls: list[float] = []
    check = served.service.database_check
    real = check._check

    def counted() -> object:
        calls.append(time.monotonic())
        return real()

    check._check = counted
    time.sleep(1.1)  # let the answer cached while starting expire
    codes: list[int] = []

    def probe() -> None:
        with httpx2.Client(base_url=http_url(served), timeout=30) as http:
            for _ in range(10):
                codes.append(http.get("/readyz").status_code)

    threads = [threading.Thread(target=probe) for _ in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    assert codes == [200] * 200
    assert 1 <= len(calls) <= elapsed + 2, (len(calls), elapsed)


# TLS.


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    """A test CA, and a certificate for 127.0.0.1 it issued (chain file, key file)."""
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    chain, key = tmp_path / "http-cert.pem", tmp_path / "http-key.pem"
    chain.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return authority, chain, key


def test_https_with_tls_cert_and_key(
    http_config: Callable[..., Path], ca: tuple[trustme.CA, Path, Path]
) -> None:
    """With tls_cert and tls_key the listener speaks HTTPS only: a client verifying the CA
    gets the probes and the API; plain HTTP gets nothing."""
    authority, chain, key = ca
    config = http_config(f'tls_cert = "{chain.name}"\ntls_key = "{key.name}"')
    with RunningMaild(load_settings(config)) as maild:
        trusted = ssl.create_default_context()
        authority.configure_trust(trusted)
        with httpx2.Client(base_url=http_url(maild, "https"), verify=trusted, timeout=30) as http:
            assert http.get("/readyz").json() == {"status": "ready"}
            token = make_token(maild.service.database, "portal", "read")
            assert http.get("/api/v1/whoami", headers=bearer(token)).json()["name"] == "portal"
            assert problem(http.get("/api/v1/whoami")).get("status") == 401
        with pytest.raises(httpx2.HTTPError), httpx2.Client(timeout=10) as plain:
            plain.get(http_url(maild) + "/readyz")
        with pytest.raises(httpx2.ConnectError), httpx2.Client(timeout=10) as unverified:
            unverified.get(http_url(maild, "https") + "/readyz")  # the system's CAs only


def test_a_tls_handshake_that_never_comes_is_cut_at_header_timeout(
    http_config: Callable[..., Path], ca: tuple[trustme.CA, Path, Path]
) -> None:
    """A TCP connection to the HTTPS listener that never starts TLS is closed after
    header_timeout, like a slow request head."""
    _, chain, key = ca
    config = http_config(f'tls_cert = "{chain}"\ntls_key = "{key}"\nheader_timeout = "0.5s"')
    with (
        RunningMaild(load_settings(config)) as maild,
        raw_connection(maild.service.addresses["http"][1]) as sock,
    ):
        assert closed(sock) == b""


def test_a_port_in_use_is_a_config_error(http_config: Callable[..., Path]) -> None:
    """maild does not start when [http] listen cannot be bound, and names the key."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = http_config()
        http = '[http]\nlisten = "127.0.0.1:0"'
        config.write_text(config.read_text().replace(http, http.replace(":0", f":{port}")))
        with pytest.raises(ConfigError, match=r"\[http\] listen: cannot listen on"):
            asyncio.run(Service(load_settings(config)).start())


def test_an_unusable_certificate_refuses_to_start_naming_the_keys(
    http_config: Callable[..., Path], ca: tuple[trustme.CA, Path, Path]
) -> None:
    """A key that is not a key: maild does not start, and says which setting is wrong."""
    _, chain, key = ca
    key.write_text("not a key\n")
    config = http_config(f'tls_cert = "{chain}"\ntls_key = "{key}"')
    with pytest.raises(ConfigError, match=r"\[http\] tls_cert, tls_key: cannot use"):
        asyncio.run(Service(load_settings(config)).start())


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('tls_cert = "c.pem"', "[http] tls_key: tls_cert and tls_key go together"),
        ('trusted_proxies = ["proxy.example"]', "[http] trusted_proxies: 'proxy.example' is not"),
        ('trusted_proxies = ["10.0.0.1/8"]', "has host bits set"),
        ("max_body_size = 0", "[http] max_body_size: must be positive"),
        ("max_connections = 0", "[http] max_connections: "),
        ('header_timeout = "soon"', "[http] header_timeout: 'soon' is not a duration"),
        ("keep_alive = 5", "[http] keep_alive: unknown key"),
    ],
)
def test_http_settings_are_checked_naming_the_key(
    http_config: Callable[..., Path], keys: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(http_config(keys))
    assert message in str(info.value)


# Limits.


def test_a_connection_over_max_connections_gets_503(http_config: Callable[..., Path]) -> None:
    """With max_connections = 3 and three open, a fourth is answered 503 and closed before
    anything is read; once one closes, a new one is served."""
    config = http_config("max_connections = 3")
    with RunningMaild(load_settings(config)) as maild:
        port = maild.service.addresses["http"][1]
        held = [raw_connection(port) for _ in range(3)]
        for sock in held:  # each is being served (its request answered) before the fourth
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        with raw_connection(port) as extra:
            answer = closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert answer.endswith(b"too many HTTP connections\n")
        held.pop().close()
        wait_until(
            lambda: httpx2.get(http_url(maild) + "/readyz", timeout=10).status_code == 200,
            10,
            "a free slot",
        )
        for sock in held:
            sock.close()


def test_a_trickled_request_head_is_cut_at_header_timeout(
    http_config: Callable[..., Path],
) -> None:
    """A client sending its head a byte at a time (slowloris) is closed once header_timeout
    has passed since it connected, however often it sends."""
    config = http_config('header_timeout = "0.5s"')
    with RunningMaild(load_settings(config)) as maild:
        with raw_connection(maild.service.addresses["http"][1]) as sock:
            sock.settimeout(30)
            head = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
            sent = 0
            with contextlib.suppress(OSError):
                for byte in head:
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.05)
            assert closed(sock) == b""
        assert sent < len(head)


def test_a_stalled_body_is_cut_at_body_timeout(app_server: Callable[..., AppServer]) -> None:
    """A body that stops arriving is cut after body_timeout of silence; the application's
    read ends instead of waiting for ever."""
    server = app_server([uploads], http='body_timeout = "0.5s"')
    token = make_token(server.database, "writer", "write")
    with raw_connection(server.port) as sock:
        sock.sendall(
            b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
            + b"y" * 10
        )
        assert closed(sock) == b""


@pytest.mark.parametrize("pieces", [1, 40])
def test_a_request_head_over_16_kib_gets_431(served: RunningMaild, pieces: int) -> None:
    """A head past 16 KiB is refused 431 and closed, whether it arrives whole (measured by
    the application) or in pieces (h11 stops buffering it)."""
    head = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n"
    with raw_connection(served.service.addresses["http"][1]) as sock:
        size = -(-len(head) // pieces)
        with contextlib.suppress(OSError):
            for start in range(0, len(head), size):
                sock.sendall(head[start : start + size])
                if pieces > 1:
                    time.sleep(0.005)
        assert closed(sock).startswith(b"HTTP/1.1 431 ")


def send_body(port: int, head: bytes, piece: bytes, total: int = GIB) -> tuple[bytes, int]:
    """Send `head`, then `piece` again and again up to `total` bytes, as a careful client
    (curl) does: it stops sending once an answer arrives. The answer (read until the
    server closes) and the bytes of body sent."""
    sent = 0
    with raw_connection(port) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(piece)
                except BlockingIOError:
                    continue
                except OSError:
                    break
        sock.setblocking(True)
        return closed(sock), sent


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.slow
def test_a_1_gib_body_declared_up_front_is_refused_unread(
    http_config: Callable[..., Path], tmp_path: Path
) -> None:
    """`maild serve` answers a 1 GiB Content-Length with 413 before reading the body and
    closes the connection; the client gets the whole answer; maild's memory does not grow."""
    with Daemon(http_config(), tmp_path / "maild.log") as daemon:
        assert daemon.process is not None
        port = daemon.ports["http"]
        httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=30)  # the app is loaded
        before = rss(daemon.process.pid)
        head = (
            b"POST /api/v1/whoami HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {GIB}\r\n\r\n".encode()
        )
        raw, sent = send_body(port, head, CHUNK)
        grown = rss(daemon.process.pid) - before
    status, headers, body = answer_of(raw)
    assert (status, headers["content-type"], headers["connection"]) == (
        413,
        "application/problem+json",
        "close",
    )
    assert json.loads(body)["type"] == "urn:maild:problem:body-too-large"
    assert sent < 64 * MIB, sent
    assert grown < 4 * MIB, grown


def test_a_streamed_body_over_the_cap_is_refused_while_it_arrives(
    app_server: Callable[..., AppServer],
) -> None:
    """A chunked body (no Content-Length) is counted as the route reads it: past
    max_body_size the answer is 413, the rest is never read, memory does not grow."""
    server = app_server([uploads], http='max_body_size = "1 MiB"')
    token = make_token(server.database, "writer", "write")
    with httpx2.Client(base_url=server.url, timeout=30) as http:
        small = http.post("/api/v1/upload", content=CHUNK, headers=bearer(token))
        assert small.json() == {"size": len(CHUNK)}
    before = rss()
    head = (
        b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    raw, sent = send_body(server.port, head, b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n")
    grown = rss() - before
    status, headers, body = answer_of(raw)
    assert (status, headers["connection"]) == (413, "close")
    assert json.loads(body)["detail"] == (
        "the request body is over 1048576 bytes ([http] max_body_size)"
    )
    assert sent < 64 * MIB, sent
    assert grown < 8 * MIB, grown


def test_fifty_slow_http_clients_do_not_delay_smtp(
    served: RunningMaild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 50 HTTP clients trickle request heads, SMTP accepts a message and it is filed;
    the HTTP listener still answers others; stopping maild does not wait for them."""
    port = served.service.addresses["http"][1]
    slow = [raw_connection(port) for _ in range(50)]
    stop = threading.Event()

    def trickle() -> None:
        for sock in slow:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        while not stop.wait(0.1):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        with smtplib.SMTP("127.0.0.1", served.smtp_port, timeout=30) as smtp:
            refused = smtp.send_message(
                mail("While HTTP crawls"),
                from_addr="alice@customer.example",
                to_addrs=["support@altis-dxp.com"],
            )
        assert refused == {}
        served.settle()
        assert [t["subject"] for t in served.tickets()] == ["While HTTP crawls"]
        assert httpx2.get(http_url(served) + "/readyz", timeout=30).status_code == 200
        served.call(served.service.stop(), timeout=30)  # does not wait for the 50
        monkeypatch.setattr(served.service, "stop", _stopped)
    finally:
        stop.set()
        thread.join(10)
        for sock in slow:
            sock.close()


async def _stopped() -> None:
    """Service.stop, already done."""


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate (Debian package systemd) is not installed",
)
def test_socket_activation_passes_the_http_socket(
    http_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A socket named "http" (FileDescriptorName=http) is served instead of [http] listen."""
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    smtp_port, http_port = ports
    activate = [
        "systemd-socket-activate",
        "-l",
        f"127.0.0.1:{smtp_port}",
        "-l",
        f"127.0.0.1:{http_port}",
        "--fdname=smtp:http",
    ]
    answers: list[Any] = []

    def first_client() -> None:  # the first connection makes systemd-socket-activate start maild
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                answers.append(httpx2.get(f"http://127.0.0.1:{http_port}/readyz", timeout=60))
                return
            except httpx2.ConnectError:
                time.sleep(0.02)

    daemon = Daemon(http_config(), tmp_path / "maild.log", prefix=activate)
    try:
        daemon.start(trigger=first_client)
        assert daemon.ports["http"] == http_port
        wait_until(lambda: answers, 60, "the first probe's answer")
        assert (answers[0].status_code, answers[0].json()) == (200, {"status": "ready"})
        assert daemon.terminate() == 0
    finally:
        daemon.__exit__()
    assert not [e for e in daemon.events() if e.get("level") == "error"]


def test_keep_alive_connections_have_nagle_off(served: RunningMaild) -> None:
    """TCP_NODELAY on every accepted connection: with Nagle on, a response written as head
    and body waited for the client's delayed ACK, 40 ms on each keep-alive request after
    the first (the listener is made with proto 0, so asyncio did not set it)."""
    with httpx2.Client(base_url=http_url(served)) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
        server = served.service.http
        assert server is not None
        assert server._server is not None
        (protocol,) = server._server.server_state.connections
        sock = protocol._real.get_extra_info("socket")  # type: ignore[attr-defined]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
