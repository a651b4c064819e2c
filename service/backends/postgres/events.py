"""Postgres mode's event transport: run events in the table ``events``, so every replica streams every run.

Publishing never waits: events queue in this process and one writer task inserts them in batches, each batch
one transaction under the row lock ``locks.events``, so ids (a sequence) commit in order and a reader that
follows the table by id never skips one; the batch ends with a NOTIFY. Each replica's reader reads what is
new when notified (and once a second regardless), while a stream client of the replica listens: without one it
reads nothing, and the first client that comes waits until it has read the newest id, from which it reads on
(what is older is in the backlog that client reads next). The table keeps at most ALL_EVENTS_BYTES of event data (the
newest event always) and TABLE_EVENTS_MAX events, as Redis mode's stream of all events. No per-run trim removes
one of the newest ALL_EVENTS_MAX events, so a reader that many behind (a busy replica) still reads every event
kept; past those, a run keeps its newest RUN_BACKLOG_FRAMES. Each trim records the highest id it removed
(``events_trimmed``): a reader behind it ends its local streams, which resume from their Last-Event-ID with a
``gap`` frame, instead of skipping events without a word. A run's events are dropped with it at retention. A log line is kept in ``run_logs``
in the same transaction. Events are best effort: when the database fails, events are dropped (logged once),
the local streams end cleanly, and the runs go on; the run store stays the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

from service.backends.base import Followers, FrameSink
from service.backends.postgres.database import Connection, Database
from service.backends.postgres.listener import Listener
from service.backends.records import (ALL_EVENTS_BYTES, ALL_EVENTS_MAX, GLOBAL_BACKLOG_BYTES, GLOBAL_BACKLOG_FRAMES,
                                      LOG_BYTES_MAX, LOG_LINES_MAX, RUN_BACKLOG_BYTES, RUN_BACKLOG_FRAMES, Frame,
                                      RunBacklog, StoreUnavailable)
from service.cancelling import cancel_and_wait

TABLE_EVENTS_MAX = 100000  # events kept in all (and ALL_EVENTS_BYTES of their data)
SEND_QUEUE_MAX = 10000  # events waiting for the writer; past it new ones are dropped
SEND_QUEUE_BYTES = 16 * 1024 * 1024
BATCH = 200  # events per transaction at most, and BATCH_BYTES of their data (one event at least)
BATCH_BYTES = 1024 * 1024
TRIM_BYTES = 1024 * 1024  # data written between two trims of the whole table to ALL_EVENTS_BYTES, at most
TRIM_EVERY = 50  # batches between two trims of the whole table, at most
PER_RUN_COUNTS = 10000  # runs whose events written this replica counts
POLL_SECONDS = 1.0  # the reader looks for new events this often even without a notification
FOLLOW_SECONDS = 10.0  # a new stream waits this long at most for the reader to follow again (then 503)
COLUMNS = "id, run_id, kind, state, data"
# After a delete of events (``dropped``): their runs' backlogs no longer start with their first event, and a reader
# that has not read up to the highest id dropped has missed events
MARK_TRIMMED = ("marked AS (UPDATE runs SET events_trimmed = true WHERE run_id IN (SELECT DISTINCT run_id FROM dropped) "
                "AND NOT events_trimmed) UPDATE events_trimmed SET through = greatest(through, "
                "(SELECT max(id) FROM dropped))")
# A backlog's newest events with the bytes of those up to each (newest first): kept while within the byte bound,
# the newest always (as Redis mode's capped streams)
BACKLOG = (f"SELECT {COLUMNS} FROM (SELECT {COLUMNS}, sum(length(data)) OVER (ORDER BY id DESC) AS kept "
           f"FROM (SELECT {COLUMNS} FROM events WHERE {{}} AND id > %s ORDER BY id DESC LIMIT %s) AS newest) "
           "AS counted WHERE kept <= %s OR kept = length(data) ORDER BY id")
Row = tuple[int, str, str, str, bytes]


class PostgresEvents:
    """The writer and reader tasks of one replica, and the backlog reads a new client needs."""

    def __init__(self, db: Database, sink: FrameSink, log: logging.Logger, listener: Listener) -> None:
        self.db = db
        self.sink = sink
        self.log = log
        self.listener = listener
        self.available = False  # the listener follows the database; while False new streams are refused (503)
        self._outbox: deque[tuple[str, str, str, bytes]] = deque()
        self._outbox_bytes = 0
        self._queued = 0
        self._done = 0
        self._batch_done = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._new_events = asyncio.Event()
        self._writing = False
        self._last_written = 0
        self._last_read: int | None = None
        self._following = False  # the reader reads every event for the clients here (none: it reads none)
        self._followers = Followers(FOLLOW_SECONDS)
        self._epoch = 0  # read with the newest id as the reader starts (ids: _id)
        self._write_failed = False
        self._dropped = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._batches = 0  # batches this writer has sent: each one's number
        self._writer = uuid.uuid4().hex  # names this process's batches in event_batches
        self._unbounded = 0  # data written since the last trim of the whole table
        self._per_run: OrderedDict[str, int] = OrderedDict()  # events written per run, most recent run last

    async def start(self) -> None:
        self.listener.on_events = self._new_events.set
        self.listener.on_connected = self._connected
        self.available = self.listener.connected
        self._tasks = [asyncio.create_task(self._write_forever(), name="events-writer"),
                       asyncio.create_task(self._read_forever(), name="events-reader")]
        deadline = time.monotonic() + 2.0  # streams opened right after start find the reader following
        while not (self.available and self._last_read is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)

    def _connected(self, connected: bool) -> None:
        if connected == self.available:
            return
        self.available = connected
        if connected:
            self._new_events.set()
        else:
            self.sink.end_all("unavailable")

    # --- writing -------------------------------------------------------------------------------------------

    def send(self, kind: str, run_id: str, state: str, data: bytes) -> None:
        if len(self._outbox) >= SEND_QUEUE_MAX or self._outbox_bytes + len(data) > SEND_QUEUE_BYTES:
            self._dropped += 1
            if self._dropped == 1:
                self.log.warning("events_dropped", extra={"detail": "too many events waiting for the database"})
            return
        self._outbox.append((kind, run_id, state, data))
        self._outbox_bytes += len(data)
        self._queued += 1
        self._outbox_ready.set()

    async def _write_forever(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch: list[tuple[str, str, str, bytes]] = []
                size = 0
                while self._outbox and len(batch) < BATCH and (
                        not batch or size + len(self._outbox[0][3]) <= BATCH_BYTES):
                    batch.append(self._outbox.popleft())
                    size += len(batch[-1][3])
                self._writing = True
                try:
                    await self._write(batch)
                finally:
                    self._outbox_bytes -= sum(len(data) for _, _, _, data in batch)
                    self._writing = False
                    self._done += len(batch)
                    self._batch_done.set()

    async def _write(self, batch: list[tuple[str, str, str, bytes]]) -> None:
        self._batches += 1
        number = self._batches
        crowded = self._crowded(batch)
        self._unbounded += sum(len(data) for _, _, _, data in batch)
        trim_all = number % TRIM_EVERY == 0 or self._unbounded >= TRIM_BYTES
        if trim_all:
            self._unbounded = 0
        attempts = 0

        async def write(connection: Connection) -> int:
            nonlocal attempts
            attempts += 1
            await connection.execute("SET LOCAL synchronous_commit TO off")  # best effort: no wait for the disk
            await self.db.lock(connection, "events")
            if attempts > 1:  # Database.run's retry: the first attempt may have committed, its reply lost
                row = await (await connection.execute(
                    "SELECT newest FROM event_batches WHERE writer = %s AND batch = %s", (self._writer, number))
                ).fetchone()
                if row is not None:
                    return int(row[0])
            cursor = await connection.execute(
                "INSERT INTO events (id, run_id, kind, state, data) "
                "SELECT nextval('event_ids'), r, k, s, d FROM unnest(%s::text[], %s::text[], %s::text[], %s::bytea[]) "
                "WITH ORDINALITY AS batch(k, r, s, d, o) ORDER BY o RETURNING id",
                ([kind for kind, _, _, _ in batch], [run_id for _, run_id, _, _ in batch],
                 [state for _, _, state, _ in batch], [data for _, _, _, data in batch]))
            logged = [(run_id, data) for kind, run_id, _, data in batch if kind == "log"]
            if logged:
                await connection.execute(
                    "INSERT INTO run_logs (run_id, line) SELECT r, d FROM unnest(%s::text[], %s::bytea[]) "
                    "WITH ORDINALITY AS lines(r, d, o) WHERE EXISTS (SELECT 1 FROM runs WHERE runs.run_id = r) "
                    "ORDER BY o", ([run_id for run_id, _ in logged], [data for _, data in logged]))
                await connection.execute(
                    "DELETE FROM run_logs WHERE id IN (SELECT id FROM (SELECT id, "
                    "row_number() OVER (PARTITION BY run_id ORDER BY id DESC) AS n, "
                    "sum(length(line)) OVER (PARTITION BY run_id ORDER BY id DESC) AS b "
                    "FROM run_logs WHERE run_id = ANY(%s)) AS kept WHERE n > %s OR b > %s)",
                    (list({run_id for run_id, _ in logged}), LOG_LINES_MAX, LOG_BYTES_MAX))
                await connection.execute(
                    "UPDATE runs SET log_bytes = (SELECT coalesce(sum(length(line)), 0) FROM run_logs "
                    "WHERE run_logs.run_id = runs.run_id) WHERE run_id = ANY(%s)",
                    (list({run_id for run_id, _ in logged}),))
            if crowded:
                await connection.execute(
                    "WITH dropped AS (DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, "
                    "row_number() OVER (PARTITION BY run_id ORDER BY id DESC) AS n "
                    "FROM events WHERE run_id = ANY(%s)) AS kept WHERE n > %s) "
                    "AND id <= (SELECT max(id) FROM events) - %s RETURNING id, run_id), "
                    f"{MARK_TRIMMED}", (crowded, RUN_BACKLOG_FRAMES, ALL_EVENTS_MAX))
            if trim_all:
                await connection.execute("DELETE FROM event_batches WHERE written_at < clock_timestamp() - "
                                         "interval '1 hour'")  # writers long gone
                await connection.execute(  # the oldest events past the newest TABLE_EVENTS_MAX or ALL_EVENTS_BYTES
                    "WITH dropped AS (DELETE FROM events WHERE id <= (SELECT coalesce(max(id), 0) FROM "
                    "(SELECT id, row_number() OVER (ORDER BY id DESC) AS n, "
                    "sum(length(data)) OVER (ORDER BY id DESC) AS b FROM events) AS ranked "
                    "WHERE n > 1 AND (n > %s OR b > %s)) RETURNING id, run_id), "
                    f"{MARK_TRIMMED}", (TABLE_EVENTS_MAX, ALL_EVENTS_BYTES))
            await connection.execute(  # currval: the last id this transaction took, the batch's newest
                "INSERT INTO event_batches (writer, batch, newest) VALUES (%s, %s, currval('event_ids')) "
                "ON CONFLICT (writer) DO UPDATE SET batch = excluded.batch, newest = excluded.newest, "
                "written_at = clock_timestamp()", (self._writer, number))
            await connection.execute("SELECT pg_notify(%s, '')", (self.listener.channel("events"),))
            return max(int(row[0]) for row in await cursor.fetchall())  # every statement went out in one go

        try:
            newest = await self.db.run(write)
        except StoreUnavailable as exc:
            if not self._write_failed:
                self._write_failed = True
                self.log.warning("events_unavailable", extra={"error": str(exc), "events_lost": len(batch)})
            return
        if self._write_failed:
            self._write_failed = False
            self.log.info("events_recovered")
        self._last_written = max(self._last_written, newest)

    def _crowded(self, batch: list[tuple[str, str, str, bytes]]) -> list[str]:
        """The runs of ``batch`` that may now have more than RUN_BACKLOG_FRAMES events kept (counted per run by
        this replica, which writes a run's events while it runs it); trimmed in the batch's transaction."""
        for _, run_id, _, _ in batch:
            self._per_run[run_id] = self._per_run.get(run_id, 0) + 1
            self._per_run.move_to_end(run_id)
        while len(self._per_run) > PER_RUN_COUNTS:
            self._per_run.popitem(last=False)
        return [run_id for run_id in {run_id for _, run_id, _, _ in batch}
                if self._per_run.get(run_id, 0) > RUN_BACKLOG_FRAMES]

    async def written(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until the events sent so far are written (or given up)."""
        target = self._queued
        deadline = time.monotonic() + timeout
        while self._done < target and (left := deadline - time.monotonic()) > 0:
            self._batch_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_done.wait(), left)

    async def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until what was sent is in the table and, while a client listens, back through
        the reader."""
        deadline = time.monotonic() + timeout
        while (self._outbox or self._writing or self._following and (self._last_read or 0) < self._last_written) and \
                time.monotonic() < deadline and self.available:
            await asyncio.sleep(0.01)

    async def follow(self) -> None:
        """Until the events stored from now on will reach the sink: at once while the reader follows the table;
        else once it has read the newest id (StoreUnavailable if it cannot)."""
        if not self._following:
            await self._followers.wait()

    # --- reading -------------------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        while True:
            try:
                if self._last_read is None:  # start at the end: what happened before is in the backlogs
                    self._epoch, self._last_read = await self.db.run(_epoch_and_newest_id, transaction=False)
                if not self._followers and not self.sink.listening():
                    self._following = False  # no client: nothing to read for (the listener watches the database)
                    self._followers.wake.clear()
                    await self._followers.wake.wait()
                    continue
                if not self._following:  # a client came: on from the end, what is older is in the backlogs
                    self._epoch, self._last_read = await self.db.run(_epoch_and_newest_id, transaction=False)
                    self._following = True
                    self._followers.release(None)
                self._new_events.clear()
                while True:
                    trimmed, rows = await self.db.run(self._rows_after, transaction=False)
                    if self._last_read is not None and self._last_read < trimmed:
                        self._behind(trimmed)
                        self._last_read = trimmed  # on from what no trim has touched
                        rows = [row for row in rows if row[0] > trimmed]
                    for row in rows:
                        self._last_read = row[0]
                        frame = self._frame(row)
                        if frame is not None:
                            self.sink.deliver(frame)
                    if len(rows) < 1000:
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database gone or erroring: the listener's state ends the streams
                self._followers.release(StoreUnavailable(f"{type(exc).__name__}: {exc}"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_events.wait(), POLL_SECONDS)

    async def _rows_after(self, connection: Connection) -> tuple[int, list[Row]]:
        """The highest id trimmed, and up to 1000 rows after the last read, in one snapshot (one statement)."""
        cursor = await connection.execute(
            f"SELECT through, {COLUMNS} FROM events_trimmed "
            f"LEFT JOIN LATERAL (SELECT {COLUMNS} FROM events WHERE id > %s ORDER BY id LIMIT 1000) AS rows ON true "
            "ORDER BY id", (self._last_read or 0,), binary=True)
        found = await cursor.fetchall()
        return (int(found[0][0]) if found else 0), [_row(row[1:]) for row in found if row[1] is not None]

    def _behind(self, trimmed: int) -> None:
        """A trim took events this reader never read (it fell behind): the local streams end (a client resumes
        from its Last-Event-ID and is told of a gap) instead of skipping them."""
        self.log.warning("events_reader_behind", extra={"events_behind": trimmed - (self._last_read or 0)})
        self.sink.end_all("behind")

    # --- what a new client gets first ----------------------------------------------------------------------

    async def run_backlog(self, run_id: str, after: tuple[int, int] | None) -> RunBacklog:
        """The run's kept frames from ``after`` on (or all), oldest first, within RUN_BACKLOG_FRAMES and
        RUN_BACKLOG_BYTES (the newest kept), read in one transaction with what says whether they are whole: the
        event ``after`` comes first, or (for all) nothing of the run was ever trimmed or cut here."""
        async def backlog(connection: Connection) -> tuple[list[Row], bool, int | None]:
            await connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # both reads, one snapshot
            cursor = await connection.execute(BACKLOG.format("run_id = %s"),
                                              (run_id, self._seq(after) - 1 if after else 0, RUN_BACKLOG_FRAMES + 1,
                                               RUN_BACKLOG_BYTES), binary=True)
            rows = [_row(row) for row in await cursor.fetchall()]
            state = await (await connection.execute(
                "SELECT (SELECT count(*) FROM events WHERE run_id = %s), (SELECT max(id) FROM events WHERE run_id = %s),"
                " (SELECT NOT events_trimmed FROM runs WHERE run_id = %s)", (run_id, run_id, run_id))).fetchone()
            assert state is not None
            whole = bool(state[2]) and int(state[0]) == len(rows)
            return rows, whole, state[1]

        rows, whole, newest = await self.db.run(backlog)
        if after is not None:
            rows = rows if rows and self._key(rows[0][0]) == after else []
            found = bool(rows)
        else:
            rows, found = rows[-RUN_BACKLOG_FRAMES:], whole and len(rows) <= RUN_BACKLOG_FRAMES
        frames = [frame for row in rows if (frame := self._frame(row)) is not None]
        return RunBacklog(frames, found, self._id(newest) if newest is not None else None)

    async def newest_run_event(self, run_id: str) -> str | None:
        async def newest(connection: Connection) -> int | None:
            row = await (await connection.execute("SELECT max(id) FROM events WHERE run_id = %s",
                                                  (run_id,))).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        found = await self.db.run(newest, transaction=False)
        return None if found is None else self._id(found)

    async def global_after(self, after: tuple[int, int]) -> list[Frame]:
        """The newest GLOBAL_BACKLOG_FRAMES run events after ``after``, oldest first."""
        async def rows(connection: Connection) -> list[Row]:
            cursor = await connection.execute(
                BACKLOG.format("kind = 'run'"),
                (self._seq(after), GLOBAL_BACKLOG_FRAMES, GLOBAL_BACKLOG_BYTES), binary=True)
            return [_row(row) for row in await cursor.fetchall()]

        return [frame for row in await self.db.run(rows, transaction=False)
                if (frame := self._frame(row)) is not None]

    # --- event ids: "<epoch>-<n>", the epoch the schema's creation in ms, n from the sequence event_ids ----------

    def _id(self, seq: int) -> str:
        return f"{self._epoch}-{seq}"

    def _key(self, seq: int) -> tuple[int, int]:
        return self._epoch, seq

    def _seq(self, after: tuple[int, int]) -> int:
        """The sequence number after which ``after`` resumes: its own for an id of this schema, 0 (all) for one
        older, past everything for one newer (a schema dropped and made again has a later epoch)."""
        if after[0] == self._epoch:
            return after[1]
        return 0 if after[0] < self._epoch else 2 ** 62

    def _frame(self, row: Row) -> Frame | None:
        """A row as a frame; None for one this version cannot send (a line break would end the SSE frame)."""
        event_id, run_id, kind, state, data = row
        if kind not in ("run", "log") or b"\n" in data or b"\r" in data:
            return None
        return Frame(self._id(event_id), kind, run_id, state, data)


async def _epoch_and_newest_id(connection: Connection) -> tuple[int, int]:
    row = await (await connection.execute(
        "SELECT (SELECT (extract(epoch FROM applied_at) * 1000)::bigint FROM schema_version WHERE version = 1), "
        "(SELECT greatest(coalesce(max(id), 0), (SELECT through FROM events_trimmed)) FROM events)")).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _row(row: tuple[Any, ...]) -> Row:
    return int(row[0]), str(row[1]), str(row[2]), str(row[3]), bytes(row[4])
