"""The events reader of Redis and Postgres mode in process: it reads the events of every replica only while a
stream client of its own replica listens, and the first client after an idle time still gets each event once, in
order: what the reader did not read is in the backlog that client reads once the reader follows again."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conftest import new_schema
from service.backends.records import Frame, Run
from service.backends.redis.events import IDLE_CHECK_SECONDS, RedisEvents
from service.events import EventHub

LOG = logging.getLogger("agent_runner.test_events_reader")
Scenario = Callable[[Any, EventHub, Any], Awaitable[None]]


@pytest.fixture(params=["redis", "postgres"])
def with_hub(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    """Runs a scenario over a started backend and an event hub on its transport, as a replica has them."""
    def run(scenario: Scenario) -> None:
        async def main() -> None:
            if request.param == "redis":
                from service.backends.redis import open_redis
                _, backend = open_redis(request.getfixturevalue("redis_server").url, f"test-{uuid.uuid4().hex[:8]}",
                                        30.0, 100, 1 << 30, LOG)
            else:
                from service.backends.postgres import open_postgres
                backend = open_postgres(request.getfixturevalue("postgres_server").url, new_schema(), 30.0, 100,
                                        1 << 30, LOG)
            await backend.start()
            hub = EventHub()
            transport = backend.event_transport(hub)
            hub.start(15.0, transport)
            await transport.start()
            try:
                await scenario(backend, hub, transport)
            finally:
                await hub.stop()
                await backend.close()

        asyncio.run(main())

    return run


def around_the_position_read(transport: Any, around: Callable[[], Awaitable[None]]) -> None:
    """``around`` runs just before and just after the reader reads where the events end (to read on from there)."""
    async def racing(real: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        await around()
        found = await real(*args, **kwargs)
        await around()
        return found

    if isinstance(transport, RedisEvents):
        xrevrange = transport.reader_client.xrevrange
        transport.reader_client.xrevrange = lambda *a, **k: racing(xrevrange, *a, **k)  # type: ignore[method-assign]
        return
    from service.backends.postgres.events import _epoch_and_newest_id
    run = transport.db.run

    def run_racing(work: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return racing(run, work, *args, **kwargs) if work is _epoch_and_newest_id else run(work, *args, **kwargs)

    transport.db.run = run_racing


def new_run() -> Run:
    return Run.new(str(uuid.uuid4()), "sleeper", str(uuid.uuid4()), {}, holder=None)


def received(first: list[Frame], live: list[Frame]) -> list[Frame]:
    """What a client's stream writes: its first frames, then the live ones not covered by them (EventStream)."""
    last = max((frame.key for frame in first if not frame.local), default=(-1, -1))
    return [*first, *(frame for frame in live if frame.local or frame.key > last)]


def numbers(frames: list[Frame]) -> list[int]:
    """The ``n`` of each frame that has one (the run's own frames, gap or snapshot frames have none)."""
    found = []
    for frame in frames:
        data = json.loads(frame.wire.partition(b"\ndata: ")[2])
        if isinstance(data, dict) and "n" in data:
            found.append(data["n"])
    return found


def test_the_reader_reads_no_event_while_no_client_listens(with_hub: Callable[[Scenario], None]) -> None:
    async def scenario(backend: Any, hub: EventHub, transport: Any) -> None:
        delivered: list[Frame] = []
        hub.deliver = delivered.append  # type: ignore[method-assign]
        run_id = str(uuid.uuid4())
        for n in range(100):
            transport.send("run", run_id, "RUNNING", b'{"n":%d}' % n)
        await transport.flush(5.0)
        await asyncio.sleep(0.3)  # a reader that reads would have read them by now
        assert numbers(await transport.global_after((0, 0))) == list(range(100))  # stored, for the backlogs
        assert delivered == []
        client = hub.subscribe(None, None)  # a client comes: the reader reads again, from the end
        await hub.first_global_frames(None)
        for n in range(100, 105):
            transport.send("run", run_id, "RUNNING", b'{"n":%d}' % n)
        await transport.flush(5.0)
        assert numbers(delivered) == [100, 101, 102, 103, 104]
        hub.unsubscribe(client)

    with_hub(scenario)


def test_the_reader_stops_reading_once_the_last_client_has_left(with_hub: Callable[[Scenario], None]) -> None:
    async def scenario(backend: Any, hub: EventHub, transport: Any) -> None:
        delivered: list[Frame] = []
        hub.deliver = delivered.append  # type: ignore[method-assign]
        client = hub.subscribe(None, None)
        await hub.first_global_frames(None)
        run_id = str(uuid.uuid4())
        transport.send("run", run_id, "RUNNING", b'{"n":0}')
        await transport.flush(5.0)
        assert numbers(delivered) == [0]
        hub.unsubscribe(client)
        transport.send("run", run_id, "RUNNING", b'{"n":1}')  # read, maybe, by the read under way as the client left
        await transport.flush(5.0)
        await asyncio.sleep(0.3)
        for n in range(2, 50):
            transport.send("run", run_id, "RUNNING", b'{"n":%d}' % n)
        await transport.flush(5.0)
        await asyncio.sleep(0.3)
        assert numbers(delivered) in ([0], [0, 1])

    with_hub(scenario)


@pytest.mark.parametrize("stream", ["run", "run, resumed", "all runs", "all runs, resumed"])
def test_a_first_client_after_an_idle_time_gets_each_event_once_though_events_are_stored_as_it_starts(
        with_hub: Callable[[Scenario], None], stream: str) -> None:
    """Events stored before the client, between its subscribing and the reader following again, just after
    that, and after its backlog read: each reaches it once, in order (a resumed client: each after its id)."""
    async def scenario(backend: Any, hub: EventHub, transport: Any) -> None:
        run = new_run()
        assert await backend.admit(run, "reject", 10) == "started"  # stored: the run stream finds it
        for_run = stream.startswith("run")
        if for_run:  # the run's first event: its backlog is whole from it on (no gap frame)
            transport.send("run", run.run_id, run.state, run.json())
        sent = 0

        async def store(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                transport.send("log" if for_run else "run", run.run_id, "RUNNING", b'{"n":%d}' % sent)
                sent += 1
            await transport.flush(5.0)

        await store(5)
        await asyncio.sleep(IDLE_CHECK_SECONDS + 0.5)  # idle (Redis mode: it checked Redis once at least)
        resumed_from = None
        if stream.endswith("resumed"):
            kept = (await transport.run_backlog(run.run_id, None)).frames if for_run \
                else await transport.global_after((0, 0))
            resumed_from = next(frame.key for frame in kept if numbers([frame]) == [2])
        around_the_position_read(transport, lambda: store(3))
        client = hub.subscribe(run.run_id if for_run else None, None)
        first: Any = (await hub.first_run_frames(run.run_id, resumed_from, False, backend.get) if for_run
                      else await hub.first_global_frames(resumed_from))
        await store(4)
        frames = received(first, client.take())
        if for_run:
            assert [frame.kind for frame in frames[:1]] == (["log"] if resumed_from else ["run"])  # no gap frame
        ids = [frame.key for frame in frames]
        assert ids == sorted(set(ids))
        if resumed_from is not None:
            assert numbers(frames) == list(range(3, 15))
        elif for_run:
            assert numbers(frames) == list(range(15))
        else:  # from the moment it started on: every event stored since the reader follows is there
            got = numbers(frames)
            assert got and got[0] <= 8 and got == list(range(got[0], 15))
        hub.unsubscribe(client)

    with_hub(scenario)


class Recorder:
    """A transport that keeps what the hub sends (kind, state)."""

    available = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, kind: str, run_id: str, state: str, data: bytes) -> None:
        self.sent.append((kind, state))


def test_a_progress_frame_due_while_the_run_is_written_finished_is_not_a_second_terminal_frame() -> None:
    """A progress frame waits up to PROGRESS_INTERVAL; it must not go out with the run's terminal state (set on
    the run before its terminal write), ahead of the one terminal frame published once that write is done."""
    async def main() -> None:
        hub = EventHub()
        recorder = Recorder()
        hub.start(15.0, recorder)  # type: ignore[arg-type]
        run = new_run()
        run.update(state="RUNNING")
        hub.publish_progress(run)  # the first: due at once, on the loop's next turn
        run.update(state="DONE", finished_at="2026-12-06T00:00:00.000Z")  # the runner's terminal write begins
        await asyncio.sleep(0.1)  # the write takes a while
        hub.publish_run(run)  # written: the terminal frame
        assert recorder.sent == [("run", "DONE")]

    asyncio.run(main())
