"""A real SMTP server on loopback port 0 that keeps what it receives: the tests' smarthost.

It runs aiosmtpd on its own event loop in a thread. Tests read `received`
(envelope and bytes of every accepted message), and can make it answer
like a real smarthost in trouble: refuse or defer chosen recipients, defer
whole transactions, or answer like an auto-responder by calling back.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def header(self, name: str) -> str:
        return str(self.message[name] or "")

    @property
    def body(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())  # type: ignore[attr-defined]


@dataclass
class SinkBehaviour:
    """How the sink answers; tests change it while it runs."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply
    data_replies: list[str] = field(default_factory=list)  # next DATA replies, in order
    on_message: Callable[[Received], None] | None = None
    data_delay: float = 0.0  # seconds before answering the end of DATA (a slow smarthost)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.behaviour.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        behaviour = self._sink.behaviour
        if behaviour.data_delay:
            await asyncio.sleep(behaviour.data_delay)
        if behaviour.data_replies:
            return behaviour.data_replies.pop(0)
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=bytes(envelope.original_content or b""),
        )
        with self._sink.lock:
            self._sink.received.append(received)
        if behaviour.on_message is not None:
            threading.Thread(target=behaviour.on_message, args=(received,), daemon=True).start()
        return "250 OK: kept"


class SmtpSink:
    """aiosmtpd on 127.0.0.1:0 in a thread; optionally STARTTLS and AUTH LOGIN/PLAIN."""

    def __init__(
        self,
        tls_context: ssl.SSLContext | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.received: list[Received] = []
        self.logins: list[str] = []
        self.behaviour = SinkBehaviour()
        self.lock = threading.Lock()
        self._tls = tls_context
        self._login = login
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self._login is not None
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if (user, password) == self._login:
                self.logins.append(user)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def _factory(self) -> SMTP:
        options: dict[str, Any] = {}
        if self._tls is not None:
            options.update(tls_context=self._tls, require_starttls=True)
        if self._login is not None:
            options.update(
                authenticator=self._authenticate,
                auth_require_tls=self._tls is not None,
            )
        return SMTP(
            _Handler(self),
            hostname="smarthost.test.invalid",
            decode_data=False,
            enable_SMTPUTF8=True,
            loop=self._loop,
            **options,
        )

    async def _start(self) -> int:
        self._server = await self._loop.create_server(self._factory, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def __enter__(self) -> SmtpSink:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        """The first `count` messages, once that many arrived; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received[:count])
            time.sleep(0.02)
        with self.lock:
            got = len(self.received)
        raise AssertionError(f"the smarthost received {got} message(s), expected {count}")
