"""Redis mode's event transport: run events through Redis Streams, so every replica streams every run.

Keys: ``<prefix>:events`` (every event of every run, the stream each
replica's reader follows), ``<prefix>:events:runs`` (run events only: the
backlog of GET /agents/events) and ``<prefix>:events:run:<id>`` (one run's
events: its backlog, expiring RUN_STREAM_TTL_SECONDS after its last event and
dropped with the run). One script appends an event to all three under the
same id, so an id means the same event everywhere. Each stream is capped by
entries and bytes. A run's log lines are kept in ``<prefix>:log:<id>``, each by
the same script call as its event and before it.

Publishing never waits: events queue in this process and one writer task
sends them in batches (but for the two events of a handoff, which the store's
script appends itself while the writer has nothing waiting: ``idle``), each call numbered, so a batch redis-py sends again after a
timeout (``<prefix>:writer:<id>`` holds the highest number applied) stores nothing
twice. One reader task per replica follows ``<prefix>:events``
with a blocking XREAD on its own connection and hands each event to the sink
(the event hub), which fans it out to the local clients. It reads only while a
client here listens: without one it checks Redis every few seconds (an XLEN,
so new streams are still refused while Redis is down), and the first client
that comes waits until it has read where the stream ends, from which it reads
on: what is older is in the backlog that client reads next. Events are best
effort: when Redis fails, events are dropped (logged once), the local streams
end cleanly, and the runs go on; the run store stays the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from service.backends.base import Followers, FrameSink
from service.cancelling import cancel_and_wait
from service.backends.records import (ALL_EVENTS_BYTES, ALL_EVENTS_MAX, GLOBAL_BACKLOG_BYTES, GLOBAL_BACKLOG_FRAMES,
                                      RUN_BACKLOG_BYTES, RUN_BACKLOG_FRAMES, RUN_STREAM_TTL_SECONDS, Frame, RunBacklog,
                                      StoreUnavailable)
from service.backends.redis.connect import STORE_ERRORS, Endpoint, open_client
from service.backends.redis.side_scripts import WRITE_SCRIPT

LOG_LINES_MAX = 500  # per run, kept with it and counted in its retention size
LOG_BYTES_MAX = 256 * 1024
SEND_QUEUE_MAX = 10000  # events waiting for the writer; past it new ones are dropped
SEND_QUEUE_BYTES = 16 * 1024 * 1024  # their data, the batch being written included (10000 lines of 64 KiB: 640 MB)
BATCH = 200  # events per pipeline
READ_BLOCK_MS = 2000
IDLE_CHECK_SECONDS = 2.0  # while no client listens, the reader checks Redis this often (``available``)
FOLLOW_SECONDS = 10.0  # a new stream waits this long at most for the reader (then 503); its reads time out sooner
WRITER_MARK_TTL_SECONDS = 600  # a writer's mark outlives any copy of its calls still on the way
SEQ = 11  # where a call's sequence number is in its ARGV
RETRY_SECONDS = 0.5
Entries = list[tuple[bytes, dict[bytes, bytes]]]  # a stream's entries as XRANGE and XREAD answer them


class RedisEvents:
    """The writer and reader tasks of one replica, and the backlog reads a new client needs."""

    def __init__(self, client: Redis, endpoint: Endpoint, prefix: str, events: FrameSink,
                 log: logging.Logger) -> None:
        self.client = client  # the store's pooled client, for writes and backlog reads
        self.reader_client = open_client(endpoint, socket_timeout=READ_BLOCK_MS / 1000 + 3, pooled=False)
        self.in_cluster = endpoint.kind == "cluster"
        self.prefix = prefix
        self.events = events
        self.log = log
        self.available = False  # the reader follows Redis; while False new streams are refused (503)
        self._outbox: deque[tuple[str, str, str, bytes]] = deque()
        self._outbox_bytes = 0  # data of the events in the outbox and in the batch being written
        self._logs_queued = 0  # log lines put in the outbox so far (a terminal state waits for them: written)
        self._logs_done = 0  # of those, the ones whose write is over (stored, or lost with a failed batch)
        self._batch_done = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._writing = False
        self._last_written: tuple[int, int] = (0, 0)
        self._last_read: tuple[int, int] = (0, 0)
        self._position: bytes | None = None  # the id the reader reads on from; None while it reads for no client
        self._followers = Followers(FOLLOW_SECONDS)
        self._write_failed = False
        self._dropped = 0
        self._script = client.register_script(WRITE_SCRIPT)
        self._mark = self.key("writer", uuid.uuid4().hex)  # this process's writer: its calls' high-water mark
        self._seq = 0  # the number of the last call made
        self._tasks: list[asyncio.Task[None]] = []

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write_forever(), name="events-writer"),
                       asyncio.create_task(self._read_forever(), name="events-reader")]
        deadline = time.monotonic() + 2.0  # streams opened right after start find Redis checked
        while not self.available and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            await self.reader_client.aclose()

    # --- writing -------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """Whether every event sent so far is in Redis (or given up): one a script appends itself
        (store.RedisBackend.finish_and_take) then comes after them, as it would through the writer."""
        return not self._outbox and not self._writing

    def appended(self, entry_id: bytes) -> None:
        """A script of the store appended the event ``entry_id`` itself (flush waits for the reader to reach it)."""
        key = _key(entry_id)
        if key > self._last_written:
            self._last_written = key

    def stream_caps(self) -> list[int]:
        """APPEND_EVENT's caps, as the writer sends them."""
        return [ALL_EVENTS_MAX, ALL_EVENTS_BYTES, GLOBAL_BACKLOG_FRAMES, GLOBAL_BACKLOG_BYTES, RUN_BACKLOG_FRAMES,
                RUN_BACKLOG_BYTES, RUN_STREAM_TTL_SECONDS]

    def send(self, kind: str, run_id: str, state: str, data: bytes) -> None:
        if len(self._outbox) >= SEND_QUEUE_MAX or self._outbox_bytes + len(data) > SEND_QUEUE_BYTES:
            self._dropped += 1
            if self._dropped == 1:
                self.log.warning("events_dropped", extra={"detail": "too many events waiting for Redis"})
            return
        self._outbox.append((kind, run_id, state, data))
        self._outbox_bytes += len(data)
        if kind == "log":
            self._logs_queued += 1
        self._outbox_ready.set()

    async def _write_forever(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(BATCH, len(self._outbox)))]
                self._writing = True
                try:
                    await self._write(batch)
                finally:
                    self._outbox_bytes -= sum(len(data) for _, _, _, data in batch)  # counted until written
                    self._writing = False
                    self._logs_done += sum(1 for kind, _, _, _ in batch if kind == "log")
                    self._batch_done.set()

    async def _write(self, batch: list[tuple[str, str, str, bytes]]) -> None:
        calls: list[tuple[AsyncScript, list[str], list[Any]]] = []
        for kind, run_id, state, data in batch:
            keys = [self.key("events"), self.key("events", "runs"), self.key("events", "run", run_id), self._mark,
                    self.key("log", run_id), self.key("logbytes"), self.key("sizes"), self.key("bytes"),
                    self.key("run", run_id)]
            calls.append((self._script, keys, [kind, run_id, state, data, *self.stream_caps(), self._next_seq(),
                                               WRITER_MARK_TTL_SECONDS, LOG_LINES_MAX, LOG_BYTES_MAX]))
        try:
            replies = await self._run_scripts(calls)
        except STORE_ERRORS as exc:
            self._failed(exc, len(batch))
            return
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            self._failed(errors[0], len(errors))
        elif self._write_failed:
            self._write_failed = False
            self.log.info("events_recovered")
        for reply in replies:
            if isinstance(reply, bytes):
                key = _key(reply)
                if key > self._last_written:
                    self._last_written = key

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _run_scripts(self, calls: list[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        """Each call as an EVALSHA in one pipeline (no SCRIPT EXISTS first); the calls whose script Redis does not
        have (NOSCRIPT: a restart, SCRIPT FLUSH) are sent again, in order, once it is loaded. NOSCRIPT means the
        call did nothing, so each goes again under a new number: a later call of the batch that did apply (the
        script loaded by another replica meanwhile) raised the mark past its old one."""
        replies = await self._pipeline(calls)
        missing = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {calls[index][0] for index in missing}:
                await self.client.script_load(script.script)
            again = [(script, keys, [*args[:SEQ], self._next_seq(), *args[SEQ + 1:]])
                     for script, keys, args in (calls[index] for index in missing)]
            for index, reply in zip(missing, await self._pipeline(again)):
                replies[index] = reply
        return replies

    async def _pipeline(self, calls: list[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                if self.in_cluster:  # a cluster's pipelines refuse EVALSHA: EVAL with the script's text
                    pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)

    def _failed(self, exc: BaseException, count: int) -> None:
        if not self._write_failed:
            self._write_failed = True
            self.log.warning("events_unavailable", extra={"error": f"{type(exc).__name__}: {exc}",
                                                          "events_lost": count})

    async def written(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until the log lines sent so far have been written to Redis (or given up); at
        once when none is waiting, so a run that logged nothing ends without waiting for its other events."""
        target = self._logs_queued
        deadline = time.monotonic() + timeout
        while self._logs_done < target and (left := deadline - time.monotonic()) > 0:
            self._batch_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_done.wait(), left)

    async def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until what was published is in Redis and, while a client listens, back through
        the reader."""
        deadline = time.monotonic() + timeout
        while (self._outbox or self._writing or self._position is not None and self._last_read < self._last_written) \
                and time.monotonic() < deadline and self.available:
            await asyncio.sleep(0.01)

    # --- reading -------------------------------------------------------------------------------------------

    async def follow(self) -> None:
        """Until the events stored from now on will reach the sink: at once while the reader follows the stream;
        else once it has read where the stream ends (StoreUnavailable if it cannot)."""
        if self._position is None:
            await self._followers.wait()

    async def _read_forever(self) -> None:
        stream = self.key("events")
        while True:
            try:
                if not self._followers and not self.events.listening():
                    self._position = None  # no client: nothing to read for
                    await self._idle(stream)
                    continue
                if self._position is None:  # a client came: on from the end, what is older is in the backlogs
                    newest = cast(Entries, await self.reader_client.xrevrange(stream, count=1))
                    self._position = newest[0][0] if newest else b"0-0"
                    self._last_read = _key(self._position)
                    self._set_available(True)
                    self._followers.release(None)
                elif not self.available:
                    await self.reader_client.ping()
                self._set_available(True)
                replies = cast("list[tuple[bytes, Entries]] | None",
                               await self.reader_client.xread({stream: self._position}, count=1000,
                                                              block=READ_BLOCK_MS))
                for _, entries in replies or ():
                    for entry_id, fields in entries:
                        self._position = entry_id
                        frame = _frame(entry_id, fields)
                        self._last_read = _key(entry_id)
                        if frame is not None:
                            self.events.deliver(frame)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone or erroring: end the local streams cleanly, then retry
                if self.available:
                    self.log.warning("events_reader_lost", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._set_available(False)
                self._followers.release(StoreUnavailable(f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(RETRY_SECONDS)

    async def _idle(self, stream: str) -> None:
        """While no client listens: check Redis (new streams are refused while it fails), then wait for a client,
        IDLE_CHECK_SECONDS at most."""
        self._followers.wake.clear()  # before the check: a client coming during it is not missed
        await self.reader_client.xlen(stream)  # routed to the stream's node in a cluster, as the reads are
        self._set_available(True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._followers.wake.wait(), IDLE_CHECK_SECONDS)

    def _set_available(self, available: bool) -> None:
        if available == self.available:
            return
        self.available = available
        if not available:
            self.events.end_all("unavailable")

    # --- what a new client gets first ----------------------------------------------------------------------

    async def run_backlog(self, run_id: str, after: tuple[int, int] | None) -> RunBacklog:
        """The run's kept frames from ``after`` on (or all), in one transaction with what says whether they are
        whole: the entry ``after`` itself comes first, or (for all) the stream's record of trimmed entries."""
        stream = self.key("events", "run", run_id)
        async with self.client.pipeline(transaction=True) as pipe:
            if after is None:
                pipe.xrange(stream, "-", "+", count=RUN_BACKLOG_FRAMES)
                pipe.xinfo_stream(stream)  # an error reply when there is no stream: then nothing is kept anyway
            else:
                wanted = f"{after[0]}-{after[1]}"
                pipe.xrange(stream, wanted, "+", count=RUN_BACKLOG_FRAMES + 1)
            pipe.xrevrange(stream, count=1)
            entries, *check, newest = await _guarded(pipe.execute(raise_on_error=False))
        for reply in (entries, newest):
            if isinstance(reply, Exception):
                raise StoreUnavailable(str(reply))
        frames = [frame for entry_id, fields in entries if (frame := _frame(entry_id, fields)) is not None]
        if after is None:
            found = bool(entries) and isinstance(check[0], dict) and _whole(check[0], frames[0] if frames else None)
        else:
            found = bool(entries) and _key(entries[0][0]) == after
        return RunBacklog(frames, found, newest[0][0].decode() if newest else None)

    async def newest_run_event(self, run_id: str) -> str | None:
        newest = await _guarded(self.client.xrevrange(self.key("events", "run", run_id), count=1))
        return newest[0][0].decode() if newest else None

    async def global_after(self, after: tuple[int, int]) -> list[Frame]:
        entries = await _guarded(self.client.xrange(self.key("events", "runs"), f"({after[0]}-{after[1]}", "+",
                                                    count=GLOBAL_BACKLOG_FRAMES))
        return [frame for entry_id, fields in entries if (frame := _frame(entry_id, fields)) is not None]


async def _guarded(awaitable: Any) -> Any:
    """A backlog read; Redis failing is the run store failing (503)."""
    try:
        return await awaitable
    except STORE_ERRORS as exc:
        raise StoreUnavailable(str(exc)) from exc


def _whole(info: dict[Any, Any], first: Frame | None) -> bool:
    """Whether a run's stream still starts with the run's first event: no entry was ever trimmed from it
    (XINFO's max-deleted-entry-id, Redis 7), and it is not a stream that expired and began again (its first
    entry, a run event, is less than the stream's lifetime younger than the run)."""
    deleted = info.get("max-deleted-entry-id", info.get(b"max-deleted-entry-id"))
    if deleted is None or _key(deleted if isinstance(deleted, bytes) else str(deleted).encode()) != (0, 0):
        return False  # trimmed (or a Redis before 7 that does not say)
    if first is None or first.kind != "run":
        return False
    try:
        created = datetime.fromisoformat(json.loads(first.wire.partition(b"\ndata: ")[2])["created_at"])
    except (ValueError, KeyError, TypeError):
        return False
    return first.key[0] - created.timestamp() * 1000 < RUN_STREAM_TTL_SECONDS * 1000


def _key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _frame(entry_id: bytes, fields: dict[bytes, bytes]) -> Frame | None:
    """An entry as a frame; None for one this version cannot read (written by something else)."""
    try:
        kind = fields[b"k"].decode()
        if kind not in ("run", "log") or b"\n" in fields[b"d"] or b"\r" in fields[b"d"]:
            return None  # a line break would end the SSE frame early
        return Frame(entry_id.decode(), kind, fields[b"r"].decode(), fields.get(b"s", b"").decode(), fields[b"d"])
    except (KeyError, UnicodeDecodeError):
        return None
