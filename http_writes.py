"""One send per response: a connection's writes made in one event-loop turn leave together.

uvicorn writes a response's status line and headers, then its body, as two
writes; each is a send() system call and, with TCP_NODELAY, a packet of its
own. ``CoalescingTransport`` stands in for the connection's transport: it
keeps what is written and sends it as one write when the turn ends (a
callback on the loop), so a plain response costs one send(), not two. The
order of the bytes on a connection is unchanged: every write of the
protocol and of its requests goes through it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """A transport's writes in one loop turn sent as one; all else is the transport's own.

    ``close`` sends what is kept first; ``abort`` drops it, as a transport's
    abort drops its buffer. Pausing and resuming reading, the write buffer's
    limits and the rest are passed through untouched.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.kept: list[bytes] = []
        self._send_kept = self.send_kept  # bound once: scheduled for every response

    def write(self, data: bytes) -> None:
        if not self.kept:
            self.loop.call_soon(self._send_kept)
        self.kept.append(data)

    def send_kept(self) -> None:
        if not self.kept:
            return  # closed or aborted in the same turn
        kept, self.kept = self.kept, []
        if not self.transport.is_closing():  # the client left: the bytes have nowhere to go
            self.transport.write(kept[0] if len(kept) == 1 else b"".join(kept))

    def close(self) -> None:
        self.send_kept()
        self.transport.close()

    def abort(self) -> None:
        self.kept.clear()
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
