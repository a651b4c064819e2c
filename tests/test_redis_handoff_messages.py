"""What other replicas hear of a handoff (a run's end that hands its slot to the next run, HANDOFF_SCRIPT).

No slot is freed, so no dispatcher anywhere is woken to take one: the end goes out on ``ended:<run_id>``, which a
replica follows only while it has waiters of that run, and on ``ended``, which it follows while clients watch queue
positions. A waiter on any replica still hears it at once, also when its replica subscribed only after the message
went out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from conftest import RedisServer
from service.backends.records import Run, utc_now
from service.backends.redis import listener, open_redis
from service.backends.redis.store import RedisBackend

LOG = logging.getLogger("test")


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


async def two_replicas(url: str) -> tuple[RedisBackend, RedisBackend]:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    replicas = [open_redis(url, prefix, 30.0, 100, 1 << 30, LOG)[1] for _ in range(2)]
    for replica in replicas:
        await replica.start()
    return replicas[0], replicas[1]


def new_run() -> Run:
    return Run.new(str(uuid.uuid4()), "sleeper", "u", {}, holder=None)


async def followers(url: str, backend: RedisBackend, *channel: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return int((await client.pubsub_numsub(backend.key("ended", *channel)))[0][1])
    finally:
        await client.aclose()


def heard_by(replica: RedisBackend) -> list[str]:
    """What ``replica``'s listener asks of it from now on: a take ("work"), new queue positions ("moved")."""
    woken: list[str] = []
    replica.on_work = lambda: woken.append("work")
    replica.on_moved = lambda: woken.append("moved")
    return woken


async def queue_behind_a_running_run(a: RedisBackend, b: RedisBackend, woken: list[str]) -> tuple[Run, Run]:
    """``first`` running on ``a``'s slot, ``second`` waiting; ``b`` heard the queueing (and nothing since)."""
    first, second = new_run(), new_run()
    assert await a.admit(first, "enqueue", 10) == "started"
    assert await a.admit(second, "enqueue", 10) == "queued"

    async def heard() -> bool:
        return woken == ["work"]

    await until(heard)  # "queued": b's dispatch looks at the queue
    woken.clear()
    first.update(state="DONE", finished_at=utc_now(), result_json=b'"done"')
    return first, second


def test_a_handoff_wakes_no_dispatcher_and_a_waiter_on_another_replica_hears_it_at_once(
        redis_server: RedisServer) -> None:
    async def scenario() -> None:
        a, b = await two_replicas(redis_server.url)
        woken = heard_by(b)
        try:
            first, second = await queue_behind_a_running_run(a, b, woken)
            waiter = asyncio.create_task(b.wait_finished(first.run_id, 10))

            async def followed() -> bool:
                return await followers(redis_server.url, b, first.run_id) == 1

            await until(followed)  # b follows "ended:<first>" while it has a waiter of it
            handed = asyncio.get_running_loop().time()
            taken = await a.finish_and_take(first)
            assert taken is not None and taken.run_id == second.run_id
            ended = await asyncio.wait_for(waiter, 5)
            assert ended is not None and ended.state == "DONE"
            assert asyncio.get_running_loop().time() - handed < b.POLL_SECONDS / 2  # heard, not polled
            await asyncio.sleep(0.2)
            assert woken == []  # no take asked for (no slot is free); no client here watches positions
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_waiter_subscribed_only_after_the_handoff_reads_its_run_again_at_once(redis_server: RedisServer) -> None:
    """The message went out before its replica followed "ended:<run_id>": once Redis confirms the subscription, the
    waiter reads its run again, rather than at its next poll a second later."""

    async def scenario() -> None:
        a, b = await two_replicas(redis_server.url)
        woken = heard_by(b)
        subscribe_now = asyncio.Event()
        ended = b.key("ended", "").encode()  # ended:<run_id>
        pubsub = b.client.pubsub

        def slow_pubsub(**kwargs: Any) -> Any:  # its subscriptions to "ended:<run_id>" wait for the test
            made = pubsub(**kwargs)
            subscribe = made.subscribe

            async def held_back(*channels: Any) -> Any:
                if any(channel.startswith(ended) for channel in channels):
                    await subscribe_now.wait()
                return await subscribe(*channels)

            made.subscribe = held_back
            return made

        await b.close()
        b.client.pubsub = slow_pubsub
        await b.start()
        try:
            first, second = await queue_behind_a_running_run(a, b, woken)
            waiter = asyncio.create_task(b.wait_finished(first.run_id, 10))
            await asyncio.sleep(0.1)  # it read the run, RUNNING, and waits
            assert await a.finish_and_take(first) is not None  # "ended:<first>" goes out: nobody follows it yet
            subscribed = asyncio.get_running_loop().time()
            subscribe_now.set()
            ended = await asyncio.wait_for(waiter, 5)
            assert ended is not None and ended.state == "DONE"
            assert asyncio.get_running_loop().time() - subscribed < b.POLL_SECONDS / 2
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_replica_follows_handoffs_only_for_its_waiters_runs_and_while_clients_watch_positions(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "MOVED_LINGER_SECONDS", 0.2)

    async def scenario() -> None:
        a, b = await two_replicas(redis_server.url)
        woken = heard_by(b)
        try:
            def following(count: int, *channel: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return await followers(redis_server.url, b, *channel) == count
                return check

            await asyncio.sleep(0.3)
            assert await followers(redis_server.url, b) == 0  # started with neither: no message per handoff
            b.watching = lambda: True  # a client of queue positions came
            await until(following(1))
            first, second = await queue_behind_a_running_run(a, b, woken)
            assert await a.finish_and_take(first) is not None

            async def moved() -> bool:
                return woken == ["moved"]

            await until(moved)  # its clients get the new positions; still no take
            b.watching = lambda: False
            await until(following(0))  # gone after the linger
            waiter = asyncio.create_task(b.wait_finished(second.run_id, 0.5))  # RUNNING on a's slot
            await until(following(1, second.run_id))
            assert await followers(redis_server.url, b) == 0  # a waiter hears its run's end only
            await waiter
            await until(following(0, second.run_id))
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_listener_that_fails_leaves_no_follower_subscribing_on_a_connection_of_its_own(
        redis_server: RedisServer) -> None:
    """The follower stops before the listener's pubsub closes: one left running while the listener pauses to start
    again subscribed on a new pool connection, never given back (a few dozen restarts used up the pool)."""

    async def scenario() -> None:
        b = open_redis(redis_server.url, f"t-{uuid.uuid4().hex[:8]}", 30.0, 100, 1 << 30, LOG)[1]
        await b.start()
        pool: Any = b.client.connection_pool
        try:
            waited = new_run()
            await b.add(waited)
            await asyncio.sleep(0.3)
            in_use = len(pool._in_use_connections)

            def fails(run_id: str, by: str | None) -> None:
                raise RuntimeError("a bug in a callback")  # the listener's "any other failure": it starts again

            b.on_cancel = fails
            publisher = redis.asyncio.Redis.from_url(redis_server.url)
            await publisher.publish(b.key("cancel"), "whatever")
            await publisher.aclose()
            await asyncio.sleep(0.1)  # the listener failed and pauses
            b.on_cancel = lambda run_id, by: None
            await b.wait_finished(waited.run_id, 1.5)  # a waiter comes and goes meanwhile
            await asyncio.sleep(0.6)
            assert await followers(redis_server.url, b, waited.run_id) == 0
            assert len(pool._in_use_connections) == in_use  # the listener's own, again
        finally:
            await b.close()

    asyncio.run(scenario())


def test_the_follower_subscribes_again_after_a_failed_subscribe(redis_server: RedisServer) -> None:
    """One SUBSCRIBE fails (the listener's read reconnecting under it): the follower goes on, and subscribes."""

    async def scenario() -> None:
        b = open_redis(redis_server.url, f"t-{uuid.uuid4().hex[:8]}", 30.0, 100, 1 << 30, LOG)[1]
        ended = b.key("ended", "").encode()
        pubsub, failures = b.client.pubsub, [1]

        def flaky_pubsub(**kwargs: Any) -> Any:
            made = pubsub(**kwargs)
            subscribe = made.subscribe

            async def fails_once(*channels: Any) -> Any:
                if failures and any(channel.startswith(ended) for channel in channels):
                    failures.pop()
                    raise redis.exceptions.ConnectionError("reset by peer")
                return await subscribe(*channels)

            made.subscribe = fails_once
            return made

        b.client.pubsub = flaky_pubsub
        await b.start()
        try:
            first, second = new_run(), new_run()
            await b.add(first)
            await b.add(second)
            await asyncio.sleep(0.3)
            await b.wait_finished(first.run_id, 0.3)  # its SUBSCRIBE fails
            waiter = asyncio.create_task(b.wait_finished(second.run_id, 3))

            async def followed() -> bool:
                return await followers(redis_server.url, b, second.run_id) == 1

            await until(followed)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        finally:
            await b.close()

    asyncio.run(scenario())


def test_subscriptions_end_up_as_the_waiters_want_after_pubsub_connections_are_killed_under_churn(
        redis_server: RedisServer) -> None:
    """Waits come and go while Redis kills the pubsub connection again and again (a failover, an output buffer
    limit): afterwards one pubsub connection stands, subscribed to the three channels and nothing of a run."""

    async def scenario() -> None:
        prefix = f"t-{uuid.uuid4().hex[:8]}"
        b = open_redis(redis_server.url, prefix, 30.0, 100, 1 << 30, LOG)[1]
        await b.start()
        admin = redis.asyncio.Redis.from_url(redis_server.url)
        runs = [new_run() for _ in range(50)]
        for run in runs:
            await b.add(run)
        stop = asyncio.Event()

        async def churn() -> None:
            waits = 0
            while not stop.is_set():
                await b.wait_finished(runs[waits % 50].run_id, 0.01)
                waits += 1

        waiting = [asyncio.create_task(churn()) for _ in range(20)]
        try:
            for _ in range(30):
                await asyncio.sleep(0.05)
                await admin.client_kill_filter(_type="pubsub")
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*waiting)

            async def settled() -> bool:
                clients = await admin.client_list(_type="pubsub")
                return len(clients) == 1 and clients[0]["sub"] == "3"

            await until(settled, 5)
            assert await admin.pubsub_channels(f"{prefix}:ended*") == []
            assert len(b.client.connection_pool._in_use_connections) == 1  # type: ignore[attr-defined]
        finally:
            await admin.aclose()
            await b.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("end", ["handoff", "save"])
def test_a_renewal_answered_while_the_runs_end_is_out_finds_its_slot_let_go_not_lost(
        redis_server: RedisServer, end: str) -> None:
    """The lock keeper's renewal and the terminal write that frees the slot are out at once (on two connections):
    the renewal answered after the write landed says the slot is gone, which is the write's doing, not a loss
    (runs.Runner.keep_lock stops without lock_lost when the backend no longer holds the token)."""
    from service.backends.records import LockLost

    async def scenario() -> None:
        a, b = await two_replicas(redis_server.url)
        try:
            run = new_run()
            assert await a.admit(run, "enqueue", 10) == "started"
            token = run.holder
            assert token is not None and a.holds(token)
            held_while_out: list[bool] = []
            name = "_handoff" if end == "handoff" else "_finish"
            write = getattr(a, name)

            async def renewed_meanwhile(keys: Any, args: Any) -> Any:
                answer = await write(keys=keys, args=args)  # landed; its answer not read yet
                with pytest.raises(LockLost):
                    await a.renew(run)
                held_while_out.append(a.holds(token))
                return answer

            setattr(a, name, renewed_meanwhile)
            run.update(state="DONE", finished_at=utc_now(), result_json=b'"done"')
            if end == "handoff":
                assert await a.finish_and_take(run) is None  # nothing queued
            else:
                await a.save(run, release=True)
            assert held_while_out == [False]
            assert not a.holds(token)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
