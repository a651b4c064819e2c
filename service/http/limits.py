"""Limits on HTTP connections, enforced in uvicorn's protocol before a request reaches the app (or its auth).

uvicorn's httptools protocol keeps a request's head in memory however large it
grows and waits for it however slowly it arrives. ``LimitedHttpToolsProtocol``
refuses a head over ``MAX_HEADER_BYTES`` and drops a connection whose head is
not complete within ``HEADER_TIMEOUT_SECONDS``; uvicorn's own
``limit_concurrency`` (``MAX_CONNECTIONS``) answers 503 past that many
connections.

The protocol also writes through ``writes.CoalescingTransport``, so a
response leaves in one send() rather than two.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.writes import CoalescingTransport
from service.logs import log

MAX_HEADER_BYTES = 64 * 1024  # the request line and headers together
HEADER_TIMEOUT_SECONDS = 10.0  # from connection (or a kept-alive request's first byte) to the end of the head
MAX_CONNECTIONS = 2000  # uvicorn's limit_concurrency: open connections, or requests in progress (the suite uses 1000)

TOO_LARGE = json.dumps({"detail": f"Request headers are larger than {MAX_HEADER_BYTES} bytes"},
                       separators=(",", ":")).encode()


async def refuse_headers_too_large(scope: Scope, receive: Receive, send: Send) -> None:
    """Served instead of the app for a head over the limit: 431, then the connection closes."""
    await send({"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(TOO_LARGE)),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": TOO_LARGE})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a cap on the size of a request's head and on the time it may take.

    A head that completes within one read is measured as parsed and answered
    431. httptools keeps an incomplete header to itself until its end arrives,
    so a head still growing is measured by the bytes received since it began
    and the connection is closed once they pass the cap: at most one read
    (uvloop reads up to 250 KB at a time) is held beyond it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_received: int | None = None  # bytes received since the head began; None between heads
        self.head_size = 0  # bytes of request line and headers parsed
        self.head_started = 0.0  # loop time the current head began
        # One timer per connection, not per request: it is left running when a head completes, and when it
        # fires it closes the connection if a head began HEADER_TIMEOUT_SECONDS ago, or waits for the one
        # in progress, or stops until the next head begins.
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # reading is paused and resumed on the transport itself (uvicorn's flow)
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._begin_head()  # so a client that connects and sends nothing is dropped too

    def eof_received(self) -> None:
        # The client ended its side (a half-close after its request): the transport closes on return, so what
        # this turn wrote (an answer written as the end of input arrived) goes out first.
        self.transport.send_kept()  # type: ignore[attr-defined]
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.head_received is not None:
            self.head_received += len(data)
        super().data_received(data)
        if self.head_received is not None and self.head_received > MAX_HEADER_BYTES:
            self._refuse("headers_too_large")
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
        if self.head_size <= MAX_HEADER_BYTES:
            self._end_head()
            extensions: dict[str, Any] = self.scope  # type: ignore[assignment]  # a key of ours beside the ASGI ones
            extensions["agent_runner.abort"] = self.transport.abort  # an event stream drops a client that lags
            super().on_headers_complete()
            return
        self._refuse("headers_too_large")
        app, self.app = self.app, refuse_headers_too_large
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _begin_head(self) -> None:
        self.head_received = self.head_size = 0
        self.head_started = self.loop.time()
        if self.head_timer is None:
            self.head_timer = self.loop.call_at(self.head_started + HEADER_TIMEOUT_SECONDS, self._head_timer_fired)

    def _end_head(self) -> None:
        self.head_received = None

    def _head_timer_fired(self) -> None:
        self.head_timer = None
        if self.head_received is None or self.transport.is_closing():
            return  # no head in progress: _begin_head starts the timer again
        deadline = self.head_started + HEADER_TIMEOUT_SECONDS
        if self.loop.time() < deadline:  # the head in progress began after the one the timer was set for
            self.head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        self._refuse("header_timeout")
        self.transport.close()

    def _refuse(self, reason: str) -> None:
        self._end_head()
        client = "%s:%d" % self.client if self.client else None
        log.warning("request_refused", extra={"reason": reason, "client": client})
