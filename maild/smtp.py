"""The SMTP and LMTP front door, on aiosmtpd, on the daemon's own event loop.

RCPT: the recipient is checked against the current rules table (550 5.1.1 no
route, 550 5.7.1 not our domain); refused recipients cost nothing.
DATA: the raw bytes and envelope go to the spool, which commits them; only
then 250. Any failure of ours answers 451 4.3.0 so the sending MTA retries.
LMTP answers one line per accepted recipient after DATA (RFC 2033).

aiosmtpd fixes made here: lines longer than 1000 bytes are accepted (real mail
has them), the per-command size limits are per connection (aiosmtpd keeps them
in one dict shared by all connections), and the hostname is computed once.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from maild import metrics
from maild.errors import MessageTooLarge, RecipientRefused, TemporaryFailure
from maild.rules import RuleTable
from maild.spool import Delivery, Spool

log = structlog.get_logger("maild.smtp")

TEMPFAIL = TemporaryFailure.smtp_reply
IDENT = "maild"
_SIZE_REPLIES = (
    "500 Line too long",
    "552 Error: Too much mail data",
    "552 Error: message size exceeds",
)
SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"


class _ConnectionFixes:
    """Per-connection limits and bookkeeping shared by the SMTP and LMTP protocols."""

    envelope: Envelope | None
    transport: asyncio.BaseTransport | None

    def __init__(
        self, handler: Any, *, line_length_limit: int, on_lost: Callable[[Any], None], **kwargs: Any
    ) -> None:
        self.line_length_limit = line_length_limit
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        self._on_lost = on_lost
        super().__init__(handler, **kwargs)  # type: ignore[call-arg]

    @property
    def in_transaction(self) -> bool:
        """True from MAIL FROM until the reply to DATA has been decided."""
        return self.envelope is not None and self.envelope.mail_from is not None

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's size refusals, rewritten with enhanced status codes.

        A line longer than line_length_limit (set above max_message_size) can
        only belong to a message over the size limit, so it is answered 552
        like one, not with aiosmtpd's 500 "Line too long".
        """
        if isinstance(status, str) and status.startswith(_SIZE_REPLIES):
            status = MessageTooLarge.smtp_reply
            metrics.MESSAGES_REFUSED.labels("too_large").inc()
        await super().push(status)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        self._on_lost(self)
        super().connection_lost(error)  # type: ignore[misc]


class MaildSMTP(_ConnectionFixes, SMTP):  # type: ignore[misc]
    pass


class MaildLMTP(_ConnectionFixes, LMTP):  # type: ignore[misc]
    pass


def _peer(session: Session) -> str:
    peer: Any = session.peer  # a (host, port) tuple, whatever aiosmtpd's annotation says
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")


class Handler:
    """aiosmtpd hooks: refuse at RCPT, spool at DATA, 451 for anything of ours."""

    def __init__(self, protocol: str, rules: Callable[[], RuleTable], spool: Spool) -> None:
        self.protocol = protocol
        self._rules = rules
        self._spool = spool

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        try:
            route = self._rules().resolve(address)
        except RecipientRefused as refused:
            metrics.REFUSED.labels(
                "relay" if refused.smtp_reply.startswith("550 5.7.1") else "unknown_mailbox"
            ).inc()
            log.info(
                "recipient refused",
                rcpt=address,
                reason=refused.reason,
                mail_from=envelope.mail_from,
            )
            return refused.smtp_reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        log.debug("recipient accepted", rcpt=address, route=route.name)
        return "250 2.1.5 OK"

    def _reply(self, envelope: Envelope, line: str) -> str:
        if self.protocol == "lmtp":  # RFC 2033: one reply per accepted recipient
            return "\r\n".join(line for _ in envelope.rcpt_tos)
        return line

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        delivery = Delivery(
            protocol=self.protocol,
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
            peer=_peer(session),
            helo=session.host_name or "",
            session_id=str(structlog.contextvars.get_contextvars().get("session_id", "")),
        )
        try:
            inbound_id = await self._spool.put(delivery)
        except TemporaryFailure as exc:
            metrics.DEFERRED.labels("store_failed").inc()
            log.warning("message not stored; answered 451", error=str(exc)[:300])
            return self._reply(envelope, TEMPFAIL)
        except Exception:
            metrics.DEFERRED.labels("internal_error").inc()
            log.exception("message not stored; answered 451")
            return self._reply(envelope, TEMPFAIL)
        metrics.RECEIVED.labels(self.protocol).inc()
        log.info(
            "message accepted",
            inbound=inbound_id,
            size=len(raw),
            mail_from=delivery.mail_from,
            rcpt=delivery.rcpt_tos,
        )
        return self._reply(envelope, f"250 2.0.0 OK: queued as {inbound_id}")

    async def handle_exception(self, error: Exception) -> str:
        log.error(
            "SMTP session error; answered 451",
            error=str(error)[:300],
            error_type=type(error).__name__,
        )
        return TEMPFAIL


class Listener:
    """One listening socket (SMTP or LMTP) and the connections it has open."""

    def __init__(
        self,
        protocol: str,
        handler: Handler,
        *,
        hostname: str,
        max_message_size: int,
        timeout: float,
    ) -> None:
        self.protocol = protocol
        self._handler = handler
        self._hostname = hostname
        self._max_message_size = max_message_size
        self._timeout = timeout
        self._server: asyncio.Server | None = None
        self.connections: set[_ConnectionFixes] = set()

    def _factory(self) -> _ConnectionFixes:
        structlog.contextvars.bind_contextvars(
            session_id=secrets.token_hex(6), listener=self.protocol
        )
        cls = MaildLMTP if self.protocol == "lmtp" else MaildSMTP
        connection: _ConnectionFixes = cls(
            self._handler,
            line_length_limit=max(1001, self._max_message_size + 2),
            on_lost=self.connections.discard,
            data_size_limit=self._max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self._hostname,
            ident=IDENT,
            timeout=self._timeout,
            loop=asyncio.get_running_loop(),
        )
        self.connections.add(connection)
        return connection

    async def start(
        self, host: str, port: int, sock: socket.socket | None = None
    ) -> tuple[str, int]:
        """Listen on host:port, or on `sock` (a socket systemd passed in)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            sock.setblocking(False)
            self._server = await loop.create_server(self._factory, sock=sock)  # type: ignore[arg-type]
        else:
            self._server = await loop.create_server(self._factory, host, port)  # type: ignore[arg-type]
        address = self._server.sockets[0].getsockname()
        return str(address[0]), int(address[1])

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> int:
        """Say goodbye to idle connections, give open transactions `grace` seconds.

        Returns how many transactions were still open when time ran out (their
        senders got no 250 and will retry).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for connection in list(self.connections):
                if not connection.in_transaction:
                    _goodbye(connection)
            busy = [c for c in self.connections if c.in_transaction]
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            _goodbye(connection)
        return len(busy)


def _goodbye(connection: _ConnectionFixes) -> None:
    transport = connection.transport
    if transport is not None and not transport.is_closing():
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(SHUTDOWN_REPLY)
        transport.close()
