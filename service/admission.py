"""Admission: what POST /agents/run does with a run (start it, queue it, interrupt for it, refuse it),
the dispatcher that starts queued runs as slots free up, and the drain at shutdown.

``accepting_runs`` turns False once shutdown has begun; ``admitting`` counts
POSTs and dispatches between taking a slot and starting their run, so drain waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import agents
import events
import idempotency
import metrics
import runner
import settings
from logs import log
from runner import STOP_WAIT_SECONDS, finish_run, recover_orphans, request_stop, run_fields, start, work_waiting
from store import Run, StoreUnavailable, utc_now

accepting_runs = True
admitting = 0
QUEUE_FRAMES_INTERVAL = 0.25  # the waiting runs' position frames, at most this often
ORPHANS_INTERVAL = 1.0  # dispatch looks for runs whose replica died this often
queue_frames_from: int | None = None  # a pass is due, for the runs from this position on
queue_frame_tasks: set[asyncio.Task[None]] = set()


async def admit(agent_cls: type[agents.BaseAgent], user_id: str, agent_input: dict[str, Any],
                on_busy: str, webhook: str | None = None, run_id: str | None = None,
                claim: list[Any] | None = None) -> tuple[str, Run | None]:
    """Start a run on a free slot, or queue it as ``on_busy`` says; returns the store's verdict and the run.

    "started" and "queued" are accepted (202); "busy" and "full" are refused (409) and leave no run (None),
    and so does "lost" (with ``claim``, the Idempotency-Key's claim is no longer this request's).
    """
    global admitting
    refused = runner.run_store.refusal(runner.run_lock, on_busy, settings.current.queue_max)
    if refused is not None:  # the hot path while busy: answered before a run is built
        return refused, None
    admitting += 1  # drain waits for this admission, so a run accepted as shutdown starts gets its grace
    try:
        run = Run.new(run_id or str(uuid.uuid4()), agent_cls.agent_type, user_id, agent_input, holder=None,
                      webhook=webhook)
        verdict = await runner.run_store.admit(run, runner.run_lock, on_busy, settings.current.queue_max, claim)
        if verdict in ("started", "queued"):
            events.hub.publish_run(run)  # accepted
        if verdict == "started":
            start(run, agent_cls, agent_input)
    finally:
        admitting -= 1
    if verdict == "queued":
        log.info("run_accepted", extra=run_fields(run))
        log.info("run_queued", extra={**run_fields(run), "queue_position": run.queue_position})
        work_waiting.set()
        try:  # the run is accepted: a store failure from here on must not answer 503 (the client would resend it)
            metrics.QUEUE_DEPTH.set(await runner.run_store.queue_length())
            if on_busy == "interrupt":
                publish_queue(from_position=2)  # the run went to the head: every other one moved back
                await interrupt_oldest(run)
        except StoreUnavailable as exc:  # it waits in line all the same; an interrupt then stops no run
            log.warning("run_queued_store_unavailable", extra={**run_fields(run), "on_busy": on_busy,
                                                                "detail": str(exc)})
    elif verdict == "started":
        log.info("run_accepted", extra=run_fields(run))
    return verdict, run


async def admit_once(key: str, agent_cls: type[agents.BaseAgent], user_id: str, agent_input: dict[str, Any],
                     on_busy: str, webhook: str | None = None,
                     check: Callable[[], Awaitable[None]] | None = None) -> tuple[str, str, int | None]:
    """``admit`` for a request with an Idempotency-Key: one run per key, however the request is retried.

    Returns the verdict, the run id and the run's queue position. Verdicts: those of ``admit`` ("busy" and
    "full" give the key back), "replayed" (an earlier request with the key was admitted: its run),
    "pending" (an earlier request with the key is still being decided), "mismatch" (the key came with a
    different request) and "closed" (shutting down; the key is given back). ``check`` (the webhook's DNS
    look-up) runs only when the key is this request's to decide: a replay answers as the first request did.
    """
    keys = runner.idempotency_keys
    fingerprint = idempotency.fingerprint(agent_cls.agent_type, user_id, agent_input, on_busy, webhook)
    run_id = str(uuid.uuid4())
    try:
        claim = await keys.claim(key, fingerprint, run_id)
    except BaseException:  # the claim may have been stored before its reply was lost
        await asyncio.shield(settle_key(key, fingerprint, run_id, "failed"))
        raise
    if claim.outcome == "mismatch":
        return "mismatch", claim.run_id, None
    if claim.outcome != "new":
        run = await runner.run_store.get(claim.run_id)  # a pending key whose run exists was admitted
        if claim.outcome == "pending" and run is None:
            return "pending", claim.run_id, None
        return "replayed", claim.run_id, run.queue_position if run is not None else None
    verdict: str | None = None
    try:
        if not accepting_runs:
            verdict = "closed"
            return verdict, claim.run_id, None
        if check is not None:
            await check()  # raising: the key is given back, like any refused request
        verdict, run = await admit(agent_cls, user_id, agent_input, on_busy, webhook, run_id=claim.run_id,
                                   claim=keys.admit_args(key, fingerprint))
        if verdict == "lost":  # the claim expired or was taken over meanwhile: the key is another request's now
            return "pending", claim.run_id, None
        return verdict, claim.run_id, run.queue_position if run is not None else None
    finally:  # before the answer, on every path: a client disconnect or an error included
        await asyncio.shield(settle_key(key, fingerprint, claim.run_id, verdict))


async def settle_key(key: str, fingerprint: str, run_id: str, verdict: str | None) -> None:
    """Keep the key when its run was admitted, give it back when it was refused; after an error, ask the store.

    A store that fails here leaves the key pending: a retry then finds the run if it was admitted, and takes
    the key over once it is stale if it was not.
    """
    keys = runner.idempotency_keys
    with contextlib.suppress(StoreUnavailable):
        if verdict is None:  # admit raised or was cancelled: its run may or may not have been stored
            verdict = "started" if await runner.run_store.get(run_id) is not None else "failed"
        if verdict in ("started", "queued"):
            await keys.accept(key, fingerprint, run_id)
        else:
            await keys.release(key, run_id)


async def interrupt_oldest(run: Run) -> None:
    """Stop the oldest running run not already stopping for ``run``, which waits at the head of the queue."""
    if runner.run_lock.renew_interval is None:  # memory mode: every run is this process's
        oldest = next((active.run.run_id for active in runner.active_runs.values()
                       if not active.stop_requested.is_set() and active.run.run_id != run.run_id), None)
    else:  # picked and asked in one script: two interrupts on two replicas never pick the same run
        stopping = [active.run.run_id for active in runner.active_runs.values() if active.stop_requested.is_set()]
        oldest = await runner.run_store.interrupt_oldest(runner.run_lock, run.run_id, stopping)
    if oldest is None:  # none left to stop: the run starts when a slot frees up
        return
    log.info("run_interrupting", extra={**run_fields(run), "interrupted_run_id": oldest})
    request_stop(oldest, by=run.run_id)  # at once if this process runs it; other replicas hear it from Redis


async def dispatch_forever() -> None:
    """Start waiting runs as slots free up, head of the queue first, until shutdown.

    Woken by this process (a run queued, a slot freed) and, in Redis mode, by
    pub/sub from other replicas, and at least once a second in any case.
    """
    global admitting
    orphans_due = 0.0
    while accepting_runs:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(work_waiting.wait(), 1.0)
        work_waiting.clear()
        try:
            taken = 0
            while accepting_runs:
                admitting += 1  # drain waits for a take in flight: a run that got its slot gets the grace
                try:
                    if (run := await runner.run_store.take(runner.run_lock)) is None:
                        break
                    begin_waited_run(run)
                finally:
                    admitting -= 1
                taken += 1
            if taken:
                publish_queue(from_position=1)
            metrics.QUEUE_DEPTH.set(await runner.run_store.queue_length())
            if time.monotonic() >= orphans_due:  # a run whose replica died ends even if no other run starts
                orphans_due = time.monotonic() + ORPHANS_INTERVAL
                await recover_orphans()
        except StoreUnavailable:
            pass  # the next tick tries again


def begin_waited_run(run: Run) -> None:
    agent_input = json.loads(run.input_json)  # written by Run.new: always a JSON object
    log.info("run_dequeued", extra=run_fields(run))
    start(run, agents.registry.get(run.agent_type), agent_input, waited=True)


def publish_queue(from_position: int) -> None:
    """The queue moved: a run frame for each waiting run from ``from_position`` on, soon (best effort).

    Moves within QUEUE_FRAMES_INTERVAL share one pass: a queue of n draining
    run by run would otherwise cost n frames (and in Redis mode n event
    writes and a read of n records) for every run that leaves it.
    """
    global queue_frames_from
    if queue_frames_from is not None:  # a pass is due: it covers this move too
        queue_frames_from = min(queue_frames_from, from_position)
        return
    queue_frames_from = from_position
    asyncio.get_running_loop().call_later(QUEUE_FRAMES_INTERVAL, start_queue_frames)


def start_queue_frames() -> None:
    task = asyncio.ensure_future(publish_queue_frames())
    queue_frame_tasks.add(task)  # a strong reference until it is done
    task.add_done_callback(queue_frame_tasks.discard)


async def publish_queue_frames() -> None:
    global queue_frames_from
    from_position, queue_frames_from = queue_frames_from or 1, None
    with contextlib.suppress(StoreUnavailable):
        for run in await runner.run_store.waiting():
            if run.queue_position is not None and run.queue_position >= from_position:
                events.hub.publish_run(run)


async def cancel_waiting(run_id: str, position: int = 1) -> Run | None:
    """Cancel a run still in the queue at ``position`` (CANCELLED at once); None if it no longer waits."""
    run = await runner.run_store.dequeue(run_id, state="CANCELLED", finished_at=utc_now())
    if run is None:
        return None
    events.hub.publish_run(run)
    publish_queue(from_position=position)
    metrics.QUEUE_DEPTH.set(await runner.run_store.queue_length())
    metrics.RUNS_TOTAL.labels(run.agent_type, run.state).inc()
    log.info("run_cancelled", extra={**run_fields(run), "state": run.state, "duration_ms": 0.0})
    return run


def retry_after() -> int:
    """Seconds a refused client should wait: what the built-in agents still need, at least 1."""
    elapsed, now = 0.0, time.monotonic()
    for active in runner.active_runs.values():  # a plain loop: this runs on every 409
        elapsed = max(elapsed, now - active.started)
    return max(1, math.ceil(settings.current.agent_sleep_seconds - elapsed))


async def drain(grace_seconds: float) -> None:
    """Stop accepting runs; let the running runs finish within the grace time, else interrupt them.

    An agent that does not stop gets its run recorded as ERROR anyway; its
    slot is kept until its code stops or the process exits. Runs waiting in
    the queue end CANCELLED in memory mode; in Redis mode they stay queued
    for the other replicas.
    """
    global accepting_runs
    if not accepting_runs:
        return
    accepting_runs = False
    work_waiting.set()  # dispatch sees accepting_runs and stops taking runs
    deadline = time.monotonic() + grace_seconds
    while admitting and time.monotonic() < deadline:  # a POST between lock and start: it gets the grace too
        await asyncio.sleep(0.01)
    running = list(runner.active_runs.values())
    log.info("shutdown_started", extra={"grace_seconds": grace_seconds,
                                        "active_run_id": running[0].run.run_id if running else None,
                                        "active_run_ids": [active.run.run_id for active in running]})
    if runner.run_lock.renew_interval is None:  # memory mode: nobody else will run what waits
        await cancel_queue("Service shut down before the run started")
    drivers = {active.driver for active in running if active.driver is not None}
    if drivers:
        await asyncio.wait(drivers, timeout=max(0.0, deadline - time.monotonic()))
    late = [active for active in running if active.driver is not None and not active.driver.done()]
    for active in late:
        active.stop("shutdown")
    if late:
        await asyncio.wait({active.driver for active in late}, timeout=STOP_WAIT_SECONDS)
    for active in late:
        if not active.run.finished:  # the agent ignores cancellation: record the outcome before exiting anyway
            await finish_run(active, {"state": "ERROR", "event": "run_interrupted",
                                      "error": "Run interrupted by shutdown; the agent did not stop"})


async def cancel_queue(error: str) -> None:
    for waiting in await runner.run_store.waiting():
        run = await runner.run_store.dequeue(waiting.run_id, state="CANCELLED", error=error, finished_at=utc_now())
        if run is not None:
            events.hub.publish_run(run)
            metrics.RUNS_TOTAL.labels(run.agent_type, run.state).inc()
            log.warning("run_cancelled", extra={**run_fields(run), "state": run.state, "error": error})
    metrics.QUEUE_DEPTH.set(0)
