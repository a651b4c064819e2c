"""One send per response: a connection's writes made in one event-loop turn leave together.

uvicorn writes a response's status line and headers, then its body, as two
writes; each is a send() system call and, with TCP_NODELAY, a packet of its
own. ``CoalescingTransport`` stands in for the connection's transport: it
keeps what is written and hands it on as one write when the turn ends (a
callback on the loop), so a plain response costs one send(), not two. Every
write of the protocol and of its requests goes through it, so the order of
the bytes on a connection is unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

# More than this kept in one turn is handed on at once: a large body or a burst of event-stream frames meets
# the transport's flow control (pause at uvicorn's 64 KiB high-water mark) as it did without the wrapper.
SEND_AT_ONCE_BYTES = 64 * 1024


class CoalescingTransport:
    """A transport whose writes in one loop turn are handed on as one; all else is the transport's own.

    ``close`` hands on what is kept first; ``abort`` drops it, as a
    transport's abort drops its buffer. Pausing and resuming reading, the
    write buffer and the rest go to the transport untouched.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.handed_bytes = 0  # the last write handed on: kept whole by the transport until all of it is sent
        self._send_kept = self.send_kept  # bound once: scheduled for every response

    def write(self, data: bytes) -> None:
        if not self.kept:
            self.loop.call_soon(self._send_kept)
        self.kept.append(data)
        self.kept_bytes += len(data)
        if self.kept_bytes > SEND_AT_ONCE_BYTES:
            self.send_kept()

    def send_kept(self) -> None:
        if not self.kept:
            return  # already handed on (closed, aborted, or past SEND_AT_ONCE_BYTES) within the turn
        kept, self.handed_bytes, self.kept, self.kept_bytes = self.kept, self.kept_bytes, [], 0
        if not self.transport.is_closing():  # the client left: the bytes have nowhere to go
            self.transport.writelines(kept)  # several pieces go out in one writev(), without a copy

    def close(self) -> None:
        self.send_kept()
        self.transport.close()

    def abort(self) -> None:
        self.kept, self.kept_bytes = [], 0
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
