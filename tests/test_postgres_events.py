"""Postgres mode's event transport in process: the table ``events`` followed by each replica's reader, trimmed
per run and in all without costing a reader (on this replica or another) an event it has not read yet."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from conftest import PostgresServer, new_schema

LOG = logging.getLogger("agent_runner.test_postgres_events")


class Sink:
    """The event hub's place: the frames delivered and the reasons the streams were ended."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.ended: list[str] = []

    def deliver(self, frame: Any) -> None:
        self.frames.append(frame)

    def end_all(self, reason: str) -> None:
        self.ended.append(reason)

    def listening(self) -> bool:
        return True  # as a hub with a client: the transport reads every event

    def lines(self, run_id: str) -> list[int]:
        return [json.loads(frame.wire.partition(b"data: ")[2])["n"] for frame in self.frames
                if frame.kind == "log" and frame.run_id == run_id]


def with_events(postgres: PostgresServer, test: Callable[[Any, Any, Sink], Awaitable[None]]) -> None:
    from service.backends.postgres import open_postgres

    async def main() -> None:
        backend = open_postgres(postgres.url, new_schema(), 30.0, 100, 1 << 30, LOG)
        await backend.start()
        sink = Sink()
        events = backend.event_transport(sink)
        await events.start()
        try:
            await test(backend, events, sink)
        finally:
            await events.stop()
            await backend.close()

    asyncio.run(main())


async def pause_reader(events: Any) -> AsyncIterator[None]:
    """The reader stopped (a replica whose loop is busy), then started again where it was."""
    from service.cancelling import cancel_and_wait

    await events.follow()  # it follows the table: it has read where the end was (a reader stopped before that
    await cancel_and_wait(events._tasks[1])  # starts from the end when started again, and reads nothing sent meanwhile)
    yield
    events._tasks[1] = asyncio.create_task(events._read_forever())


async def send_lines(events: Any, run_id: str, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        events.send("log", run_id, "", json.dumps({"n": n}).encode())
    await events.written(30)


def test_a_reader_a_few_batches_behind_still_gets_every_line_of_a_run(postgres_server: PostgresServer) -> None:
    """Each batch trims its runs to their backlog; a reader that had not read the batch before still must."""
    async def test(backend: Any, events: Any, sink: Sink) -> None:
        paused = pause_reader(events)
        await anext(paused)
        await send_lines(events, "flood", 1000)  # five batches of 200: the run's backlog is 200
        with pytest.raises(StopAsyncIteration):
            await anext(paused)
        await events.flush(30)
        assert sink.lines("flood") == list(range(1000))
        assert sink.ended == []

    with_events(postgres_server, test)


def test_a_reader_behind_what_trims_spare_ends_its_streams_instead_of_skipping_events(
        postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.backends.postgres import events as module

    monkeypatch.setattr(module, "ALL_EVENTS_MAX", 300)

    async def test(backend: Any, events: Any, sink: Sink) -> None:
        paused = pause_reader(events)
        await anext(paused)
        await send_lines(events, "flood", 1000)
        with pytest.raises(StopAsyncIteration):
            await anext(paused)
        await events.flush(30)
        assert sink.ended == ["behind"]
        lines = sink.lines("flood")
        assert lines == list(range(lines[0], 1000)) and lines[0] >= 700  # what it got, it got whole

    with_events(postgres_server, test)


def test_the_events_table_stays_within_its_byte_bound_whatever_the_size_of_events(
        postgres_server: PostgresServer) -> None:
    """Run events carry the whole run (up to 64 KiB of input): the table is bounded in bytes, not only rows."""
    from service.backends.postgres.events import TRIM_BYTES
    from service.backends.records import ALL_EVENTS_BYTES

    async def test(backend: Any, events: Any, sink: Sink) -> None:
        padding = "x" * 60 * 1024
        for n in range(2000):
            events.send("run", f"run-{n % 50}", "RUNNING", json.dumps({"n": n, "input": padding}).encode())
            if n % 100 == 99:
                await events.written(30)
        await events.written(30)
        stored = postgres_server.sql(f"SELECT sum(length(data)), count(*) FROM {backend.db.schema}.events").split("|")
        assert int(stored[0]) <= ALL_EVENTS_BYTES + TRIM_BYTES, stored
        assert int(stored[1]) >= ALL_EVENTS_BYTES // (61 * 1024)  # the newest are kept
        newest = postgres_server.sql(f"SELECT max(id) FROM {backend.db.schema}.events")
        assert int(newest) >= 2000

    with_events(postgres_server, test)


# --- the migration's own connection -------------------------------------------------------------------------------

def test_a_migration_waits_for_another_replicas_past_the_statement_timeout(postgres_server: PostgresServer) -> None:
    """Another replica migrating for longer than statement_timeout holds the advisory lock: this one waits (its
    lock_timeout bounds the wait), instead of failing the wait as a statement that took too long."""
    import psycopg

    from service.backends.postgres.schema import advisory_key, migrate

    schema = new_schema()

    async def main() -> None:
        holder = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)
        waiter = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)
        await waiter.execute("SET statement_timeout = 200")  # as DATABASE_URL's options may set it
        await holder.execute("SELECT pg_advisory_lock(%s)", (advisory_key(schema),))
        migrating = asyncio.create_task(migrate(waiter, schema))
        await asyncio.sleep(1.0)
        assert not migrating.done()
        await holder.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(schema),))
        assert await asyncio.wait_for(migrating, 30) >= 3
        await holder.close()
        await waiter.close()

    asyncio.run(main())


def test_a_migration_gives_up_waiting_for_the_lock_after_its_lock_timeout(
        postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    from service.backends.postgres import schema as module

    monkeypatch.setattr(module, "MIGRATION_LOCK_TIMEOUT_MS", 300)
    schema = new_schema()

    async def main() -> None:
        holder = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)
        waiter = await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True)
        await holder.execute("SELECT pg_advisory_lock(%s)", (module.advisory_key(schema),))
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await asyncio.wait_for(module.migrate(waiter, schema), 10)
        await holder.close()
        await waiter.close()

    asyncio.run(main())


def test_a_reader_starting_on_a_table_trimmed_empty_is_not_behind(postgres_server: PostgresServer) -> None:
    async def test(backend: Any, events: Any, sink: Sink) -> None:
        await send_lines(events, "old", 300)
        await events.flush(30)
        schema = backend.db.schema
        postgres_server.sql(f"UPDATE {schema}.events_trimmed SET through = (SELECT max(id) FROM {schema}.events); "
                            f"DELETE FROM {schema}.events")  # as a trim (or retention) leaves it
        later = Sink()
        second = backend.event_transport(later)
        await second.start()
        try:
            await send_lines(events, "new", 3)
            deadline = time.monotonic() + 10  # the other reader's flush follows its own writes only
            while later.lines("new") != [0, 1, 2] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert later.lines("new") == [0, 1, 2]
            assert later.ended == []
        finally:
            await second.stop()

    with_events(postgres_server, test)
