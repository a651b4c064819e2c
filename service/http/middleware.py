"""Pure ASGI middleware: bearer-token auth on /agents routes, the root path, proxy headers, CORS, the access log
line (and the request's span while tracing is on), and the shortcut that answers the busiest route."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from json.encoder import encode_basestring_ascii as json_string
from typing import Any, cast

from starlette._utils import get_route_path
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service import metrics, settings, tracing
from service.http.validation import json_response
from service.logs import log_hot

LOGGED_PATH_CHARS = 200  # a longer path is logged cut to this, with "path_chars" giving its length
LOGGED_TOKEN_CHARS = 64  # a longer client address (forwarded) or method (under h11) is logged cut to this


class TokenRequired:
    """With API_TOKEN set, the wrapped route needs ``Authorization: Bearer <token>``.

    It wraps a route's app, not the whole service: the check follows the route
    the request matched, whatever prefix (``root_path``) the path carries.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = token_refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def token_refusal(scope: Scope) -> Response | None:
    """The 401 for a request without the API token (when API_TOKEN is set), or None to go on."""
    token = settings.current.api_token
    if token:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        if not hmac.compare_digest(given, b"Bearer " + token.encode()):
            return json_response({"detail": "Missing or invalid bearer token"}, 401,
                                 headers={"WWW-Authenticate": "Bearer"})
    return None


def token_required(route: Route) -> Route:
    """The route, answering 401 without the API token."""
    route.app = TokenRequired(route.app)
    return route


RouteAnswer = Callable[[Any, dict[str, Any], bytes], Awaitable[Response]]  # (app state, path params, query string)
ErrorAnswer = Callable[[Request, Exception], Awaitable[Response]]


class Shortcut:
    """A busy route's GET and HEAD requests answered ahead of Starlette's exception middleware and router, with the
    route's own token check, answer and error answers, in fewer steps (no Request, no send wrappers).

    ``answer`` is the route's endpoint taking the request's parts; ``exception_handlers`` are the app's: the
    500 one (``Exception``) stays with Starlette's outermost middleware, as in the app. Any other method goes on
    to the router (its 405).
    """

    def __init__(self, app: ASGIApp, route: Route, answer: RouteAnswer,
                 exception_handlers: Mapping[Any, ErrorAnswer]) -> None:
        self.app = app
        self.route = route
        self.answer = answer
        self.token_required = isinstance(route.app, TokenRequired)
        self.methods = route.methods or set()
        self.status_handlers = {key: handler for key, handler in exception_handlers.items()
                                if isinstance(key, int) and key != 500}
        self.class_handlers = {key: handler for key, handler in exception_handlers.items()
                               if isinstance(key, type) and key is not Exception}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.methods:
            match = self.route.path_regex.match(get_route_path(scope))
            if match is not None:
                await self.handle(scope, receive, send, match.groupdict())
                return
        await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send, matched: dict[str, str]) -> None:
        # what the router puts in the scope: the access log's route label and the span's name read it
        convertors = self.route.param_convertors
        path_params = {**scope.get("path_params", {}), **{key: convertors[key].convert(value)
                                                           for key, value in matched.items()}}
        scope["route"], scope["endpoint"], scope["path_params"] = self.route, self.route.endpoint, path_params
        response = token_refusal(scope) if self.token_required else None
        if response is None:
            try:
                response = await self.answer(scope["app"].state, path_params, scope["query_string"])
            except Exception as exc:
                handler = self.error_handler(exc)
                if handler is None:
                    raise  # to the 500 handler, as from the route
                response = await handler(Request(scope, receive, send), exc)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    def error_handler(self, exc: Exception) -> ErrorAnswer | None:
        """The handler Starlette's exception middleware would pick for ``exc``."""
        if isinstance(exc, HTTPException) and exc.status_code in self.status_handlers:
            return self.status_handlers[exc.status_code]
        return next((self.class_handlers[cls] for cls in type(exc).__mro__ if cls in self.class_handlers), None)


class RootPath:
    """With ROOT_PATH set, requests carry it as their ``root_path``, as ``uvicorn --root-path`` sets it.

    A server that set a root path itself (``--root-path``) keeps its own. The
    path gets the prefix unless the proxy passed it on already.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root_path = settings.current.root_path
        if root_path and scope["type"] == "http" and not scope.get("root_path"):
            path = scope["path"]
            if path != root_path and not path.startswith(root_path + "/"):
                path = root_path + path
            scope = {**scope, "root_path": root_path, "path": path}
        await self.app(scope, receive, send)


class SettingMiddleware:
    """A middleware that wraps an inner one built for a setting's value (read per request, as every setting is),
    built again when the value changes; with the setting empty, requests go straight to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._built: tuple[tuple[str, ...], Any] | None = None  # (the value, the middleware built for it)

    def setting(self) -> tuple[str, ...]:
        raise NotImplementedError

    def build(self, value: tuple[str, ...]) -> Any:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        value = self.setting()
        if not value or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._built is None or self._built[0] != value:
            self._built = (value, self.build(value))
        await self.handle(self._built[1], scope, receive, send)

    async def handle(self, built: Any, scope: Scope, receive: Receive, send: Send) -> None:
        await built(scope, receive, send)


class ForwardedClient(SettingMiddleware):
    """With FORWARDED_ALLOW_IPS set, a trusted proxy's X-Forwarded-For and -Proto set the client and scheme."""

    def setting(self) -> tuple[str, ...]:
        return settings.current.forwarded_allow_ips

    def build(self, value: tuple[str, ...]) -> Any:
        return ProxyHeadersMiddleware(cast(Any, self.app), trusted_hosts=list(value))


# What a page on an allowed origin may send and read: the request headers of the API (the token, JSON, a
# retry's key, a stream's resume point, a trace), and the answer headers it documents.
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "traceparent",
                        "tracestate")
CORS_EXPOSED_HEADERS = ("Location", "Retry-After", "Idempotent-Replayed", "WWW-Authenticate", "traceparent")
CORS_MAX_AGE_SECONDS = 600  # how long a browser may keep a preflight's answer (Chromium caps it at 2 hours)


class Cors(SettingMiddleware):
    """With CORS_ALLOW_ORIGINS set, Starlette's CORSMiddleware answers preflights and marks the answers to the
    origins listed; without it, no CORS header is sent and a preflight is an ordinary (405) request.

    A preflight needs no token (browsers never send one with it): the route's token check comes after. One the
    middleware refuses (a method or header not allowed) is answered as JSON ``{"detail": ...}`` like every error.
    """

    def setting(self) -> tuple[str, ...]:
        return settings.current.cors_allow_origins

    def build(self, value: tuple[str, ...]) -> Any:
        return CORSMiddleware(self.app, allow_origins=list(value), allow_methods=["GET", "POST"],
                              allow_headers=list(CORS_REQUEST_HEADERS), expose_headers=list(CORS_EXPOSED_HEADERS),
                              max_age=CORS_MAX_AGE_SECONDS)

    async def handle(self, built: Any, scope: Scope, receive: Receive, send: Send) -> None:
        preflight = scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"])
        await built(scope, receive, refusal_as_json(send) if preflight else send)


def refusal_as_json(send: Send) -> Send:
    """``send``, with a refused preflight's plain-text answer (400 "Disallowed CORS ...") turned into JSON."""
    refused: list[Message] = []

    async def send_json(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            refused.append(message)
            return
        if refused and message["type"] == "http.response.body":
            detail = message.get("body", b"").decode("utf-8", "replace")
            response = json_response({"detail": f"{detail} (preflight refused)"}, 400, headers={"Vary": "Origin"})
            await send({"type": "http.response.start", "status": 400, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        await send(message)

    return send_json


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class AccessLog:
    """One ``http_request`` log line and one metrics sample per request, and with tracing on its SERVER span
    (continuing the client's ``traceparent``), current while the app answers and the line is written.

    This is the hot path, so the line goes through log_hot.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # labelled series, looked up once each

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        traced = tracing.start_request(scope) if tracing.tracer is not None else None
        error: BaseException | None = None

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except BaseException as exc:
            error = exc
            raise
        finally:
            method = scope["method"]
            route = scope.get("route")
            # a label per method the service knows: another server's parser (h11) lets any token through
            key = (method if method in HTTP_METHODS else "other", route.path if route is not None else "<unmatched>",
                   status)
            series = self._requests.get(key)
            if series is None:
                labels = (key[0], key[1], str(status))
                series = self._requests[key] = (metrics.HTTP_REQUESTS_TOTAL.labels(*labels),
                                                metrics.HTTP_REQUEST_DURATION.labels(*labels))
            duration = time.perf_counter() - started
            series[0].inc()
            series[1].observe(duration)
            path = scope["path"]
            logged = json_string(path) if len(path) <= LOGGED_PATH_CHARS else \
                f'{json_string(logged_path(path))}, "path_chars": {len(path)}'
            client = scope.get("client")
            address = json_string(logged_text(client[0], LOGGED_TOKEN_CHARS)) if client else "null"
            log_hot("http_request", f'"method": {json_string(logged_text(method, LOGGED_TOKEN_CHARS))}, '
                                    f'"path": {logged}, "status": {status}, "client": {address}, '
                                    f'"duration_ms": {round(duration * 1000, 2)}')
            if traced is not None:  # the line above is written inside the request's span
                tracing.end_request(*traced, scope, status, error)


def logged_text(text: str, limit: int) -> str:
    """A client-chosen string as logs show it: cut to ``limit`` characters (ending "...") so that clients
    cannot swell the log."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def logged_path(path: str) -> str:
    return logged_text(path, LOGGED_PATH_CHARS)
