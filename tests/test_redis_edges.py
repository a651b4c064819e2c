"""Redis mode's terminal writes and takes at their edges: a run past the retention bytes by itself, a script that
redis-py sends again after losing its reply, a take asked again after its slot expired, a dispatch take answered
while a handoff's trim is out."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pytest

from conftest import RedisServer
from test_guarantee import Lossy, handoff_scenario, new_user


def test_a_handoff_whose_ended_run_is_past_retention_bytes_leaves_no_event_stream_of_the_dropped_run(
        redis_server: RedisServer) -> None:
    """RUN_RETENTION_MB=1 and a run whose counted size (record + log bytes + event backlog bytes, each under its
    cap) is past it: the end's own step never drops its own run (HANDOFF appends the run's end event after it, which
    would make its stream again); the trim call after the answer drops it, stream and all."""
    from service.backends.records import utc_now

    async def scenario(store: Any, runs: list[Any]) -> Any:
        ended = runs[0]
        # within the caps: LOG_BYTES_MAX 256 KiB of log lines, RUN_BACKLOG_BYTES 1 MiB of event backlog
        await store.client.hset(store.key("logbytes"), ended.run_id, 200 * 1024)
        await store.client.set(store.key("events", "run", ended.run_id) + ":bytes", 1000 * 1024)
        ended.update(state="DONE", finished_at=utc_now())
        taken = await store.finish_and_take(ended)
        return (taken, await store.client.exists(store.key("run", ended.run_id)),
                await store.client.exists(store.key("events", "run", ended.run_id)),
                await store.client.exists(store.key("events", "run", ended.run_id) + ":bytes"),
                ended.run_id in store.appended_events)

    taken, record, stream, stream_bytes, appended = handoff_scenario(redis_server, scenario,
                                                                     retention_bytes=1024 * 1024)
    assert taken is not None and appended  # handed on, its end event appended by the script
    assert record == 0  # dropped by retention, by the trim call after the answer
    assert (stream, stream_bytes) == (0, 0), "the dropped run's event stream was made again after its drop"


def test_a_dispatch_take_during_a_handoffs_trim_keeps_the_handoffs_appended_events(
        redis_server: RedisServer) -> None:
    """A handoff's trim call (more than two finished runs past retention: RUN_RETENTION lowered) is out while
    dispatch's take is answered, which sets appended_events too: the handoff's runner still reads the handoff's (or
    it sends both events of the handoff again)."""
    from service.backends.records import utc_now

    async def scenario(store: Any, runs: list[Any]) -> Any:
        real_trim = store._trim

        async def trim(**kwargs: Any) -> Any:
            await store.take()  # dispatch's take, answered while the trim is out (no slot free: nothing taken)
            return await real_trim(**kwargs)

        store._trim = trim
        await store.client.zadd(store.key("finished"), {f"old-{i}": i for i in range(5)})  # retention lowered
        runs[0].update(state="DONE", finished_at=utc_now())
        taken = await store.finish_and_take(runs[0])
        return taken, store.appended_events, runs

    taken, appended, runs = handoff_scenario(redis_server, scenario, retention=1)
    assert taken is not None and taken.state == "RUNNING"
    assert appended == {runs[0].run_id, taken.run_id}, appended


def test_a_dispatch_take_that_retook_a_free_slot_does_not_skip_a_running_event_with_a_new_fencing_token(
        redis_server: RedisServer) -> None:
    """A handoff takes run 2 (stored RUNNING, its RUNNING event appended with fencing token t1) and its reply is lost;
    the runner gives up and dispatch inherits the token; the slot expires before dispatch's take asks again (a
    paused process). The retry takes a free slot and mints t2 into the record; it does not answer the handoff's
    RUNNING event as the run's, so the runner sends one with t2 (the token GET shows)."""
    from service.backends.records import utc_now

    async def scenario(store: Any, runs: list[Any]) -> Any:
        store._handoff = Lossy(store._handoff)
        runs[0].update(state="DONE", finished_at=utc_now())
        with pytest.raises(Exception):
            await store.finish_and_take(runs[0])
        token = store._handoffs[runs[0].holder][0]
        await store.release(runs[0].holder)  # the runner gave up on the end (save_finished)
        for slot in store._lock.keys:  # the taken run's slot expired meanwhile
            if await store.client.get(slot) == token.encode():
                await store.client.delete(slot)
        taken = await store.take()
        entries = await store.client.xrange(store.key("events", "run", runs[2].run_id))
        return taken, store.appended_events, entries

    taken, appended, entries = handoff_scenario(redis_server, scenario)
    assert taken is not None and taken.state == "RUNNING"
    running = [json.loads(fields[b"d"]) for _, fields in entries if fields[b"s"] == b"RUNNING"]
    assert taken.run_id not in appended  # so the runner sends one, with the token GET shows
    assert len(running) == 1 and running[0]["fencing_token"] != taken.fencing_token  # the handoff's, with t1


class SentTwice:
    """A registered script that redis-py sends twice: the first copy runs and its reply is lost, the second copy's
    reply is the one answered."""

    def __init__(self, script: Any) -> None:
        self.script = script

    async def __call__(self, **kwargs: Any) -> Any:
        await self.script(**kwargs)
        return await self.script(**kwargs)


def test_a_cancel_of_a_waiting_run_past_retention_bytes_sent_twice_still_answers_the_cancelled_run(
        redis_server: RedisServer) -> None:
    """MAX_BODY_BYTES above RUN_RETENTION_MB (both settable), a waiting run larger than the retention bytes is
    cancelled, and redis-py sends CANCEL_WAITING_SCRIPT again after losing its reply. The first copy stores the end
    and does not drop its own run in the same step, so the second finds the record it stored and answers it: the
    client's cancel is answered with the run CANCELLED (not "no longer waits")."""
    from service.backends.records import Run, utc_now
    from service.backends.redis import open_redis

    async def opened() -> Any:
        _, store = open_redis(redis_server.url, f"test-{uuid.uuid4().hex[:8]}", 30.0, 100, 1024 * 1024,
                              logging.getLogger("test"), slots=1)
        await store.start()
        try:
            runs = [Run.new(str(uuid.uuid4()), "sleeper", new_user(), {"x": "y" * (1100 * 1024)}, holder=None)
                    for _ in range(2)]
            for run in runs:
                await store.admit(run, "enqueue", 10)
            assert runs[1].queue_position == 1
            store._cancel_waiting = SentTwice(store._cancel_waiting)
            return await store.dequeue(runs[1].run_id, state="CANCELLED", finished_at=utc_now())
        finally:
            await store.close()

    cancelled = asyncio.run(opened())
    assert cancelled is not None and cancelled.state == "CANCELLED", "the cancel answered as if the run had left"
