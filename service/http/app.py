"""The app: its routes, error answers and lifespan, built once by ``build_app``.

Every URL the service answers is in ``routes``; every error is answered as
JSON ``{"detail": ...}`` by the handlers in ``exception_handlers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import agents
from service import metrics, settings, tracing
from service.cancelling import cancel_and_wait
from service.backends import Backend
from service.backends.records import StoreUnavailable
from service.http import dashboard
from service.http.docs import docs, openapi_json, openapi_spec
from service.http.event_stream import all_events, run_events, run_logs
from service.http.handlers import (cancel_run, get_status, healthz, list_agents, list_runs, metrics_page,
                                   post_run, readyz, status_answer)
from service.http.middleware import (AccessLog, Cors, ForwardedClient, RootPath, Shortcut, logged_path,
                                     token_required)
from service.http.single_process import claim_server_sockets
from service.http.startup import refuse_to_start
from service.http.validation import json_response
from service.logs import flush_stdout_regularly, log, write_hot_lines
from service.supervision import run_fields
from service.runtime import NotStarted, Runtime, close_runtime, open_runtime, stop_delivering
from service.settings import ConfigError


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    return json_response({"detail": "Run store unavailable"}, 503, headers={"Retry-After": "1"})


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled_error", exc_info=exc, extra={"method": request.method, "path": logged_path(request.url.path)})
    return json_response({"detail": "Internal server error"}, 500)


LOOP_LAG_WARNING_SECONDS = 1.0  # an event loop stalled longer than this is logged (event_loop_blocked)


async def watch_event_loop(runtime: Runtime, interval: float = 0.25) -> None:
    """Warn when something (usually an agent doing blocking work) stalls the event loop."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + interval
        await asyncio.sleep(interval)
        lag = loop.time() - expected
        if lag > LOOP_LAG_WARNING_SECONDS:
            active = next(iter(runtime.runner.active_runs.values()), None)
            log.warning("event_loop_blocked", extra={
                "lag_ms": round(lag * 1000), **(run_fields(active.run) if active else {}),
                "hint": "agents must run blocking work in asyncio.to_thread"})


async def not_started(request: Request, exc: Exception) -> Response:
    """A launcher that runs no lifespan (``--lifespan off``) gets no service: nothing is admitted unguarded."""
    return json_response({"detail": "The service has not started (its launcher ran no ASGI lifespan)"}, 503)


def lifespan_of(version: str) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: the runtime is built at start (after the one-process check) and taken down at stop."""
    return contextlib.asynccontextmanager(lambda app: lifespan(app, version))


async def lifespan(app: Starlette, version: str) -> AsyncIterator[None]:
    """Build the runtime (refusing a second memory-mode process), serve, then drain and take it down."""
    async def before_start(backend: Backend) -> None:
        backend.on_invalid_configuration = refuse_to_start  # what the store tells only once reached, after start
        if not backend.shared and not getattr(app.state, "binds_own_socket", False):
            await refuse_second_memory_process()

    try:
        runtime = app.state.runtime = await open_runtime(settings.current, before_start=before_start)
    except ConfigError as exc:  # what only the store can tell (a schema newer than this version knows)
        refuse_to_start(exc.variable, exc.detail)
    log.info("service_started", extra={
        "version": version, "store": runtime.backend.name, "agent_types": sorted(agents.registry),
        "agent_sleep_seconds": settings.current.agent_sleep_seconds})
    background = [asyncio.create_task(flush_stdout_regularly()), asyncio.create_task(watch_event_loop(runtime)),
                  asyncio.create_task(runtime.admission.dispatch_forever())]
    try:
        yield
    finally:
        await runtime.admission.drain(settings.current.shutdown_grace_seconds)
        await stop_delivering(runtime)
        await close_runtime(runtime)  # ends the event streams first
        for task in background:
            await cancel_and_wait(task)
        write_hot_lines()
        sys.stdout.flush()
        tracing.shutdown()


async def refuse_second_memory_process() -> None:
    """Memory mode: refuse to start when another process on this host serves the socket this worker was handed.

    A holder that is stopping (the old worker of a graceful reload) is waited for, as long as it may drain.
    """
    taken = await claim_server_sockets(settings.current.shutdown_grace_seconds + STOP_MARGIN_SECONDS)
    if taken is not None:
        refuse_to_start("REDIS_URL", f"memory mode runs in one process, and another process on this host already "
                                     f"serves {taken} in memory mode (several workers, or --reuse-port); "
                                     "run one worker, or set REDIS_URL to share the slots between processes")


STOP_MARGIN_SECONDS = 5.0  # beyond the grace: how long a stopping process may take to record and exit


# the busiest route: its GET and HEAD requests are answered by the Shortcut middleware, ahead of the router
status_route = token_required(Route("/agents/status/{run_id}", get_status, methods=["GET"]))

routes = [  # the router tries them in order: the busiest first; every /agents route needs the API token
    status_route,
    token_required(Route("/agents/run", post_run, methods=["POST"])),
    token_required(Route("/agents", list_agents, methods=["GET"])),
    token_required(Route("/agents/cancel/{run_id}", cancel_run, methods=["POST"])),
    token_required(Route("/agents/runs", list_runs, methods=["GET"])),
    token_required(Route("/agents/events", all_events, methods=["GET"])),
    token_required(Route("/agents/events/{run_id}", run_events, methods=["GET"])),
    token_required(Route("/agents/logs/{run_id}", run_logs, methods=["GET"])),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_page, methods=["GET"]),
    Route("/openapi.yaml", openapi_spec, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Route("/", dashboard.dashboard, methods=["GET"]),
]


exception_handlers: dict[Any, Any] = {HTTPException: http_error, StoreUnavailable: store_unavailable,
                                      NotStarted: not_started, Exception: server_error}


def build_app(version: str) -> Starlette:
    """The ASGI app; the settings it follows are read by each request, once the launcher has read them."""
    metrics.set_build_info(version)
    app = Starlette(routes=routes, exception_handlers=exception_handlers, lifespan=lifespan_of(version))
    app.router.redirect_slashes = False  # its redirects take their host from the Host header: /metrics/ is a 404
    app.add_middleware(Shortcut, route=status_route, answer=status_answer, exception_handlers=exception_handlers)
    app.add_middleware(Cors)  # inside the log line: the client and path are set, and its preflights are logged
    app.add_middleware(AccessLog)  # added last is outermost: the log line sees the client and path set below
    app.add_middleware(RootPath)
    app.add_middleware(ForwardedClient)
    return app


