"""A run's agent while it runs: the run's state in this process (``ActiveRun``), the agent's task, and the steps
runs.Runner takes around it: ``supervise`` (until no code of the agent runs, timing it out and cancelling it again
as needed) and ``judge`` (the terminal state, error and log event of an agent that has stopped).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any

import agents
from service import settings
from service.agent_work import current_run
from service.backends.records import Run
from service.logs import log, safe_fields

MAX_RESULT_BYTES = 1024 * 1024  # a larger agent result ends the run as ERROR
CANCEL_RETRY_SECONDS = 1.0  # an agent that swallows CancelledError is cancelled again this often
STILL_RUNNING_LOG_SECONDS = 10.0  # how often a stopped run whose code goes on is logged (agent_still_running)
# What finish_run puts on the terminal line itself; an agent's completion_fields with these names are renamed
TERMINAL_LINE_FIELDS = frozenset({"run_id", "agent_type", "user_id", "state", "result", "result_json", "error",
                                  "event", "traceback", "duration_ms"})


class ActiveRun:
    """The run this process is executing, and why it was asked to stop, if it was."""

    def __init__(self, run: Run, agent_cls: type[agents.BaseAgent] | None, agent_input: dict[str, Any]) -> None:
        self.run = run
        self.agent_cls = agent_cls  # None: queued by a replica that has an agent type this one lacks
        self.agent_input = agent_input  # the parsed input, for the agent; the run keeps it encoded
        self.stop_reason: str | None = None  # "cancel", "interrupt", "timeout", "shutdown" or "lock_lost"
        self.cancelled_by: str | None = None  # with "interrupt": the run that took this one's place
        self.stop_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # done once asked
        self.stopping = threading.Event()  # the agent's view of stop_requested, readable from threads
        self.agent_task: asyncio.Task[Any] | None = None
        self.executor_work: list[Future[Any]] = []  # appended from any thread, pruned on the loop
        self.driver: asyncio.Task[None] | None = None
        self.code_stopped = asyncio.Event()  # set once neither the coroutine nor its executor work runs
        self.started = time.monotonic()
        self.waited = False  # it waited in the queue before it got its slot
        self.span: Any = None  # the run's span while tracing is on (service/tracing.py)
        self.refused = False  # a write was refused: the run is another holder's (or terminal); this one stops
        self.running_stored = False  # the take that gave it its slot stored it RUNNING (Backend.finish_and_take)
        self.running_appended = False  # and appended its RUNNING event (Backend.appended_events)

    def stop(self, reason: str) -> None:
        """Ask the agent to stop; the first reason given decides the run's terminal state.

        The agent is cancelled once, here: a second request (the same cancel arriving by pub/sub and by
        the flag read at renewal, a timeout after a cancel) must not cut the cleanup it is running in
        ``finally``. An agent that ignores the first is cancelled again by ``supervise``, every second.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.stop_requested.done():
            return
        self.stop_requested.set_result(None)
        self.stopping.set()
        if self.agent_task is not None:
            self.agent_task.cancel()

    def running_work(self) -> list[Future[Any]]:
        self.executor_work = [future for future in self.executor_work if not future.done()]
        return self.executor_work


def run_fields(run: Run) -> dict[str, Any]:
    return {"run_id": run.run_id, "agent_type": run.agent_type, "user_id": run.user_id}


async def run_agent(active: ActiveRun, agent: agents.BaseAgent) -> Any:
    current_run.set(active)  # this task's context, copied into executor work it submits
    return await agent.run()


async def supervise(active: ActiveRun, timeout: float) -> None:
    """Wait for the agent to end, time out, or be stopped; return only once none of its code runs."""
    assert active.agent_task is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stop_requested = active.stop_requested
    code: asyncio.Future[None] | None = None
    try:
        # Most agents end by themselves and leave no executor work: their task is then all there is to wait for.
        await asyncio.wait({active.agent_task, stop_requested}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if active.agent_task.done() and not active.running_work():
            return
        code = asyncio.ensure_future(agent_stopped(active))
        if not stop_requested.done() and (left := deadline - loop.time()) > 0:
            await asyncio.wait({code, stop_requested}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if not code.done() and not stop_requested.done():
            active.stop("timeout")
        waited = 0.0
        while not code.done():  # an agent may swallow CancelledError or sit in a thread: keep asking
            await asyncio.wait({code}, timeout=CANCEL_RETRY_SECONDS)
            waited += CANCEL_RETRY_SECONDS
            assert active.agent_task is not None
            if not active.agent_task.done():
                active.agent_task.cancel()
            if not code.done() and waited % STILL_RUNNING_LOG_SECONDS < CANCEL_RETRY_SECONDS:
                log.warning("agent_still_running", extra={
                    **run_fields(active.run), "stop_reason": active.stop_reason, "waited_s": round(waited),
                    "threads": len(active.running_work())})
    finally:
        if code is not None:
            code.cancel()


async def agent_stopped(active: ActiveRun) -> None:
    """Returns once the agent's coroutine has ended and every piece of executor work it started has returned."""
    assert active.agent_task is not None
    await asyncio.wait({active.agent_task})
    while work := active.running_work():
        await asyncio.wait([asyncio.wrap_future(future) for future in work])


def judge(active: ActiveRun, agent: agents.BaseAgent | None) -> dict[str, Any]:
    """The terminal state, error and log event for a run whose agent has stopped."""
    if active.stop_reason == "cancel":
        return {"state": "CANCELLED", "event": "run_cancelled"}
    if active.stop_reason == "interrupt":
        return {"state": "CANCELLED", "event": "run_cancelled", "cancelled_by": active.cancelled_by}
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
    if isinstance(exc, agents.LeaseLost):
        return {"state": "ERROR", "event": "agent_error", "error": f"Run stopped: lease lost ({exc})"}
    if exc is not None:
        return {"state": "ERROR", "event": "agent_error", "error": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(exc))}
    result = task.result()
    try:
        encoded = json.dumps(result, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        return {"state": "ERROR", "event": "agent_error",
                "error": f"Agent result is not JSON-serialisable: {type(exc).__name__}: {exc}"}
    if len(encoded) > MAX_RESULT_BYTES:
        return {"state": "ERROR", "event": "agent_error",
                "error": f"Agent result is too large: {len(encoded)} bytes (limit {MAX_RESULT_BYTES})"}
    try:
        extra = safe_fields(agent.completion_fields(result), taken=TERMINAL_LINE_FIELDS)
    except Exception as exc:  # a broken completion_fields must not cost the run its outcome
        extra = {"completion_fields_error": f"{type(exc).__name__}: {exc}"}
    return {"state": "DONE", "event": "agent_complete", "result_json": encoded, **extra}
