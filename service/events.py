"""Run events: what GET /agents/events and GET /agents/events/{run_id} stream (Server-Sent Events).

``EventHub`` is this process's event hub (one per runtime). The runner and admission call
``publish_run`` on every change of a run (accepted, queue position, RUNNING,
progress, terminal); agents' ``self.log`` lines reach ``publish_log`` through
``RunLogCapture``, from any thread. Nothing here waits or raises into a run:
publishing appends to bounded buffers and returns.

Each client is a ``Subscriber`` with its own bounded queue of frames; a
client that falls behind by more than ``CLIENT_MAX_FRAMES`` or
``CLIENT_MAX_BYTES`` is dropped (its connection closed), never waited for.
The backend's event transport carries each event and hands it back to
``deliver`` with its id: in memory it numbers the frames and keeps the
backlogs (backends/memory_events.py); in Redis frames go through Redis
Streams and come back through one reader task per replica
(backends/redis/events.py).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable

from service import metrics
from service.backends.base import EventTransport
from service.backends.records import Frame, Run, RunBacklog, encode
from service.logs import LogFormatter, log, log_timestamp

CLIENT_MAX_FRAMES = 1000  # frames a client may have waiting while its writer is stuck on a send
CLIENT_MAX_BYTES = 4 * 1024 * 1024  # bytes of frames a client may have waiting (one frame always fits)
MAX_STREAMS = 1000  # open event streams per process; past it 503, so streams never take every connection
LOG_LINE_MAX_BYTES = 64 * 1024  # a longer self.log line is replaced by a short line saying its size
STREAM_RETRY_MS = 2000  # the retry: every stream sends first, how long an EventSource waits to reconnect
PROGRESS_INTERVAL = 0.05  # progress frames of one run are coalesced to at most one per interval
LOGS_STORED_SECONDS = 2.0  # how long a run's terminal state waits for its log lines to be kept (Redis writes late)
CLOSE_FLUSH_SECONDS = 1.0
BACKLOG_WRITTEN_SECONDS = 1.0  # how long a new run stream waits for this process's events to reach the backlog
TERMINAL_EVENT_WAIT_SECONDS = 1.0  # how long it waits for a finished run's terminal event to reach the backlog  # at shutdown, how long clients get to take their last frames


class Ended(enum.Enum):
    ENDED = "ended"


ENDED = Ended.ENDED  # a run's stream has nothing more for this client (204)


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
        self.position: int | None = None  # a run's stream: the queue position in the last run frame it was given

    def take(self) -> list[Frame]:
        frames = list(self.frames)
        self.frames.clear()
        self.bytes = 0
        return frames


class EventHub:
    """Fan-out of run events to the stream clients of this process, through the backend's event transport."""

    def __init__(self, keepalive: float = 15.0) -> None:
        self.keepalive = keepalive
        self.transport: EventTransport | None = None  # set by start
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        self._run_clients: dict[str, set[Subscriber]] = {}
        self._all_clients: set[Subscriber] = set()
        self._progress: dict[str, asyncio.TimerHandle | asyncio.Handle] = {}
        self._progress_at: dict[str, float] = {}
        self._all_positions: dict[str, int | None] = {}  # the waiting runs' positions the all-runs clients were given

    def start(self, keepalive: float, transport: EventTransport) -> None:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.keepalive, self.transport, self.closed = keepalive, transport, False

    def available(self) -> bool:
        """Whether new streams are served: not once shutdown began, nor while the transport is lost."""
        return not self.closed and self.transport is not None and self.transport.available

    @property
    def streams(self) -> int:
        return len(self._all_clients) + sum(len(clients) for clients in self._run_clients.values())

    def listening(self) -> bool:
        """Whether a stream client here wants frames (while none does, the transport need not read any)."""
        return bool(self._all_clients or self._run_clients)

    # --- publishing (never blocks, never raises into the run) ----------------------------------------------

    def publish_run(self, run: Run, appended: bool = False) -> None:
        """A run changed: one ``run`` frame to its stream and to the stream of all runs. ``appended``: the step that
        stored the change appended its event already (Backend.finish_and_take); it comes back through deliver."""
        pending = self._progress.pop(run.run_id, None)
        if pending is not None:  # this frame carries the latest progress too
            pending.cancel()
        if run.finished:
            self._progress_at.pop(run.run_id, None)
        if not appended:
            self._emit("run", run.run_id, run.state, run.json())

    def publish_progress(self, run: Run) -> None:
        """A progress change: published at once, or coalesced with the next ones within PROGRESS_INTERVAL."""
        if run.run_id in self._progress or self.loop is None:
            return
        now = self.loop.time()
        last = self._progress_at.get(run.run_id, -PROGRESS_INTERVAL)

        def publish() -> None:
            self._progress.pop(run.run_id, None)
            if run.finished:  # its terminal write is under way: its one terminal frame follows that write
                return
            self._progress_at[run.run_id] = self.loop.time() if self.loop else 0.0
            self.publish_run(run)

        self._progress[run.run_id] = self.loop.call_at(max(now, last + PROGRESS_INTERVAL), publish)

    def publish_log(self, run_id: str, line: bytes) -> None:
        """A line the run's agent logged (its stdout JSON): kept with the run, and one ``log`` frame."""
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
        if self.transport is not None:  # comes back through deliver, with its id
            self.transport.send(kind, run_id, state, data)

    def deliver(self, frame: Frame) -> None:
        """Hand a frame to the clients that want it; a client that cannot keep up is dropped."""
        clients = self._run_clients.get(frame.run_id)
        if clients:
            position = position_in(frame) if frame.kind == "run" else None
            for client in list(clients):
                if frame.kind == "run":
                    client.position = position
                self._offer(client, frame)
        if frame.kind == "run":
            for client in list(self._all_clients):
                self._offer(client, frame)

    # --- queue positions (admission.publish_queue): frames of this process's own, for its clients only --------

    def watches_queue(self) -> bool:
        """Whether a client here may want a waiting run's new position (any client of the stream of all runs,
        or of one run's)."""
        return self.listening()

    def watches_all(self) -> bool:
        return bool(self._all_clients)

    def watched_runs(self) -> list[str]:
        """The runs whose streams clients here follow."""
        return list(self._run_clients)

    def seen_first(self, client: Subscriber, first: list[Frame]) -> None:
        """A run's stream starts with ``first``: the position it shows is the one the client has."""
        runs = [frame for frame in first if frame.kind == "run"]
        if runs:
            client.position = position_in(runs[-1])

    def deliver_positions(self, waiting: list[Run], everyone: bool) -> None:
        """The waiting runs' positions as they stand: a frame to each of their run streams' clients whose last
        frame showed another position and, with ``everyone``, to the clients of the stream of all runs (each run
        once per change of its position)."""
        shown: dict[str, int | None] = {}
        for run in waiting:
            frame: Frame | None = None
            for client in list(self._run_clients.get(run.run_id, ())):
                if client.position != run.queue_position:
                    frame = frame or Frame.position(run)
                    client.position = run.queue_position
                    self._offer(client, frame)
            if everyone:
                shown[run.run_id] = run.queue_position
                if self._all_positions.get(run.run_id) != run.queue_position:
                    frame = frame or Frame.position(run)
                    for client in list(self._all_clients):
                        self._offer(client, frame)
        if everyone:
            self._all_positions = shown

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
        """Wait until the log lines published so far are kept with their run: at once in memory; Redis writes
        them in batches, and a run's terminal state waits for its lines (at most ``timeout``)."""
        if self.transport is not None:
            await self.transport.written(timeout)

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

    async def first_run_frames(self, run_id: str, after: tuple[int, int] | None, from_now: bool,
                               read_run: Callable[[str], Awaitable[Run | None]]) -> list[Frame] | None | Ended:
        """The frames a new client of ``run_id`` gets first; None if there is no such run, ENDED if there is
        nothing more for it (it resumes after the run's terminal event: 204). Subscribe before calling this.

        The backlog is read before the run, so an event it holds is reflected in the run, and any later one
        arrives live. Without ``after``: every kept event of the run (with a ``gap`` frame first when its
        first ones are gone), or with ``from_now`` the run as it stands.
        """
        assert self.transport is not None
        await self.transport.follow()  # every event stored from here on comes live: the backlog read next has the rest
        if from_now and after is None:
            newest = await self.transport.newest_run_event(run_id)
            run = await read_run(run_id)
            return None if run is None else [Frame.snapshot(newest or "0-0", run)]
        await self.transport.written(BACKLOG_WRITTEN_SECONDS)  # this process's events so far, in the backlog
        backlog, run = await self._backlog_to_the_end(run_id, after, read_run)
        if run is None:
            return None
        frames = backlog.frames
        ended = run.finished and not any(frame.terminal for frame in frames)  # (its terminal event was lost)
        if after is not None:
            if backlog.found and (frames[0].terminal or ended):
                return ENDED  # it had the terminal event
            if backlog.found:
                return frames[1:]
            if ended:
                return ENDED  # its id is long gone and the run is over: GET /agents/status/{run_id} has the end
        if not backlog.found:
            frames = [Frame.gap(run_id, frames[0].id if frames else None), *frames]
        if len(frames) == 1 and not backlog.found or ended:
            frames.append(Frame.snapshot(backlog.newest or "0-0", run))  # nothing kept, or its end never came
        return frames

    async def _backlog_to_the_end(self, run_id: str, after: tuple[int, int] | None,
                                  read_run: Callable[[str], Awaitable[Run | None]]) -> tuple[RunBacklog, Run | None]:
        """The run's backlog, then the run. A run is stored finished a moment before its terminal event is
        published (by whichever replica ran it): a finished run whose backlog lacks that event is read again
        for up to TERMINAL_EVENT_WAIT_SECONDS, so a client does not get the end twice (as the run stored,
        then as the event)."""
        assert self.transport is not None
        deadline = time.monotonic() + TERMINAL_EVENT_WAIT_SECONDS
        while True:
            backlog = await self.transport.run_backlog(run_id, after)
            run = await read_run(run_id)
            if run is None or not run.finished or any(frame.terminal for frame in backlog.frames) or \
                    time.monotonic() >= deadline:
                return backlog, run
            await asyncio.sleep(0.05)

    async def first_global_frames(self, after: tuple[int, int] | None) -> list[Frame]:
        """The frames a new client of the stream of all runs gets first: those after ``after``, or none. Subscribe
        before calling this: once it returns, every event stored from then on reaches the client live."""
        if self.transport is None:
            return []
        await self.transport.follow()
        return [] if after is None else await self.transport.global_after(after)

    # --- shutdown ------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """End every stream: first let what was published reach the clients, then close the slow ones."""
        if self.closed:
            return
        self.closed = True
        for handle in self._progress.values():
            handle.cancel()
        self._progress.clear()
        if self.transport is not None:
            await self.transport.flush(CLOSE_FLUSH_SECONDS)
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
        if self.transport is not None:
            await self.transport.stop()


def position_in(frame: Frame) -> int | None:
    """The queue position a run frame shows."""
    try:
        position = json.loads(frame.wire.partition(b"\ndata: ")[2])["queue_position"]
    except (ValueError, KeyError, TypeError):
        return None
    return position if isinstance(position, int) else None


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


def capture_agent_logs(hub: EventHub) -> None:
    """Send the lines agents log to ``hub`` (and to no hub of an earlier runtime)."""
    logger = logging.getLogger("agents")
    for handler in [handler for handler in logger.handlers if isinstance(handler, RunLogCapture)]:
        logger.removeHandler(handler)
    logger.addHandler(RunLogCapture(hub))
