"""Admission: what POST /agents/run does with a run (start it, queue it, interrupt for it, refuse it),
the dispatcher that starts queued runs as slots free up, and the drain at shutdown.

``Admission.accepting_runs`` turns False once shutdown has begun; ``admitting`` counts
POSTs from their accepting_runs check (whatever they await next) and dispatches from taking a slot, until their
run is started, so drain waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import agents
from service import settings
from service import metrics
from service import tracing
from service.backends.records import Run, StoreUnavailable, utc_now
from service.logs import lifecycle_log, log
from service.runs import STOP_WAIT_SECONDS, Runner
from service.supervision import run_fields

QUEUE_FRAMES_INTERVAL = 0.25  # the watched waiting runs' position frames, at most this often
ORPHANS_INTERVAL = 1.0  # dispatch looks for runs whose replica died this often


def request_fingerprint(agent_type: str, user_id: str, agent_input: dict[str, Any], on_busy: str,
                webhook: str | None = None) -> str:
    """The request as its Idempotency-Key remembers it: every body field, key order and spacing aside."""
    canonical = json.dumps([agent_type, user_id, agent_input, on_busy, webhook], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Admission:
    """Whether runs are accepted, and the admissions and dispatches in flight; one per runtime."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.backend = runner.backend
        self.hub = runner.hub
        self.accepting_runs = True
        self.admitting = 0
        self.queue_frames_due = False  # a pass over the watched waiting runs' positions is due
        self.queue_frame_tasks: set[asyncio.Task[None]] = set()
        runner.dispatch = self  # a run that ends hands its slot to the next run (Runner.save_finished)

    async def admit(self, agent_cls: type[agents.BaseAgent], user_id: str, agent_input: dict[str, Any],
                    on_busy: str, webhook: str | None = None, run_id: str | None = None,
                    claim: list[Any] | None = None) -> tuple[str, Run | None]:
        """Start a run on a free slot, or queue it as ``on_busy`` says; returns the store's verdict and the run.

        "started" and "queued" are accepted (202); "busy" and "full" are refused (409) and leave no run (None),
        and so does "lost" (with ``claim``, the Idempotency-Key's claim is no longer this request's).
        """
        refused = self.backend.refusal(on_busy, settings.current.queue_max)
        if refused is not None:  # the hot path while busy: answered before a run is built
            return refused, None
        self.admitting += 1  # drain waits for this admission, so a run accepted as shutdown starts gets its grace
        try:
            run = Run.new(run_id or str(uuid.uuid4()), agent_cls.agent_type, user_id, agent_input, holder=None,
                          webhook=webhook, trace=tracing.new_run_trace() if tracing.tracer is not None else None)
            verdict = await self.backend.admit(run, on_busy, settings.current.queue_max, claim)
            if verdict in ("started", "queued"):
                self.hub.publish_run(run)  # accepted
            if verdict == "started":
                self.runner.start(run, agent_cls, agent_input)
        finally:
            self.admitting -= 1
        if verdict == "queued":
            if tracing.tracer is not None:
                tracing.note_accepted(run.run_id, run.queue_position)
            lifecycle_log.info("run_accepted", run_fields(run))
            lifecycle_log.info("run_queued", {**run_fields(run), "queue_position": run.queue_position})
            self.runner.work_waiting.set()
            try:  # the run is accepted: a store failure from here on must not answer 503 (the client would resend it)
                if on_busy == "enqueue" and run.queue_position is not None:
                    metrics.QUEUE_DEPTH.set(run.queue_position)  # it joined at the end of the line
                else:
                    metrics.QUEUE_DEPTH.set(await self.backend.queue_length())
                if on_busy == "interrupt":
                    self.publish_queue()  # the run went to the head: every other one moved back
                    await self.interrupt_oldest(run)
            except StoreUnavailable as exc:  # it waits in line all the same; an interrupt then stops no run
                log.warning("run_queued_store_unavailable", extra={**run_fields(run), "on_busy": on_busy,
                                                                    "detail": str(exc)})
        elif verdict == "started":
            lifecycle_log.info("run_accepted", run_fields(run))
        return verdict, run

    async def admit_once(self, key: str, agent_cls: type[agents.BaseAgent], user_id: str, agent_input: dict[str, Any],
                         on_busy: str, webhook: str | None = None,
                         check: Callable[[], Awaitable[None]] | None = None) -> tuple[str, str, int | None]:
        """``admit`` for a request with an Idempotency-Key: one run per key, however the request is retried.

        Returns the verdict, the run id and the run's queue position. Verdicts: those of ``admit`` ("busy" and
        "full" give the key back), "replayed" (an earlier request with the key was admitted: its run),
        "pending" (an earlier request with the key is still being decided), "mismatch" (the key came with a
        different request) and "closed" (shutting down; the key is given back). ``check`` (the webhook's DNS
        look-up) runs only when the key is this request's to decide: a replay answers as the first request did.
        """
        keys = self.backend.idempotency_keys
        fingerprint = request_fingerprint(agent_cls.agent_type, user_id, agent_input, on_busy, webhook)
        run_id = str(uuid.uuid4())
        try:
            claim = await keys.claim(key, fingerprint, run_id)
        except BaseException:  # the claim may have been stored before its reply was lost
            await asyncio.shield(self.settle_key(key, fingerprint, run_id, "failed"))
            raise
        if claim.outcome == "mismatch":
            return "mismatch", claim.run_id, None
        if claim.outcome != "new":
            run = await self.backend.get(claim.run_id)  # a pending key whose run exists was admitted
            if claim.outcome == "pending" and run is None:
                return "pending", claim.run_id, None
            return "replayed", claim.run_id, run.queue_position if run is not None else None
        verdict: str | None = None
        # Counted from the accepting_runs check until the run is stored and started, the webhook look-up between
        # included: drain waits for it, so a run accepted as shutdown begins gets its grace (or its queue's end).
        self.admitting += 1
        try:
            if not self.accepting_runs:
                verdict = "closed"
                return verdict, claim.run_id, None
            if check is not None:
                await check()  # raising: the key is given back, like any refused request
            verdict, run = await self.admit(agent_cls, user_id, agent_input, on_busy, webhook, run_id=claim.run_id,
                                       claim=keys.admit_args(key, fingerprint))
            if verdict == "lost":  # the claim expired or was taken over meanwhile: the key is another request's now
                return "pending", claim.run_id, None
            return verdict, claim.run_id, run.queue_position if run is not None else None
        finally:  # before the answer, on every path: a client disconnect or an error included
            self.admitting -= 1
            await asyncio.shield(self.settle_key(key, fingerprint, claim.run_id, verdict))

    async def settle_key(self, key: str, fingerprint: str, run_id: str, verdict: str | None) -> None:
        """Keep the key when its run was admitted, give it back when it was refused; after an error, ask the store.

        A store that fails here leaves the key pending: a retry then finds the run if it was admitted, and takes
        the key over once it is stale if it was not.
        """
        keys = self.backend.idempotency_keys
        with contextlib.suppress(StoreUnavailable):
            if verdict is None:  # admit raised or was cancelled: its run may or may not have been stored
                verdict = "started" if await self.backend.get(run_id) is not None else "failed"
            if verdict in ("started", "queued"):
                await keys.accept(key, fingerprint, run_id)
            else:
                await keys.release(key, run_id)

    async def interrupt_oldest(self, run: Run) -> None:
        """Stop the oldest running run not already stopping for ``run``, which waits at the head of the queue."""
        # Picked (and, when shared, flagged) in one step: two interrupts, on two replicas, never pick the same run
        stopping = [active.run.run_id for active in self.runner.active_runs.values() if active.stop_requested.done()]
        oldest = await self.backend.interrupt_oldest(run.run_id, stopping)
        if oldest is None:  # none left to stop: the run starts when a slot frees up
            return
        log.info("run_interrupting", extra={**run_fields(run), "interrupted_run_id": oldest})
        self.runner.request_stop(oldest, by=run.run_id)  # at once if this process runs it; else its own hears it

    async def dispatch_forever(self) -> None:
        """Start waiting runs as slots free up, head of the queue first, until shutdown.

        Woken by this process (a run queued, a slot freed) and, in Redis mode, by
        pub/sub from other replicas, and at least once a second in any case.
        """
        orphans_due = 0.0
        while self.accepting_runs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runner.work_waiting.wait(), 1.0)
            self.runner.work_waiting.clear()
            self.publish_queue()  # the queue may have moved, here or on another replica
            try:
                taken = 0
                while self.accepting_runs:
                    self.admitting += 1  # drain waits for a take in flight: a run that got its slot gets the grace
                    try:
                        if (run := await self.backend.take()) is None:
                            break
                        self.begin_waited_run(run, run.run_id in self.backend.appended_events)
                    finally:
                        self.admitting -= 1
                    taken += 1
                    if not self.backend.take_again:  # no slot free, or nobody waits: the next take would find none
                        break
                tick = time.monotonic() >= orphans_due
                if taken and not tick and (told := self.backend.queue_after_take) is not None:
                    metrics.QUEUE_DEPTH.set(told)  # what the last take saw: no read of its own
                elif taken or tick:
                    metrics.QUEUE_DEPTH.set(await self.backend.queue_length())
                if tick:  # a run whose replica died ends even if no other run starts
                    orphans_due = time.monotonic() + ORPHANS_INTERVAL
                    await self.runner.recover_orphans()
            except StoreUnavailable:
                pass  # the next tick tries again

    def begin_waited_run(self, run: Run, appended: bool = False) -> None:
        """Start a run taken from the queue (``appended``: its take's step appended its RUNNING event, if it stored it
        RUNNING)."""
        agent_input = json.loads(run.input_json)  # written by Run.new: always a JSON object
        active = self.runner.start(run, agents.registry.get(run.agent_type), agent_input, waited=True)
        active.running_appended = appended and active.running_stored
        with tracing.current(active.span):  # its agent starts on the next turn of the loop, after this line
            lifecycle_log.info("run_dequeued", run_fields(run))

    def publish_queue(self) -> None:
        """The queue may have moved: the new positions of the waiting runs that this process's stream clients
        watch, soon (best effort), as frames of their own to those clients only.

        Nothing is published for a run nobody here watches, so a handoff costs the same whatever the queue's
        length: each process refreshes its own clients (its stream clients of a waiting run; every waiting run
        when it has a client of the stream of all runs), and moves within QUEUE_FRAMES_INTERVAL share one pass.
        Status and list read positions from the queue itself.
        """
        if self.queue_frames_due or not self.hub.watches_queue():
            return
        self.queue_frames_due = True
        asyncio.get_running_loop().call_later(QUEUE_FRAMES_INTERVAL, self.start_queue_frames)

    def start_queue_frames(self) -> None:
        task = asyncio.ensure_future(self.publish_queue_frames())
        self.queue_frame_tasks.add(task)  # a strong reference until it is done
        task.add_done_callback(self.queue_frame_tasks.discard)

    async def publish_queue_frames(self) -> None:
        self.queue_frames_due = False
        with contextlib.suppress(StoreUnavailable):
            if self.hub.watches_all():
                self.hub.deliver_positions(await self.backend.waiting(), everyone=True)
                return
            watched = await asyncio.gather(*(self.backend.get(run_id) for run_id in self.hub.watched_runs()))
            self.hub.deliver_positions([run for run in watched if run is not None and run.queue_position is not None],
                                       everyone=False)

    async def cancel_waiting(self, run_id: str) -> Run | None:
        """Cancel a run still in the queue (CANCELLED at once); None if it no longer waits."""
        write_started = time.time_ns()
        run = await self.backend.dequeue(run_id, state="CANCELLED", finished_at=utc_now())
        if run is None:
            return None
        if tracing.tracer is not None:
            tracing.unexecuted_run(run, write_started)
        self.hub.publish_run(run)
        self.publish_queue()
        metrics.QUEUE_DEPTH.set(await self.backend.queue_length())
        metrics.RUNS_TOTAL.labels(run.agent_type, run.state).inc()
        lifecycle_log.info("run_cancelled", {**run_fields(run), "state": run.state, "duration_ms": 0.0})
        return run

    def retry_after(self) -> int:
        """Seconds a refused client should wait: what the built-in agents still need, at least 1."""
        elapsed, now = 0.0, time.monotonic()
        for active in self.runner.active_runs.values():  # a plain loop: this runs on every 409
            elapsed = max(elapsed, now - active.started)
        return max(1, math.ceil(settings.current.agent_sleep_seconds - elapsed))

    async def drain(self, grace_seconds: float) -> None:
        """Stop accepting runs; let the running runs finish within the grace time, else interrupt them.

        An agent that does not stop gets its run recorded as ERROR anyway; its
        slot is kept until its code stops or the process exits. Runs waiting in
        the queue end CANCELLED, unless the backend is shared: then they stay
        queued for the other replicas.
        """
        if not self.accepting_runs:
            return
        self.accepting_runs = False
        self.runner.work_waiting.set()  # dispatch sees accepting_runs and stops taking runs
        deadline = time.monotonic() + grace_seconds
        while self.admitting and time.monotonic() < deadline:  # a POST between slot and start gets the grace too
            await asyncio.sleep(0.01)
        running = list(self.runner.active_runs.values())
        log.info("shutdown_started", extra={"grace_seconds": grace_seconds,
                                            "active_run_id": running[0].run.run_id if running else None,
                                            "active_run_ids": [active.run.run_id for active in running]})
        if not self.backend.shared:  # nobody else will run what waits
            await self.cancel_queue("Service shut down before the run started")
        drivers = {active.driver for active in running if active.driver is not None}
        if drivers:
            await asyncio.wait(drivers, timeout=max(0.0, deadline - time.monotonic()))
        late = [active for active in running if active.driver is not None and not active.driver.done()]
        for active in late:
            active.stop("shutdown")
        if late:
            await asyncio.wait({active.driver for active in late if active.driver is not None},
                               timeout=STOP_WAIT_SECONDS)
        for active in late:
            if not active.run.finished:  # the agent ignores cancellation: record the outcome before exiting anyway
                await self.runner.finish_run(active, {"state": "ERROR", "event": "run_interrupted",
                                          "error": "Run interrupted by shutdown; the agent did not stop"})

    async def cancel_queue(self, error: str) -> None:
        for waiting in await self.backend.waiting():
            write_started = time.time_ns()
            run = await self.backend.dequeue(waiting.run_id, state="CANCELLED", error=error, finished_at=utc_now())
            if run is not None:
                if tracing.tracer is not None:
                    tracing.unexecuted_run(run, write_started)
                self.hub.publish_run(run)
                metrics.RUNS_TOTAL.labels(run.agent_type, run.state).inc()
                log.warning("run_cancelled", extra={**run_fields(run), "state": run.state, "error": error})
        metrics.QUEUE_DEPTH.set(0)
