"""The SMTP and LMTP front door, on aiosmtpd, on the daemon's own event loop.

RCPT: the recipient is checked against the current rules table (550 5.1.1 no
route, 550 5.7.1 not our domain); refused recipients cost nothing.
DATA: the raw bytes and envelope go to the spool, which commits them; only
then 250. Any failure of ours answers 451 4.3.0 so the sending MTA retries.
LMTP answers one line per accepted recipient after DATA (RFC 2033).

aiosmtpd fixes made here: lines longer than 1000 bytes are accepted (real mail
has them), the per-command size limits are per connection (aiosmtpd keeps them
in one dict shared by all connections), and the hostname is computed once.

Abuse limits (aiosmtpd has none of its own), each 0 for no limit:
- max_connections / max_connections_per_ip: connections open on one listener,
  in all and per client IP address. One more is answered 421 4.7.0 instead of
  the greeting and closed; no session or task is created for it.
- max_recipients: the RCPT beyond it gets 452 4.5.3 (RFC 5321 4.5.3.1.10), so
  the client sends the rest in another transaction; DATA goes on for the others.
- max_errors: 5xx replies to commands per connection (aiosmtpd's syntax errors,
  our 550 refusals); the one beyond the budget is replaced by 421 4.7.0 and the
  connection closed. The reply to the end of DATA never counts, so a message
  being stored is never cut.
- The idle timeout ([smtp] timeout) says 421 4.4.2 before closing; aiosmtpd
  itself closes without a word.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
import socket
from collections.abc import Callable
from typing import Any

import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, _DataState, syntax

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
TOO_MANY_CONNECTIONS = "421 4.7.0 {hostname} Too many connections, try again later"
TOO_MANY_CONNECTIONS_PER_IP = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
IDLE_TIMEOUT = "421 4.4.2 {hostname} Timeout, closing connection"

# The path nearly every client sends: <dot-atom@dot-atom> and the parameters after it.
# aiosmtpd's email-header parser gives the same answer for it, at 40 times the cost.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*)>"
    r'(?:[ \t]+([^()\\"\s][^()\\"\r\n]*)?)?'
)


class _ConnectionFixes:
    """Per-connection limits and bookkeeping shared by the SMTP and LMTP protocols."""

    per_recipient_replies = False  # LMTP answers the end of DATA once per recipient

    envelope: Envelope | None
    hostname: str
    session: Session | None
    transport: asyncio.BaseTransport | None
    _handler_coroutine: asyncio.Task[None] | None
    _timeout_duration: float

    def __init__(
        self,
        handler: Any,
        *,
        line_length_limit: int,
        admit: Callable[[Any, Any], bytes | None],
        on_lost: Callable[[Any], None],
        max_errors: int = 0,
        **kwargs: Any,
    ) -> None:
        self.line_length_limit = line_length_limit
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        self._admit = admit
        self._on_lost = on_lost
        self._refused = False
        self._max_errors = max_errors
        self.errors = 0  # 5xx replies to commands so far
        self._data_reply_next = False  # after 354: the next reply ends DATA
        self._data_recipients = 0  # accepted recipients of the DATA in progress
        self.peer_ip: str | None = None  # set by the listener when it admits the connection
        super().__init__(handler, **kwargs)  # type: ignore[call-arg]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT path parser, with a fast path for the plain form.

        aiosmtpd 1.4.6 runs the email package's header parser (and defines a
        class) for every MAIL and RCPT; a path that is `<dot-atom@dot-atom>`
        followed by nothing or by whitespace and parameters is read with one
        regular expression, with the same result. Anything else (quoted local
        parts, address literals, source routes, no angle brackets, UTF-8) goes
        to aiosmtpd's parser as before."""
        match = _SIMPLE_PATH.fullmatch(arg.lstrip(" \t"))
        if match is None:
            return super()._getaddr(arg)  # type: ignore[misc,no-any-return]
        address, rest = match.group(1), match.group(2) or ""
        limit: int = self.local_part_limit  # type: ignore[attr-defined]
        if limit and len(address.rpartition("@")[0]) > limit:
            return None, None
        return address, rest

    @property
    def in_transaction(self) -> bool:
        """True from MAIL FROM until the reply to DATA has been decided."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection, or answer 421 and close it before any greeting."""
        if self.transport is None:  # not the second call that STARTTLS would make
            refusal = self._admit(self, transport.get_extra_info("peername"))
            if refusal is not None:
                # aiosmtpd never sees this connection: no session, no timer, no task.
                self._refused = True
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(refusal)
                transport.close()  # sends the reply first
                return
        super().connection_made(transport)  # type: ignore[misc]

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's size refusals, rewritten with enhanced status codes; the error budget.

        A line longer than line_length_limit (set above max_message_size) can
        only belong to a message over the size limit, so it is answered 552
        like one, not with aiosmtpd's 500 "Line too long".

        Every 5xx reply to a command counts against max_errors; the one beyond
        it is replaced by 421 and the connection closed. The reply to the end
        of DATA (the message's fate) never counts; over LMTP it is said once per
        accepted recipient (RFC 2033), whoever decided it: our handler, our
        exception handler, or aiosmtpd's own size refusal.
        """
        if isinstance(status, str) and status.startswith(_SIZE_REPLIES):
            status = MessageTooLarge.smtp_reply
            metrics.MESSAGES_REFUSED.labels("too_large").inc()
        if self._data_reply_next:
            self._data_reply_next = False
            if self.per_recipient_replies and self._data_recipients:
                line = status.decode() if isinstance(status, bytes) else status
                status = "\r\n".join(line for _ in range(self._data_recipients))
        elif status[:1] in ("5", b"5"):
            self.errors += 1
            if self._max_errors and self.errors > self._max_errors:
                await self._close_for_errors()
                return
        elif status[:3] in ("354", b"354"):
            self._data_reply_next = True
            # aiosmtpd resets the envelope before it sends the final reply: count them now.
            self._data_recipients = len(self.envelope.rcpt_tos) if self.envelope else 0
        await super().push(status)  # type: ignore[misc]

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's DATA, with the message collected in one buffer.

        aiosmtpd keeps every line as a bytearray of its own until the final "."
        (for 78-byte lines, about 54 MiB of objects for a 25 MiB message, on top
        of the joined copy); here each line is appended to one bytearray as it
        arrives. Everything else is aiosmtpd's, in its order: the checks and
        replies, the size and line-length limits (the rest of an oversized
        message is read and dropped, then refused), dot-unstuffing of complete
        lines, and the DATA hook."""
        if await self.check_helo_needed():  # type: ignore[attr-defined]
            return
        if await self.check_auth_needed("DATA"):  # type: ignore[attr-defined]
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        num_bytes = 0
        limit: int | None = self.data_size_limit  # type: ignore[attr-defined]
        fragments: list[bytes] = []
        state = _DataState.NOMINAL
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
        while self.transport is not None:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()  # type: ignore[attr-defined]
                raise
            except asyncio.LimitOverrunError as exc:
                if state == _DataState.NOMINAL:
                    state = _DataState.TOO_LONG
                data = bytearray()
                line = await reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                break
            num_bytes += len(line)
            if state == _DataState.NOMINAL and limit and num_bytes > limit:
                state = _DataState.TOO_MUCH
                data = bytearray()
            fragments.append(line)
            if line.endswith(b"\r\n"):
                if state == _DataState.NOMINAL:
                    whole = line if len(fragments) == 1 else b"".join(fragments)
                    if len(whole) > self.line_length_limit:
                        state = _DataState.TOO_LONG
                        data = bytearray()
                    else:
                        data += whole[1:] if whole[:1] == b"." else whole
                fragments.clear()
        if state != _DataState.NOMINAL:
            if state == _DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[attr-defined]
            return
        content = bytes(data)
        del data
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")  # type: ignore[attr-defined]
        self._set_post_data_state()  # type: ignore[attr-defined]
        await self.push("250 OK" if status is MISSING else status)

    async def _close_for_errors(self) -> None:
        metrics.REFUSED.labels("too_many_errors").inc()
        log.warning(
            "too many errors; connection closed",
            reason="too_many_errors",
            peer=_peer(self.session) if self.session else "",
            errors=self.errors,
            limit=self._max_errors,
        )
        await super().push(TOO_MANY_ERRORS)  # type: ignore[misc]
        # As aiosmtpd's QUIT does: no further command of this connection runs.
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        """The idle timeout: say 421 4.4.2 (aiosmtpd just closes), then close."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            log.info(
                "idle timeout; connection closed",
                peer=_peer(self.session) if self.session else "",
                timeout=self._timeout_duration,
            )
            transport.write(IDLE_TIMEOUT.format(hostname=self.hostname).encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        self._on_lost(self)
        if not self._refused:  # a refused connection never reached aiosmtpd
            super().connection_lost(error)  # type: ignore[misc]


class MaildSMTP(_ConnectionFixes, SMTP):  # type: ignore[misc]
    pass


class MaildLMTP(_ConnectionFixes, LMTP):  # type: ignore[misc]
    per_recipient_replies = True


def _format_peer(peer: Any) -> str:
    """The peer as "host:port" or "[v6]:port"; a Unix socket's name as is."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")


def _peer(session: Session) -> str:
    return _format_peer(session.peer)  # a (host, port) tuple, whatever aiosmtpd's annotation says


def _peer_ip(peer: Any) -> str | None:
    """The IP address of a TCP peer; None for a Unix socket (no per-address limit there)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0])
    return None


class Handler:
    """aiosmtpd hooks: refuse at RCPT, spool at DATA, 451 for anything of ours."""

    def __init__(
        self,
        protocol: str,
        rules: Callable[[], RuleTable],
        spool: Spool,
        *,
        max_recipients: int = 0,
    ) -> None:
        self.protocol = protocol
        self._rules = rules
        self._spool = spool
        self._max_recipients = max_recipients  # per transaction; 0: no limit

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._max_recipients and len(envelope.rcpt_tos) >= self._max_recipients:
            # 452, not 5xx: the client keeps the rest for another transaction.
            metrics.REFUSED.labels("too_many_recipients").inc()
            log.info(
                "recipient refused",
                rcpt=address,
                reason="too_many_recipients",
                limit=self._max_recipients,
                mail_from=envelope.mail_from,
            )
            return TOO_MANY_RECIPIENTS
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
            urgent=self._pages(envelope.rcpt_tos),
        )
        try:
            inbound_id = await self._spool.put(delivery)
        except TemporaryFailure as exc:
            metrics.DEFERRED.labels("store_failed").inc()
            log.warning("message not stored; answered 451", error=str(exc)[:300])
            return TEMPFAIL
        except Exception:
            metrics.DEFERRED.labels("internal_error").inc()
            log.exception("message not stored; answered 451")
            return TEMPFAIL
        metrics.RECEIVED.labels(self.protocol).inc()
        log.info(
            "message accepted",
            inbound=inbound_id,
            size=len(raw),
            mail_from=delivery.mail_from,
            rcpt=delivery.rcpt_tos,
        )
        return f"250 2.0.0 OK: queued as {inbound_id}"

    def _pages(self, recipients: list[str]) -> bool:
        """Whether a recipient's route pages (sysops@): such mail is filed first."""
        table = self._rules()
        for address in recipients:
            try:
                if table.resolve(address).page:
                    return True
            except RecipientRefused:  # the table changed since RCPT; filing will say
                continue
        return False

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
        max_connections: int = 0,
        max_connections_per_ip: int = 0,
        max_errors: int = 0,
    ) -> None:
        self.protocol = protocol
        self._handler = handler
        self._hostname = hostname
        self._max_message_size = max_message_size
        self._timeout = timeout
        self._max_connections = max_connections  # 0: no limit
        self._max_connections_per_ip = max_connections_per_ip  # 0: no limit
        self._max_errors = max_errors  # 0: no limit
        self._server: asyncio.Server | None = None
        self.connections: set[_ConnectionFixes] = set()  # admitted and still open
        self._per_ip: collections.Counter[str] = collections.Counter()

    def _factory(self) -> _ConnectionFixes:
        structlog.contextvars.bind_contextvars(
            session_id=secrets.token_hex(6), listener=self.protocol
        )
        cls = MaildLMTP if self.protocol == "lmtp" else MaildSMTP
        connection: _ConnectionFixes = cls(
            self._handler,
            line_length_limit=max(1001, self._max_message_size + 2),
            admit=self._admit,
            on_lost=self._release,
            max_errors=self._max_errors,
            data_size_limit=self._max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self._hostname,
            ident=IDENT,
            timeout=self._timeout,
            loop=asyncio.get_running_loop(),
        )
        return connection

    def _admit(self, connection: _ConnectionFixes, peer: Any) -> bytes | None:
        """Count the new connection in, or return the 421 that refuses it."""
        ip = _peer_ip(peer)
        if self._max_connections and len(self.connections) >= self._max_connections:
            reason, limit = "too_many_connections", self._max_connections
            reply = TOO_MANY_CONNECTIONS.format(hostname=self._hostname)
        elif (
            self._max_connections_per_ip
            and ip is not None
            and self._per_ip[ip] >= self._max_connections_per_ip
        ):
            reason, limit = "too_many_connections_per_ip", self._max_connections_per_ip
            reply = TOO_MANY_CONNECTIONS_PER_IP
        else:
            connection.peer_ip = ip
            self.connections.add(connection)
            if ip is not None:
                self._per_ip[ip] += 1
            return None
        metrics.REFUSED.labels(reason).inc()
        log.warning(
            "connection refused",
            reason=reason,
            peer=_format_peer(peer),
            limit=limit,
            open=len(self.connections),
        )
        return reply.encode() + b"\r\n"

    def _release(self, connection: _ConnectionFixes) -> None:
        if connection not in self.connections:
            return  # a refused connection was never counted
        self.connections.discard(connection)
        ip = connection.peer_ip
        if ip is not None:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

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
