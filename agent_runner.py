"""agent-runner: an HTTP service that runs at most N agents at once (one by default).

This module is the HTTP surface: the handlers, the routes and the app, and
``python agent_runner.py``. One run's path from PENDING to its terminal state
is in service/runs.py; settings, logs, request validation and the backends each have
their own module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import html
import json
import logging.config
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from json.encoder import encode_basestring_ascii as json_string
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

import agents
import dashboard
import settings
from event_stream import all_events, run_events, run_logs
from http_json import (check_idempotency_key, check_uuid, check_webhook_resolves, header, json_response, parse_limit,
                       parse_run_request, parse_wait, read_json, short)
from http_limits import LimitedHttpToolsProtocol
from middleware import AccessLog, ForwardedClient, RootPath, logged_path, token_required
from service import metrics
from service.backends import Backend
from service.backends.cancelling import cancel_and_wait
from service.backends.records import STATES, Page, Run, StoreUnavailable
from service.logs import flush_stdout_regularly, log, log_hot, logging_config, write_hot_lines
from service.runs import run_fields
from service.runtime import Runtime, close_runtime, from_state, open_runtime, stop_delivering
from settings import SETTINGS_TABLE, ConfigError, Settings, load_agent_modules
import single_process
from single_process import claim_server_sockets, refusal_exit_status

__version__ = "0.1.0"

HERE = Path(__file__).resolve().parent
CANCEL_WAIT_SECONDS = 5.0  # how long POST /agents/cancel waits for the agent to stop
LIST_BODY_BYTES = 8 * 1024 * 1024  # GET /agents/runs returns fewer runs rather than a larger body
# Lists of runs and event replays read and built at once (each up to 8 MiB, several times that while decoded):
# the rest wait their turn, so clients asking many at once cannot multiply the memory they take.
LARGE_READS_AT_ONCE = 2
BUSY_BODY = b'{"detail":"An agent is already running, please retry later"}'
QUEUE_FULL_BODY = b'{"detail":"An agent is already running and the queue is full, please retry later"}'


# ---------------------------------------------------------------------------
# Handlers.


async def post_run(request: Request) -> Response:
    agent_cls, user_id, agent_input, on_busy, webhook = parse_run_request(await read_json(request))
    if header(request, b"idempotency-key") is not None:  # without one, this lookup is all a key costs
        return await post_run_once(request, agent_cls, user_id, agent_input, on_busy, webhook)
    if webhook is not None:
        await check_webhook_resolves(webhook)
    runtime = from_state(request.app.state)
    if not runtime.admission.accepting_runs:
        raise HTTPException(503, "Shutting down")
    verdict, run = await runtime.admission.admit(agent_cls, user_id, agent_input, on_busy, webhook)
    if verdict in ("busy", "full"):
        return refuse_run(runtime, verdict, agent_cls, user_id)
    assert run is not None  # accepted: started or queued
    return accept_run(request, run.run_id, on_busy, run.queue_position)


async def post_run_once(request: Request, agent_cls: type[agents.BaseAgent], user_id: str,
                        agent_input: dict[str, Any], on_busy: str, webhook: str | None) -> Response:
    """POST /agents/run with an Idempotency-Key: a retry gets the first accepted request's answer, not a run."""
    key = check_idempotency_key(request.headers.getlist("idempotency-key"))
    check = (lambda: check_webhook_resolves(webhook)) if webhook is not None else None  # a replay is not checked
    runtime = from_state(request.app.state)
    verdict, run_id, queue_position = await runtime.admission.admit_once(key, agent_cls, user_id, agent_input,
                                                                           on_busy, webhook, check)
    if verdict == "mismatch":
        raise HTTPException(422, f"Idempotency-Key {short(key)} was used with a different request")
    if verdict == "pending":
        raise HTTPException(409, "The first request with this key is still being processed, please retry later",
                            headers={"Retry-After": "1"})
    if verdict == "closed":
        raise HTTPException(503, "Shutting down")
    if verdict in ("busy", "full"):
        return refuse_run(runtime, verdict, agent_cls, user_id)
    if verdict == "replayed":
        log.info("run_replayed", extra={"run_id": run_id, "agent_type": agent_cls.agent_type, "user_id": user_id,
                                        "key": key})
    return accept_run(request, run_id, on_busy, queue_position, replayed=verdict == "replayed")


def refuse_run(runtime: Runtime, verdict: str, agent_cls: type[agents.BaseAgent], user_id: str) -> Response:
    """409: every slot taken, or the queue full. The busy path is hot: answered here, not by the exception handler."""
    metrics.REJECTED_TOTAL.inc()
    log_hot("run_rejected", f'"agent_type": {json_string(agent_cls.agent_type)}, "user_id": "{user_id}"')
    refusal = json_response(BUSY_BODY if verdict == "busy" else QUEUE_FULL_BODY, 409)
    refusal.raw_headers.append((b"retry-after", b"%d" % runtime.admission.retry_after()))
    return refusal


def accept_run(request: Request, run_id: str, on_busy: str, queue_position: int | None,
               replayed: bool = False) -> Response:
    """202 with the run's id (and its place in the queue when the request may queue); a replay says so."""
    body: dict[str, Any] = {"run_id": run_id, "state": "PENDING"}
    if on_busy != "reject":
        body["queue_position"] = queue_position
    headers = {"Location": f"{request.scope.get('root_path', '')}/agents/status/{run_id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(body, 202, headers=headers)


async def find_run(backend: Backend, run_id: str) -> Run:
    run = await backend.get(check_uuid(run_id, "run_id"))
    if run is None:
        raise HTTPException(404, f"Run {run_id} not found")
    return run


async def get_status(request: Request) -> Response:
    backend = from_state(request.app.state).backend
    run = await find_run(backend, request.path_params["run_id"])
    wait = parse_wait(request.query_params.get("wait")) if request.scope["query_string"] else None
    if wait is not None and not run.finished:
        run = await backend.wait_finished(run.run_id, wait) or run
    return json_response(run.json())


async def cancel_run(request: Request) -> Response:
    runtime = from_state(request.app.state)
    run = await find_run(runtime.backend, request.path_params["run_id"])
    if run.finished:
        raise HTTPException(409, f"Run {run.run_id} already finished ({run.state})")
    log.info("cancel_requested", extra=run_fields(run))
    if run.queue_position is not None and \
            (waiting := await runtime.admission.cancel_waiting(run.run_id, run.queue_position)) is not None:
        return json_response(waiting.json())
    if not runtime.runner.request_stop(run.run_id):  # another replica runs it (or it is just leaving the queue)
        await runtime.backend.request_cancel(run.run_id)
    run = await runtime.backend.wait_finished(run.run_id, CANCEL_WAIT_SECONDS) or run
    return json_response(run.json(), 200 if run.finished else 202)


async def list_runs(request: Request) -> Response:
    query = request.query_params
    state = query.get("state")
    if state is not None and state not in STATES:
        raise HTTPException(400, f"state must be one of {', '.join(STATES)}, got {short(state)}")
    user_id = query.get("user_id")
    before = query.get("before")
    backend = from_state(request.app.state).backend
    if before is not None and await backend.get(check_uuid(before, "before")) is None:
        raise HTTPException(400, f"before: run {before} not found (it may have been dropped by retention)")
    page = Page(parse_limit(query.get("limit")), state=state, agent_type=query.get("agent_type"),
                user_id=check_uuid(user_id, "user_id") if user_id is not None else None, max_bytes=LIST_BODY_BYTES)
    async with request.app.state.large_reads:
        runs = await backend.list(page, before=before.lower() if before else None)
        body = b'{"runs":[' + b",".join(run.json() for run in runs) + b"]}"
    return json_response(body)


async def list_agents(request: Request) -> Response:
    return json_response({"agents": [
        {"agent_type": agent_type, "description": cls.description}
        for agent_type, cls in sorted(agents.registry.items())
    ]})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime = from_state(request.app.state)
    if not runtime.admission.accepting_runs:
        raise HTTPException(503, "Shutting down")
    await runtime.backend.check()
    return json_response({"status": "ready"})


async def metrics_page(request: Request) -> Response:
    body, media_type = metrics.render()
    return Response(body, media_type=media_type)


OPENAPI_YAML = (HERE / "openapi.yaml").read_bytes()  # read at start: the spec served is the one started with
OPENAPI_JSON = (HERE / "openapi.json").read_bytes()  # the same document, generated by tools/openapi_json.py


@functools.cache
def openapi_document(root_path: str) -> bytes:
    """/openapi.json: openapi.json as read at start. Behind a path prefix its ``servers`` name the prefix, so
    generated clients and /docs call the service there."""
    if not root_path:
        return OPENAPI_JSON
    document = json.loads(OPENAPI_JSON)
    document["servers"] = [{"url": root_path}]
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


# /docs loads exactly swagger-ui-dist settings.SWAGGER_UI_VERSION: the browser checks each file's hash
# (Subresource Integrity), so a file changed at the CDN, or another version, is refused rather than run.
SWAGGER_UI_CSS_SRI = "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I"
SWAGGER_UI_JS_SRI = "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9"
# The spec's URL (with the root path) comes from the page's markup, so the script, and its hash, never change.
DOCS_SCRIPT = ('window.ui = SwaggerUIBundle({url: document.getElementById("swagger-ui").dataset.spec, '
               'dom_id: "#swagger-ui", validatorUrl: null});')
DOCS_SCRIPT_HASH = "'sha256-" + base64.b64encode(hashlib.sha256(DOCS_SCRIPT.encode()).digest()).decode() + "'"

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>agent-runner API</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css" integrity="{css_sri}" crossorigin="anonymous">
</head>
<body>
  <div id="swagger-ui" data-spec="{spec}"></div>
  <script src="{assets}/swagger-ui-bundle.js" integrity="{js_sri}" crossorigin="anonymous"></script>
  <script>{script}</script>
</body>
</html>
"""


def docs_policy(assets: str) -> str:
    """The Content-Security-Policy of /docs: Swagger UI's two files, its init script, and this service."""
    source = f"{assets}/" if urllib.parse.urlsplit(assets).netloc else "'self'"
    return (f"default-src 'none'; script-src {source} {DOCS_SCRIPT_HASH}; style-src {source}; "
            f"img-src {source} data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


async def openapi_spec(request: Request) -> Response:
    return Response(OPENAPI_YAML, media_type="application/yaml")


async def openapi_json(request: Request) -> Response:
    return json_response(openapi_document(request.scope.get("root_path", "")))


async def docs(request: Request) -> Response:
    assets = settings.current.docs_assets_url
    spec = request.scope.get("root_path", "") + "/openapi.json"  # its servers carry the root path
    page = DOCS_PAGE.format(assets=html.escape(assets), css_sri=SWAGGER_UI_CSS_SRI, js_sri=SWAGGER_UI_JS_SRI,
                            script=DOCS_SCRIPT, spec=html.escape(spec))
    return HTMLResponse(page, headers={"Content-Security-Policy": docs_policy(assets)})


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


# ---------------------------------------------------------------------------
# Routes and app.


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    if not settings.current.redis_url:
        await refuse_second_memory_process()
    app.state.large_reads = asyncio.Semaphore(LARGE_READS_AT_ONCE)
    runtime = app.state.runtime = await open_runtime(settings.current)
    log.info("service_started", extra={
        "version": __version__, "store": runtime.backend.name, "agent_types": sorted(agents.registry),
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


routes = [  # the router tries them in order: the busiest first; every /agents route needs the API token
    token_required(Route("/agents/status/{run_id}", get_status, methods=["GET"])),
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

app = Starlette(
    routes=routes,
    exception_handlers={HTTPException: http_error, StoreUnavailable: store_unavailable, Exception: server_error},
    lifespan=lifespan,
)
app.router.redirect_slashes = False  # its redirects take their host from the Host header: /metrics/ is a 404
app.add_middleware(AccessLog)  # added last is outermost: the log line sees the client and path set below
app.add_middleware(RootPath)
app.add_middleware(ForwardedClient)


# ---------------------------------------------------------------------------
# python agent_runner.py


class Server(uvicorn.Server):
    """uvicorn's server, with a drain on the first SIGTERM/SIGINT before it stops listening.

    While draining, /readyz answers 503 and POST /agents/run 503, so a load
    balancer moves traffic away; status and cancel keep working.
    """

    draining = False

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)
        runtime: Runtime | None = getattr(app.state, "runtime", None)  # None: the lifespan never started
        if runtime is not None and runtime.runner.agent_code_running():  # only exiting stops its code now
            for active in runtime.runner.active_runs.values():
                log.error("exit_with_agent_running", extra=run_fields(active.run))
            write_hot_lines()
            sys.stdout.flush()
            os._exit(0)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            try:
                runtime: Runtime | None = getattr(app.state, "runtime", None)
                if runtime is not None:
                    await runtime.admission.drain(settings.current.shutdown_grace_seconds)
                    await runtime.hub.close()  # the streams end (after the frames of runs that ended in the grace)
            finally:
                self.should_exit = True

        self.drain_task = asyncio.ensure_future(drain_then_exit())


def configure(env: Mapping[str, str] = os.environ) -> None:
    """Read settings, set up logging and load agent modules; on a bad value log it and exit 2."""
    logging.config.dictConfig(logging_config("info"))
    try:
        settings.current = Settings.from_env(env)
        logging.config.dictConfig(process_logging_config())
        load_agent_modules(settings.current.agent_modules)
    except ConfigError as exc:
        refuse_to_start(exc.variable, exc.detail)


def refuse_to_start(variable: str, detail: str) -> NoReturn:
    """Log ``invalid_configuration`` and exit 2 (3 in a worker of uvicorn or gunicorn: they stop on it)."""
    log.error("invalid_configuration", extra={"variable": variable, "detail": detail})
    write_hot_lines()
    sys.stdout.flush()
    os._exit(refusal_exit_status())  # from the lifespan too, where uvicorn would take SystemExit for exit 3


def process_logging_config() -> dict[str, Any]:
    config = settings.current
    return logging_config(config.log_level, config.log_format, colour=not config.no_color)


def parse_args(argv: list[str]) -> None:
    """--help prints the configuration table, --version the version; there are no other options."""
    import argparse

    width = max(len(name) for name, _, _ in SETTINGS_TABLE)
    table = "\n".join(f"  {name:<{width}}  {meaning}" + (f" (default: {default})" if default else "")
                      for name, default, meaning in SETTINGS_TABLE)
    parser = argparse.ArgumentParser(
        prog="agent_runner.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="agent-runner: an HTTP service that runs at most MAX_CONCURRENT_RUNS agents at once.",
        epilog=f"Configuration comes from the environment (also under uvicorn, gunicorn and hypercorn, which\n"
               f"import agent_runner:app; HOST, PORT and KEEPALIVE_SECONDS are this launcher's own):\n{table}")
    parser.add_argument("--version", action="version", version=f"agent-runner {__version__}")
    parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:]:  # argparse only for --help or --version: most starts have no arguments
        parse_args(sys.argv[1:])
    configure()
    single_process.binds_own_socket = True  # nothing else can serve the socket uvicorn binds below
    config = uvicorn.Config(
        app,
        host=settings.current.host,
        port=settings.current.port,
        log_config=process_logging_config(),
        access_log=False,
        proxy_headers=False,  # the app applies FORWARDED_ALLOW_IPS itself (ForwardedClient), under every launcher
        timeout_keep_alive=settings.current.keepalive_seconds,
        loop="uvloop",
        http=LimitedHttpToolsProtocol,  # httptools, with limits on connections, heads, bodies, unread answers
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    Server(config).run()


if __name__ == "__main__":
    main()
else:  # uvicorn, gunicorn, hypercorn (and tests) import the app: the same settings, logs and checks
    configure()
