"""Run events: what GET /agents/events and GET /agents/events/{run_id} stream (Server-Sent Events).

``hub`` is this process's event hub. The runner and admission call
``publish_run`` on every change of a run (accepted, queue position, RUNNING,
progress, terminal); agents' ``self.log`` lines reach ``publish_log`` through
``RunLogCapture``, from any thread. Nothing here waits or raises into a run:
publishing appends to bounded buffers and returns.

Each client is a ``Subscriber`` with its own bounded queue of frames; a
client that falls behind by more than ``CLIENT_MAX_FRAMES`` or
``CLIENT_MAX_BYTES`` is dropped (its connection closed), never waited for.
In memory mode the hub numbers the frames and keeps the backlogs; in Redis
mode (redis_events.py) frames go through Redis Streams and come back through
one reader task per replica, which hands them to ``deliver``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import metrics
from logs import LogFormatter, log, log_timestamp
from store import Run, encode

CLIENT_MAX_FRAMES = 1000  # frames a client may have waiting while its writer is stuck on a send
CLIENT_MAX_BYTES = 4 * 1024 * 1024  # bytes of frames a client may have waiting (one frame always fits)
RUN_BACKLOG_FRAMES = 200  # frames kept per run for Last-Event-ID (memory mode; Redis keeps the same)
RUN_BACKLOG_BYTES = 1024 * 1024
RUN_BACKLOGS_BYTES = 8 * 1024 * 1024  # all runs' backlogs together (memory mode): least recent dropped first
FINISHED_BACKLOGS = 50  # finished runs whose backlog is kept (memory mode); an older one resumes from its end
GLOBAL_BACKLOG_FRAMES = 1000  # frames of GET /agents/events kept for Last-Event-ID
GLOBAL_BACKLOG_BYTES = 4 * 1024 * 1024
MAX_STREAMS = 1000  # open event streams per process; past it 503, so streams never take every connection
LOG_LINE_MAX_BYTES = 64 * 1024  # a longer self.log line is replaced by a short line saying its size
PROGRESS_INTERVAL = 0.05  # progress frames of one run are coalesced to at most one per interval
LOGS_STORED_SECONDS = 2.0  # Redis mode: how long a run's terminal state waits for its log lines to be written
CLOSE_FLUSH_SECONDS = 1.0  # at shutdown, how long clients get to take their last frames
EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})")


def parse_event_id(raw: str | None) -> tuple[int, int] | None:
    """A Last-Event-ID as a comparable key; None for a missing or foreign one (then it is ignored)."""
    match = EVENT_ID.fullmatch(raw.strip()) if raw else None
    if match is None or int(match[1]) >= 2 ** 63 or int(match[2]) >= 2 ** 63:  # past any id made here or by Redis
        return None
    return int(match[1]), int(match[2])


class Frame:
    """One event as it goes on the wire, encoded once and shared by every client that receives it."""

    __slots__ = ("id", "key", "kind", "run_id", "terminal", "wire")

    def __init__(self, event_id: str, kind: str, run_id: str, state: str, data: bytes) -> None:
        self.id = event_id
        self.key = parse_event_id(event_id) or (0, 0)
        self.kind = kind  # "run" or "log"
        self.run_id = run_id
        self.terminal = kind == "run" and state in ("DONE", "ERROR", "CANCELLED")
        self.wire = b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), kind.encode(), data)

    @classmethod
    def snapshot(cls, event_id: str, run: Run) -> Frame:
        """A ``run`` frame of the run as it stands (read from the store), under the id of the last event seen."""
        return cls(event_id, "run", run.run_id, run.state, run.json())


class Backlog:
    """The last frames of a stream, bounded by count and bytes (the newest frame is always kept)."""

    __slots__ = ("frames", "bytes", "max_frames", "max_bytes")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.frames: deque[Frame] = deque()
        self.bytes = 0
        self.max_frames, self.max_bytes = max_frames, max_bytes

    def add(self, frame: Frame) -> int:
        """Append ``frame``; returns the change in bytes held."""
        before = self.bytes
        self.frames.append(frame)
        self.bytes += len(frame.wire)
        while len(self.frames) > 1 and (len(self.frames) > self.max_frames or self.bytes > self.max_bytes):
            self.bytes -= len(self.frames.popleft().wire)
        return self.bytes - before

    def after(self, key: tuple[int, int]) -> list[Frame]:
        return [frame for frame in self.frames if frame.key > key]

    def has(self, key: tuple[int, int]) -> bool:
        return any(frame.key == key for frame in self.frames)


class Subscriber:
    """One stream client: the frames waiting for it, and whether it has ended (and why)."""

    def __init__(self, run_id: str | None, abort: Callable[[], None] | None) -> None:
        self.run_id = run_id  # None: the stream of all runs
        self.abort = abort  # closes the client's connection (a send blocked on a full socket returns)
        self.frames: deque[Frame] = deque()
        self.bytes = 0
        self.wake = asyncio.Event()
        self.sending = False  # its writer waits on a send: the client is not reading as fast as frames come
        self.ended: str | None = None  # "disconnected", "slow", "shutdown" or "unavailable"

    def take(self) -> list[Frame]:
        frames = list(self.frames)
        self.frames.clear()
        self.bytes = 0
        return frames


class EventHub:
    """Fan-out of run events to the stream clients of this process, and (memory mode) their backlogs."""

    def __init__(self) -> None:
        self.keepalive = 15.0
        self.redis: Any = None  # redis_events.RedisEvents in Redis mode
        self.on_log: Callable[[str, bytes], None] = lambda run_id, line: None  # memory mode: keep the line
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        self._run_clients: dict[str, set[Subscriber]] = {}
        self._all_clients: set[Subscriber] = set()
        self._backlogs: OrderedDict[str, Backlog] = OrderedDict()  # memory mode, least recently used first
        self._backlogs_bytes = 0
        self._finished_backlogs: deque[str] = deque()  # runs whose backlog ends with their terminal frame
        self._global = Backlog(GLOBAL_BACKLOG_FRAMES, GLOBAL_BACKLOG_BYTES)
        self._epoch = int(time.time() * 1000)  # ids of a restarted process are larger than the last one's
        self._seq = 0
        self._progress: dict[str, asyncio.TimerHandle | asyncio.Handle] = {}
        self._progress_at: dict[str, float] = {}

    def start(self, keepalive: float, redis: Any = None, on_log: Callable[[str, bytes], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.keepalive, self.redis, self.closed = keepalive, redis, False
        if on_log is not None:
            self.on_log = on_log

    def available(self) -> bool:
        """Whether new streams are served: not once shutdown began, nor while Redis is lost."""
        return not self.closed and (self.redis is None or self.redis.available)

    @property
    def streams(self) -> int:
        return len(self._all_clients) + sum(len(clients) for clients in self._run_clients.values())

    # --- publishing (never blocks, never raises into the run) ----------------------------------------------

    def publish_run(self, run: Run) -> None:
        """A run changed: one ``run`` frame to its stream and to the stream of all runs."""
        pending = self._progress.pop(run.run_id, None)
        if pending is not None:  # this frame carries the latest progress too
            pending.cancel()
        if run.finished:
            self._progress_at.pop(run.run_id, None)
        self._emit("run", run.run_id, run.state, run.json())

    def publish_progress(self, run: Run) -> None:
        """A progress change: published at once, or coalesced with the next ones within PROGRESS_INTERVAL."""
        if run.run_id in self._progress or self.loop is None:
            return
        now = self.loop.time()
        last = self._progress_at.get(run.run_id, -PROGRESS_INTERVAL)

        def publish() -> None:
            self._progress.pop(run.run_id, None)
            self._progress_at[run.run_id] = self.loop.time() if self.loop else 0.0
            self.publish_run(run)

        self._progress[run.run_id] = self.loop.call_at(max(now, last + PROGRESS_INTERVAL), publish)

    def publish_log(self, run_id: str, line: bytes) -> None:
        """A line the run's agent logged (its stdout JSON): kept with the run, and one ``log`` frame."""
        if self.redis is None:
            try:
                self.on_log(run_id, line)
            except Exception as exc:  # keeping a log line must never cost the run anything
                log.warning("run_log_not_kept", extra={"run_id": run_id, "error": f"{type(exc).__name__}: {exc}"})
        self._emit("log", run_id, "", line)

    def publish_log_from_any_thread(self, run_id: str, line: bytes) -> None:
        loop = self.loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self.publish_log(run_id, line)
            return
        try:
            loop.call_soon_threadsafe(self.publish_log, run_id, line)
        except RuntimeError:  # the loop is closed: the process is ending
            pass

    def _emit(self, kind: str, run_id: str, state: str, data: bytes) -> None:
        if self.redis is not None:
            self.redis.send(kind, run_id, state, data)  # comes back through the reader, with its Redis id
            return
        self._seq += 1
        frame = Frame(f"{self._epoch}-{self._seq}", kind, run_id, state, data)
        backlog = self._backlogs.get(run_id)
        if backlog is None:
            backlog = self._backlogs[run_id] = Backlog(RUN_BACKLOG_FRAMES, RUN_BACKLOG_BYTES)
        else:
            self._backlogs.move_to_end(run_id)
        self._backlogs_bytes += backlog.add(frame)
        if frame.terminal:
            self._finished_backlogs.append(run_id)
            while len(self._finished_backlogs) > FINISHED_BACKLOGS:
                dropped = self._backlogs.pop(self._finished_backlogs.popleft(), None)
                self._backlogs_bytes -= dropped.bytes if dropped is not None else 0
        while self._backlogs_bytes > RUN_BACKLOGS_BYTES and len(self._backlogs) > 1:
            self._backlogs_bytes -= self._backlogs.popitem(last=False)[1].bytes
        if kind == "run":
            self._global.add(frame)
        self.deliver(frame)

    def deliver(self, frame: Frame) -> None:
        """Hand a frame to the clients that want it; a client that cannot keep up is dropped."""
        clients = self._run_clients.get(frame.run_id)
        if clients:
            for client in list(clients):
                self._offer(client, frame)
        if frame.kind == "run":
            for client in list(self._all_clients):
                self._offer(client, frame)

    def _offer(self, client: Subscriber, frame: Frame) -> None:
        """Queue ``frame`` for ``client``, or drop the client if it is behind.

        Past CLIENT_MAX_BYTES a client is always dropped (that bounds memory).
        Past CLIENT_MAX_FRAMES only while its writer waits on a send: frames
        piling up while the writer has had no turn yet (an agent logging a
        thousand lines without yielding) say nothing about the client.
        """
        if client.frames and (client.bytes + len(frame.wire) > CLIENT_MAX_BYTES
                              or (client.sending and len(client.frames) >= CLIENT_MAX_FRAMES)):
            self.drop(client, "slow")
            return
        client.frames.append(frame)
        client.bytes += len(frame.wire)
        client.wake.set()

    async def logs_stored(self, timeout: float) -> None:
        """Wait until the log lines published so far are kept with their run: at once in memory mode; Redis
        mode writes them in batches, and a run's terminal state waits for its lines (at most ``timeout``)."""
        if self.redis is not None:
            await self.redis.written(timeout)

    # --- clients -------------------------------------------------------------------------------------------

    def subscribe(self, run_id: str | None, abort: Callable[[], None] | None) -> Subscriber:
        client = Subscriber(run_id, abort)
        if run_id is None:
            self._all_clients.add(client)
        else:
            self._run_clients.setdefault(run_id, set()).add(client)
        metrics.EVENT_STREAMS.set(self.streams)
        return client

    def unsubscribe(self, client: Subscriber, reason: str = "disconnected") -> None:
        if client.ended is None:
            client.ended = reason
        client.wake.set()
        if client.run_id is None:
            self._all_clients.discard(client)
        else:
            clients = self._run_clients.get(client.run_id)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._run_clients[client.run_id]
        metrics.EVENT_STREAMS.set(self.streams)

    def drop(self, client: Subscriber, reason: str) -> None:
        """End a client's stream now and close its connection (it is too slow, or events are unavailable)."""
        if client.ended is not None:
            return
        self.unsubscribe(client, reason)
        if reason == "slow":
            metrics.EVENT_STREAMS_DROPPED.inc()
            log.warning("event_stream_dropped", extra={"run_id": client.run_id, "reason": reason,
                                                       "frames_waiting": len(client.frames)})
            client.frames.clear()
            if client.abort is not None:
                client.abort()

    def end_all(self, reason: str) -> None:
        """End every stream after the frames it already has (shutdown, or Redis lost)."""
        for client in [*self._all_clients, *(c for cs in self._run_clients.values() for c in cs)]:
            self.unsubscribe(client, reason)

    def clients(self) -> list[Subscriber]:
        return [*self._all_clients, *(c for cs in self._run_clients.values() for c in cs)]

    # --- what a new client gets first ----------------------------------------------------------------------

    async def first_run_frames(self, run_id: str, after: tuple[int, int] | None,
                               read_run: Callable[[str], Any]) -> list[Frame] | None:
        """The frames a new client of ``run_id`` gets first: those after ``after`` when they are all still
        kept, else the run as it stands now; None if there is no such run. Subscribe before calling this."""
        if self.redis is not None:
            return await self.redis.first_run_frames(run_id, after, read_run)
        backlog = self._backlogs.get(run_id)
        if after is not None and backlog is not None and backlog.has(after) and \
                (run := await read_run(run_id)) is not None:
            frames = backlog.after(after)
            if not run.finished or any(frame.terminal for frame in frames):
                return frames
            # a client that had the terminal frame (an EventSource reconnects): the run again, then the end
        last_id = backlog.frames[-1].id if backlog is not None and backlog.frames else f"{self._epoch}-0"
        run = await read_run(run_id)
        return None if run is None else [Frame.snapshot(last_id, run)]

    async def first_global_frames(self, after: tuple[int, int] | None) -> list[Frame]:
        if after is None:
            return []
        if self.redis is not None:
            return await self.redis.global_after(after)
        return self._global.after(after)

    # --- shutdown ------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """End every stream: first let what was published reach the clients, then close the slow ones."""
        if self.closed:
            return
        self.closed = True
        for handle in self._progress.values():
            handle.cancel()
        self._progress.clear()
        if self.redis is not None:
            await self.redis.flush(CLOSE_FLUSH_SECONDS)
        clients = self.clients()
        self.end_all("shutdown")
        deadline = time.monotonic() + CLOSE_FLUSH_SECONDS
        while any(client.frames for client in clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in clients:
            if client.frames and client.abort is not None:
                client.abort()

    async def stop(self) -> None:
        await self.close()
        if self.redis is not None:
            await self.redis.stop()


hub = EventHub()


class RunLogCapture(logging.Handler):
    """On the ``agents`` logger: each line an agent logs through ``self.log`` goes to its run's stream and log.

    The line is formatted as on stdout; emit may run in an agent's thread, and
    hands the line to the event loop without waiting.
    """

    def __init__(self, events: EventHub) -> None:
        super().__init__()
        self.setFormatter(LogFormatter())
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        run_id = getattr(record, "run_id", None)
        if not isinstance(run_id, str):
            return
        try:
            line = self.format(record).encode()
        except Exception:  # stdout's handler reports a line it cannot format; here it is just skipped
            return
        if len(line) > LOG_LINE_MAX_BYTES:
            line = encode({"timestamp": log_timestamp(record.created), "level": record.levelname.lower(),
                           "event": str(record.msg)[:200], "run_id": run_id, "line_too_large_bytes": len(line)})
        self.events.publish_log_from_any_thread(run_id, line)


def capture_agent_logs() -> None:
    logger = logging.getLogger("agents")
    if not any(isinstance(handler, RunLogCapture) for handler in logger.handlers):
        logger.addHandler(RunLogCapture(hub))
