"""agent-runner: an HTTP service that runs one agent at a time.

Read top to bottom: settings, JSON logging, the run lock and run store, the
task that runs one agent to a terminal state, the handlers, the routes and
the app, and ``python agent_runner.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import logging.config
import math
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
from json.encoder import encode_basestring_ascii as json_string
import uvicorn
from pythonjsonlogger.json import JsonFormatter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import agents
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.asyncio.retry import Retry

from store import (STATES, MemoryRunLock, MemoryRunStore, RedisRunLock, RedisRunStore, Run, StoreHealth,
                   StoreUnavailable, utc_now)

__version__ = "0.1.0"

HERE = Path(__file__).resolve().parent
MAX_JSON_DEPTH = 32  # request bodies nested deeper are refused with 400
MAX_RESULT_BYTES = 1024 * 1024  # a larger agent result ends the run as ERROR
LOOP_LAG_WARNING_SECONDS = 1.0  # an event loop stalled longer than this is logged (event_loop_blocked)
CANCEL_WAIT_SECONDS = 5.0  # how long POST /agents/cancel waits for the agent to stop
CANCEL_RETRY_SECONDS = 1.0  # an agent that swallows CancelledError is cancelled again this often
STOP_WAIT_SECONDS = 5.0  # at shutdown, how long an interrupted agent may take to stop
REQUEST_FIELDS = ("agent_type", "user_id", "input")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
BUSY_BODY = json.dumps({"detail": "An agent is already running, please retry later"}).encode()


# ---------------------------------------------------------------------------
# Settings: read from the environment once, at start.


class ConfigError(Exception):
    """A bad setting; the process stops at start with one log line naming the variable."""

    def __init__(self, variable: str, detail: str) -> None:
        super().__init__(f"{variable}: {detail}")
        self.variable = variable
        self.detail = detail


def _env_number(env: Mapping[str, str], name: str, default: float, *, integer: bool,
                minimum: float, maximum: float = math.inf, above_minimum: bool = False) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(name, f"must be {'an integer' if integer else 'a number'}, got {raw!r}") from None
    too_small = value <= minimum if above_minimum else value < minimum
    if not math.isfinite(value) or too_small or value > maximum:
        bound = f"> {minimum:g}" if above_minimum else f">= {minimum:g}"
        if maximum != math.inf:
            bound += f" and <= {maximum:g}"
        raise ConfigError(name, f"must be {bound}, got {raw!r}")
    return value


# Every environment variable: name, default, meaning. --help, the README and .env.example show this table.
SETTINGS_TABLE = (
    ("HOST", "127.0.0.1", "bind address (the Dockerfile sets 0.0.0.0)"),
    ("PORT", "8000", "bind port"),
    ("LOG_LEVEL", "info", "debug, info, warning or error"),
    ("AGENT_SLEEP_SECONDS", "5", "how long the built-in agents work (0 allowed)"),
    ("MAX_BODY_BYTES", "65536", "largest accepted request body"),
    ("AGENT_MODULES", "", "comma-separated importable modules; each is imported at start and registers agents"),
    ("DOCS_ASSETS_URL", "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5", "where /docs loads Swagger UI's assets from"),
    ("RUN_TIMEOUT_SECONDS", "300", "a run still going after this is stopped and marked ERROR"),
    ("RUN_RETENTION", "10000", "finished runs kept; the oldest finished run is dropped first"),
    ("API_TOKEN", "", "when set, every /agents... endpoint needs Authorization: Bearer <token>"),
    ("SHUTDOWN_GRACE_SECONDS", "30", "on SIGTERM/SIGINT, how long a running run may still take"),
    ("REDIS_URL", "", "e.g. redis://host:6379/0; when set, the lock and all run records live in Redis"),
    ("REDIS_PREFIX", "agent-runner", "prefix of every Redis key, so several deployments can share one Redis"),
    ("LOCK_TTL_SECONDS", "30", "the run lock's expiry in Redis; the holder renews it every TTL/3"),
)


@dataclass(frozen=True)
class Settings:
    """The service's configuration; see the README's table for each variable."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    agent_sleep_seconds: float = 5.0
    max_body_bytes: int = 65536
    agent_modules: tuple[str, ...] = ()
    docs_assets_url: str = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"
    run_timeout_seconds: float = 300.0
    run_retention: int = 10000
    api_token: str | None = field(default=None, repr=False)
    shutdown_grace_seconds: float = 30.0
    redis_url: str | None = field(default=None, repr=False)
    redis_prefix: str = "agent-runner"
    lock_ttl_seconds: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        log_level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
        if log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("LOG_LEVEL", f"must be one of debug, info, warning, error; got {log_level!r}")
        host = env.get("HOST", cls.host).strip()
        if not host:
            raise ConfigError("HOST", "must not be empty")
        redis_url = env.get("REDIS_URL", "").strip() or None
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("REDIS_URL", "must start with redis://, rediss:// or unix://")
        return cls(
            host=host,
            port=_env_number(env, "PORT", cls.port, integer=True, minimum=1, maximum=65535),
            log_level=log_level,
            agent_sleep_seconds=_env_number(env, "AGENT_SLEEP_SECONDS", cls.agent_sleep_seconds,
                                            integer=False, minimum=0),
            max_body_bytes=_env_number(env, "MAX_BODY_BYTES", cls.max_body_bytes, integer=True, minimum=1),
            agent_modules=tuple(name.strip() for name in env.get("AGENT_MODULES", "").split(",") if name.strip()),
            docs_assets_url=env.get("DOCS_ASSETS_URL", "").strip().rstrip("/") or cls.docs_assets_url,
            run_timeout_seconds=_env_number(env, "RUN_TIMEOUT_SECONDS", cls.run_timeout_seconds,
                                            integer=False, minimum=0, above_minimum=True),
            run_retention=_env_number(env, "RUN_RETENTION", cls.run_retention, integer=True, minimum=1),
            api_token=env.get("API_TOKEN") or None,
            shutdown_grace_seconds=_env_number(env, "SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds,
                                               integer=False, minimum=0),
            redis_url=redis_url,
            redis_prefix=env.get("REDIS_PREFIX", "").strip() or cls.redis_prefix,
            lock_ttl_seconds=_env_number(env, "LOCK_TTL_SECONDS", cls.lock_ttl_seconds,
                                         integer=False, minimum=0.3),
        )


def load_agent_modules(names: tuple[str, ...]) -> None:
    """Import each AGENT_MODULES entry so its @register decorators run."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure to import stops the process at start
            raise ConfigError("AGENT_MODULES", f"cannot import {name!r}: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------
# Logging: one JSON object per line on stdout, uvicorn's lines included.

OWN_LOGGERS = ("agent_runner", "agents")


class LogFormatter(JsonFormatter):
    """JSON lines with ``timestamp``, ``level`` and ``event`` first, then the record's fields.

    Our loggers log event names (``log.info("run_accepted", extra=...)``);
    lines from other libraries (uvicorn) get event ``server_log`` and their
    text as ``message``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("reserved_attrs", [*logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
                                             "message", "asctime", "color_message"])
        super().__init__(**kwargs)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["timestamp"] = log_timestamp(record.created)
        log_data["level"] = record.levelname.lower()
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        log_data["event"] = record.message if own else "server_log"
        if not own:
            log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)
        if own:
            log_data.pop("message", None)
        if "human_message" in log_data:
            log_data["message"] = log_data.pop("human_message")
        if "exc_info" in log_data:
            log_data["traceback"] = log_data.pop("exc_info")


hot_lines: list[str] = []  # per-request lines waiting to be written (see log_hot)


def write_hot_lines() -> None:
    if hot_lines:
        sys.stdout.write("".join(hot_lines))
        hot_lines.clear()


class StdoutHandler(logging.StreamHandler):
    """stdout: warnings and errors are flushed at once, info lines at most 0.2 s late.

    A write per info line would cost more than the request it logs; the
    lifespan flushes every 0.2 s and at exit. Per-request lines queued by
    log_hot are written first, so lines keep their order.
    """

    FLUSH_SECONDS = 0.2

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self._may_wait = False
        self._flushed_at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self._may_wait = record.levelno < logging.WARNING
        try:
            write_hot_lines()
            super().emit(record)
        finally:
            self._may_wait = False

    def flush(self) -> None:
        now = time.monotonic()
        if self._may_wait and now - self._flushed_at < self.FLUSH_SECONDS:
            return
        write_hot_lines()
        super().flush()
        self._flushed_at = now


def logging_config(level: str) -> dict[str, Any]:
    """The dictConfig for the whole process, also handed to uvicorn."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": LogFormatter}},
        "handlers": {"stdout": {"()": StdoutHandler, "formatter": "json"}},
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


log = logging.getLogger("agent_runner")

_second, _second_text = -1, ""


def log_timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, ending in Z (the seconds part is formatted once per second)."""
    global _second, _second_text
    second = int(now)
    if second != _second:
        _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second_text}.{int((now - second) * 1000):03d}Z"


def log_hot(event: str, fields: str) -> None:
    """An info line for the per-request events (http_request, run_rejected), without a LogRecord.

    ``fields`` is the rest of the JSON object, already encoded (`"status": 200`).
    Same shape as LogFormatter's lines; queued and written in batches, ahead of
    any other line, at most 0.2 s late.
    """
    if log.isEnabledFor(logging.INFO):
        hot_lines.append(f'{{"timestamp": "{log_timestamp(time.time())}", "level": "info", "event": "{event}", '
                         f'{fields}}}\n')
        if len(hot_lines) >= 512:
            write_hot_lines()


# ---------------------------------------------------------------------------
# Run state. post_run is the only place that takes run_lock and finish_run the
# only place that releases it, right after storing the run's terminal state.
# The lifespan picks the backend (memory, or Redis with REDIS_URL) once.

settings = Settings()
run_lock: MemoryRunLock | RedisRunLock = MemoryRunLock()
run_store: MemoryRunStore | RedisRunStore = MemoryRunStore(retention=settings.run_retention)
active_run: ActiveRun | None = None  # the run this process is executing
accepting_runs = True  # False once shutdown has begun

prometheus_client.disable_created_metrics()  # the *_created series only add noise to every scrape
RUNS_TOTAL = prometheus_client.Counter(
    "agent_runner_runs_total", "Runs that reached a terminal state.", ["agent_type", "state"])
REJECTED_TOTAL = prometheus_client.Counter(
    "agent_runner_rejected_total", "Runs refused with 409 because another run was active.")
RUN_DURATION = prometheus_client.Histogram(
    "agent_runner_run_duration_seconds", "Time from RUNNING to a terminal state.", ["agent_type"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
RUNNING = prometheus_client.Gauge("agent_runner_running", "1 while this process runs an agent, else 0.")
HTTP_REQUESTS_TOTAL = prometheus_client.Counter(
    "agent_runner_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])


class ActiveRun:
    """The run this process is executing, and why it was asked to stop, if it was."""

    def __init__(self, run: Run, agent_cls: type[agents.BaseAgent]) -> None:
        self.run = run
        self.agent_cls = agent_cls
        self.stop_reason: str | None = None  # "cancel", "timeout", "shutdown" or "lock_lost"
        self.stop_requested = asyncio.Event()
        self.agent_task: asyncio.Task[Any] | None = None
        self.driver: asyncio.Task[None] | None = None
        self.started = time.monotonic()

    def stop(self, reason: str) -> None:
        """Ask the agent to stop; the first reason given decides the run's terminal state."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_requested.set()
        if self.agent_task is not None:
            self.agent_task.cancel()


# ---------------------------------------------------------------------------
# The run task: one agent from PENDING to a terminal state.


def run_fields(run: Run) -> dict[str, Any]:
    return {"run_id": run.run_id, "agent_type": run.agent_type, "user_id": run.user_id}


async def execute_run(active: ActiveRun) -> None:
    """Run the agent, record exactly one terminal state, log it, release the lock."""
    run = active.run
    outcome: dict[str, Any] = {"state": "ERROR", "error": "Run ended without an outcome"}
    keeper = asyncio.create_task(keep_lock(active)) if run_lock.renew_interval else None
    try:
        await recover_orphans(run)
        if active.stop_reason is None:
            run.update(state="RUNNING", started_at=utc_now())
            await run_store.save(run)
            RUNNING.set(1)
            agent = active.agent_cls(run.run_id, run.user_id, run.input,
                                     sleep_seconds=settings.agent_sleep_seconds,
                                     on_progress=lambda fraction: report_progress(run, fraction))
            active.agent_task = asyncio.create_task(agent.run())
            await supervise(active, active.agent_task, settings.run_timeout_seconds)
            outcome = judge(active, agent)
        else:
            outcome = judge(active, None)
    except Exception as exc:  # the store or the agent's constructor failed before the agent ran
        outcome = {"state": "ERROR", "error": f"{type(exc).__name__}: {exc}",
                   "event": "agent_error", "traceback": traceback.format_exc()}
    finally:
        if keeper is not None:
            keeper.cancel()
        await finish_run(active, outcome)


def report_progress(run: Run, fraction: float) -> None:
    run.update(progress=fraction)
    run_store.note_progress(run)


async def recover_orphans(run: Run) -> None:
    """Mark ERROR the unfinished runs of holders that lost the lock (a replica died); we hold it now."""
    for orphan in await run_store.unfinished():
        if orphan.run_id == run.run_id or orphan.holder == run.holder:
            continue
        orphan.update(state="ERROR", finished_at=utc_now(),
                      error="Runner lost: the replica running it stopped holding the run lock")
        await run_store.save(orphan)
        log.error("run_orphaned", extra={**run_fields(orphan), "state": "ERROR", "error": orphan.error})


async def keep_lock(active: ActiveRun) -> None:
    """Renew the run lock while the run lasts; stop the run the moment the lock may be lost.

    Unreachable Redis counts as lost once the lock could have expired within
    the next interval, so another replica can never start while this agent runs.
    """
    interval = run_lock.renew_interval
    assert interval is not None and active.run.holder is not None
    renewed_at = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        try:
            await run_lock.renew(active.run.holder)
            renewed_at = time.monotonic()
            if await run_store.cancel_requested(active.run.run_id):
                active.stop("cancel")
        except LockError:
            reason = "the lock was taken over or expired"
        except StoreUnavailable:
            if time.monotonic() - renewed_at + interval < settings.lock_ttl_seconds:
                continue
            reason = "the run store was unreachable for the lock's whole TTL"
        else:
            continue
        log.error("lock_lost", extra={**run_fields(active.run), "detail": reason})
        active.stop("lock_lost")
        return


async def supervise(active: ActiveRun, agent_task: asyncio.Task[Any], timeout: float) -> None:
    """Wait for the agent to end, time out, or be stopped; return only once its code has stopped."""
    stop_requested = asyncio.ensure_future(active.stop_requested.wait())
    try:
        await asyncio.wait({agent_task, stop_requested}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not agent_task.done() and not active.stop_requested.is_set():
            active.stop("timeout")
        while not agent_task.done():  # an agent may swallow CancelledError: keep asking until it stops
            await asyncio.wait({agent_task}, timeout=CANCEL_RETRY_SECONDS)
            if not agent_task.done():
                agent_task.cancel()
    finally:
        stop_requested.cancel()


def judge(active: ActiveRun, agent: agents.BaseAgent | None) -> dict[str, Any]:
    """The terminal state, error and log event for a run whose agent has stopped."""
    if active.stop_reason == "cancel":
        return {"state": "CANCELLED", "event": "run_cancelled"}
    if active.stop_reason == "timeout":
        return {"state": "ERROR", "event": "run_timeout",
                "error": f"Run timed out after {settings.run_timeout_seconds:g} seconds"}
    if active.stop_reason == "shutdown":
        return {"state": "ERROR", "event": "run_interrupted", "error": "Run interrupted by shutdown"}
    if active.stop_reason == "lock_lost":
        return {"state": "ERROR", "event": "agent_error", "error": "Run stopped: lock lost"}
    task = active.agent_task
    assert task is not None and agent is not None
    if task.cancelled():
        return {"state": "ERROR", "event": "agent_error", "error": "Agent was cancelled unexpectedly"}
    exc = task.exception()
    if exc is not None:
        return {"state": "ERROR", "event": "agent_error", "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(exc))}
    result = task.result()
    try:
        size = len(json.dumps(result, allow_nan=False, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError) as exc:
        return {"state": "ERROR", "event": "agent_error",
                "error": f"Agent result is not JSON-serialisable: {type(exc).__name__}: {exc}"}
    if size > MAX_RESULT_BYTES:
        return {"state": "ERROR", "event": "agent_error",
                "error": f"Agent result is too large: {size} bytes (limit {MAX_RESULT_BYTES})"}
    return {"state": "DONE", "event": "agent_complete", "result": result, **agent.completion_fields(result)}


async def finish_run(active: ActiveRun, outcome: dict[str, Any]) -> None:
    """Store the terminal state, then release the lock with no await in between that could yield."""
    global active_run
    run = active.run
    if run.finished:  # already forced to a terminal state at shutdown
        return
    outcome = dict(outcome)
    event = outcome.pop("event", "agent_error")
    trace = outcome.pop("traceback", None)
    extra_fields = {key: outcome.pop(key) for key in list(outcome) if key not in ("state", "result", "error")}
    run.update(finished_at=utc_now(), **outcome)
    await save_finished(run)
    if active_run is active:
        active_run = None
    duration = time.monotonic() - active.started
    RUNNING.set(0)
    RUNS_TOTAL.labels(run.agent_type, run.state).inc()
    RUN_DURATION.labels(run.agent_type).observe(duration)
    fields = {**run_fields(run), "state": run.state, "duration_ms": round(duration * 1000, 1), **extra_fields}
    if run.error is not None:
        fields["error"] = run.error
    if trace is not None:
        fields["traceback"] = trace
    level = logging.INFO if run.state in ("DONE", "CANCELLED") else logging.ERROR
    log.log(level, event, extra=fields)


async def save_finished(run: Run) -> None:
    """Store a terminal state and release the run lock in one step, retrying while the store is unreachable.

    If the store never comes back within the lock's TTL, the run stays
    unfinished there and the next lock holder marks it ERROR ("runner lost");
    the terminal log line is written anyway.
    """
    deadline = time.monotonic() + max(settings.lock_ttl_seconds, 5.0)
    while True:
        try:
            await run_store.save(run, release=run_lock)  # type: ignore[arg-type]
            return
        except StoreUnavailable:
            if time.monotonic() >= deadline:
                log.error("terminal_state_not_stored", extra={**run_fields(run), "state": run.state})
                await run_lock.release(run.holder)  # type: ignore[arg-type]
                return
            await asyncio.sleep(0.5)


def cancel_local(run_id: str) -> None:
    """Cancel ``run_id`` if this process is running it (a cancel request from another replica)."""
    active = active_run
    if active is not None and active.run.run_id == run_id:
        active.stop("cancel")


async def drain(grace_seconds: float) -> None:
    """Stop accepting runs; let the active run finish within the grace time, else interrupt it."""
    global accepting_runs
    if not accepting_runs:
        return
    accepting_runs = False
    active = active_run
    log.info("shutdown_started", extra={"grace_seconds": grace_seconds,
                                        "active_run_id": active.run.run_id if active else None})
    if active is None or active.driver is None:
        return
    await asyncio.wait({active.driver}, timeout=grace_seconds)
    if not active.driver.done():
        active.stop("shutdown")
        await asyncio.wait({active.driver}, timeout=STOP_WAIT_SECONDS)
    if not active.run.finished:  # the agent ignores cancellation: record the outcome before exiting anyway
        await finish_run(active, {"state": "ERROR", "event": "run_interrupted",
                                  "error": "Run interrupted by shutdown; the agent did not stop"})


# ---------------------------------------------------------------------------
# Handlers.


def json_response(content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = content if isinstance(content, bytes) else json.dumps(content, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def short(value: Any) -> str:
    """A value as it appears in an error message, cut to a readable length."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_uuid(value: str, name: str) -> str:
    if not UUID_RE.fullmatch(value):
        raise HTTPException(400, f"{name} must be a UUID, got {short(value)}")
    return value.lower()


def json_depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> Any:
    """The request's JSON body, or an HTTPException saying exactly what is wrong with it."""
    media_type, _, params = request.headers.get("content-type", "").partition(";")
    if media_type.strip().lower() != "application/json":
        raise HTTPException(415, "Content-Type must be application/json")
    charset = params.strip().lower()
    if charset and charset.replace(" ", "").replace('"', "") not in ("charset=utf-8", "charset=utf8"):
        raise HTTPException(415, "Content-Type charset must be utf-8")
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"Request body is larger than {limit} bytes")
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"Request body is larger than {limit} bytes")
    except ClientDisconnect:  # nobody is left to answer; the access line records a 400
        raise HTTPException(400, "Client disconnected before the request body was complete") from None
    if not body.strip():
        raise HTTPException(400, "Request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "Request body is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        raise HTTPException(400, f"Request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise HTTPException(400, f"Request body is not valid JSON: {exc}") from None
    if json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise HTTPException(400, f"Request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def parse_run_request(data: Any) -> tuple[type[agents.BaseAgent], str, dict[str, Any]]:
    """Validate a POST /agents/run body; returns the agent class, user_id and input."""
    if not isinstance(data, dict):
        raise HTTPException(400, "Request body must be a JSON object")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        named = ", ".join(short(name) for name in unknown[:5])
        if len(unknown) > 5:
            named += f" and {len(unknown) - 5} more"
        raise HTTPException(400, f"Unknown field(s): {named}; allowed: {', '.join(REQUEST_FIELDS)}")
    for name in ("agent_type", "user_id"):
        if name not in data:
            raise HTTPException(400, f"{name} is required")
        if not isinstance(data[name], str):
            raise HTTPException(400, f"{name} must be a string")
    user_id = check_uuid(data["user_id"], "user_id")
    agent_input = data.get("input", {})
    if not isinstance(agent_input, dict):
        raise HTTPException(400, "input must be a JSON object")
    agent_type = data["agent_type"]
    agent_cls = agents.registry.get(agent_type)
    if agent_cls is None:
        supported = ", ".join(sorted(agents.registry))
        log.warning("unsupported_agent_type", extra={"agent_type": agent_type[:200], "user_id": user_id})
        raise HTTPException(400, f"Unsupported agent_type {short(agent_type)}; supported types: {supported}")
    return agent_cls, user_id, agent_input


async def post_run(request: Request) -> Response:
    global active_run
    agent_cls, user_id, agent_input = parse_run_request(await read_json(request))
    if not accepting_runs:
        raise HTTPException(503, "Shutting down")
    token = await run_lock.try_acquire()
    if token is None:  # the busy path is hot: answered directly, not through the exception handler
        REJECTED_TOTAL.inc()
        log_hot("run_rejected", f'"agent_type": {json_string(agent_cls.agent_type)}, "user_id": "{user_id}"')
        return json_response(BUSY_BODY, 409, headers={"Retry-After": str(retry_after())})
    run = Run(run_id=str(uuid.uuid4()), agent_type=agent_cls.agent_type, user_id=user_id,
              input=agent_input, holder=token)
    try:
        await run_store.add(run)
    except BaseException:
        await run_lock.release(token)
        raise
    active_run = ActiveRun(run, agent_cls)
    active_run.driver = asyncio.create_task(execute_run(active_run), name=f"run-{run.run_id}")
    log.info("run_accepted", extra=run_fields(run))
    return json_response({"run_id": run.run_id, "state": run.state}, 202,
                         headers={"Location": f"/agents/status/{run.run_id}"})


def retry_after() -> int:
    """Seconds a refused client should wait: what the built-in agents still need, at least 1."""
    active = active_run
    elapsed = time.monotonic() - active.started if active else 0.0
    return max(1, math.ceil(settings.agent_sleep_seconds - elapsed))


async def find_run(run_id: str) -> Run:
    run = await run_store.get(check_uuid(run_id, "run_id"))
    if run is None:
        raise HTTPException(404, f"Run {run_id} not found")
    return run


def parse_wait(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not 0 < wait <= 60:  # also refuses nan
        raise HTTPException(400, f"wait must be a number of seconds greater than 0 and at most 60, got {short(raw)}")
    return wait


async def get_status(request: Request) -> Response:
    run = await find_run(request.path_params["run_id"])
    wait = parse_wait(request.query_params.get("wait")) if request.scope["query_string"] else None
    if wait is not None and not run.finished:
        run = await run_store.wait_finished(run.run_id, wait) or run
    return json_response(run.json())


async def cancel_run(request: Request) -> Response:
    run = await find_run(request.path_params["run_id"])
    if run.finished:
        raise HTTPException(409, f"Run {run.run_id} already finished ({run.state})")
    log.info("cancel_requested", extra=run_fields(run))
    active = active_run
    if active is not None and active.run.run_id == run.run_id:
        active.stop("cancel")
    else:  # another replica runs it
        await run_store.request_cancel(run.run_id)
    run = await run_store.wait_finished(run.run_id, CANCEL_WAIT_SECONDS) or run
    return json_response(run.json(), 200 if run.finished else 202)


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return 50
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise HTTPException(400, f"limit must be an integer from 1 to 1000, got {short(raw)}")
    return int(raw)


async def list_runs(request: Request) -> Response:
    query = request.query_params
    state = query.get("state")
    if state is not None and state not in STATES:
        raise HTTPException(400, f"state must be one of {', '.join(STATES)}, got {short(state)}")
    user_id = query.get("user_id")
    before = query.get("before")
    if before is not None and await run_store.get(check_uuid(before, "before")) is None:
        raise HTTPException(400, f"before: run {before} not found (it may have been dropped by retention)")
    runs = await run_store.list(
        limit=parse_limit(query.get("limit")),
        state=state,
        agent_type=query.get("agent_type"),
        user_id=check_uuid(user_id, "user_id") if user_id is not None else None,
        before=before.lower() if before else None,
    )
    return json_response(b'{"runs":[' + b",".join(run.json() for run in runs) + b"]}")


async def list_agents(request: Request) -> Response:
    return json_response({"agents": [
        {"agent_type": agent_type, "description": cls.description}
        for agent_type, cls in sorted(agents.registry.items())
    ]})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    if not accepting_runs:
        raise HTTPException(503, "Shutting down")
    await run_store.check()
    return json_response({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


OPENAPI_YAML = (HERE / "openapi.yaml").read_bytes()

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>agent-runner API</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "/openapi.yaml", dom_id: "#swagger-ui"}});
  </script>
</body>
</html>
"""


async def openapi_spec(request: Request) -> Response:
    return Response(OPENAPI_YAML, media_type="application/yaml")


async def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE.format(assets=settings.docs_assets_url))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    return json_response({"detail": "Run store unavailable"}, 503, headers={"Retry-After": "1"})


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled_error", exc_info=exc, extra={"method": request.method, "path": request.url.path})
    return json_response({"detail": "Internal server error"}, 500)


# ---------------------------------------------------------------------------
# Middleware (pure ASGI).


class BearerAuth:
    """With API_TOKEN set, every /agents path needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = settings.api_token
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
                counter = self._requests[key] = HTTP_REQUESTS_TOTAL.labels(key[0], key[1], str(status))
            counter.inc()
            log_hot("http_request", f'"method": {json_string(method)}, "path": {json_string(scope["path"])}, '
                                    f'"status": {status}, '
                                    f'"duration_ms": {round((time.perf_counter() - started) * 1000, 2)}')


async def watch_event_loop(interval: float = 0.25) -> None:
    """Warn when something (usually an agent doing blocking work) stalls the event loop."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + interval
        await asyncio.sleep(interval)
        lag = loop.time() - expected
        if lag > LOOP_LAG_WARNING_SECONDS:
            active = active_run
            log.warning("event_loop_blocked", extra={
                "lag_ms": round(lag * 1000), **(run_fields(active.run) if active else {}),
                "hint": "agents must run blocking work in asyncio.to_thread"})


async def flush_stdout_regularly() -> None:
    """Flush the info lines left in stdout's buffer (see StdoutHandler)."""
    while True:
        await asyncio.sleep(StdoutHandler.FLUSH_SECONDS)
        write_hot_lines()
        sys.stdout.flush()


# ---------------------------------------------------------------------------
# Routes and app.


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global run_lock, run_store
    if settings.redis_url:
        # A blocking pool: a burst of requests waits briefly for a connection instead of failing.
        # Retry once on a dropped connection, so pooled connections left over from before a
        # Redis restart do not turn into 503s.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=64, timeout=5, socket_timeout=2, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])
        client = Redis(connection_pool=pool)
        health = StoreHealth(log)
        run_lock = RedisRunLock(client, f"{settings.redis_prefix}:lock", settings.lock_ttl_seconds, health)
        run_store = RedisRunStore(client, settings.redis_prefix, settings.run_retention, health)
    else:
        run_lock, run_store = MemoryRunLock(), MemoryRunStore(settings.run_retention)
    run_store.on_cancel = cancel_local
    await run_store.start()
    log.info("service_started", extra={
        "version": __version__, "store": "redis" if settings.redis_url else "memory",
        "agent_types": sorted(agents.registry), "agent_sleep_seconds": settings.agent_sleep_seconds})
    background = [asyncio.create_task(flush_stdout_regularly()), asyncio.create_task(watch_event_loop())]
    try:
        yield
    finally:
        await drain(settings.shutdown_grace_seconds)
        await run_store.close()
        for task in background:
            task.cancel()
        write_hot_lines()
        sys.stdout.flush()


routes = [
    Route("/agents", list_agents, methods=["GET"]),
    Route("/agents/run", post_run, methods=["POST"]),
    Route("/agents/status/{run_id}", get_status, methods=["GET"]),
    Route("/agents/cancel/{run_id}", cancel_run, methods=["POST"]),
    Route("/agents/runs", list_runs, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.yaml", openapi_spec, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]

app = Starlette(
    routes=routes,
    exception_handlers={HTTPException: http_error, StoreUnavailable: store_unavailable, Exception: server_error},
    lifespan=lifespan,
)
app.add_middleware(BearerAuth)
app.add_middleware(AccessLog)


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

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            try:
                await drain(settings.shutdown_grace_seconds)
            finally:
                self.should_exit = True

        self.drain_task = asyncio.ensure_future(drain_then_exit())


def configure(env: Mapping[str, str] = os.environ) -> None:
    """Read settings, set up logging and load agent modules; on a bad value log it and exit 2."""
    global settings
    logging.config.dictConfig(logging_config("info"))
    try:
        settings = Settings.from_env(env)
        logging.config.dictConfig(logging_config(settings.log_level))
        load_agent_modules(settings.agent_modules)
    except ConfigError as exc:
        log.error("invalid_configuration", extra={"variable": exc.variable, "detail": exc.detail})
        sys.exit(2)


def parse_args(argv: list[str]) -> None:
    """--help prints the configuration table, --version the version; there are no other options."""
    import argparse

    width = max(len(name) for name, _, _ in SETTINGS_TABLE)
    table = "\n".join(f"  {name:<{width}}  {meaning}" + (f" (default: {default})" if default else "")
                      for name, default, meaning in SETTINGS_TABLE)
    parser = argparse.ArgumentParser(
        prog="agent_runner.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="agent-runner: an HTTP service that runs one agent at a time.",
        epilog=f"Configuration comes from the environment:\n{table}")
    parser.add_argument("--version", action="version", version=f"agent-runner {__version__}")
    parser.parse_args(argv)


def main() -> None:
    parse_args(sys.argv[1:])
    configure()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    Server(config).run()


if __name__ == "__main__":
    main()
