"""DATA read in blocks (smtp.data_pieces, smtp.unstuff) stores what aiosmtpd's
line-by-line reading stores, wherever the bytes are cut as they arrive."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from maild.receive.smtp import data_pieces, unstuff
from tests.test_fuzz import SPECIAL, aiosmtpd_reads

# Bytes that make or break an end-of-data line, and the dots that stuffing is about.
EDGES = st.sampled_from(
    [b".", b"..", b".\r", b".\r\n", b"\r\n.", b"\r\n.\r", b"\r\n..\r\n", b"\r", b"\n", b"\r\n"]
)


async def read(wire: bytes, cuts: list[int], limit: int) -> tuple[bytes, bytes]:
    """The message and the bytes left after it, `wire` arriving in pieces cut at `cuts`."""
    reader = asyncio.StreamReader(limit=limit)

    async def arrive() -> None:
        start = 0
        for cut in [*cuts, len(wire)]:
            reader.feed_data(wire[start : start + cut])
            start += cut
            await asyncio.sleep(0)
            if start >= len(wire):
                break
        reader.feed_eof()

    sender = asyncio.create_task(arrive())
    pieces = [piece async for piece in data_pieces(reader)]
    await sender
    assert all(pieces), "an empty piece"
    return unstuff(pieces), await reader.read()


@settings(max_examples=1500, deadline=None)
@given(
    body=st.lists(st.one_of(st.binary(max_size=12), SPECIAL, EDGES), max_size=30),
    after=st.binary(max_size=8),
    cuts=st.lists(st.integers(1, 40), max_size=20),
    limit=st.sampled_from([8, 16, 64, 4096]),
)
def test_blocks_store_what_lines_store(
    body: list[bytes], after: bytes, cuts: list[int], limit: int
) -> None:
    """Any bytes, then an end of data (maybe not the first), then a pipelined command."""
    wire = b"".join(body) + b"\r\n.\r\n" + after
    assert asyncio.run(read(wire, cuts, limit)) == aiosmtpd_reads(wire)


def test_an_empty_message_and_a_leading_dot() -> None:
    assert asyncio.run(read(b".\r\nQUIT\r\n", [1, 1, 1], 4096)) == (b"", b"QUIT\r\n")
    assert asyncio.run(read(b"\r\n.\r\n", [1], 4096)) == (b"\r\n", b"")
    assert asyncio.run(read(b"..x\r\n.y\r\n.\r\n", [2], 4096)) == (b".x\r\ny\r\n", b"")
