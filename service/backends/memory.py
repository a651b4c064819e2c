"""Memory mode: slots, queue, runs, Idempotency-Keys and webhook deliveries in this process, lost with it.

Nothing here awaits between a check and what follows it, so each method is one
step on the event loop: that is all the locking one process needs.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import itertools
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.backends.base import Claim, Delivery, FrameSink, new_message_id
from service.backends.fencing import TokenMinter
from service.backends.memory_events import MemoryEvents
from service.backends.records import (LOG_BYTES_MAX, LOG_LINES_MAX, MAX_OWED, MAX_OWED_BYTES, Page, Run,
                                      WriteRefused)

LOG_LINE_OVERHEAD_BYTES = 48  # a bytes object and its deque slot, beyond the line
POLL_SECONDS = 1.0  # the deliverer looks at an empty queue this often at least


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


class MemoryBackend:
    """Runs in a dict in creation order; keeps at most ``retention`` finished runs and ``retention_bytes`` of them.

    ``slots`` holder tokens at most (MAX_CONCURRENT_RUNS), each held by one run, in the order they were taken.
    """

    name = "memory"
    shared = False  # one process: what it does not run, nobody runs
    renew_interval: float | None = None  # a slot is held until released: nothing to renew
    take_again = True  # set by take
    queue_after_take: int | None = None  # set by take: the queue's length after it
    appended_events: frozenset[str] = frozenset()  # the hub sends every event (finish_and_take appends none)

    def __init__(self, retention: int, retention_bytes: int = 256 * 1024 * 1024, slots: int = 1,
                 idempotency_ttl_seconds: float = 86400.0, log: logging.Logger | None = None,
                 fencing_state_path: str | None = None) -> None:
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.slots = slots
        self.log = log or logging.getLogger("agent_runner")
        self._finished_bytes = 0
        self.on_cancel: Callable[[str, str | None], object] = lambda run_id, by: None
        self.on_work: Callable[[], None] = lambda: None
        self.on_moved: Callable[[], None] = lambda: None  # never called here: Redis mode's handoffs
        self.watching: Callable[[], bool] = lambda: False
        self.on_finished: Callable[[Run], None] = lambda run: None  # first terminal save of a run with a webhook
        self.on_not_owed: Callable[[Run, str], None] = lambda run, detail: None
        self.on_invalid_configuration: Callable[[str, str], object] = lambda variable, detail: None  # never found later
        self.idempotency_keys = MemoryIdempotencyKeys(idempotency_ttl_seconds, retention, unfinished=self.unfinished)
        self._held: dict[str, str] = {}  # slot token -> the run holding it, oldest first
        self._runs: dict[str, Run] = {}
        self._finished: deque[str] = deque()  # finished run ids, oldest first
        self._finish_events: dict[str, asyncio.Event] = {}
        self._queue: deque[Run] = deque()  # waiting runs, next first
        self._logs: dict[str, RunLog] = {}
        self.fencing = TokenMinter(fencing_state_path, self.log)

    async def start(self) -> None:
        self.fencing.load()

    async def close(self) -> None:
        pass

    async def check(self) -> None:
        pass

    def event_transport(self, sink: FrameSink) -> MemoryEvents:
        return MemoryEvents(sink, self.append_log, self.log)

    def webhook_deliveries(self, timeout_seconds: float) -> MemoryDeliveries:
        deliveries = MemoryDeliveries()
        deliveries.on_not_owed = lambda run, detail: self.on_not_owed(run, detail)  # as wired when it happens
        return deliveries

    # --- slots and the queue ---------------------------------------------------------------------------------

    def _take_slot(self, run: Run) -> bool:
        """Give ``run`` a free slot (its ``holder`` set); no await, so atomic with what the caller does next."""
        if len(self._held) >= self.slots:
            return False
        run.holder = uuid.uuid4().hex
        run.update(fencing_token=self.fencing.mint())
        self._held[run.holder] = run.run_id
        return True

    def holds(self, token: str) -> bool:
        return token in self._held

    async def release(self, token: str) -> None:
        self._held.pop(token, None)

    async def renew(self, run: Run) -> bool:
        return False  # never called: renew_interval is None

    async def check_lease(self, run: Run) -> bool:
        return run.holder is not None and self._held.get(run.holder) == run.run_id

    async def claim_orphans(self, starting: Run | None = None) -> builtins.list[Run]:
        return []  # one process: no other holder can leave a run behind

    async def interrupt_oldest(self, by: str, stopping: builtins.list[str]) -> str | None:
        """The run holding a slot longest, not ``by`` and not stopping; the caller stops it (one process)."""
        skip = {by, *stopping}
        return next((run_id for run_id in self._held.values() if run_id not in skip), None)

    def refusal(self, on_busy: str, queue_max: int) -> str | None:
        """"busy" or "full" when ``admit`` would refuse a run now, else None; exact, as nothing awaits in
        between, so a refused POST never builds a run."""
        if not self._queue and len(self._held) < self.slots:
            return None
        if on_busy == "reject":
            return "busy"
        return "full" if len(self._queue) >= queue_max else None

    async def admit(self, run: Run, on_busy: str, queue_max: int, claim: builtins.list[Any] | None = None) -> str:
        """In one step: start ``run`` on a free slot when nobody waits ("started", ``run.holder`` set),
        else queue it if ``on_busy`` allows and there is room ("queued"), else "busy" or "full".
        ``claim`` is None here: a pending Idempotency-Key is removed only by its own request."""
        refused = self.refusal(on_busy, queue_max)
        if refused is not None:
            return refused
        if not self._queue and self._take_slot(run):
            self._add(run)
            return "started"
        self._add(run)
        if on_busy == "interrupt":
            self._queue.appendleft(run)
        else:
            self._queue.append(run)
        self._number_queue()
        return "queued"

    async def take(self) -> Run | None:
        """The head of the queue on a free slot (``holder`` set), or None: one step, so never two takers."""
        if not self._queue or not self._take_slot(self._queue[0]):
            return None
        run = self._queue.popleft()
        run.update(queue_position=None)
        self._number_queue()
        self.take_again = bool(self._queue) and len(self._held) < self.slots
        self.queue_after_take = len(self._queue)
        return run

    async def finish_and_take(self, run: Run) -> Run | None:
        await self.save(run, release=True)
        return await self.take()

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

    async def waiting(self) -> builtins.list[Run]:
        return list(self._queue)

    def _number_queue(self) -> None:
        for position, run in enumerate(self._queue, 1):
            if run.queue_position != position:
                run.update(queue_position=position)

    # --- the run store -----------------------------------------------------------------------------------------

    async def add(self, run: Run) -> None:
        self._add(run)

    def _add(self, run: Run) -> None:
        self._runs[run.run_id] = run
        self._finish_events[run.run_id] = asyncio.Event()

    def unfinished(self, run_id: str) -> bool:
        """Whether ``run_id`` is stored and not finished (retention never drops it, nor its Idempotency-Key)."""
        return run_id in self._finish_events

    def note_progress(self, run: Run) -> None:
        pass  # the stored run is the object the agent updates

    async def save(self, run: Run, release: bool = False) -> None:
        """Store a change; a terminal state wakes its waiters and may drop the oldest finished run.

        With ``release``, the run's slot is released in the same step (nothing
        in between yields), so a client that sees the terminal state can start
        the next run at once. A write by another holder, or of another record once the run is terminal,
        is refused (WriteRefused): the runner's own record is the stored object, so only a stale copy is.
        """
        stored = self._runs.get(run.run_id)
        if stored is not None and stored is not run and (
                stored.finished or (run.holder is not None and stored.holder not in (None, run.holder))):
            raise WriteRefused("the run is terminal already, or held by another token")
        self._runs[run.run_id] = run
        if not run.finished:
            return
        if release and run.holder is not None:
            self._held.pop(run.holder, None)
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

    async def logs(self, run_id: str) -> builtins.list[bytes] | None:
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

    async def list(self, page: Page, before: str | None = None) -> builtins.list[Run]:
        """Runs newest first, as many as ``page`` takes; ``before`` starts after that run (it must exist)."""
        skipping = before is not None
        for run in reversed(self._runs.values()):
            if skipping:
                skipping = run.run_id != before
            elif not page.offer(run):
                break
        return page.runs

    # --- cancel flags ----------------------------------------------------------------------------------------

    async def request_cancel(self, run_id: str, by: str | None = None) -> None:
        pass  # one process: the runner cancels its own run directly

    async def cancel_requested(self, run_id: str) -> tuple[bool, str | None]:
        return False, None


@dataclass(slots=True)
class KeyEntry:
    fingerprint: str
    run_id: str
    expires: float  # time.monotonic()


class MemoryIdempotencyKeys:
    """Keys in this process: accepted ones for ``ttl_seconds``, at most ``limit`` of them (oldest dropped first)
    besides those whose run has not finished (``unfinished``), which retention does not drop either.

    Pending keys are not counted: each belongs to a request in progress, which settles it before it answers,
    so one never expires (another request taking it over would admit a second run).
    """

    def __init__(self, ttl_seconds: float, limit: int,
                 unfinished: Callable[[str], bool] = lambda run_id: False) -> None:
        self.ttl_seconds = ttl_seconds
        self.limit = limit
        self.unfinished = unfinished
        self._pending: dict[str, KeyEntry] = {}
        self._accepted: OrderedDict[str, KeyEntry] = OrderedDict()  # oldest first, so expiry pops from the front

    def __len__(self) -> int:
        return len(self._pending) + len(self._accepted)

    async def claim(self, key: str, fingerprint: str, run_id: str) -> Claim:
        """The key's entry, or a new pending one for ``run_id``; no await, so racing requests see one claim."""
        now = time.monotonic()
        while self._accepted and next(iter(self._accepted.values())).expires <= now:
            self._accepted.popitem(last=False)
        if (entry := self._accepted.get(key)) is not None:
            return Claim("accepted" if entry.fingerprint == fingerprint else "mismatch", entry.run_id)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = KeyEntry(fingerprint, run_id, math.inf)
            return Claim("new", run_id)
        return Claim("pending" if entry.fingerprint == fingerprint else "mismatch", entry.run_id)

    async def accept(self, key: str, fingerprint: str, run_id: str) -> None:
        """``run_id`` was admitted: keep the key for the TTL."""
        self._pending.pop(key, None)
        self._accepted.pop(key, None)
        self._accepted[key] = KeyEntry(fingerprint, run_id, time.monotonic() + self.ttl_seconds)
        if len(self._accepted) > self.limit:
            self._drop_oldest(len(self._accepted) - self.limit)

    def _drop_oldest(self, count: int) -> None:
        """Drop the ``count`` oldest keys whose run has finished (or is gone); at most the unfinished are kept."""
        finished = (key for key, entry in self._accepted.items() if not self.unfinished(entry.run_id))
        dropped = list(itertools.islice(finished, count))  # stops early: only unfinished runs' keys are skipped
        for key in dropped:
            del self._accepted[key]

    def admit_args(self, key: str, fingerprint: str) -> builtins.list[Any] | None:
        """Nothing for the backend's admit to check: a pending claim here is removed only by its own request."""
        return None

    async def release(self, key: str, run_id: str) -> None:
        """``run_id`` was refused: forget the key, if it is still this request's pending claim."""
        entry = self._pending.get(key)
        if entry is not None and entry.run_id == run_id:
            del self._pending[key]


class MemoryDeliveries:
    """Webhook deliveries owed, by due time, in this process (lost with it: the deliverer tries each once more
    at shutdown)."""

    durable = False

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Delivery]] = []
        self._bytes = 0
        self._order = itertools.count()
        self.on_owed: Callable[[], None] = lambda: None
        self.on_not_owed: Callable[[Run, str], None] = lambda run, detail: None

    def owe(self, run: Run) -> None:
        assert run.webhook is not None
        body = run.record()
        if len(self._due) >= MAX_OWED or self._bytes + len(body) > MAX_OWED_BYTES:  # memory stays bounded
            self.on_not_owed(run, f"too many deliveries owed already ({len(self._due)}, {self._bytes} bytes)")
            return
        self._push(time.monotonic(), Delivery(run.run_id, run.webhook, body, message_id=new_message_id()))
        self.on_owed()

    def _push(self, due: float, delivery: Delivery) -> None:
        heapq.heappush(self._due, (due, next(self._order), delivery))
        self._bytes += len(delivery.body)

    async def claim(self) -> tuple[Delivery | None, float]:
        """The next due delivery (its attempt counted), or None and how long until one is due."""
        now = time.monotonic()
        if not self._due:
            return None, POLL_SECONDS
        if self._due[0][0] > now:
            return None, self._due[0][0] - now
        delivery = heapq.heappop(self._due)[2]
        self._bytes -= len(delivery.body)
        delivery.attempt += 1
        return delivery, 0.0

    async def report(self, delivery: Delivery, retry_in: float | None) -> None:
        if retry_in is not None:
            self._push(time.monotonic() + retry_in, delivery)

    def take_all(self) -> builtins.list[Delivery]:
        owed = [entry[2] for entry in sorted(self._due)]
        self._due.clear()
        self._bytes = 0
        return owed
