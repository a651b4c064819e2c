"""One run, from PENDING to exactly one terminal state, and the run lock and store it uses.

Module-level state lives here, in one place: ``run_lock`` and ``run_store``
(memory, or Redis with REDIS_URL, chosen once by ``open_stores``),
``active_run`` (what this process executes) and ``accepting_runs``.
``admit`` is the only code that takes the lock; ``finish_run`` the only code
that releases it, in the same step that stores the terminal state.

Read top to bottom: admit, execute_run (supervise, judge, finish_run), lock
renewal, drain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import traceback
import uuid
from typing import Any

import agents
import metrics
import settings
from logs import log, safe_fields
from store import LockLost, MemoryRunLock, MemoryRunStore, Run, StoreUnavailable, utc_now

MAX_RESULT_BYTES = 1024 * 1024  # a larger agent result ends the run as ERROR
LOOP_LAG_WARNING_SECONDS = 1.0  # an event loop stalled longer than this is logged (event_loop_blocked)
CANCEL_RETRY_SECONDS = 1.0  # an agent that swallows CancelledError is cancelled again this often
STOP_WAIT_SECONDS = 5.0  # at shutdown, how long an interrupted agent may take to stop
# What finish_run puts on the terminal line itself; an agent's completion_fields with these names are renamed
TERMINAL_LINE_FIELDS = frozenset({"run_id", "agent_type", "user_id", "state", "result", "error", "event",
                                  "traceback", "duration_ms"})

run_lock: Any = MemoryRunLock()  # MemoryRunLock, or RedisRunLock in Redis mode
run_store: Any = MemoryRunStore(retention=settings.current.run_retention)  # MemoryRunStore or RedisRunStore
active_run: ActiveRun | None = None  # the run this process is executing
accepting_runs = True  # False once shutdown has begun


async def open_stores() -> str:
    """Pick the backend once, at start; returns its name ("memory" or "redis")."""
    global run_lock, run_store
    config = settings.current
    if config.redis_url:
        from redis_store import open_redis  # redis-py is only imported when it is used

        run_lock, run_store = open_redis(config.redis_url, config.redis_prefix, config.lock_ttl_seconds,
                                         config.run_retention, log)
    else:
        run_lock, run_store = MemoryRunLock(), MemoryRunStore(config.run_retention)
    run_store.on_cancel = request_stop
    await run_store.start()
    return "redis" if config.redis_url else "memory"


async def close_stores() -> None:
    await run_store.close()


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


def run_fields(run: Run) -> dict[str, Any]:
    return {"run_id": run.run_id, "agent_type": run.agent_type, "user_id": run.user_id}


async def admit(agent_cls: type[agents.BaseAgent], user_id: str, agent_input: dict[str, Any]) -> Run | None:
    """Take the run lock and start the run; None when the lock is held (the caller answers 409)."""
    global active_run
    token = await run_lock.try_acquire()
    if token is None:
        return None
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
    return run


def retry_after() -> int:
    """Seconds a refused client should wait: what the built-in agents still need, at least 1."""
    active = active_run
    elapsed = time.monotonic() - active.started if active else 0.0
    return max(1, math.ceil(settings.current.agent_sleep_seconds - elapsed))


def request_stop(run_id: str) -> bool:
    """Cancel ``run_id`` if this process runs it; False when another replica does."""
    active = active_run
    if active is not None and active.run.run_id == run_id:
        active.stop("cancel")
        return True
    return False


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
            metrics.RUNNING.set(1)
            agent = active.agent_cls(run.run_id, run.user_id, run.input,
                                     sleep_seconds=settings.current.agent_sleep_seconds,
                                     on_progress=lambda fraction: report_progress(run, fraction))
            active.agent_task = asyncio.create_task(agent.run())
            await supervise(active, active.agent_task, settings.current.run_timeout_seconds)
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
        except LockLost:
            reason = "the lock was taken over or expired"
        except StoreUnavailable:
            if time.monotonic() - renewed_at + interval < settings.current.lock_ttl_seconds:
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
                "error": f"Run timed out after {settings.current.run_timeout_seconds:g} seconds"}
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
    extra = safe_fields(agent.completion_fields(result), taken=TERMINAL_LINE_FIELDS)
    return {"state": "DONE", "event": "agent_complete", "result": result, **extra}


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
    metrics.RUNNING.set(0)
    metrics.RUNS_TOTAL.labels(run.agent_type, run.state).inc()
    metrics.RUN_DURATION.labels(run.agent_type).observe(duration)
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
    deadline = time.monotonic() + max(settings.current.lock_ttl_seconds, 5.0)
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
