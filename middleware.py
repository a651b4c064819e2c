"""Pure ASGI middleware: bearer-token auth on /agents paths, and the per-request log line and metric."""

from __future__ import annotations

import hmac
import time
from json.encoder import encode_basestring_ascii as json_string
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

import metrics
import settings
from http_json import json_response
from logs import log_hot

LOGGED_PATH_CHARS = 200  # a longer path is logged cut to this, with "path_chars" giving its length


class BearerAuth:
    """With API_TOKEN set, every /agents path needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = settings.current.api_token
        path = scope.get("path", "")
        if token and scope["type"] == "http" and (path == "/agents" or path.startswith("/agents/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + token.encode()):
                response = json_response({"detail": "Missing or invalid bearer token"}, 401,
                                         headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AccessLog:
    """One ``http_request`` log line and one metrics sample per request.

    This is the hot path, so the line goes through log_hot.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._requests: dict[tuple[str, str, int], Any] = {}  # labelled counters, looked up once each

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            method = scope["method"]
            route = scope.get("route")
            key = (method, route.path if route is not None else "<unmatched>", status)
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = metrics.HTTP_REQUESTS_TOTAL.labels(key[0], key[1], str(status))
            counter.inc()
            path = scope["path"]
            logged = json_string(path) if len(path) <= LOGGED_PATH_CHARS else \
                f'{json_string(logged_path(path))}, "path_chars": {len(path)}'
            log_hot("http_request", f'"method": {json_string(method)}, "path": {logged}, "status": {status}, '
                                    f'"duration_ms": {round((time.perf_counter() - started) * 1000, 2)}')


def logged_path(path: str) -> str:
    """A request path as logs show it: cut to LOGGED_PATH_CHARS (ending "...") so clients cannot swell the log."""
    return path if len(path) <= LOGGED_PATH_CHARS else path[:LOGGED_PATH_CHARS - 3] + "..."
