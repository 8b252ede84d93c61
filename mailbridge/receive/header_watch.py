"""Reads the header of a message while aiosmtpd receives its DATA, so a message whose From is
not a member is refused without keeping its body: the rest of the DATA is read and thrown
away instead of being buffered (an 80 MB message from anyone would otherwise sit in memory
before the member check could refuse it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

END_OF_DATA = b".\r\n"
HEADER_LIMIT = 1024 * 1024  # more header than this: no early decision (handle_DATA decides)

# Given the header bytes, the refusal to answer (e.g. 550 5.7.1) or None to go on reading.
Decide = Callable[[bytes], Awaitable[str | None]]


class HeaderWatch:
    """Stands in for aiosmtpd's StreamReader during DATA (it only calls `readuntil` and
    `read`). Once the header is complete, `decide` runs once; after a refusal the remaining
    lines are drained here and aiosmtpd sees the end of DATA at once."""

    def __init__(self, reader: asyncio.StreamReader, decide: Decide) -> None:
        self._reader = reader
        self._decide = decide
        self._header = bytearray()
        self._reading_header = True
        self.refusal: str | None = None

    async def read(self, n: int = -1) -> bytes:
        self._reading_header = False  # an over-long line: no early decision for this message
        return await self._reader.read(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line = await self._reader.readuntil(separator)
        if not self._reading_header or line == END_OF_DATA:
            return line
        if line == b"\r\n":
            self._reading_header = False
            self.refusal = await self._decide(bytes(self._header))
            if self.refusal is not None:
                await self._drain()
                return END_OF_DATA
            return line
        # RFC 5321 4.5.2: a leading dot is doubled on the wire.
        self._header += line[1:] if line.startswith(b".") else line
        if len(self._header) > HEADER_LIMIT:
            self._reading_header = False
        return line

    async def _drain(self) -> None:
        in_long_line = False
        while True:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)
                in_long_line = True
                continue
            if line == END_OF_DATA and not in_long_line:
                return
            in_long_line = False
