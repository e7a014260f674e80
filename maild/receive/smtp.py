"""The SMTP and LMTP front door, on aiosmtpd, on the daemon's own event loop.

RCPT: the recipient is checked against the current rules table (550 5.1.1 no
route, 550 5.7.1 not our domain); refused recipients cost nothing.
DATA: the raw bytes and envelope go to the spool, which commits them; only
then 250. Any failure of ours answers 451 4.3.0 so the sending MTA retries.
LMTP answers one line per accepted recipient after DATA (RFC 2033).

aiosmtpd fixes made here: lines longer than 1000 bytes are accepted inside DATA
(real mail has them) while command lines stay capped at COMMAND_LINE_LIMIT (the
stream's buffer limit, so a line without CRLF is read and dropped in pieces,
never held whole), the per-command size limits are per connection (aiosmtpd
keeps them in one dict shared by all connections), and the hostname is
computed once.

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
- max_junk_commands: NOOP, RSET, HELP, VRFY, EXPN and greetings after the
  second, per connection since its last accepted message (as Postfix's
  smtpd_junk_command_limit); the one beyond it gets 421 4.7.0 and the close.
- max_session_time: a connection still open after it is closed with 421 4.4.2
  as soon as it is not inside a transaction.
- A full listener (max_connections) makes room for a new client by closing the
  connection that has done nothing useful (no greeting, MAIL, RCPT or DATA) for
  the longest, if that is over EVICT_AFTER_IDLE seconds and it is not inside a
  transaction: connections that only NOOP cannot lock the desk out.
- max_data_memory (DataBudget): message bytes held in memory by all DATA
  transfers of the daemon at once. DATA beyond it is answered
  452 4.3.1 (insufficient system storage; the sender retries later), at once
  when the budget is already spent, else after the rest of the message is read
  and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtpd.smtp
import structlog
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from maild import metrics
from maild.errors import MessageTooLarge, RecipientRefused, StorageUnavailable, TemporaryFailure
from maild.receive.spool import Delivery, Spool
from maild.routing.rules import RuleTable

log = structlog.get_logger("maild.smtp")

TEMPFAIL = TemporaryFailure.smtp_reply
IDENT = "maild"
_SIZE_REPLIES = (
    "552 Error: Too much mail data",
    "552 Error: message size exceeds",
)
SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"
TOO_MANY_CONNECTIONS = "421 4.7.0 {hostname} Too many connections, try again later"
TOO_MANY_CONNECTIONS_PER_IP = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_JUNK = "421 4.7.0 Too many commands without mail, closing connection"
IDLE_TIMEOUT = "421 4.4.2 {hostname} Timeout, closing connection"
SESSION_TOO_LONG = "421 4.4.2 {hostname} Session time limit reached, closing connection"
EVICTED = "421 4.7.0 {hostname} Busy: closing an idle connection for a new client"
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage, try again later"
# RFC 5321's 512 octets for a command line, and room for extensions' parameters. It is
# the stream's buffer limit: a longer line is read and dropped in pieces of this size,
# then answered 500 (and counted against max_errors).
COMMAND_LINE_LIMIT = 4096

# The end of the data: a line holding only "." (RFC 5321 4.1.1.4), with the line end
# before it. The first line has none: the DATA command's own line end stands for it.
END_OF_DATA = b"\r\n.\r\n"


class _MembersByClass:
    """`inspect` as aiosmtpd.smtp sees it, with `getmembers` remembered per class.

    aiosmtpd's SMTP.__init__ looks for `auth_*` methods with inspect.getmembers on the
    new connection and on its handler, for every connection: 110 of the 144 µs a
    connection object cost (cProfile, issue 21). Those methods are the classes'; here
    their names are found once per class and bound to each object. Everything else is
    the real `inspect`."""

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        names = self._names.get(type(obj))
        if names is None:
            names = [name for name, _ in inspect.getmembers(obj) if name.startswith("auth_")]
            self._names[type(obj)] = names
        return [(name, getattr(obj, name)) for name in names]

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


aiosmtpd.smtp.inspect = _MembersByClass()  # type: ignore[attr-defined,assignment]
LINE_TOO_LONG = "500 Command line too long"  # aiosmtpd's reply to one
EVICT_AFTER_IDLE = 5.0  # seconds without a useful command before a full listener may evict

# The path nearly every client sends: <dot-atom@dot-atom> and the parameters after it.
# aiosmtpd's email-header parser gives the same answer for it, at 40 times the cost.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*)>"
    r'(?:[ \t]+([^()\\"\s][^()\\"\r\n]*)?)?'
)


class DataBudget:
    """Message bytes held in memory by every DATA transfer at once ([smtp] max_data_memory).

    Shared by all listeners of a daemon. A transfer adds each block's bytes to
    `used` as it is read, unless that would pass `limit`, and gives them back when
    its reply has been decided (after the spool has committed the message, or after
    a refusal). The last four bytes a paused sender has sent are not read yet (they
    may begin the end of data: `data_pieces`), so the budget counts as spent once
    fewer than that are left: a transfer that has sent the whole budget holds it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.used = 0

    @property
    def spent(self) -> bool:
        return bool(self.limit) and self.used + len(END_OF_DATA) - 1 >= self.limit

    def give_back(self, size: int) -> None:
        self.used = max(0, self.used - size)


@dataclass(frozen=True)
class SessionLimits:
    """What one connection may do, from [smtp]; 0 turns a limit off."""

    max_errors: int = 0
    max_junk_commands: int = 0
    max_session_time: float = 0.0
    data_budget: DataBudget = field(default_factory=lambda: DataBudget(0))


def _junk_command(name: str, help_text: str | None) -> Any:
    """aiosmtpd's smtp_<name>, run unless the command is one junk command too many."""

    async def command(self: _ConnectionFixes, arg: str) -> None:
        if not await self._one_junk_too_many(name):
            await getattr(super(_ConnectionFixes, self), f"smtp_{name}")(arg)

    command.__name__ = f"smtp_{name}"
    return syntax(help_text)(command) if help_text else command


class _ConnectionFixes:
    """Per-connection limits and bookkeeping shared by the SMTP and LMTP protocols."""

    per_recipient_replies = False  # LMTP answers the end of DATA once per recipient

    envelope: Envelope | None
    hostname: str
    loop: asyncio.AbstractEventLoop
    session: Session | None
    transport: asyncio.BaseTransport | None
    _handler_coroutine: asyncio.Task[None] | None
    _timeout_duration: float

    def __init__(
        self,
        handler: Any,
        *,
        admit: Callable[[Any, Any], bytes | None],
        on_lost: Callable[[Any], None],
        limits: SessionLimits = SessionLimits(),
        **kwargs: Any,
    ) -> None:
        # Read by aiosmtpd's __init__ as the StreamReader's limit: the longest command line
        # held in memory. DATA lines may be longer (smtp_DATA reads them in pieces).
        self.line_length_limit = COMMAND_LINE_LIMIT
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        self._admit = admit
        self._on_lost = on_lost
        self._refused = False
        self._limits = limits
        self.errors = 0  # 5xx replies to commands so far
        self.junk = 0  # junk commands since the connection's last accepted message
        self._greetings = 0  # HELO/EHLO so far: the first two (before and after STARTTLS) count
        self._data_reply_next = False  # after 354: the next reply ends DATA
        self._data_recipients = 0  # accepted recipients of the DATA in progress
        self.peer_ip: str | None = None  # set by the listener when it admits the connection
        self.last_useful = 0.0  # loop time of the last command that was not junk
        self._useful_before = 0.0  # last_useful before the command being run
        self._lifetime: asyncio.TimerHandle | None = None
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
            self.last_useful = self._useful_before = self.loop.time()
            if self._limits.max_session_time:
                self._lifetime = self.loop.call_later(
                    self._limits.max_session_time, self._session_expired
                )
        super().connection_made(transport)  # type: ignore[misc]

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd calls this before running each valid command: the command is useful
        unless it turns out to be junk (`_junk` takes the mark back)."""
        self._useful_before, self.last_useful = self.last_useful, self.loop.time()
        super()._reset_timeout(duration)  # type: ignore[misc]

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's size refusals, rewritten with enhanced status codes; the error budget.

        Every 5xx reply to a command counts against max_errors; the one beyond
        it is replaced by 421 and the connection closed. The reply to the end
        of DATA (the message's fate) never counts; over LMTP it is said once per
        accepted recipient (RFC 2033), whoever decided it: our handler, our
        exception handler, or aiosmtpd's own size refusal. An accepted message
        clears the junk count.
        """
        if isinstance(status, str) and status.startswith(_SIZE_REPLIES):
            status = MessageTooLarge.smtp_reply
            metrics.MESSAGES_REFUSED.labels("too_large").inc()
        elif status == LINE_TOO_LONG:  # aiosmtpd's, once it has read past the line's end
            log.warning(
                "command line too long",
                peer=_peer(self.session) if self.session else "",
                limit=COMMAND_LINE_LIMIT,
            )
        if self._data_reply_next:
            self._data_reply_next = False
            if status[:3] in ("250", b"250"):
                self.junk = 0
            if self.per_recipient_replies and self._data_recipients:
                line = status.decode() if isinstance(status, bytes) else status
                status = "\r\n".join(line for _ in range(self._data_recipients))
        elif status[:1] in ("5", b"5"):
            self.errors += 1
            if self._limits.max_errors and self.errors > self._limits.max_errors:
                await self._close_with(
                    TOO_MANY_ERRORS,
                    "too many errors; connection closed",
                    reason="too_many_errors",
                    errors=self.errors,
                    limit=self._limits.max_errors,
                )
                return
        elif status[:3] in ("354", b"354"):
            self._data_reply_next = True
            # aiosmtpd resets the envelope before it sends the final reply: count them now.
            self._data_recipients = len(self.envelope.rcpt_tos) if self.envelope else 0
        await super().push(status)  # type: ignore[misc]

    async def _junk(self) -> bool:
        """Count a junk command: it does not count as activity, and the one beyond
        max_junk_commands closes the connection (True: do not run the command). Junk
        commands are NOOP, RSET, HELP, VRFY, EXPN, and greetings after the second."""
        self.last_useful = self._useful_before
        self.junk += 1
        limit = self._limits.max_junk_commands
        if limit and self.junk > limit:
            await self._close_with(
                TOO_MANY_JUNK,
                "too many commands without mail; connection closed",
                reason="too_many_junk_commands",
                commands=self.junk,
                limit=limit,
            )
            return True
        return False

    async def _one_junk_too_many(self, command: str) -> bool:
        """Count `command` when it is junk; True when it is one too many (the connection
        is closing, the command must not run)."""
        if command in ("HELO", "EHLO"):  # the first two are useful (again after STARTTLS)
            self._greetings += 1
            if self._greetings <= 2:
                return False
        return await self._junk()

    smtp_NOOP = _junk_command("NOOP", "NOOP [ignored]")
    smtp_RSET = _junk_command("RSET", "RSET")
    smtp_HELP = _junk_command("HELP", "HELP [command]")
    smtp_VRFY = _junk_command("VRFY", "VRFY <address>")
    smtp_EXPN = _junk_command("EXPN", None)
    smtp_HELO = _junk_command("HELO", "HELO hostname")
    smtp_EHLO = _junk_command("EHLO", "EHLO hostname")

    # sha256 of aiosmtpd's SMTP.smtp_DATA source (1.4.6), which the method below copies
    # and changes; tests/receive/test_smtp.py fails when an installed aiosmtpd's differs.
    UPSTREAM_DATA_SHA256 = "3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df"

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's DATA, with the message read in blocks, lines of any length,
        and the daemon-wide memory budget.

        aiosmtpd reads the message a line at a time and keeps every line as an
        object of its own until the final "." (for 78-byte lines, about 54 MiB of
        objects for a 25 MiB message, on top of the joined copy); here it is read
        in blocks up to the end-of-data line (`data_pieces`), joined once, and
        dot-unstuffed in one pass (`unstuff`). aiosmtpd's checks and replies are
        kept, in its order: the size limit (the rest of an oversized message is
        read and dropped, then refused 552), dot-unstuffing of every line, and the
        DATA hook. A message that would take the daemon past max_data_memory is
        read and dropped the same way, then answered 452 4.3.1."""
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
        budget = self._limits.data_budget
        memory = budget.limit  # 0: no limit
        if budget.spent:
            self._over_budget()
            await self.push(INSUFFICIENT_STORAGE)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        pieces: list[bytes] = []
        taken = 0  # bytes of the budget this transfer holds
        num_bytes = 0
        limit: int | None = self.data_size_limit  # type: ignore[attr-defined]
        refusal: str | None = None  # decided early: the rest is read and dropped
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
        try:
            try:
                async for piece in data_pieces(reader):
                    num_bytes += len(piece)
                    if refusal is not None:
                        continue
                    if limit and num_bytes > limit:
                        refusal = "552 Error: Too much mail data"
                    elif memory and budget.used + len(piece) > memory:
                        self._over_budget()
                        refusal = INSUFFICIENT_STORAGE
                    else:
                        budget.used += len(piece)
                        taken += len(piece)
                        pieces.append(piece)
                        continue
                    pieces.clear()
                    budget.give_back(taken)
                    taken = 0
            except asyncio.CancelledError:
                self._writer.close()  # type: ignore[attr-defined]
                raise
            if refusal is not None:
                await self.push(refusal)
                self._set_post_data_state()  # type: ignore[attr-defined]
                return
            content = unstuff(pieces)
            del pieces
            self.envelope.content = content
            self.envelope.original_content = content
            status = await self._call_handler_hook("DATA")  # type: ignore[attr-defined]
        finally:
            budget.give_back(taken)
        self._set_post_data_state()  # type: ignore[attr-defined]
        await self.push("250 OK" if status is MISSING else status)

    def _over_budget(self) -> None:
        budget = self._limits.data_budget
        metrics.DEFERRED.labels("memory_budget").inc()
        log.warning(
            "message deferred: DATA memory budget spent; answered 452 4.3.1",
            peer=_peer(self.session) if self.session else "",
            in_use=budget.used,
            limit=budget.limit,
        )

    async def _close_with(self, reply: str, event: str, *, reason: str, **fields: Any) -> None:
        """Say `reply` (a 421), log `event`, count `reason` (maild_recipients_refused_total)
        and close: as aiosmtpd's QUIT does, no further command of this connection runs."""
        metrics.REFUSED.labels(reason).inc()
        peer = _peer(self.session) if self.session else ""
        log.warning(event, peer=peer, reason=reason, **fields)
        await super().push(reply)  # type: ignore[misc]
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    def close_now(self, reply: str, event: str, **fields: Any) -> None:
        """Say `reply` and close, from outside the connection's own task (a timer, the
        listener); the log line says why."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            log.info(event, peer=_peer(self.session) if self.session else "", **fields)
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    def _session_expired(self) -> None:
        """max_session_time: close now if between transactions, else check again shortly."""
        if self.in_transaction:
            self._lifetime = self.loop.call_later(1.0, self._session_expired)
            return
        metrics.REFUSED.labels("session_time").inc()
        self.close_now(
            SESSION_TOO_LONG.format(hostname=self.hostname),
            "session time limit reached; connection closed",
            limit=self._limits.max_session_time,
        )

    def _timeout_cb(self) -> None:
        """The idle timeout: say 421 4.4.2 (aiosmtpd just closes), then close."""
        self.close_now(
            IDLE_TIMEOUT.format(hostname=self.hostname),
            "idle timeout; connection closed",
            timeout=self._timeout_duration,
        )
        super()._timeout_cb()  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        self._on_lost(self)
        if self._lifetime is not None:
            self._lifetime.cancel()
        if not self._refused:  # a refused connection never reached aiosmtpd
            super().connection_lost(error)  # type: ignore[misc]


def _partial_end(tail: bytes) -> int:
    """How many bytes at the end of `tail` could begin END_OF_DATA (0 to 4)."""
    for k in range(min(len(END_OF_DATA) - 1, len(tail)), 0, -1):
        if tail.endswith(END_OF_DATA[:k]):
            return k
    return 0


async def data_pieces(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The message's bytes as sent (dot-stuffed), in pieces, up to its end-of-data line,
    which is consumed and not yielded; bytes after it stay in `reader` (a pipelined
    command). Joined and unstuffed, the pieces are what aiosmtpd's line-by-line reading
    stores.

    Blocks come from `readuntil(END_OF_DATA)`: the whole message when it is in the
    buffer, else all but the last four buffered bytes (so an end of data split across
    reads is still found whole). Only where already-read bytes end in a part of
    END_OF_DATA (at the start, where the DATA command's line end counts) could the
    end straddle what was read: those few bytes are read exactly, until they cannot."""
    seen = b"\r\n"  # the last bytes read, the DATA command's line end before any
    held = b""  # read, and maybe the "." line's start: not yielded yet
    while partial := _partial_end(seen):
        got = await reader.readexactly(len(END_OF_DATA) - partial)
        pending = held + got
        seen = (seen + got)[-len(END_OF_DATA) :]
        if seen == END_OF_DATA:
            if len(pending) > 3:
                yield pending[:-3]
            return
        hold = max(0, _partial_end(seen) - 2)  # a "." or ".\r" that may end the data
        held = pending[len(pending) - hold :] if hold else b""
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
    while True:
        try:
            block = await reader.readuntil(END_OF_DATA)
        except asyncio.LimitOverrunError as exc:  # no end in the buffer yet: take what is safe
            yield await reader.read(exc.consumed)
            continue
        if len(block) > 3:
            yield block[:-3]  # its line end belongs to the message's last line
        return


def unstuff(pieces: list[bytes]) -> bytes:
    """The message from its dot-stuffed pieces: every line's leading "." removed (as
    aiosmtpd does for each line: RFC 5321 4.5.2 says only a second one is added, but a
    sender's lone one is dropped the same way), in one pass."""
    if not pieces:
        return b""
    wire = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if wire[:1] == b".":
        wire = wire[1:]
    return wire.replace(b"\r\n.", b"\r\n")


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
        except StorageUnavailable as exc:
            metrics.DEFERRED.labels(exc.reason).inc()
            log.warning("message not stored; answered 451", reason=exc.reason, error=str(exc)[:300])
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
        limits: SessionLimits = SessionLimits(),
    ) -> None:
        self.protocol = protocol
        self._handler = handler
        self._hostname = hostname
        self._max_message_size = max_message_size
        self._timeout = timeout
        self._max_connections = max_connections  # 0: no limit
        self._max_connections_per_ip = max_connections_per_ip  # 0: no limit
        self.limits = limits
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
            admit=self._admit,
            on_lost=self._release,
            limits=self.limits,
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
        """Count the new connection in, or return the 421 that refuses it.

        A full listener first tries to make room by evicting an idle connection."""
        ip = _peer_ip(peer)
        if (
            self._max_connections
            and len(self.connections) >= self._max_connections
            and not self._evict_idlest()
        ):
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

    def _evict_idlest(self) -> bool:
        """Close the connection that has done nothing useful for longest (over
        EVICT_AFTER_IDLE seconds, outside a transaction), counting it out at once;
        False when every connection is busy or recently active."""
        now = asyncio.get_running_loop().time()
        idle = [
            c
            for c in self.connections
            if not c.in_transaction and now - c.last_useful >= EVICT_AFTER_IDLE
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_useful)
        self._release(victim)
        metrics.REFUSED.labels("evicted_idle").inc()
        victim.close_now(
            EVICTED.format(hostname=self._hostname),
            "idle connection closed to make room for a new client",
            idle=round(now - victim.last_useful, 1),
            limit=self._max_connections,
        )
        return True

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
