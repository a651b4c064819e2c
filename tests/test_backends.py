"""The Backend contract: every case runs over every backend, in this process, in milliseconds.

A new backend passes this file before anything else. ``place`` opens memory, Redis (a redis-server of
the session, each case under a key prefix of its own) or PostgreSQL (a cluster of the session, each case in a
schema of its own); where the backends differ by design (a shared one
has replicas to hear from), the case says so with ``backend.shared``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import PostgresServer, RedisServer
from service.backends import Backend
from service.backends.memory import MemoryBackend
from service.backends.records import RUN_BACKLOG_FRAMES, Frame, Run, WriteRefused, utc_now

LOG = logging.getLogger("agent_runner.test_backends")
Scenario = Callable[[Backend], Awaitable[Any]]


class Place:
    """Where backends are opened: this process's memory, one Redis under one prefix, or one PostgreSQL under one
    schema (replicas share it)."""

    def __init__(self, redis: RedisServer | None, state: Path, postgres: PostgresServer | None = None) -> None:
        self.redis = redis
        self.postgres = postgres
        self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self.schema = f"test_{uuid.uuid4().hex[:8]}"
        self.fencing_state = state / "fencing-token"  # memory mode's highest token, kept across restarts

    def open(self, slots: int = 1, lock_ttl_seconds: float = 30.0) -> Backend:
        if self.postgres is not None:
            from service.backends.postgres import open_postgres

            return open_postgres(self.postgres.url, self.schema, lock_ttl_seconds, 100, 1 << 30, LOG, slots=slots)
        if self.redis is None:
            return MemoryBackend(retention=100, slots=slots, fencing_state_path=str(self.fencing_state))
        from service.backends.redis import open_redis

        _, backend = open_redis(self.redis.url, self.prefix, lock_ttl_seconds, 100, 1 << 30, LOG, slots=slots)
        return backend

    def run(self, scenario: Scenario, slots: int = 1) -> Any:
        """``scenario`` over a started backend, closed after it."""
        async def opened() -> Any:
            backend = self.open(slots)
            await backend.start()
            try:
                return await scenario(backend)
            finally:
                await backend.close()

        return asyncio.run(opened())


@pytest.fixture(params=["memory", "redis", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "postgres":
        return Place(None, tmp_path, request.getfixturevalue("postgres_server"))
    return Place(request.getfixturevalue("redis_server") if request.param == "redis" else None, tmp_path)


def new_run(webhook: str | None = None) -> Run:
    return Run.new(str(uuid.uuid4()), "sleeper", str(uuid.uuid4()), {"n": 1}, holder=None, webhook=webhook)


async def finish(backend: Backend, run: Run, release: bool = True) -> None:
    run.update(state="DONE", finished_at=utc_now(), result_json=b'{"ok":true}')
    await backend.save(run, release=release)


# --- slots and the queue ---------------------------------------------------------------------------------------

def test_a_free_slot_admits_and_a_taken_one_refuses_without_storing(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        first, second = new_run(), new_run()
        assert await backend.admit(first, "reject", 10) == "started" and first.holder is not None
        assert backend.holds(first.holder)
        assert await backend.admit(second, "reject", 10) == "busy"
        assert await backend.get(second.run_id) is None
        stored = await backend.get(first.run_id)
        assert stored is not None and stored.state == "PENDING"

    place.run(scenario)


def test_every_slot_admits_one_run(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        runs = [new_run() for _ in range(3)]
        verdicts = [await backend.admit(run, "reject", 10) for run in runs]
        assert verdicts == ["started", "started", "busy"]
        assert len({run.holder for run in runs[:2]}) == 2

    place.run(scenario, slots=2)


def test_the_queue_refuses_past_its_bound(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        running, waiting, refused = new_run(), new_run(), new_run()
        assert await backend.admit(running, "enqueue", 1) == "started"
        assert await backend.admit(waiting, "enqueue", 1) == "queued" and waiting.queue_position == 1
        assert await backend.admit(refused, "enqueue", 1) == "full"
        assert await backend.queue_length() == 1 and await backend.get(refused.run_id) is None

    place.run(scenario)


def test_runs_are_taken_first_in_first_out_and_an_interrupting_run_goes_first(place: Place) -> None:
    async def scenario(backend: Backend) -> list[str]:
        running, *waiting = [new_run() for _ in range(4)]
        assert await backend.admit(running, "enqueue", 10) == "started"
        for run, on_busy in zip(waiting, ("enqueue", "enqueue", "interrupt")):
            assert await backend.admit(run, on_busy, 10) == "queued"
        assert [run.run_id for run in await backend.waiting()] == [waiting[2].run_id, waiting[0].run_id,
                                                                    waiting[1].run_id]
        assert [run.queue_position for run in await backend.waiting()] == [1, 2, 3]
        assert await backend.take() is None  # every slot is taken
        taken, holder = [], running
        for _ in waiting:
            await finish(backend, holder)
            run = await backend.take()
            assert run is not None and run.holder is not None and run.queue_position is None
            assert run.fencing_token is not None and run.created_at
            if backend.name == "redis":  # the take stored it RUNNING (TAKE_SCRIPT): the runner need not
                stored = await backend.get(run.run_id)
                assert run.state == "RUNNING" and run.started_at is not None and stored is not None
                assert (stored.state, stored.started_at, stored.queue_position) == ("RUNNING", run.started_at, None)
                assert stored.input_json == run.input_json
            else:
                assert run.state == "PENDING"
            if backend.name != "postgres":  # the take tells the queue's length after it (Postgres: None, ask)
                assert backend.queue_after_take == await backend.queue_length()
            else:
                assert backend.queue_after_take is None
            taken.append(run.run_id)
            holder = run
        assert await backend.take() is None and await backend.queue_length() == 0
        return [taken.index(run.run_id) for run in waiting]

    assert place.run(scenario) == [1, 2, 0]


def test_a_run_that_ends_hands_its_slot_to_the_head_of_the_queue(place: Place) -> None:
    """finish_and_take: the terminal write frees the slot and the next run takes it (Redis: in the same script,
    which stores it RUNNING; Postgres leaves the take to the dispatcher)."""
    async def scenario(backend: Backend) -> None:
        running, waiting, last = new_run(), new_run(), new_run()
        assert await backend.admit(running, "enqueue", 10) == "started"
        assert await backend.admit(waiting, "enqueue", 10) == "queued"
        assert await backend.admit(last, "enqueue", 10) == "queued"
        running.update(state="DONE", finished_at=utc_now(), result_json=b'{"ok":true}')
        taken = await backend.finish_and_take(running)
        assert running.holder is not None and not backend.holds(running.holder)
        stored = await backend.get(running.run_id)
        assert stored is not None and stored.state == "DONE"
        if backend.name == "postgres":
            assert taken is None and await backend.queue_length() == 2
            return
        assert taken is not None and taken.run_id == waiting.run_id and taken.holder is not None
        assert backend.holds(taken.holder) and taken.fencing_token is not None
        assert await backend.queue_length() == 1 and backend.take_again is False  # its one slot is held
        assert [run.run_id for run in await backend.waiting()] == [last.run_id]
        stored = await backend.get(waiting.run_id)
        assert stored is not None and stored.fencing_token == taken.fencing_token and stored.queue_position is None
        assert taken.state == stored.state == ("RUNNING" if backend.name == "redis" else "PENDING")
        assert await backend.admit(new_run(), "reject", 10) == "busy"  # the slot is the taken run's

    place.run(scenario)


def test_a_run_stored_running_by_its_take_keeps_an_input_that_looks_like_a_record(place: Place) -> None:
    """The take finds the record's own state field after an input object that holds the same text (TAKE_SCRIPT's
    MARK_RUNNING): the input is left as it was, and the record reads back whole."""
    async def scenario(backend: Backend) -> None:
        hostile = {"x": 1, "state": "PENDING", "result": None, "error": None, "progress": None,
                   "created_at": "2026-01-01T00:00:00.000Z", "started_at": None, "finished_at": None,
                   "queue_position": 0, "nested": {"state": "PENDING", "result": None, "started_at": None},
                   "text": '","state":"PENDING","result":null,"started_at":null,"queue_position":0,'}
        running = new_run()
        waiting = Run.new(str(uuid.uuid4()), "sleeper", str(uuid.uuid4()), hostile, holder=None,
                          webhook="https://example.com/hook?state=%22PENDING%22")
        assert await backend.admit(running, "enqueue", 10) == "started"
        assert await backend.admit(waiting, "enqueue", 10) == "queued"
        await finish(backend, running)
        taken = await backend.take()
        assert taken is not None and taken.run_id == waiting.run_id
        stored = await backend.get(waiting.run_id)
        assert stored is not None and stored.input_json == waiting.input_json and stored.webhook == waiting.webhook
        assert stored.state == taken.state and stored.queue_position is None
        if backend.name == "redis":
            assert stored.state == "RUNNING" and stored.started_at == taken.started_at is not None

    place.run(scenario)


def test_a_run_whose_cancel_was_asked_as_it_waited_is_not_stored_running_by_its_take(place: Place) -> None:
    """The runner stores it RUNNING itself and reads the flag as it does (Runner.save_running)."""
    async def scenario(backend: Backend) -> None:
        running, waiting = new_run(), new_run()
        assert await backend.admit(running, "enqueue", 10) == "started"
        assert await backend.admit(waiting, "enqueue", 10) == "queued"
        await backend.request_cancel(waiting.run_id)
        await finish(backend, running)
        taken = await backend.take()
        assert taken is not None and taken.state == "PENDING"
        if backend.shared:  # a flag for whichever replica takes it (memory tells its runner at once)
            assert await backend.cancel_requested(waiting.run_id) == (True, None)

    place.run(scenario)


def test_a_waiting_run_leaves_the_queue_with_its_terminal_state_in_one_step(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        running, first, second = new_run(), new_run(), new_run()
        for run in (running, first, second):
            await backend.admit(run, "enqueue", 10)
        cancelled = await backend.dequeue(first.run_id, state="CANCELLED", finished_at=utc_now())
        assert cancelled is not None and cancelled.state == "CANCELLED"
        assert await backend.dequeue(first.run_id, state="CANCELLED", finished_at=utc_now()) is None
        stored = await backend.get(first.run_id)
        assert stored is not None and stored.state == "CANCELLED"
        assert [(run.run_id, run.queue_position) for run in await backend.waiting()] == [(second.run_id, 1)]

    place.run(scenario)


def test_two_interrupts_stop_two_runs(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        older, newer, first_by, second_by = (new_run() for _ in range(4))
        for run in (older, newer):
            assert await backend.admit(run, "interrupt", 10) == "started"
        for by in (first_by, second_by):
            assert await backend.admit(by, "interrupt", 10) == "queued"
        assert await backend.interrupt_oldest(first_by.run_id, []) == older.run_id
        # the runner stops the picked run at once, so it is stopping when the second interrupt comes
        assert await backend.interrupt_oldest(second_by.run_id, [older.run_id]) == newer.run_id
        assert await backend.interrupt_oldest(new_run().run_id, [older.run_id, newer.run_id]) is None

    place.run(scenario, slots=2)


# --- the run store ---------------------------------------------------------------------------------------------

def test_finish_stores_the_terminal_state_and_frees_the_slot_in_the_same_step(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        run, next_run = new_run(), new_run()
        await backend.admit(run, "reject", 10)
        assert run.holder is not None
        await finish(backend, run)
        assert not backend.holds(run.holder)
        assert await backend.admit(next_run, "reject", 10) == "started"  # no other call in between
        stored = await backend.wait_finished(run.run_id, 1.0)
        assert stored is not None and (stored.state, stored.result_json) == ("DONE", b'{"ok":true}')

    place.run(scenario)


def test_a_terminal_state_stored_without_release_keeps_the_slot(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        run = new_run()
        await backend.admit(run, "reject", 10)
        await finish(backend, run, release=False)  # recorded at shutdown while the agent's code still runs
        assert run.holder is not None and backend.holds(run.holder)
        assert await backend.admit(new_run(), "reject", 10) == "busy"
        await backend.release(run.holder)
        assert await backend.admit(new_run(), "reject", 10) == "started"

    place.run(scenario)


def test_a_run_is_listed_newest_first_and_its_log_lines_are_kept(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        from service.backends.records import Page

        runs = [new_run() for _ in range(3)]
        for run in runs:
            await backend.admit(run, "reject", 10)
            await finish(backend, run)
        listed = await backend.list(Page(10))
        assert [run.run_id for run in listed] == [run.run_id for run in reversed(runs)]
        assert await backend.logs(runs[0].run_id) == [] and await backend.logs(str(uuid.uuid4())) is None

    place.run(scenario)


def test_a_live_holders_run_is_never_an_orphan_and_a_dead_holders_is_claimed(place: Place) -> None:
    """A replica that dies leaves its run unfinished; once its lease ends, another claims it to record it.
    One process (not shared) has no other holder that could die."""
    async def scenario(backend: Backend) -> None:
        alive = new_run()
        await backend.admit(alive, "reject", 10)
        peer = place.open(slots=2, lock_ttl_seconds=0.05)  # the other replica, on the same store when shared
        await peer.start()
        dead = new_run()
        try:
            assert await peer.admit(dead, "reject", 10) == "started"
        finally:
            await peer.close()  # dies: its run is never recorded, its lease is never renewed
        await asyncio.sleep(0.1)
        orphans = await backend.claim_orphans()
        assert [run.run_id for run in orphans] == ([dead.run_id] if backend.shared else [])
        for orphan in orphans:
            orphan.update(state="ERROR", finished_at=utc_now(), error="Runner lost")
            await backend.save(orphan)
        assert await backend.claim_orphans() == []

    place.run(scenario, slots=2)


# --- fencing tokens and the holder's writes ----------------------------------------------------------------------

def test_every_slot_given_out_mints_a_larger_fencing_token_kept_in_the_record(place: Place) -> None:
    async def scenario(backend: Backend) -> list[int | None]:
        first, second, waiting = new_run(), new_run(), new_run()
        assert await backend.admit(first, "reject", 10) == "started"
        assert await backend.admit(second, "reject", 10) == "started"  # the other slot
        assert await backend.admit(waiting, "enqueue", 10) == "queued" and waiting.fencing_token is None
        await finish(backend, first)
        taken = await backend.take()
        assert taken is not None and taken.run_id == waiting.run_id
        for run in (second, taken):
            stored = await backend.get(run.run_id)
            assert stored is not None and stored.fencing_token == run.fencing_token
        return [first.fencing_token, second.fencing_token, taken.fencing_token]

    tokens = place.run(scenario, slots=2)
    assert all(isinstance(token, int) for token in tokens) and tokens == sorted(set(tokens)), tokens


def test_fencing_tokens_stay_above_every_earlier_one_after_a_restart_and_a_loss_of_the_store(place: Place) -> None:
    """Memory: the file of the highest token is read at start (a token far above the clock proves it). Redis:
    the counter is shared by a backend opened anew; once Redis lost everything, the clock keeps tokens above."""
    async def token_after_start(setup: Callable[[], Awaitable[None]] | None = None) -> int:
        backend = place.open()
        if setup is not None:
            await setup()
        await backend.start()
        try:
            run = new_run()
            assert await backend.admit(run, "reject", 10) == "started" and run.fencing_token is not None
            await finish(backend, run)
            return run.fencing_token
        finally:
            await backend.close()

    first = asyncio.run(token_after_start())
    second = asyncio.run(token_after_start())
    assert second > first
    if place.redis is not None:
        redis = place.redis

        async def lose_everything() -> None:
            for key in redis.command("KEYS", f"{place.prefix}:*"):
                redis.command("DEL", key)

        assert asyncio.run(token_after_start(lose_everything)) > second
    if place.postgres is not None:
        postgres = place.postgres

        async def drop_the_schema() -> None:
            postgres.sql(f"DROP SCHEMA {place.schema} CASCADE")

        assert asyncio.run(token_after_start(drop_the_schema)) > second
    far_ahead = second + 10 ** 12  # a token no clock reaches for days: only the kept state yields more

    async def raise_the_kept_state() -> None:
        if place.postgres is not None:
            place.postgres.sql(f"SELECT setval('{place.schema}.fencing_tokens', {far_ahead})")
        elif place.redis is None:
            place.fencing_state.write_text(f"{far_ahead}\n")
        else:
            place.redis.command("SET", f"{place.prefix}:fencing", str(far_ahead))

    above = asyncio.run(token_after_start(raise_the_kept_state))
    assert above > far_ahead
    assert asyncio.run(token_after_start()) > above  # the kept state follows the token minted above it


def test_a_terminal_state_is_written_once_a_second_end_is_refused_and_a_retry_is_not(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        run = new_run()
        await backend.admit(run, "reject", 10)
        await finish(backend, run)
        await backend.save(run, release=True)  # the same write again (a retry after a lost reply): accepted
        other_end = run.copy()
        other_end.update(state="ERROR", error="Runner lost", result_json=b"null")
        with pytest.raises(WriteRefused):
            await backend.save(other_end)
        stored = await backend.get(run.run_id)
        assert stored is not None and (stored.state, stored.error) == ("DONE", None)

    place.run(scenario)


def test_a_write_under_another_holders_token_is_refused_and_changes_nothing(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        run = new_run()
        await backend.admit(run, "reject", 10)
        run.update(state="RUNNING", started_at=utc_now())
        await backend.save(run)
        for state in ("RUNNING", "DONE"):
            stale = run.copy()
            stale.holder = uuid.uuid4().hex
            stale.update(state=state, progress=0.5, finished_at=utc_now() if state == "DONE" else None)
            with pytest.raises(WriteRefused):
                await backend.save(stale, release=True)
        stored = await backend.get(run.run_id)
        assert stored is not None and (stored.state, stored.progress) == ("RUNNING", None)
        assert run.holder is not None and backend.holds(run.holder) and await backend.check_lease(run)

    place.run(scenario)


def test_the_lease_is_held_until_the_run_ends_and_lost_once_another_claimed_the_run(place: Place) -> None:
    """Shared: a holder whose slot expired (it was paused) and whose run another replica claimed and recorded
    has lost its lease, and its own writes of the run are refused."""
    async def scenario(backend: Backend) -> None:
        run = new_run()
        await backend.admit(run, "reject", 10)
        assert await backend.check_lease(run)
        if backend.shared:
            peer = place.open()
            await peer.start()
            try:
                assert run.holder is not None
                await backend.release(run.holder)  # as if its key expired while the holder was paused
                backend_holder = run.holder
                (orphan,) = await peer.claim_orphans()
                orphan.update(state="ERROR", finished_at=utc_now(), error="Runner lost")
                await peer.save(orphan)
            finally:
                await peer.close()
            run.holder = backend_holder
            assert not await backend.check_lease(run)
            run.update(state="DONE", finished_at=utc_now())
            with pytest.raises(WriteRefused):
                await backend.save(run, release=True)
            stored = await backend.get(run.run_id)
            assert stored is not None and stored.error == "Runner lost"
        else:
            await finish(backend, run)
            assert not await backend.check_lease(run)

    place.run(scenario)


# --- cancel flags ----------------------------------------------------------------------------------------------

def test_a_cancel_flag_is_seen_by_the_holder_when_shared_and_cleared_by_the_terminal_state(place: Place) -> None:
    """Shared: the replica running the run reads the flag (at each renewal). One process cancels its runs
    directly: there is no flag to read."""
    async def scenario(backend: Backend) -> None:
        run, by = new_run(), new_run()
        await backend.admit(run, "reject", 10)
        assert await backend.cancel_requested(run.run_id) == (False, None)
        await backend.request_cancel(run.run_id, by=by.run_id)
        assert await backend.cancel_requested(run.run_id) == ((True, by.run_id) if backend.shared else (False, None))
        await finish(backend, run)
        assert await backend.cancel_requested(run.run_id) == (False, None)

    place.run(scenario)


# --- Idempotency-Keys ------------------------------------------------------------------------------------------

def test_an_idempotency_key_is_claimed_once_accepted_with_its_run_and_released_when_refused(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        keys = backend.idempotency_keys
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        assert await keys.claim("key", "request", first) == ("new", first)
        assert await keys.claim("key", "request", second) == ("pending", first)
        assert await keys.claim("key", "another request", second) == ("mismatch", first)
        await keys.release("key", first)  # refused: a retry is handled afresh
        assert await keys.claim("key", "request", second) == ("new", second)
        run = Run.new(second, "sleeper", str(uuid.uuid4()), {}, holder=None)
        assert await backend.admit(run, "reject", 10, keys.admit_args("key", "request")) == "started"
        await keys.accept("key", "request", second)
        assert await keys.claim("key", "request", str(uuid.uuid4())) == ("accepted", second)
        await keys.release("key", second)  # only a pending claim is given back
        assert await keys.claim("key", "request", str(uuid.uuid4())) == ("accepted", second)

    place.run(scenario)


# --- webhook deliveries ----------------------------------------------------------------------------------------

def test_a_terminal_state_owes_its_webhook_delivery_until_it_is_reported_done(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        deliveries = backend.webhook_deliveries(1.0)
        owed: list[str] = []
        deliveries.on_owed = lambda: owed.append("owed")
        backend.on_finished = deliveries.owe
        assert deliveries.durable == backend.shared  # outlives this process only when others share it
        run = new_run(webhook="https://hooks.example.com/done")
        await backend.admit(run, "reject", 10)
        assert await deliveries.claim() == (None, pytest.approx(1.0, abs=1.0))
        await finish(backend, run)
        assert owed == ["owed"]
        delivery, _ = await deliveries.claim()
        assert delivery is not None and (delivery.run_id, delivery.url, delivery.attempt) == \
            (run.run_id, "https://hooks.example.com/done", 1)
        assert delivery.body == run.json()
        assert (await deliveries.claim())[0] is None  # claimed: nobody else attempts it meanwhile
        await deliveries.report(delivery, 0.0)  # failed: due again at once
        again, _ = await deliveries.claim()
        assert again is not None and (again.run_id, again.attempt) == (run.run_id, 2)
        await deliveries.report(again, None)  # delivered
        assert (await deliveries.claim())[0] is None

    place.run(scenario)


# --- the event transport ---------------------------------------------------------------------------------------

class Sink:
    """An event hub as a transport sees it: what it delivers, and whether it ended every stream."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.ended: list[str] = []

    def deliver(self, frame: Frame) -> None:
        self.frames.append(frame)

    def end_all(self, reason: str) -> None:
        self.ended.append(reason)

    def listening(self) -> bool:
        return True  # as a hub with a client: the transport reads every event


def test_a_runs_backlog_is_whole_only_while_it_starts_with_the_runs_first_event(place: Place) -> None:
    """The replay's `gap`: a backlog that lost its first events says so (trimmed by its caps; in Redis also a
    stream that expired while the run was silent and began again, its first entry long after the run's start)."""
    async def scenario(backend: Backend) -> None:
        transport = backend.event_transport(Sink())
        await transport.start()
        try:
            run = new_run()
            await backend.admit(run, "reject", 10)
            for n in range(RUN_BACKLOG_FRAMES + 1):
                transport.send("log", run.run_id, "", b'{"n":%d}' % n)
            await transport.written(5.0)
            trimmed = await transport.run_backlog(run.run_id, None)
            assert not trimmed.found and len(trimmed.frames) == RUN_BACKLOG_FRAMES
            late = new_run()
            late.created_at = "2026-01-01T00:00:00.000Z"  # its events began long after it was created
            transport.send("run", late.run_id, late.state, late.json())
            await transport.written(2.0)
            assert (await transport.run_backlog(late.run_id, None)).found is (backend.name == "memory")
        finally:
            await transport.stop()

    place.run(scenario)


def test_an_event_comes_back_with_an_id_its_log_line_is_kept_and_a_client_resumes_after_it(place: Place) -> None:
    async def scenario(backend: Backend) -> None:
        sink = Sink()
        transport = backend.event_transport(sink)
        await transport.start()
        try:
            assert transport.available
            run = new_run()
            await backend.admit(run, "reject", 10)
            transport.send("run", run.run_id, run.state, run.json())
            transport.send("log", run.run_id, "", b'{"event":"hello"}')
            await transport.written(2.0)
            await transport.flush(2.0)
            first, second = sink.frames
            assert (first.kind, second.kind) == ("run", "log") and first.key < second.key
            assert first.wire.endswith(b"data: " + run.json() + b"\n\n")
            assert await backend.logs(run.run_id) == [b'{"event":"hello"}']
            resumed = await transport.run_backlog(run.run_id, first.key)
            assert resumed.found and [frame.id for frame in resumed.frames] == [first.id, second.id]  # from it on
            whole = await transport.run_backlog(run.run_id, None)
            assert whole.found and [frame.id for frame in whole.frames] == [first.id, second.id]
            assert whole.newest == second.id == await transport.newest_run_event(run.run_id)
            assert not (await transport.run_backlog(run.run_id, (1, 0))).found  # an id it never had
            nothing = await transport.run_backlog(new_run().run_id, None)
            assert (nothing.frames, nothing.found, nothing.newest) == ([], False, None)
            assert [frame.id for frame in await transport.global_after((0, 0))] == [first.id]  # run events only
            assert sink.ended == []
        finally:
            await transport.stop()

    place.run(scenario)


# --- Redis only ----------------------------------------------------------------------------------------------

def test_redis_dispatch_is_woken_by_a_slot_freed_elsewhere_not_by_the_echo_of_its_own(redis_server: RedisServer,
                                                                                     tmp_path: Path) -> None:
    """A replica's runner wakes its dispatch itself once its terminal write is answered; the "finished" message
    of that write still wakes the run's waiters but not dispatch again (a take that would find nothing), while
    one from another replica does."""
    place = Place(redis_server, tmp_path)

    async def scenario() -> None:
        here, elsewhere = place.open(), place.open()
        woken: list[str] = []
        here.on_work = lambda: woken.append("work")
        await here.start()
        await elsewhere.start()
        try:
            await asyncio.sleep(0.2)  # both listeners subscribed
            woken.clear()
            mine = new_run()
            assert await here.admit(mine, "reject", 10) == "started"
            waiter = asyncio.ensure_future(here.wait_finished(mine.run_id, 5.0))
            await asyncio.sleep(0.05)
            started = asyncio.get_running_loop().time()
            await finish(here, mine)
            stored = await waiter
            assert stored is not None and stored.state == "DONE"
            assert asyncio.get_running_loop().time() - started < 0.5  # woken by the message, not the 1 s poll
            await asyncio.sleep(0.3)
            assert woken == []
            theirs = new_run()
            assert await elsewhere.admit(theirs, "reject", 10) == "started"
            await finish(elsewhere, theirs)
            for _ in range(100):
                if woken:
                    break
                await asyncio.sleep(0.01)
            assert woken == ["work"]
        finally:
            await here.close()
            await elsewhere.close()

    asyncio.run(scenario())
