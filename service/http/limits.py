"""Limits on HTTP connections, enforced in uvicorn's protocol before a request reaches the app (or its auth).

uvicorn's httptools protocol keeps a request's head in memory however large it
grows, waits for it and for its body however slowly they arrive, and keeps
whatever a client does not read. ``LimitedHttpToolsProtocol`` refuses a head
over ``MAX_HEADER_BYTES``; drops a connection whose head is not complete
within ``HEADER_TIMEOUT_SECONDS``; answers 408 to a body not complete within
BODY_TIMEOUT_SECONDS of its head; drops a client that leaves more than the
transport's high-water mark (64 KiB) unread for WRITE_TIMEOUT_SECONDS, or
whose unread bytes would take all connections' past ``UNSENT_BYTES_MAX``;
answers 503 past ``MAX_CONNECTIONS`` (but /healthz, so liveness outlives
exhausted connections); and answers malformed HTTP, like every refusal here,
in JSON with a ``detail``. A client that half-closes after its request gets
the answer in flight before the connection closes.

The protocol also writes through ``writes.CoalescingTransport``, so a
response leaves in one send() rather than two.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import settings
from service.http.writes import CoalescingTransport
from service.logs import log

MAX_HEADER_BYTES = 64 * 1024  # the request line and headers together
HEADER_TIMEOUT_SECONDS = 10.0  # from connection (or a kept-alive request's first byte) to the end of the head
MAX_CONNECTIONS = 2000  # open connections, or requests in progress: past it 503, but for /healthz
UNSENT_BYTES_MAX = 64 * 1024 * 1024  # unread bytes of all stalled connections together: past it a client is dropped
LIVENESS_PATH = b"/healthz"
BODY_TIMEOUT_SCOPE_KEY = "agent_runner.body_timeout"  # set when the body missed its deadline: read_json answers 408


def json_refusal(status: int, detail: str, *headers: tuple[bytes, bytes]) -> ASGIApp:
    """An ASGI app that answers ``{"detail": detail}`` with ``status`` and closes the connection."""
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"), *headers]

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    return refuse


refuse_headers_too_large = json_refusal(431, f"Request headers are larger than {MAX_HEADER_BYTES} bytes")
refuse_too_many_connections = json_refusal(503, "Too many connections, please retry later", (b"retry-after", b"1"))
INVALID_HTTP_BODY = b'{"detail":"Invalid HTTP request"}'
INVALID_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                       b"connection: close\r\n\r\n%s" % (len(INVALID_HTTP_BODY), INVALID_HTTP_BODY))


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with caps on a request's head, the time its head and body may take, and what
    a client may leave unread.

    A head that completes within one read is measured as parsed and answered
    431. httptools keeps an incomplete header to itself until its end arrives,
    so a head still growing is measured by the bytes received since it began
    and the connection is closed once they pass the cap: at most one read
    (uvloop reads up to 250 KB at a time) is held beyond it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's check answers plain text and spares nothing: on_headers_complete's
        self.head_received: int | None = None  # bytes received since the head began; None between heads
        self.head_size = 0  # bytes of request line and headers parsed
        self.head_started = 0.0  # loop time the current head began
        self.body_pending = False  # a head is complete and its body is not
        self.body_due: float | None = None  # loop time the pending body must be complete by (once it outlasts a read)
        # One timer per connection, not per request: it is left running when a head or body completes, and when
        # it fires it closes the connection if a head or body is past its deadline, or waits for the one in
        # progress, or stops until the next one begins.
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.unsent = 0  # bytes the client left unread when writing paused (0 while it reads)
        self.write_timer: asyncio.TimerHandle | None = None  # runs while writing is paused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # reading is paused and resumed on the transport itself (uvicorn's flow)
        self.writes = CoalescingTransport(transport, self.loop)
        self.transport = self.writes  # type: ignore[assignment]
        self._begin_head()  # so a client that connects and sends nothing is dropped too

    def eof_received(self) -> bool | None:  # type: ignore[override]
        # The client ended its side (a half-close after its request): what this turn wrote goes out first.
        self.writes.send_kept()
        cycle = self.cycle
        if cycle is None or self.body_pending or (cycle.response_complete and not self.pipeline):
            super().eof_received()
            return None  # nothing in flight (or a request that cannot complete): the transport closes
        # An answer is in flight: the connection stays half-open until the last request's answer is written.
        (self.pipeline[0][0] if self.pipeline else cycle).keep_alive = False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        for timer in (self.deadline_timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.deadline_timer = self.write_timer = None
        self.unsent = 0
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.head_received is not None:
            self.head_received += len(data)
        super().data_received(data)
        if self.head_received is not None and self.head_received > MAX_HEADER_BYTES:
            self._refuse("headers_too_large")
            self.transport.close()
        elif self.body_pending and self.body_due is None:  # a body that did not come with its head
            self._begin_body()

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        self._refuse("invalid_http")
        if cycle is None or not cycle.response_started or cycle.response_complete:  # never inside another answer
            self.transport.write(INVALID_HTTP_ANSWER)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_received is None:  # the next request on a kept-alive connection
            self._begin_head()

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.body_pending = True
        self._end_head()
        if self.head_size > MAX_HEADER_BYTES:
            self._refuse("headers_too_large")
            refusal: ASGIApp | None = refuse_headers_too_large
        elif (len(self.connections) >= MAX_CONNECTIONS or len(self.tasks) >= MAX_CONNECTIONS) and \
                self.url.partition(b"?")[0] != LIVENESS_PATH:
            log.warning("request_refused", extra={"reason": "too_many_connections", "client": self._client()})
            refusal = refuse_too_many_connections
        else:
            extensions: dict[str, Any] = self.scope  # type: ignore[assignment]  # a key of ours beside the ASGI ones
            extensions["agent_runner.abort"] = self.transport.abort  # an event stream drops a client that lags
            super().on_headers_complete()
            return
        app, self.app = self.app, refusal
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        self.body_pending = False
        self.body_due = None
        super().on_message_complete()

    def pause_writing(self) -> None:
        """The client left more than the high-water mark unread: it has WRITE_TIMEOUT_SECONDS to take it, and
        all such clients together may not leave more than UNSENT_BYTES_MAX."""
        super().pause_writing()
        self.unsent = max(self.transport.get_write_buffer_size(), self.writes.handed_bytes)
        if self._unsent_total() > UNSENT_BYTES_MAX:
            self._drop("unsent_bytes")
        elif self.write_timer is None:
            self.write_timer = self.loop.call_later(settings.current.write_timeout_seconds, self._write_timed_out)

    def resume_writing(self) -> None:
        self.unsent = 0
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        super().resume_writing()

    def _unsent_total(self) -> int:
        """What stalled clients hold, each counted when it paused: until it takes what it left unread, the
        transport keeps every buffer it was handed whole (even one partly sent)."""
        connections: set[LimitedHttpToolsProtocol] = self.connections  # type: ignore[assignment]
        return sum(connection.unsent for connection in connections)

    def _write_timed_out(self) -> None:
        self.write_timer = None
        if not self.transport.is_closing():
            self.unsent = self.transport.get_write_buffer_size()
            self._drop("write_timeout")

    def _drop(self, reason: str) -> None:
        log.warning("connection_dropped", extra={"reason": reason, "client": self._client(),
                                                 "unsent_bytes": self.unsent})
        self.unsent = 0
        self.transport.abort()  # what is unread is let go now; the request's send returns (disconnected)

    def _begin_head(self) -> None:
        self.head_received = self.head_size = 0
        self.head_started = self.loop.time()
        if self.deadline_timer is None:
            self.deadline_timer = self.loop.call_at(self.head_started + HEADER_TIMEOUT_SECONDS, self._deadline)

    def _end_head(self) -> None:
        self.head_received = None

    def _begin_body(self) -> None:
        self.body_due = due = self.loop.time() + settings.current.body_timeout_seconds
        timer = self.deadline_timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self.deadline_timer = self.loop.call_at(due, self._deadline)

    def _deadline(self) -> None:
        self.deadline_timer = None
        if self.transport.is_closing():
            return
        if self.head_received is not None:
            due = self.head_started + HEADER_TIMEOUT_SECONDS
            if self.loop.time() >= due:
                self._refuse("header_timeout")
                self.transport.close()
                return
        elif self.body_due is not None:
            due = self.body_due
            if self.loop.time() >= due:
                self._body_timed_out()
                return
        else:
            return  # nothing in progress: _begin_head or _begin_body starts the timer again
        self.deadline_timer = self.loop.call_at(due, self._deadline)  # for the head or body begun after the last

    def _body_timed_out(self) -> None:
        """408 through the app when it waits for the body (read_json); otherwise the connection just closes."""
        self.body_pending = False
        self.body_due = None
        self._refuse("body_timeout")
        cycle = self.cycle
        if cycle is None or cycle.response_started or cycle.disconnected:
            self.transport.close()
            return
        cycle.scope[BODY_TIMEOUT_SCOPE_KEY] = True  # type: ignore[literal-required]
        cycle.keep_alive = False  # the rest of the body will not be read: the answer closes the connection
        self.flow.pause_reading()
        cycle.message_event.set()

    def _client(self) -> str | None:
        return "%s:%d" % self.client if self.client else None

    def _refuse(self, reason: str) -> None:
        self._end_head()
        log.warning("request_refused", extra={"reason": reason, "client": self._client()})
