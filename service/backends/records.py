"""The run record, and the run lock and run store behind one small interface.

Memory mode keeps both in this process. The runner only ever calls the
methods below, so another backend (Redis) slots in without touching it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


STATES = ("PENDING", "RUNNING", "DONE", "ERROR", "CANCELLED")
TERMINAL_STATES = frozenset({"DONE", "ERROR", "CANCELLED"})


def utc_now() -> str:
    """The current time as RFC 3339 UTC with millisecond precision, ending in Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


RUN_OVERHEAD_BYTES = 600  # a Run object, its dict entry and index slots, beyond its JSON
LOG_LINES_MAX = 500  # log lines kept per run (the newest), and at most LOG_BYTES_MAX of them
LOG_BYTES_MAX = 256 * 1024
LOG_LINE_OVERHEAD_BYTES = 48  # a bytes object and its deque slot, beyond the line
PUBLIC_FIELDS = ("run_id", "agent_type", "user_id", "input", "state", "result", "error", "progress",
                 "created_at", "started_at", "finished_at", "queue_position", "cancelled_by", "webhook")
ON_BUSY = ("reject", "enqueue", "interrupt")  # what POST /agents/run does when every slot is taken


# Webhook deliveries owed at once (memory: in this process; Redis: in Redis, for every replica) and their bodies'
# bytes; past either, a new one is logged as failed (webhook_failed, final, attempt 0), counted undelivered and
# dropped: a receiver down, or no replica able to send, under a flood of runs.
MAX_OWED = 10000
MAX_OWED_BYTES = 64 * 1024 * 1024


class RunRecordInvalid(ValueError):
    """A stored run record this version cannot read (malformed, or missing what every run has)."""


STRICT_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once: json.dumps makes one a call


def encode(value: Any) -> bytes:
    """Compact, strict JSON (no NaN or Infinity), as every body the service writes."""
    return STRICT_ENCODER.encode(value).encode()


@dataclass(slots=True)
class Run:
    """One run of one agent, as clients see it (plus the lock holder's token).

    ``input`` and ``result`` are kept as their encoded JSON, not as object
    trees: what is kept is what is counted against RUN_RETENTION_MB, and a
    small body cannot become megabytes of Python objects.
    """

    run_id: str
    agent_type: str
    user_id: str
    input_json: bytes = b"{}"
    state: str = "PENDING"
    result_json: bytes = b"null"
    error: str | None = None
    progress: float | None = None
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    queue_position: int | None = None  # 1 = next, while the run waits in the queue
    cancelled_by: str | None = None  # the run that interrupted this one
    webhook: str | None = None  # POSTed the run once it is terminal (webhooks.py)
    holder: str | None = None  # token of the run lock taken for this run; not shown to clients
    _json: bytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def new(cls, run_id: str, agent_type: str, user_id: str, input: dict[str, Any], holder: str | None,
            webhook: str | None = None) -> Run:
        return cls(run_id, agent_type, user_id, encode(input), holder=holder, webhook=webhook)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def size(self) -> int:
        """Bytes this run costs in a store: its JSON plus a fixed overhead."""
        return len(self.json()) + RUN_OVERHEAD_BYTES

    def update(self, **changes: Any) -> None:
        """Change fields; the cached JSON is rebuilt on the next read."""
        for name, value in changes.items():
            setattr(self, name, value)
        self._json = None

    def json(self) -> bytes:
        """The client-facing JSON, serialised once per change rather than per request."""
        if self._json is None:
            head = encode({"run_id": self.run_id, "agent_type": self.agent_type, "user_id": self.user_id})
            tail = encode({"error": self.error, "progress": self.progress, "created_at": self.created_at,
                           "started_at": self.started_at, "finished_at": self.finished_at,
                           "queue_position": self.queue_position, "cancelled_by": self.cancelled_by,
                           "webhook": self.webhook})
            self._json = b"".join((head[:-1], b',"input":', self.input_json, b',"state":', encode(self.state),
                                   b',"result":', self.result_json, b",", tail[1:]))
        return self._json

    def copy(self) -> Run:
        return Run(self.run_id, self.agent_type, self.user_id, self.input_json, self.state, self.result_json,
                   self.error, self.progress, self.created_at, self.started_at, self.finished_at,
                   queue_position=self.queue_position, cancelled_by=self.cancelled_by, webhook=self.webhook,
                   holder=self.holder, _json=self._json)

    @classmethod
    def from_json(cls, raw: bytes, holder: str | None = None) -> Run:
        """A run read back from its client-facing JSON, tolerantly: a record written by another version
        (unknown fields, optional ones missing) is read; one without what every run has raises RunRecordInvalid."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise RunRecordInvalid("not JSON") from None
        if not isinstance(data, dict):
            raise RunRecordInvalid("not a JSON object")
        for name in ("run_id", "agent_type", "user_id"):
            if not isinstance(data.get(name), str):
                raise RunRecordInvalid(f"{name} is missing or not a string")
        if data.get("state") not in STATES:
            raise RunRecordInvalid("state is missing or unknown")

        def text(name: str) -> str | None:
            value = data.get(name)
            return value if isinstance(value, str) else None

        progress = data.get("progress")
        input = data.get("input")
        position = data.get("queue_position")
        try:
            run = cls(
                run_id=data["run_id"], agent_type=data["agent_type"], user_id=data["user_id"],
                input_json=encode(input if isinstance(input, dict) else {}), state=data["state"],
                result_json=encode(data.get("result")), error=text("error"),
                progress=float(progress) if isinstance(progress, (int, float)) and not isinstance(progress, bool)
                else None,
                created_at=text("created_at") or "", started_at=text("started_at"),
                finished_at=text("finished_at"), cancelled_by=text("cancelled_by"), webhook=text("webhook"),
                holder=holder,
                queue_position=position if isinstance(position, int) and not isinstance(position, bool) else None)
        except ValueError:  # a non-finite number somewhere
            raise RunRecordInvalid("holds a number JSON cannot carry") from None
        if (tuple(data) == PUBLIC_FIELDS and isinstance(input, dict) and run.progress == progress
                and run.queue_position == position):
            run._json = raw  # served as read: this version wrote it
        return run


class Page:
    """One answer of GET /agents/runs: the runs that match, newest first, up to ``limit`` and ``max_bytes``.

    Stores offer runs in order until ``offer`` answers False. The byte cap
    keeps at least one run, so paging with ``before`` always moves on.
    """

    def __init__(self, limit: int, *, state: str | None = None, agent_type: str | None = None,
                 user_id: str | None = None, max_bytes: int | None = None) -> None:
        self.limit, self.max_bytes = limit, max_bytes
        self.state, self.agent_type, self.user_id = state, agent_type, user_id
        self.runs: list[Run] = []
        self._bytes = 0

    def offer(self, run: Run) -> bool:
        """Take ``run`` if it matches the filters; False once the page is full."""
        if ((self.state is None or run.state == self.state)
                and (self.agent_type is None or run.agent_type == self.agent_type)
                and (self.user_id is None or run.user_id == self.user_id)):
            self._bytes += len(run.json()) + 1
            if self.max_bytes is not None and self.runs and self._bytes > self.max_bytes:
                return False
            self.runs.append(run)
        return len(self.runs) < self.limit


class RunLog:
    """The newest lines a run's agent logged (its stdout JSON lines), within LOG_LINES_MAX and LOG_BYTES_MAX."""

    __slots__ = ("lines", "bytes")

    def __init__(self) -> None:
        self.lines: deque[bytes] = deque()
        self.bytes = 0  # what the lines cost in memory, counted in the retention budget

    def append(self, line: bytes) -> int:
        """Keep ``line``, dropping the oldest past the bounds; returns the change in bytes."""
        before = self.bytes
        self.lines.append(line)
        self.bytes += len(line) + LOG_LINE_OVERHEAD_BYTES
        while self.lines and (len(self.lines) > LOG_LINES_MAX
                              or self.bytes - LOG_LINE_OVERHEAD_BYTES * len(self.lines) > LOG_BYTES_MAX):
            self.bytes -= len(self.lines.popleft()) + LOG_LINE_OVERHEAD_BYTES
        return self.bytes - before


class MemoryRunLock:
    """The run lock of one process: ``slots`` holder tokens at most (MAX_CONCURRENT_RUNS). Never waits."""

    renew_interval: float | None = None  # nothing to renew in memory

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self._tokens: set[str] = set()

    def free(self) -> bool:
        return len(self._tokens) < self.slots

    def take(self) -> str | None:
        """A slot's token if one is free, else None; no await, so it is atomic with what the caller does next."""
        if not self.free():
            return None
        token = uuid.uuid4().hex
        self._tokens.add(token)
        return token

    async def try_acquire(self) -> str | None:
        return self.take()

    async def release(self, token: str) -> None:
        self._tokens.discard(token)

    async def renew(self, run: Run) -> bool:
        return False  # never called: nothing to renew in memory


class MemoryRunStore:
    """Runs in a dict in creation order; keeps at most ``retention`` finished runs and ``retention_bytes`` of them."""

    def __init__(self, retention: int, retention_bytes: int = 256 * 1024 * 1024) -> None:
        self.retention = retention
        self.retention_bytes = retention_bytes
        self._finished_bytes = 0
        self.on_cancel: Callable[[str, str | None], None] = lambda run_id, by: None
        self.on_work: Callable[[], None] = lambda: None
        self.on_finished: Callable[[Run], None] = lambda run: None  # first terminal save of a run with a webhook
        self._runs: dict[str, Run] = {}
        self._finished: deque[str] = deque()  # finished run ids, oldest first
        self._finish_events: dict[str, asyncio.Event] = {}
        self._queue: deque[Run] = deque()  # waiting runs, next first
        self._logs: dict[str, RunLog] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def check(self) -> None:
        pass

    def note_progress(self, run: Run) -> None:
        pass  # the stored run is the object the agent updates

    async def claim_orphans(self, lock: MemoryRunLock) -> list[Run]:
        return []  # one process: no other holder can leave a run behind

    async def request_cancel(self, run_id: str, by: str | None = None) -> None:
        pass  # one process: the runner cancels its own run directly

    async def cancel_requested(self, run_id: str) -> tuple[bool, str | None]:
        return False, None

    async def add(self, run: Run) -> None:
        self._add(run)

    def _add(self, run: Run) -> None:
        self._runs[run.run_id] = run
        self._finish_events[run.run_id] = asyncio.Event()

    def unfinished(self, run_id: str) -> bool:
        """Whether ``run_id`` is stored and not finished (retention never drops it, nor its Idempotency-Key)."""
        return run_id in self._finish_events

    def refusal(self, lock: MemoryRunLock, on_busy: str, queue_max: int) -> str | None:
        """"busy" or "full" when ``admit`` would refuse a run now, else None; exact, as nothing awaits in
        between, so a refused POST never builds a run."""
        if not self._queue and lock.free():
            return None
        if on_busy == "reject":
            return "busy"
        return "full" if len(self._queue) >= queue_max else None

    async def admit(self, run: Run, lock: MemoryRunLock, on_busy: str, queue_max: int, claim: None = None) -> str:
        """In one step: start ``run`` on a free slot when nobody waits ("started", ``run.holder`` set),
        else queue it if ``on_busy`` allows and there is room ("queued"), else "busy" or "full".
        ``claim`` is Redis's: an Idempotency-Key claimed here is never lost while its request runs."""
        refused = self.refusal(lock, on_busy, queue_max)
        if refused is not None:
            return refused
        if not self._queue and (token := lock.take()) is not None:
            run.holder = token
            self._add(run)
            return "started"
        self._add(run)
        if on_busy == "interrupt":
            self._queue.appendleft(run)
        else:
            self._queue.append(run)
        self._number_queue()
        return "queued"

    async def take(self, lock: MemoryRunLock) -> Run | None:
        """The head of the queue on a free slot (``holder`` set), or None: one step, so never two takers."""
        if not self._queue or (token := lock.take()) is None:
            return None
        run = self._queue.popleft()
        run.holder = token
        run.update(queue_position=None)
        self._number_queue()
        return run

    async def dequeue(self, run_id: str, **changes: Any) -> Run | None:
        """Take a waiting run out of the queue and store it with ``changes`` (its terminal state), in one step;
        None if it no longer waits."""
        for run in self._queue:
            if run.run_id == run_id:
                self._queue.remove(run)
                run.update(queue_position=None, **changes)
                self._number_queue()
                await self.save(run)
                return run
        return None

    async def queue_length(self) -> int:
        return len(self._queue)

    async def waiting(self) -> list[Run]:
        return list(self._queue)

    def _number_queue(self) -> None:
        for position, run in enumerate(self._queue, 1):
            if run.queue_position != position:
                run.update(queue_position=position)

    async def save(self, run: Run, release: MemoryRunLock | None = None) -> None:
        """Store a change; a terminal state wakes its waiters and may drop the oldest finished run.

        With ``release``, the run's lock is released in the same step (nothing
        in between yields), so a client that sees the terminal state can start
        the next run at once.
        """
        self._runs[run.run_id] = run
        if not run.finished:
            return
        if release is not None and run.holder is not None:
            await release.release(run.holder)
        event = self._finish_events.pop(run.run_id, None)
        if event is None:
            return  # finished before: counted once
        event.set()
        if run.webhook is not None:
            self.on_finished(run)  # in the same step as the terminal state: the delivery is owed from here
        self._finished.append(run.run_id)
        log = self._logs.get(run.run_id)
        self._finished_bytes += run.size + (log.bytes if log is not None else 0)
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest finished runs, with their logs, while more are kept than retention allows."""
        while len(self._finished) > self.retention or self._finished_bytes > self.retention_bytes:
            run_id = self._finished.popleft()
            log = self._logs.pop(run_id, None)
            self._finished_bytes -= self._runs.pop(run_id).size + (log.bytes if log is not None else 0)

    def append_log(self, run_id: str, line: bytes) -> None:
        """Keep a line the run's agent logged; a finished run's counted size grows with it."""
        if run_id not in self._runs:
            return  # dropped already (or never stored)
        log = self._logs.get(run_id)
        if log is None:
            log = self._logs[run_id] = RunLog()
        change = log.append(line)
        if run_id not in self._finish_events and self._runs[run_id].finished:  # counted in _finished_bytes
            self._finished_bytes += change
            self._trim()

    async def logs(self, run_id: str) -> list[bytes] | None:
        """The lines the run's agent logged, oldest first; None when the run is not stored."""
        if run_id not in self._runs:
            return None
        log = self._logs.get(run_id)
        return list(log.lines) if log is not None else []

    async def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    async def wait_finished(self, run_id: str, timeout: float) -> Run | None:
        """The run once it is terminal, or as it stands after ``timeout`` seconds."""
        event = self._finish_events.get(run_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                pass
        return self._runs.get(run_id)

    async def list(self, page: Page, before: str | None = None) -> list[Run]:
        """Runs newest first, as many as ``page`` takes; ``before`` starts after that run (it must exist)."""
        skipping = before is not None
        for run in reversed(self._runs.values()):
            if skipping:
                skipping = run.run_id != before
            elif not page.offer(run):
                break
        return page.runs


class StoreUnavailable(Exception):
    """The run store (Redis) cannot be reached; the request gets 503."""


class LockLost(Exception):
    """The run lock was taken over or expired while its holder still ran (Redis mode)."""
