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
        woken: list[str] = []
        b.on_work = lambda: woken.append("work")
        b.on_moved = lambda: woken.append("moved")
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
        woken: list[str] = []
        b.on_work = lambda: woken.append("work")
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
        woken: list[str] = []
        b.on_work = lambda: woken.append("work")
        b.on_moved = lambda: woken.append("moved")
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
