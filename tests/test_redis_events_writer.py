"""Redis mode's events writer under a stall and a script flush (found by review): a pipeline that redis-py sends
again after a socket timeout, while its first copy still runs, stores each log line and its event once; after
SCRIPT FLUSH no event is ever kept before its log line (GET /agents/logs relies on it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conftest import RedisServer
from service.backends.records import Frame
from service.backends.redis import side_scripts
from service.backends.redis.connect import open_client, parse
from service.backends.redis.events import RedisEvents

STALL_SCRIPT = """
local t = redis.call('TIME')
local start = t[1] * 1000 + math.floor(t[2] / 1000)
repeat t = redis.call('TIME') until t[1] * 1000 + math.floor(t[2] / 1000) - start >= tonumber(ARGV[1])
return 1
"""  # Redis does nothing else meanwhile, as with DEBUG SLEEP (which Redis 7 refuses by default)


class Sink:
    def deliver(self, frame: Frame) -> None:
        pass

    def end_all(self, reason: str) -> None:
        pass

    def listening(self) -> bool:
        return True  # as a hub with a client: the transport reads every event


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.getMessage())


def with_writer(redis: RedisServer, scenario: Callable[[Any, RedisEvents, Lines], Awaitable[None]]) -> None:
    async def run() -> None:
        endpoint = parse(redis.url)
        client = open_client(endpoint)
        await client.flushall()
        await client.set("t:run:r1", "{}")  # a stored run: its lines are kept
        log = logging.getLogger(f"writer-test-{id(scenario)}")
        lines = Lines()
        log.addHandler(lines)
        writer = RedisEvents(client, endpoint, "t", Sink(), log)
        try:
            await scenario(client, writer, lines)
        finally:
            log.removeHandler(lines)
            await writer.reader_client.aclose()
            await client.aclose()

    asyncio.run(run())


def test_a_pipeline_sent_again_after_a_stall_stores_each_line_and_event_once(own_redis: RedisServer) -> None:
    async def scenario(client: Any, writer: RedisEvents, lines: Lines) -> None:
        await writer._write([("log", "r1", "", b"warm")])  # scripts loaded, connection pooled
        blocker = open_client(parse(own_redis.url), socket_timeout=10, pooled=False)

        async def stall() -> None:  # longer than the writer's socket timeout (2 s): redis-py sends again
            await blocker.eval(STALL_SCRIPT, 0, 2600)

        stalling = asyncio.create_task(stall())
        await asyncio.sleep(0.1)
        await writer._write([("log", "r1", "", b"line-1"), ("run", "r1", "RUNNING", b'{"x":1}')])
        await stalling
        await blocker.aclose()
        assert await client.lrange("t:log:r1", 0, -1) == [b"warm", b"line-1"]
        kinds = [fields[b"k"] for _, fields in await client.xrange("t:events:run:r1")]
        assert kinds == [b"log", b"log", b"run"]
        assert await client.xlen("t:events") == 3
        assert int(await client.hget("t:logbytes", "r1")) == len(b"warm") + len(b"line-1")
        assert "events_unavailable" not in lines.events

    with_writer(own_redis, scenario)


@pytest.mark.parametrize("loaded", ["none", "the one that writes events"])
def test_after_a_script_flush_no_event_is_kept_before_its_log_line(own_redis: RedisServer, loaded: str) -> None:
    async def scenario(client: Any, writer: RedisEvents, lines: Lines) -> None:
        await writer._write([("log", "r1", "", b"warm")])
        await client.script_flush()
        if loaded != "none":  # e.g. another replica's writer, whose last batch had run events only
            for name in dir(side_scripts):
                text = getattr(side_scripts, name)
                if name.endswith("_SCRIPT") and "XADD" in text:
                    await client.script_load(text)
        real = writer._pipeline
        seen: list[tuple[int, int]] = []

        async def checked(calls: Any) -> list[Any]:
            replies = await real(calls)
            # what GET /agents/logs reads between two pipelines: every log event's line is kept
            logged = [e for e in await client.xrange("t:events:run:r1") if e[1][b"k"] == b"log"]
            kept = await client.lrange("t:log:r1", 0, -1)
            seen.append((len(logged), len(kept)))
            assert [fields[b"d"] for _, fields in logged] == kept
            return replies

        writer._pipeline = checked  # type: ignore[method-assign]
        await writer._write([("log", "r1", "", b"line-1"), ("log", "r1", "", b"line-2")])
        assert await client.lrange("t:log:r1", 0, -1) == [b"warm", b"line-1", b"line-2"]
        assert seen and seen[-1] == (3, 3)

    with_writer(own_redis, scenario)


def test_a_call_refused_for_noscript_is_applied_when_a_later_one_of_its_batch_was(own_redis: RedisServer) -> None:
    async def scenario(client: Any, writer: RedisEvents, lines: Lines) -> None:
        await writer._write([("log", "r1", "", b"warm")])
        await client.script_flush()
        real = writer._pipeline
        sent: list[int] = []

        async def loaded_midway(calls: Any) -> list[Any]:  # another replica loads the script mid-pipeline
            sent.append(len(calls))
            if len(sent) > 1:
                return await real(calls)
            first = await real(calls[:1])
            await client.script_load(calls[0][0].script)
            return [*first, *await real(calls[1:])]

        writer._pipeline = loaded_midway  # type: ignore[method-assign]
        await writer._write([("log", "r1", "", b"line-1"), ("log", "r1", "", b"line-2")])
        assert sent == [2, 1]
        assert sorted(await client.lrange("t:log:r1", 0, -1)) == [b"line-1", b"line-2", b"warm"]
        assert await client.xlen("t:events:run:r1") == 3

    with_writer(own_redis, scenario)


def test_each_stream_keeps_its_newest_entries_within_both_caps_and_counts_their_bytes_exactly(
        own_redis: RedisServer) -> None:
    """Past the entries' cap the oldest go with the add; past the bytes' cap one by one; the newest always stays.
    The companion <stream>:bytes is the kept entries' data, so a run's retention size and the caps stay true."""
    async def scenario(client: Any, writer: RedisEvents, lines: Lines) -> None:
        script = client.register_script(side_scripts.WRITE_SCRIPT)
        keys = ["t:events", "t:events:runs", "t:events:run:r1", "t:writer:x", "t:log:r1", "t:logbytes", "t:sizes",
                "t:bytes", "t:run:r1"]

        async def add(seq: int, data: bytes, n: int, b: int) -> None:
            await script(keys=keys, args=["run", "r1", "RUNNING", data, n, b, n, b, n, b, 600, seq, 600, 500, 1 << 20])

        async def kept(stream: str) -> list[bytes]:
            return [fields[b"d"] for _, fields in await client.xrange(stream)]

        sizes = [5, 40, 7, 300, 11, 2, 90, 13]
        for seq, size in enumerate(sizes, 1):
            await add(seq, bytes([48 + seq]) * size, 4, 10 ** 6)  # four entries at most
        for stream in keys[:3]:
            data = await kept(stream)
            assert [len(item) for item in data] == sizes[-4:]
            assert int(await client.get(f"{stream}:bytes")) == sum(map(len, data))
        # a run's stream says it lost entries (a trim would not): its backlog is not whole (events.py, _whole)
        assert (await client.xinfo_stream("t:events:run:r1"))["max-deleted-entry-id"] not in (b"0-0", "0-0")
        await add(len(sizes) + 1, b"z" * 100, 4, 150)  # bytes cap: the oldest go until 150 bytes or less are kept
        for stream in keys[:3]:
            data = await kept(stream)
            assert [len(item) for item in data] == [13, 100]
            assert int(await client.get(f"{stream}:bytes")) == 113
        await add(len(sizes) + 2, b"y" * 500, 4, 150)  # larger than the cap alone: kept, the newest always is
        for stream in keys[:3]:
            assert await kept(stream) == [b"y" * 500] and int(await client.get(f"{stream}:bytes")) == 500

    with_writer(own_redis, scenario)
