"""The Server-Sent Events response: one client's frames written as they come, with keep-alive comments.

A pure ASGI response (Starlette's StreamingResponse would not notice a client
that went away under ASGI spec 2.4, and cannot be stopped while a send waits
on a client that does not read).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Receive, Scope, Send

from events import EventHub, Frame, Subscriber

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]  # proxies such as nginx would otherwise hold frames back
KEEPALIVE = b": keep-alive\n\n"
ABORT_SCOPE_KEY = "agent_runner.abort"  # set by http_limits.LimitedHttpToolsProtocol: closes the connection


class EventStream:
    """Writes ``first`` and then the subscriber's frames; a run's stream ends after its terminal frame."""

    def __init__(self, events: EventHub, client: Subscriber, first: list[Frame]) -> None:
        self.events = events
        self.client = client
        self.first = first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.client
        watcher = asyncio.ensure_future(self._watch_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            self.last: tuple[int, int] = (-1, -1)
            done = await self._write(send, self.first, check=False)
            while not done and client.ended not in ("slow", "disconnected"):
                if not client.frames:
                    if client.ended is not None:
                        break
                    client.wake.clear()
                    try:
                        async with asyncio.timeout(self.events.keepalive):
                            await client.wake.wait()
                    except TimeoutError:
                        await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                done = await self._write(send, client.take(), check=True)
            if client.ended not in ("slow", "disconnected"):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.events.unsubscribe(client)

    async def _write(self, send: Send, frames: list[Frame], check: bool) -> bool:
        """Send ``frames`` as one chunk (skipping, with ``check``, those sent already); True after a run's
        terminal frame."""
        chunks = []
        done = False
        for frame in frames:
            if check and frame.key <= self.last:
                continue  # the first frames (replay or snapshot) already covered it
            chunks.append(frame.wire)
            self.last = max(self.last, frame.key)
            if frame.terminal and self.client.run_id is not None:
                done = True
                break
        if chunks:
            await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
        return done

    async def _watch_disconnect(self, receive: Receive) -> None:
        with contextlib.suppress(Exception):
            while (await receive())["type"] != "http.disconnect":
                pass
        self.events.unsubscribe(self.client, "disconnected")
