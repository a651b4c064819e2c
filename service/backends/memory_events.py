"""Memory mode's event transport: frames numbered in this process, with the backlogs Last-Event-ID resumes from.

A run's backlog is kept while the run is recent (the FINISHED_BACKLOGS last finished runs, RUN_BACKLOGS_BYTES
of all of them, least recently used dropped first); GET /agents/events has a backlog of its own.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from service.backends.base import FrameSink
from service.backends.records import (GLOBAL_BACKLOG_BYTES, GLOBAL_BACKLOG_FRAMES, RUN_BACKLOG_BYTES,
                                      RUN_BACKLOG_FRAMES, Frame, RunBacklog)

RUN_BACKLOGS_BYTES = 8 * 1024 * 1024  # all runs' backlogs together: least recent dropped first
FINISHED_BACKLOGS = 50  # finished runs whose backlog is kept; an older one resumes from its end


class Backlog:
    """The last frames of a stream, bounded by count and bytes (the newest frame is always kept)."""

    __slots__ = ("frames", "bytes", "max_frames", "max_bytes", "trimmed")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.frames: deque[Frame] = deque()
        self.bytes = 0
        self.trimmed = False  # its first frames were dropped
        self.max_frames, self.max_bytes = max_frames, max_bytes

    def add(self, frame: Frame) -> int:
        """Append ``frame``; returns the change in bytes held."""
        before = self.bytes
        self.frames.append(frame)
        self.bytes += len(frame.wire)
        while len(self.frames) > 1 and (len(self.frames) > self.max_frames or self.bytes > self.max_bytes):
            self.bytes -= len(self.frames.popleft().wire)
            self.trimmed = True
        return self.bytes - before

    def after(self, key: tuple[int, int]) -> list[Frame]:
        return [frame for frame in self.frames if frame.key > key]

    def since(self, key: tuple[int, int]) -> list[Frame]:
        return [frame for frame in self.frames if frame.key >= key]

    def has(self, key: tuple[int, int]) -> bool:
        return any(frame.key == key for frame in self.frames)


class MemoryEvents:
    """Numbers each event, keeps it in its backlogs and hands it to the sink at once; log lines are kept with
    their run by ``keep_log``."""

    available = True

    def __init__(self, sink: FrameSink, keep_log: Callable[[str, bytes], None], log: logging.Logger) -> None:
        self.sink = sink
        self.keep_log = keep_log
        self.log = log
        self._backlogs: OrderedDict[str, Backlog] = OrderedDict()  # least recently used first
        self._backlogs_bytes = 0
        self._finished_backlogs: deque[str] = deque()  # runs whose backlog ends with their terminal frame
        self._global = Backlog(GLOBAL_BACKLOG_FRAMES, GLOBAL_BACKLOG_BYTES)
        self._epoch = int(time.time() * 1000)  # ids of a restarted process are larger than the last one's
        self._seq = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def send(self, kind: str, run_id: str, state: str, data: bytes) -> None:
        if kind == "log":
            try:
                self.keep_log(run_id, data)
            except Exception as exc:  # keeping a log line must never cost the run anything
                self.log.warning("run_log_not_kept", extra={"run_id": run_id,
                                                            "error": f"{type(exc).__name__}: {exc}"})
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
        self.sink.deliver(frame)

    async def written(self, timeout: float) -> None:
        pass  # kept as it was sent

    async def flush(self, timeout: float) -> None:
        pass  # delivered as it was sent

    async def follow(self) -> None:
        pass  # each event is delivered as it is sent

    async def run_backlog(self, run_id: str, after: tuple[int, int] | None) -> RunBacklog:
        backlog = self._backlogs.get(run_id)
        if backlog is None or not backlog.frames:  # never had one (a run of an earlier process), or dropped
            return RunBacklog([], False, None)
        if after is None:
            return RunBacklog(list(backlog.frames), not backlog.trimmed, backlog.frames[-1].id)
        return RunBacklog(backlog.since(after), backlog.has(after), backlog.frames[-1].id)

    async def newest_run_event(self, run_id: str) -> str | None:
        backlog = self._backlogs.get(run_id)
        return backlog.frames[-1].id if backlog is not None and backlog.frames else None

    async def global_after(self, after: tuple[int, int]) -> list[Frame]:
        return self._global.after(after)
