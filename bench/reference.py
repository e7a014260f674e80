"""The reference: aiosmtpd with a handler that only answers 250, storing nothing.

    python -m bench.reference PORT

It is the ceiling for any server built on aiosmtpd in this Python: maild's
figures are given as a fraction of it. Same aiosmtpd, same size limit, same
client; no TLS, no authentication, no storage.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class Accept:
    """Answers 250 to every message and forgets it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Accept()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=MAX_MESSAGE_SIZE, hostname="reference.invalid"),
        host="127.0.0.1",
        port=port,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
