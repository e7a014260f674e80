"""The load generator: aiosmtplib sessions against one SMTP server, closed loop.

`connections` sessions run at once; each connects, sends `per_connection`
messages (MAIL, RCPT, DATA), says QUIT, and starts again until the deadline. A
session finishes the message it is on, so every message counted got its answer.

For each message it records when the 250 arrived (wall clock, the same clock
the server's host uses) and the latency from the end of DATA to the reply: the
body is written and flushed to the socket first, then the final "." starts the
clock, so for a 1 MiB message the figure is the server's work, not the transfer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

QUEUED_AS = re.compile(r"queued as (\d+)")
SYSOPS = "sysops@altis-dxp.com"
SUPPORT = "support@altis-dxp.com"
HOSTING = "hosting@altis-dxp.com"


@dataclass(frozen=True)
class Outgoing:
    """One message to send: envelope, wire bytes (dot-stuffed, CRLF) and what it is."""

    mail_from: str
    rcpt: str
    data: bytes
    message_id: str
    pages: bool  # sysops@ and not a reply: it must reach the Events API


@dataclass
class Sent:
    message_id: str
    rcpt: str
    pages: bool
    accepted_at: float  # time.time() when the 250 arrived
    end_of_data: float  # seconds from the final "." to the reply
    inbound_id: int | None  # maild's "queued as N"; None from the reference


@dataclass
class LoadResult:
    started: float
    sent: list[Sent] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu: float = 0.0  # CPU seconds of the client's thread (its event loop) in the run

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Corpus:
    """Plausible support mail of a given size, made fast and never twice the same.

    Every tenth message goes to sysops@ (a page), a few to hosting@, the rest to
    support@; a fifth of the support@ mail is a reply: In-Reply-To a message sent
    earlier in the run, or one of the stored messages (`reply_to`) for the
    scale rows. A 1 MiB message carries a binary attachment whose first line
    differs per message, so every attachment is a new blob, as in real mail.
    """

    def __init__(
        self,
        size: int,
        run: str,
        reply_to: Callable[[random.Random], str] | None = None,
        seed: int = 7,
    ) -> None:
        self.size = size
        self.run = run
        self.reply_to = reply_to
        self.random = random.Random(seed)
        self.count = 0
        self.recent: list[str] = []
        self.attachment = size > 64 * 1024
        body_bytes = max(0, size - 700)
        if self.attachment:
            raw = os.urandom(body_bytes * 3 // 4)
            self.payload = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        else:
            line = b"The site answers slowly since this morning; here is what we see.\r\n"
            self.payload = (line * (body_bytes // len(line) + 1))[:body_bytes]

    def next(self) -> Outgoing:
        self.count += 1
        n = self.count
        rng = self.random
        message_id = f"<bench-{self.run}-{n}@client.example>"
        sender = f"customer{n % 500}@customer{n % 50}.example"
        reply = ""
        if n % 10 == 0:
            rcpt = SYSOPS
        elif n % 10 == 5:
            rcpt = HOSTING
        else:
            rcpt = SUPPORT
            if n % 5 == 1 and n > 1:
                target = None
                if self.reply_to is not None:
                    target = self.reply_to(rng)
                elif self.recent:
                    target = rng.choice(self.recent)
                if target:
                    reply = f"In-Reply-To: {target}\r\nReferences: {target}\r\n"
        if rcpt == SUPPORT and not reply:
            self.recent.append(message_id)
            if len(self.recent) > 1000:
                del self.recent[:500]
        subject = f"{'Re: ' if reply else ''}Site slow on production ({self.run} {n})"
        headers = (
            f"From: Customer {n % 500} <{sender}>\r\n"
            f"To: {rcpt}\r\n"
            f"Subject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: {message_id}\r\n"
            f"{reply}"
            "MIME-Version: 1.0\r\n"
        ).encode()
        if self.attachment:
            fresh = base64.encodebytes(rng.randbytes(57)).replace(b"\n", b"\r\n")
            data = (
                headers + b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
                b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                b"Logs attached. The site answers 502 since 09:40.\r\n"
                b"--b1\r\nContent-Type: application/octet-stream\r\n"
                b'Content-Disposition: attachment; filename="logs.tar.gz"\r\n'
                b"Content-Transfer-Encoding: base64\r\n\r\n" + fresh + self.payload + b"--b1--\r\n"
            )
        else:
            text_type = b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            data = headers + text_type + self.payload + b"\r\n"
        return Outgoing(
            mail_from=sender,
            rcpt=rcpt,
            data=data,
            message_id=message_id,
            pages=rcpt == SYSOPS,
        )


async def _send_one(smtp: aiosmtplib.SMTP, message: Outgoing) -> Sent:
    await smtp.mail(message.mail_from)
    await smtp.rcpt(message.rcpt)
    protocol = smtp.protocol
    assert protocol is not None
    assert protocol.transport is not None
    reply = await protocol.execute_command(b"DATA")
    if reply.code != 354:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    protocol.write(message.data)  # the bodies have no line that starts with "."
    transport = protocol.transport
    while transport.get_write_buffer_size():  # noqa: ASYNC110 (the body is on the wire first)
        await asyncio.sleep(0.0005)
    started = time.perf_counter()
    reply = await protocol.execute_command(b".")
    took = time.perf_counter() - started
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    queued = QUEUED_AS.search(reply.message)
    return Sent(
        message_id=message.message_id,
        rcpt=message.rcpt,
        pages=message.pages,
        accepted_at=time.time(),
        end_of_data=took,
        inbound_id=int(queued.group(1)) if queued else None,
    )


async def _session_loop(
    port: int,
    per_connection: int,
    deadline: float,
    corpus: Corpus,
    result: LoadResult,
    on_sent: Callable[[Sent], None],
    limit: list[int],
) -> None:
    while time.monotonic() < deadline and limit[0] > 0:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, timeout=120, start_tls=False, use_tls=False
        )
        try:
            await smtp.connect()
            await smtp.ehlo(hostname="client.bench.invalid")
            for _ in range(per_connection):
                if limit[0] <= 0 or time.monotonic() >= deadline:
                    break
                limit[0] -= 1
                sent = await _send_one(smtp, corpus.next())
                result.sent.append(sent)
                on_sent(sent)
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError) as exc:
            code = getattr(exc, "code", None)
            result.error(f"{type(exc).__name__} {code}" if code else type(exc).__name__)
            smtp.close()
            await asyncio.sleep(0.05)


async def run_load(
    port: int,
    connections: int,
    per_connection: int,
    seconds: float,
    corpus: Corpus,
    on_sent: Callable[[Sent], None] = lambda sent: None,
    max_messages: int = 10**9,
) -> LoadResult:
    """Send for `seconds` (or `max_messages`) over `connections` concurrent sessions."""
    cpu = time.thread_time()
    result = LoadResult(started=time.time())
    deadline = time.monotonic() + seconds
    limit = [max_messages]
    await asyncio.gather(
        *(
            _session_loop(port, per_connection, deadline, corpus, result, on_sent, limit)
            for _ in range(connections)
        )
    )
    result.client_cpu = time.thread_time() - cpu
    return result
