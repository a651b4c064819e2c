"""Reading run records from Redis: concurrent reads share one MGET, nothing is cached, a parse is reused safely."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from conftest import RedisServer, new_user
from service.backends.records import Run
from service.backends.redis.reads import CoalescedReads, RecordReader


def command_calls(redis: RedisServer, command: str) -> int:
    stats = redis.command("INFO", "commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_reads_asked_for_in_one_turn_share_one_mget_and_each_caller_gets_its_own_key(own_redis: RedisServer) -> None:
    async def scenario() -> list[bytes | None]:
        client = Redis.from_url(own_redis.url)
        try:
            await client.mset({"a": b"1", "b": b"2"})
            own_redis.command("CONFIG", "RESETSTAT")
            reads = CoalescedReads(client)
            return await asyncio.gather(reads.get("a"), reads.get("b"), reads.get("missing"), reads.get("a"))
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [b"1", b"2", None, b"1"]
    assert (command_calls(own_redis, "mget"), command_calls(own_redis, "get")) == (1, 0)


def test_a_read_sees_every_write_that_landed_before_it(own_redis: RedisServer) -> None:
    async def scenario() -> list[bytes | None]:
        client = Redis.from_url(own_redis.url)
        try:
            reads, seen = CoalescedReads(client), []
            for value in range(30):
                await client.set("k", value)
                seen.append(await reads.get("k"))
            await client.delete("k")
            seen.append(await reads.get("k"))
            return seen
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == [str(value).encode() for value in range(30)] + [None]


def test_a_failed_read_fails_every_caller_of_its_batch_and_the_next_batch_reads_again(own_redis: RedisServer) -> None:
    async def scenario() -> tuple[list[Any], bytes | None]:
        client = Redis.from_url(own_redis.url, socket_connect_timeout=1)
        try:
            await client.set("k", b"v")
            reads = CoalescedReads(client)
            own_redis.stop()
            failed = await asyncio.gather(reads.get("k"), reads.get("k"), return_exceptions=True)
            own_redis.start()  # an empty Redis again: the key is gone
            await client.set("k", b"back")
            return failed, await reads.get("k")
        finally:
            await client.aclose()

    failed, after = asyncio.run(scenario())
    assert len(failed) == 2 and all(isinstance(result, RedisConnectionError) for result in failed), failed
    assert after == b"back"


def test_a_caller_cancelled_while_its_batch_is_out_leaves_the_others_their_values(own_redis: RedisServer) -> None:
    async def scenario() -> tuple[bool, list[bytes | None]]:
        client = Redis.from_url(own_redis.url)
        try:
            await client.mset({"a": b"1", "b": b"2"})
            reads = CoalescedReads(client)
            leaving = asyncio.ensure_future(reads.get("a"))
            staying = [asyncio.ensure_future(reads.get(key)) for key in ("a", "b")]
            await asyncio.sleep(0)  # the batch is sent with all three
            leaving.cancel()
            values = await asyncio.gather(*staying)
            with pytest.raises(asyncio.CancelledError):
                await leaving
            return leaving.cancelled(), values
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == (True, [b"1", b"2"])


def record(state: str = "DONE") -> bytes:
    run = Run.new(str(uuid.uuid4()), "sleeper", new_user(), {"seconds": 1}, holder=None)
    run.update(state=state, result_json=b'{"slept":1}')
    return run.json()


def test_a_record_read_again_is_an_equal_run_that_changing_does_not_touch_the_next_read() -> None:
    reader = RecordReader(logging.getLogger("test"))
    raw = record()
    reads = [reader.read("k", bytes(raw)) for _ in range(3)]  # equal bytes, other objects: as read from Redis
    for changed in reads:  # the first parse, and the reads served from it
        assert changed is not None
        changed.update(state="ERROR", queue_position=3)
        again = reader.read("k", bytes(raw))
        assert again is not None and all(again is not other for other in reads)
        assert (again.state, again.queue_position, again.json()) == ("DONE", None, raw)
        assert again == Run.from_json(raw)


def test_a_copy_keeps_every_field_of_the_run() -> None:
    run = Run.new(str(uuid.uuid4()), "sleeper", new_user(), {"seconds": 1}, holder="token",
                  webhook="https://hooks.example.com/x")
    run.update(state="CANCELLED", result_json=b"null", error="stopped", progress=0.5, started_at="s",
               finished_at="f", queue_position=2, cancelled_by=str(uuid.uuid4()))
    copied = run.copy()
    for field in dataclasses.fields(Run):  # a field added to Run later is covered too
        assert getattr(copied, field.name) == getattr(run, field.name), field.name
    assert copied.json() == run.json()


def test_a_record_read_with_a_holder_is_parsed_with_it() -> None:
    reader = RecordReader(logging.getLogger("test"))
    raw = record("RUNNING")
    assert reader.read("k", raw).holder is None
    held = reader.read("k", raw, holder="token")
    assert held is not None and held.holder == "token"


def test_parsed_records_kept_are_bounded() -> None:
    reader = RecordReader(logging.getLogger("test"))
    for _ in range(RecordReader.PARSED_MAX + 50):
        reader.read("k", record())
    big = Run.new(str(uuid.uuid4()), "sleeper", new_user(), {"pad": "x" * RecordReader.PARSED_MAX_BYTES}, None)
    reader.read("k", big.json())
    assert len(reader._parsed) == RecordReader.PARSED_MAX
    assert big.json() not in reader._parsed


def test_an_unreadable_record_is_none_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    reader = RecordReader(logging.getLogger("test-reads"))
    with caplog.at_level(logging.ERROR, logger="test-reads"):
        assert reader.read("prefix:run:x", b"{not json") is None
        assert reader.read("prefix:run:x", b"{not json") is None
    assert [record.getMessage() for record in caplog.records] == ["run_record_invalid"]


def test_concurrent_status_requests_each_get_their_own_run(start_server: Any) -> None:
    srv = start_server(AGENT_SLEEP_SECONDS="0")
    runs = {run_id: srv.wait_run(run_id) for run_id in (srv.start_run("sleeper", seconds=0) for _ in range(4))}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            return await asyncio.gather(*(client.get(f"/agents/status/{run_id}") for _ in range(15)
                                          for run_id in runs))

    answers = asyncio.run(burst())
    assert [answer.status_code for answer in answers] == [200] * 60
    assert [answer.json() for answer in answers] == [run for _ in range(15) for run in runs.values()]
    unknown = srv.client.get(f"/agents/status/{uuid.uuid4()}")
    assert unknown.status_code == 404

