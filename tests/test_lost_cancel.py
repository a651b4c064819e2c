"""A lost cancel never leaves a background task running: stopping one cancels it until it has ended.

On Python 3.11 (the image's Python) ``asyncio.wait_for`` swallows a cancel
that lands in the same loop turn as the result it waits for; redis-py awaits
it on every command. Shutting down (close_runtime) could hang while the
events reader, cancelled once, went on into its next XREAD.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from typing import Any

import pytest

from conftest import RedisServer
from service import webhooks
from service.cancelling import cancel_and_wait
from service.backends.memory import MemoryDeliveries
from service.events import EventHub


class LosesOneCancel:
    """A command that, once, does what wait_for does to a cancel landing with its answer: returns the answer."""

    def __init__(self) -> None:
        self.lost = False
        self.waiting = asyncio.Event()

    async def __call__(self, answer: Any = None) -> Any:
        self.waiting.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost = True
        return answer


async def stop_within(seconds: float, stopping: Any) -> None:
    """Fail unless ``stopping`` is over within ``seconds`` (waited for aside: a timeout's cancel would reach
    the stopped task through it and end it by a second cancel)."""
    stopper = asyncio.ensure_future(stopping)
    await asyncio.wait({stopper}, timeout=seconds)
    if not stopper.done():
        pytest.fail(f"still stopping after {seconds} s: a task went on after its cancel was lost")
    stopper.result()


def test_cancel_and_wait_ends_a_task_whose_cancel_wait_for_swallowed() -> None:
    async def scenario() -> tuple[bool, bool]:
        ready = asyncio.get_running_loop().create_future()
        steps = []

        async def worker() -> None:
            steps.append(await asyncio.wait_for(ready, 10))
            await asyncio.sleep(3600)  # a loop's next wait

        task = asyncio.create_task(worker())
        await asyncio.sleep(0)  # the worker now waits in wait_for
        ready.set_result("answer")
        task.cancel()  # the same loop turn as the answer
        await asyncio.sleep(0.05)
        lost = steps == ["answer"] and not task.done()  # wait_for answered, and the worker went on
        ended = await cancel_and_wait(task, within=2)
        return lost, ended and task.cancelled()

    lost, ended = asyncio.run(scenario())
    if sys.version_info < (3, 12):
        assert lost, "the race this module guards against did not happen"
    assert ended


def test_cancel_and_wait_gives_up_at_its_deadline_on_a_task_that_refuses_every_cancel() -> None:
    async def scenario() -> tuple[bool, bool]:
        release = asyncio.Event()

        async def refuser() -> None:
            while not release.is_set():
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue

        task = asyncio.create_task(refuser())
        await asyncio.sleep(0)
        ended = await cancel_and_wait(task, within=0.3)
        release.set()
        task.cancel()
        await asyncio.sleep(0)
        return ended, task.done()

    assert asyncio.run(scenario()) == (False, True)


@pytest.mark.parametrize("command", ["xread", "xlen"])
def test_the_events_reader_stops_when_its_read_loses_the_cancel(own_redis: RedisServer, command: str) -> None:
    """XREAD while a stream client listens; XLEN, the reader's check of Redis while none does."""
    from service.backends.redis.events import RedisEvents
    from service.backends.redis import open_redis

    async def scenario() -> None:
        _, store = open_redis(own_redis.url, f"t-{uuid.uuid4().hex[:8]}", 2.0, 10, 1 << 20,
                              logging.getLogger("test"))
        hub = EventHub()
        reader = RedisEvents(store.client, store.endpoint, store.prefix, hub, logging.getLogger("test"))
        read = LosesOneCancel()
        setattr(reader.reader_client, command, lambda *args, **kwargs: read([] if command == "xread" else 0))
        if command == "xread":
            hub.subscribe(None, None)  # a client of the stream of all runs: the reader follows the stream
        hub.start(15.0, reader)
        await reader.start()
        await asyncio.wait_for(read.waiting.wait(), 5)  # in the read when the stop comes
        await stop_within(5, hub.stop())
        assert read.lost and all(task.done() for task in reader._tasks)
        await store.client.aclose()

    asyncio.run(scenario())


def test_the_store_listener_stops_when_pubsub_loses_the_cancel(own_redis: RedisServer) -> None:
    from service.backends.redis import open_redis

    class LosingPubSub:
        async def __aenter__(self) -> LosingPubSub:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def subscribe(self, *channels: bytes) -> None:
            pass

        async def listen(self) -> Any:
            await listen()
            return
            yield  # an async generator with nothing to give

    async def scenario() -> None:
        _, store = open_redis(own_redis.url, f"t-{uuid.uuid4().hex[:8]}", 2.0, 10, 1 << 20,
                              logging.getLogger("test"))
        store.client.pubsub = lambda **kwargs: LosingPubSub()
        await store.start()
        await asyncio.wait_for(listen.waiting.wait(), 5)
        await stop_within(5, store.close())
        assert listen.lost and store._listener is not None and store._listener.done()

    listen = LosesOneCancel()
    asyncio.run(scenario())


def test_the_webhook_deliverer_stops_when_its_claim_loses_the_cancel() -> None:
    async def scenario() -> None:
        queue = MemoryDeliveries()
        claim = LosesOneCancel()
        queue.claim = lambda: claim((None, 0.01))
        deliverer = webhooks.Deliverer(queue)
        deliverer.start()
        await asyncio.wait_for(claim.waiting.wait(), 5)
        await stop_within(5, deliverer.stop())
        assert claim.lost and deliverer.task is not None and deliverer.task.done()

    asyncio.run(scenario())

