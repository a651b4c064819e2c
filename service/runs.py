"""One run, from PENDING to exactly one terminal state: the ``Runner`` and the runs this process executes.

The backend has MAX_CONCURRENT_RUNS slots. admission.py takes them (through
the backend, atomically with the run queue) and hands the run to ``start``;
``finish_run`` is the only code that releases one, in the same step that stores
the terminal state, and only once no code of the agent is still executing:
not its coroutine, not the executor work it started (``asyncio.to_thread``,
``run_in_executor(None, ...)``).

``Runner`` reads top to bottom: start, execute_run, finish_run, the lease
renewal (keep_lock); the steps it takes around the agent (supervise, judge) are in supervision.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import agents
from service import settings
from service import metrics
from service import tracing
from service.backends.base import Backend
from service.backends.records import LockLost, Run, StoreUnavailable, WriteRefused, utc_now
from service.events import LOGS_STORED_SECONDS, EventHub
from service.logs import lifecycle_log, log, write_hot_lines
from service.supervision import ActiveRun, judge, run_agent, run_fields, supervise

STOP_WAIT_SECONDS = 5.0  # at shutdown, how long an interrupted agent may take to stop
STORE_RETRY_SECONDS = 0.5  # how often a store write that must land is retried
LOCK_EXPIRED_EXIT_CODE = 70  # the process exits with this when its lock expired under a running agent
STOPS_HEARD_MAX = 1024  # cancels heard for runs this process does not run (yet): remembered, the newest this many


class Dispatch(Protocol):
    """What a run that ends asks of admission (admission.py) to hand its slot to the next run itself."""

    accepting_runs: bool
    admitting: int

    def begin_waited_run(self, run: Run, appended: bool = False) -> None: ...

    def publish_queue(self) -> None: ...

class Runner:
    """Starts runs on the slots admission took, and sees each to exactly one terminal state."""

    def __init__(self, backend: Backend, hub: EventHub) -> None:
        self.backend = backend
        self.hub = hub
        self.active_runs: dict[str, ActiveRun] = {}  # the runs this process executes, oldest first
        self.work_waiting = asyncio.Event()  # set when a run was queued or a slot freed: dispatch looks at the queue
        self.dispatch: Dispatch | None = None  # set by Admission: a run that ends starts the next one
        # Cancels (and interrupts: by whom) heard for a run before this process started it: a take answered while
        # the cancel's message came; the run stops as it starts.
        self.stops_heard: dict[str, str | None] = {}

    def agent_code_running(self) -> bool:
        """True while some code of this process's runs still executes (a run may already be recorded)."""
        return any(active.driver is not None and not active.code_stopped.is_set()
                   for active in self.active_runs.values())

    def start(self, run: Run, agent_cls: type[agents.BaseAgent] | None, agent_input: dict[str, Any],
              waited: bool = False) -> ActiveRun:
        active = self.active_runs[run.run_id] = ActiveRun(run, agent_cls, agent_input)
        active.waited = waited
        active.running_stored = waited and run.state == "RUNNING"
        if run.run_id in self.stops_heard:
            by = self.stops_heard.pop(run.run_id)
            if by is not None:
                active.cancelled_by = by
            active.stop("interrupt" if by is not None else "cancel")
        if tracing.tracer is not None:
            active.span = tracing.start_run(run, waited)
        # with tracing on, the run's span is current in the run's task and in the agent's, which it creates
        active.driver = asyncio.create_task(self.execute_run(active), name=f"run-{run.run_id}",
                                            context=tracing.run_context(active.span))
        metrics.RUNNING.set(len(self.active_runs))
        return active

    def request_stop(self, run_id: str, by: str | None = None) -> bool:
        """Cancel (or, with ``by``, interrupt) ``run_id`` if this process runs it; False when another replica does."""
        active = self.active_runs.get(run_id)
        if active is None:
            self.stops_heard[run_id] = by
            if len(self.stops_heard) > STOPS_HEARD_MAX:
                del self.stops_heard[next(iter(self.stops_heard))]
            return False
        if by is not None and active.stop_reason is None:
            active.cancelled_by = by
        active.stop("interrupt" if by is not None else "cancel")
        return True

    async def execute_run(self, active: ActiveRun) -> None:
        """Run the agent, record exactly one terminal state, log it, release the lock."""
        run = active.run
        outcome: dict[str, Any] = {"state": "ERROR", "error": "Run ended without an outcome"}
        stop_keeping = self.keep_lock_soon(active) if self.backend.renew_interval else None
        try:
            if not await self.start_running(active):
                outcome = {"state": "ERROR", "event": "agent_error",
                           "error": "Run store unavailable when the run started"}
            elif active.refused:
                pass  # another holder's run now: finish_run only lets go of the slot
            elif active.agent_cls is None:
                outcome = {"state": "ERROR", "event": "agent_error",
                           "error": f"Agent type {run.agent_type!r} is not registered on the replica that took the run"}
            elif active.stop_reason is None:
                with tracing.child_span(active.span, "run execution", run):
                    agent = active.agent_cls(run.run_id, run.user_id, active.agent_input,
                                             sleep_seconds=settings.current.agent_sleep_seconds,
                                             on_progress=lambda fraction: self.report_progress(run, fraction),
                                             stopping=active.stopping, fencing_token=run.fencing_token,
                                             lease=lambda: self.lease_lost(active))
                    active.agent_task = asyncio.create_task(run_agent(active, agent))
                    await supervise(active, settings.current.run_timeout_seconds)
                outcome = judge(active, agent)
            else:
                outcome = judge(active, None)
        except Exception as exc:  # the agent's constructor failed before the agent ran
            outcome = {"state": "ERROR", "error": f"{type(exc).__name__}: {exc}",
                       "event": "agent_error", "traceback": traceback.format_exc()}
        finally:
            if active.agent_task is None or (active.agent_task.done() and not active.running_work()):
                active.code_stopped.set()  # not when this task itself was cancelled under a running agent
            await self.finish_run(active, outcome)
            if stop_keeping is not None:
                stop_keeping()

    async def start_running(self, active: ActiveRun) -> bool:
        """Recover orphans and record RUNNING, retrying a store blip; False if the store stayed away."""
        run = active.run
        deadline = time.monotonic() + max(settings.current.lock_ttl_seconds, 5.0)
        while True:
            try:
                await self.recover_orphans(starting=run)
                if active.stop_reason is None:
                    started = run.started_at or utc_now()
                    if active.running_stored:  # by its take, which also found no cancel asked
                        asked, by = False, None
                    else:
                        run.update(state="RUNNING", started_at=started)
                        try:
                            asked, by = await self.save_running(run, active.waited)
                        except WriteRefused as exc:
                            self.refuse(active, exc)
                            return True
                    self.hub.publish_run(run, appended=active.running_appended)
                    lifecycle_log.info("run_started", {**run_fields(run), "fencing_token": run.fencing_token})
                    if active.waited:
                        metrics.QUEUE_WAIT.observe(seconds_between(run.created_at, started))
                    if asked:
                        self.request_stop(run.run_id, by=by)
                return True
            except StoreUnavailable as exc:
                if time.monotonic() < deadline and active.stop_reason is None:
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    if active.stop_reason is None:  # stopped meanwhile (its lock lost): RUNNING was never stored
                        continue
                log.error("run_start_failed", extra={**run_fields(run), "detail": str(exc)})
                return False

    async def save_running(self, run: Run, waited: bool) -> tuple[bool, str | None]:
        """Store RUNNING; for a run that waited in the queue, also whether a cancel (or an interrupt, by which run)
        was asked while it changed hands, read at the same time: this process runs it already, so a cancel asked
        from now on reaches it directly, and one asked before left its flag."""
        if not waited or not self.backend.shared:  # in this process both answer at once: no need to overlap
            await self.backend.save(run)
            return await self.backend.cancel_requested(run.run_id) if waited else (False, None)
        saved, flag = await asyncio.gather(self.backend.save(run), self.backend.cancel_requested(run.run_id),
                                           return_exceptions=True)
        for outcome in (saved, flag):
            if isinstance(outcome, BaseException):
                raise outcome
        assert not isinstance(flag, BaseException)
        return flag

    def refuse(self, active: ActiveRun, exc: WriteRefused) -> None:
        """A write of the run was refused: it is terminal, or another holder's. Log it and stop the agent."""
        if not active.refused:
            active.refused = True
            log.error("run_write_refused", extra={**run_fields(active.run), "state": active.run.state,
                                                  "fencing_token": active.run.fencing_token, "detail": str(exc)})
        active.stop("lock_lost")

    async def lease_lost(self, active: ActiveRun) -> str | None:
        """Why ``active`` no longer holds its slot right now, or None while it does (BaseAgent.ensure_lease)."""
        if active.stop_requested.done():
            return "the run is stopping"
        try:
            held = await asyncio.wait_for(self.backend.check_lease(active.run),
                                          settings.current.lock_ttl_seconds / 3)
        except (StoreUnavailable, TimeoutError):
            return "the store did not confirm the lease"
        if not held:
            active.stop("lock_lost")
            return "the lease expired or was taken over"
        return "the run is stopping" if active.stop_requested.done() else None

    def report_progress(self, run: Run, fraction: float) -> None:
        if run.finished:  # code the agent left behind (a thread of its own, or after a shutdown) reports late
            return
        run.update(progress=fraction)
        self.backend.note_progress(run)
        self.hub.publish_progress(run)

    async def recover_orphans(self, starting: Run | None = None) -> None:
        """Mark ERROR the unfinished runs whose holder no longer holds a slot (a replica died).

        Called as a run starts (``starting``: before it records RUNNING, so an orphan's RUNNING record never
        stands beside it; the backend looks only when the step that gave out its slot saw a sign of one) and, by
        dispatch, at least once a second: a run whose replica died ends even when no other run starts.
        """
        for orphan in await self.backend.claim_orphans(starting):
            orphan.update(state="ERROR", finished_at=utc_now(), queue_position=None,
                          error="Runner lost: the replica running it lost the run's lease (it stopped, or stopped "
                                "renewing)")
            write_started = time.time_ns()
            try:
                await self.backend.save(orphan)
            except WriteRefused as exc:  # its holder stored its end meanwhile
                log.warning("run_write_refused", extra={**run_fields(orphan), "state": orphan.state,
                                                        "fencing_token": orphan.fencing_token, "detail": str(exc)})
                continue
            if tracing.tracer is not None:
                tracing.unexecuted_run(orphan, write_started, orphan=True)
            self.hub.publish_run(orphan)
            log.error("run_orphaned", extra={**run_fields(orphan), "state": "ERROR", "error": orphan.error})

    async def finish_run(self, active: ActiveRun, outcome: dict[str, Any]) -> None:
        """Store the terminal state and log it; release the lock in the same step once no agent code runs.

        At shutdown an agent that will not stop gets its run recorded while its
        code goes on (``drain``); the lock is then kept, and renewed, until the
        agent stops or the process is gone.
        """
        run = active.run
        release = active.code_stopped.is_set()
        if run.finished or active.refused:  # recorded already (at shutdown, or by another): release the lock
            if release:
                if run.holder is not None:
                    await self.backend.release(run.holder)
                self.clear_active(active)
            return
        outcome = dict(outcome)
        event = outcome.pop("event", "agent_error")
        trace = outcome.pop("traceback", None)
        extra_fields = {key: outcome.pop(key) for key in list(outcome)
                        if key not in ("state", "result_json", "error", "cancelled_by")}
        with tracing.child_span(active.span, "run terminal write", run):
            # GET /agents/logs of a finished run has every line its agent logged; the wait stays well inside the
            # lock's TTL.
            await self.hub.logs_stored(min(LOGS_STORED_SECONDS, settings.current.lock_ttl_seconds / 3))
            run.update(finished_at=utc_now(), **outcome)
            try:
                stored, taken, appended = await self.save_finished(run, release)
            except WriteRefused as exc:  # another replica recorded its end: that record stands, this one is dropped
                self.refuse(active, exc)  # (and so does the run span that replica emitted)
                await self.finish_run(active, outcome)  # now it only lets go of the slot
                return
        try:
            self.log_finished(active, stored, run.run_id in appended, release,
                              taken is None or self.backend.take_again, event, trace, extra_fields)
        finally:
            if taken is not None:  # in a context of its own, not this run's (its span is no parent of the next)
                contextvars.Context().run(self.begin_taken, taken, taken.run_id in appended)

    def log_finished(self, active: ActiveRun, stored: bool, appended: bool, release: bool, wake: bool, event: str,
                     trace: str | None, extra_fields: dict[str, Any]) -> None:
        """After the terminal write: publish it (``appended``: its step appended the event), let go of the run
        (``wake``: dispatch looks at the queue), count it and write its terminal line."""
        run = active.run
        if stored:
            self.hub.publish_run(run, appended=appended)
        if release:
            self.clear_active(active, wake)
        duration = time.monotonic() - active.started
        metrics.RUNS_TOTAL.labels(run.agent_type, run.state).inc()
        metrics.RUN_DURATION.labels(run.agent_type).observe(duration)
        fields = {**extra_fields, **run_fields(run), "state": run.state, "duration_ms": round(duration * 1000, 1)}
        if run.cancelled_by is not None:
            fields["cancelled_by"] = run.cancelled_by
        if run.error is not None:
            fields["error"] = run.error
        if trace is not None:
            fields["traceback"] = trace
        level = logging.INFO if run.state in ("DONE", "CANCELLED") else logging.ERROR
        lifecycle_log.log(level, event, fields)
        tracing.end_run(active.span, run)

    def clear_active(self, active: ActiveRun, wake: bool = True) -> None:
        """The run's slot is free: forget it, and (``wake``) let dispatch look at the queue."""
        if self.active_runs.get(active.run.run_id) is active:
            del self.active_runs[active.run.run_id]
            metrics.RUNNING.set(len(self.active_runs))
        if wake:
            self.work_waiting.set()

    def begin_taken(self, run: Run, appended: bool) -> None:
        """Start the run the terminal write took onto its slot (finish_and_take), as dispatch starts one;
        ``appended``: the step appended its RUNNING event, if it stored it RUNNING."""
        assert self.dispatch is not None
        self.dispatch.begin_waited_run(run, appended)
        self.dispatch.publish_queue()
        if self.backend.queue_after_take is not None:
            metrics.QUEUE_DEPTH.set(self.backend.queue_after_take)

    async def save_finished(self, run: Run, release: bool) -> tuple[bool, Run | None, frozenset[str]]:
        """Store a terminal state (and release the run lock in the same step), retrying until both land. While
        admission takes runs, the slot released goes to the head of the queue in the same step (finish_and_take):
        the run taken is answered, for the caller to start, with the runs whose events the step appended.

        If the store never comes back within the lock's TTL, the run stays
        unfinished there and the next lock holder marks it ERROR ("runner lost");
        the terminal log line is written anyway. Returns whether it was stored.
        """
        dispatch = self.dispatch if release and self.dispatch is not None and self.dispatch.accepting_runs else None
        deadline = time.monotonic() + max(settings.current.lock_ttl_seconds, 5.0)
        if dispatch is not None:
            dispatch.admitting += 1  # drain waits for a take in flight: the run taken gets its grace
        try:
            while True:
                try:
                    if dispatch is not None:
                        taken = await self.backend.finish_and_take(run)
                        return True, taken, self.backend.appended_events
                    await self.backend.save(run, release=release)
                    return True, None, frozenset()
                except StoreUnavailable:
                    if time.monotonic() >= deadline:
                        log.error("terminal_state_not_stored", extra={**run_fields(run), "state": run.state})
                        if release and run.holder is not None:
                            await self.backend.release(run.holder)
                        return False, None, frozenset()
                    await asyncio.sleep(STORE_RETRY_SECONDS)
        finally:
            if dispatch is not None:
                dispatch.admitting -= 1

    def keep_lock_soon(self, active: ActiveRun) -> Callable[[], None]:
        """keep_lock from its first renewal on (a timer until then: most runs end before it, and never start its
        task); returns what stops it."""
        interval = self.backend.renew_interval
        assert interval is not None
        since = time.monotonic()
        keeper: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            interval, lambda: keeper.append(asyncio.create_task(self.keep_lock(active, since))))

        def stop() -> None:
            timer.cancel()
            for task in keeper:
                task.cancel()
        return stop

    async def keep_lock(self, active: ActiveRun, since: float | None = None) -> None:
        """Renew the run lock while any code of the agent runs; stop the run the moment the lock may be lost.

        Any failure to renew (Redis unreachable, or answering an error such as
        READONLY or MISCONF) is retried at once and often; once half the TTL has
        passed without a renewal the agent is stopped (``lock_lost``), so it has
        the other half to stop before another replica may take the lock. If its
        code still runs when the TTL has passed, the process exits: the lock can
        no longer keep a second agent out, and a process that is gone runs nothing.
        """
        interval = self.backend.renew_interval
        ttl = settings.current.lock_ttl_seconds
        assert interval is not None and active.run.holder is not None
        renewed_at = time.monotonic() if since is None else since  # since: the slot was taken then
        failure: str | None = None
        lost_logged = False  # once per run, whatever it was stopping for already
        first = True
        while not active.code_stopped.is_set():
            if first:  # the first renewal is due one interval after the slot was taken
                first = False
                await asyncio.sleep(max(0.0, renewed_at + interval - time.monotonic()))
            else:
                await asyncio.sleep(interval if failure is None else min(interval, ttl / 10))
            if time.monotonic() - renewed_at >= ttl and not active.code_stopped.is_set():
                exit_lock_expired(active)
            try:
                # a renewal that hangs (packets dropped, no reset) fails when half the TTL has passed without one
                answer_by = max(ttl / 10, renewed_at + ttl / 2 - time.monotonic())
                reasserted = await asyncio.wait_for(self.backend.renew(active.run), answer_by)
            except LockLost:
                if not self.backend.holds(active.run.holder):  # finish_run released it while this renewal was out
                    break
                failure, lost = "the lock was taken over or expired", True
            except Exception as exc:  # unreachable, or an error reply: either way the lock may expire
                if failure is None:
                    log.warning("lock_renewal_failed", extra={**run_fields(active.run),
                                                              "detail": f"{type(exc).__name__}: {exc}"})
                failure = "the lock could not be renewed for half its TTL"
                lost = time.monotonic() - renewed_at >= ttl / 2
            else:
                renewed_at, failure, lost = time.monotonic(), None, False
                if reasserted:  # its key was gone from Redis, and nobody else had the slot: taken back
                    log.warning("lock_reasserted", extra={**run_fields(active.run),
                                                          "detail": "the run's slot was gone from Redis; taken back"})
                # bounded too: a store that stops answering right after a renewal must not hold off the next one
                with contextlib.suppress(StoreUnavailable, TimeoutError):
                    asked, by = await asyncio.wait_for(self.backend.cancel_requested(active.run.run_id), ttl / 10)
                    if asked:
                        self.request_stop(active.run.run_id, by=by)
            if lost and not lost_logged:
                lost_logged = True
                log.error("lock_lost", extra={**run_fields(active.run), "detail": failure})
                active.stop("lock_lost")


def seconds_between(earlier: str, later: str) -> float:
    try:
        return max(0.0, (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds())
    except ValueError:  # a record from elsewhere with an odd timestamp
        return 0.0


def exit_lock_expired(active: ActiveRun) -> None:
    """The lock's TTL passed while the agent's code still runs: end the process rather than risk two agents."""
    log.critical("lock_expired_agent_running", extra={
        **run_fields(active.run), "detail": "the agent did not stop before its lock expired; exiting"})
    write_hot_lines()
    sys.stdout.flush()
    os._exit(LOCK_EXPIRED_EXIT_CODE)
