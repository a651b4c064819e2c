"""The event endpoints: GET /agents/events, /agents/events/{run_id} (Server-Sent Events) and
/agents/logs/{run_id}, and the response that writes one client's frames as they come.

``EventStream`` is a pure ASGI response: Starlette's StreamingResponse would
not notice a client that went away under ASGI spec 2.4, and cannot be stopped
while a send waits on a client that does not read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http.validation import check_uuid, json_response
from service.backends.records import Frame, Run, StoreUnavailable, parse_event_id
from service.events import ENDED, MAX_STREAMS, STREAM_RETRY_MS, EventHub, Subscriber
from service.runtime import from_state

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
           (b"x-accel-buffering", b"no")]  # proxies such as nginx would otherwise hold frames back
KEEPALIVE = b": keep-alive\n\n"
RETRY = b"retry: %d\n\n" % STREAM_RETRY_MS  # an EventSource reconnects after this many ms (its default is ~3 s)
COALESCE_SECONDS = 0.01  # a woken stream waits this long for more frames: one write (one syscall) for a burst
ABORT_SCOPE_KEY = "agent_runner.abort"  # set by limits.LimitedHttpToolsProtocol: closes the connection


class EventStream:
    """Writes ``first`` and then the subscriber's frames; a run's stream ends after its terminal frame."""

    def __init__(self, events: EventHub, client: Subscriber, first: list[Frame],
                 read_run: Callable[[str], Awaitable[Run | None]] | None = None) -> None:
        self.events = events
        self.client = client
        self.first = first
        self.read_run = read_run  # a run's stream: re-read at each keep-alive, in case its terminal frame was lost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.client
        if scope["method"] == "HEAD":  # the headers only, not a stream that never ends
            self.events.unsubscribe(client)
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        watcher = asyncio.ensure_future(self._watch_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            self.last: tuple[int, int] = (-1, -1)
            done = await self._write(send, self._take_first(), check=False, prefix=RETRY)
            while not done and client.ended not in ("slow", "disconnected"):
                if not client.frames:
                    if client.ended is not None:
                        break
                    client.wake.clear()
                    try:
                        async with asyncio.timeout(self.events.keepalive):
                            await client.wake.wait()
                    except TimeoutError:
                        if await self._ended_unseen(send):
                            break
                        await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                        continue
                    await asyncio.sleep(COALESCE_SECONDS)  # the frames that follow at once go in the same write
                done = await self._write(send, client.take(), check=True)
            if client.ended not in ("slow", "disconnected"):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.events.unsubscribe(client)

    def _take_first(self) -> list[Frame]:
        """The first frames, let go of here: a replay read from Redis is this client's own, megabytes maybe."""
        first, self.first = self.first, []
        return first

    async def _write(self, send: Send, frames: list[Frame], check: bool, prefix: bytes = b"") -> bool:
        """Send ``frames`` as one chunk after ``prefix`` (skipping, with ``check``, those sent already); True
        after a run's terminal frame."""
        chunks = [prefix] if prefix else []
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
            self.client.sending = True  # only seen by others while the send waits on a client not reading
            try:
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
            finally:
                self.client.sending = False
        return done

    async def _ended_unseen(self, send: Send) -> bool:
        """Whether an idle run stream should end: its run finished (or was dropped) with no terminal frame here.

        Events are best effort in Redis mode: a replica killed between storing a
        run's terminal state and publishing it, Redis refusing the event, or a
        replica of a version without events leave the stream waiting forever.
        The store is the truth; the stream then ends with the run as stored.
        """
        if self.read_run is None or self.client.run_id is None:
            return False
        try:
            run = await self.read_run(self.client.run_id)
        except StoreUnavailable:
            return False
        if run is not None and not run.finished:
            return False
        if run is not None:
            last = f"{self.last[0]}-{self.last[1]}" if self.last[0] >= 0 else "0-0"  # nothing sent yet on a resume
            await self._write(send, [Frame.snapshot(last, run)], check=False)
        return True

    async def _watch_disconnect(self, receive: Receive) -> None:
        with contextlib.suppress(Exception):
            while (await receive())["type"] != "http.disconnect":
                pass
        self.events.unsubscribe(self.client, "disconnected")


def open_stream(hub: EventHub, request: Request, run_id: str | None) -> Subscriber:
    """A new stream client, registered before its first frames are read so it misses nothing in between."""
    if not hub.available():
        raise HTTPException(503, "Shutting down" if hub.closed else "Run store unavailable",
                            headers={"Retry-After": "1"})
    if hub.streams >= MAX_STREAMS:
        raise HTTPException(503, "Too many event streams", headers={"Retry-After": "5"})
    return hub.subscribe(run_id, request.scope.get(ABORT_SCOPE_KEY))


async def run_events(request: Request) -> Response | EventStream:
    """GET /agents/events/{run_id}: the run's kept events from its first (``?from=now``: the run now), then
    each change and log line; ends after the terminal frame. A resume after that frame gets 204."""
    run_id = check_uuid(request.path_params["run_id"], "run_id")
    start = request.query_params.get("from", "start")
    if start not in ("start", "now"):
        raise HTTPException(400, "from must be 'start' or 'now'")
    runtime = from_state(request.app.state)
    hub = runtime.hub
    client = open_stream(hub, request, run_id)
    try:
        async with runtime.large_reads:  # a replay may be megabytes: a few at a time
            first = await hub.first_run_frames(run_id, parse_event_id(request.headers.get("last-event-id")),
                                               start == "now", runtime.backend.get)
    except BaseException:
        hub.unsubscribe(client)
        raise
    if first is None or first is ENDED:
        hub.unsubscribe(client)
        if first is ENDED:  # per the SSE spec, an EventSource stops reconnecting on a 204
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        raise HTTPException(404, f"Run {request.path_params['run_id']} not found")
    return EventStream(hub, client, first, runtime.backend.get)


async def all_events(request: Request) -> EventStream:
    """GET /agents/events: every run's changes (no log lines), for dashboards; never ends by itself."""
    runtime = from_state(request.app.state)
    hub = runtime.hub
    client = open_stream(hub, request, None)
    try:
        async with runtime.large_reads:
            first = await hub.first_global_frames(parse_event_id(request.headers.get("last-event-id")))
    except BaseException:
        hub.unsubscribe(client)
        raise
    return EventStream(hub, client, first)


async def run_logs(request: Request) -> Response:
    """GET /agents/logs/{run_id}: the lines its agent logged (the newest 500 / 256 KB), oldest first, and the id
    of the run's newest event, from which its stream (Last-Event-ID) goes on without a gap."""
    run_id = check_uuid(request.path_params["run_id"], "run_id")
    runtime = from_state(request.app.state)
    transport = runtime.hub.transport
    # read before the lines: a line is kept before its event is, so no line after this id is missing below
    newest = await transport.newest_run_event(run_id) if transport is not None else None
    lines = await runtime.backend.logs(run_id)
    if lines is None:
        raise HTTPException(404, f"Run {request.path_params['run_id']} not found")
    cursor = b'"%s"' % newest.encode() if newest else b"null"
    return json_response(b'{"run_id":"' + run_id.encode() + b'","last_event_id":' + cursor + b',"lines":['
                         + b",".join(lines) + b"]}")
