"""The seam between the service and where its state lives: one ``Backend``, and the helpers it hands out.

A backend holds MAX_CONCURRENT_RUNS slots (each a lease with a holder token), the queue of waiting runs,
the run records, the cancel flags, the Idempotency-Keys, the transport of run events and the webhook
deliveries owed. Every step that must be atomic (a slot and a queue place, a terminal state and its slot's
release, a delivery owed with its terminal state) is one call here, so the caller never holds a lock: the
lock is each backend's own business. ``open_backend`` (``__init__.py``) picks one; nothing else asks which.

A new backend passes ``tests/test_backends.py`` before anything else.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from service.backends.records import Frame, Page, Run, RunBacklog, StoreUnavailable


class Claim(NamedTuple):
    """What a request found under its Idempotency-Key.

    ``outcome``: "new" (the key is this request's to decide), "accepted" (an
    earlier request's run was admitted), "pending" (an earlier request is
    still being decided), "mismatch" (the key came with a different request).
    ``run_id`` is the run the key stands for.
    """

    outcome: str
    run_id: str


class IdempotencyKeys(Protocol):
    """The Idempotency-Keys of POST /agents/run: claimed pending, then accepted (kept for the TTL) or released."""

    async def claim(self, key: str, fingerprint: str, run_id: str) -> Claim: ...

    def admit_args(self, key: str, fingerprint: str) -> list[Any] | None:
        """What ``Backend.admit`` needs to admit the run only while the key is still this request's claim."""

    async def accept(self, key: str, fingerprint: str, run_id: str) -> None: ...

    async def release(self, key: str, run_id: str) -> None: ...


@dataclass
class Delivery:
    """One owed delivery: the run's JSON at its terminal state, to ``url``; ``attempt`` counts attempts made."""

    run_id: str
    url: str
    body: bytes
    attempt: int = 0
    lease: str | None = None  # a shared queue's claim token; the outcome is recorded only while it holds
    send_by: float = math.inf  # time.monotonic() past which the lease may have passed to another replica
    exhausted: bool = False  # every attempt was made (the last claimer died mid-attempt)
    message_id: str = ""  # its webhook-id: made when it is owed, stored with it, the same on every attempt

    def __post_init__(self) -> None:
        if not self.message_id:  # one owed before deliveries had ids: its run's id stands in (one per run)
            self.message_id = "msg_" + self.run_id.replace("-", "")


class _UniqueIds:
    """32 hex digits that no other call, in this process or any other, makes: 16 random ones made per process
    (again in a forked child) and a counter. Half a microsecond where a uuid4 takes two; unique, not secret."""

    def __init__(self) -> None:
        self.start()
        os.register_at_fork(after_in_child=self.start)

    def start(self) -> None:
        self.process, self.count = uuid.uuid4().hex[:16], itertools.count()

    def __call__(self) -> str:
        return f"{self.process}{next(self.count):016x}"


unique_id = _UniqueIds()  # a slot's token, a generation a script makes if it finds the data lost


def new_message_id() -> str:
    """A delivery's webhook-id, unique across deliveries: ``msg_`` and 32 random hex digits."""
    return "msg_" + uuid.uuid4().hex


class Deliveries(Protocol):
    """The queue of webhook deliveries owed; ``durable`` when it outlives this process (then nothing is owed
    by this process alone at shutdown)."""

    durable: bool
    on_owed: Callable[[], None]  # a delivery became due: wake the deliverer

    def owe(self, run: Run) -> None: ...

    async def claim(self) -> tuple[Delivery | None, float]:
        """The next due delivery, its attempt counted (and leased, when shared); or None and how long to wait."""

    async def report(self, delivery: Delivery, retry_in: float | None) -> None:
        """An attempt's outcome: done (``retry_in`` None), or due again in ``retry_in`` seconds."""

    def take_all(self) -> list[Delivery]:
        """Every delivery this process alone owes, taken out (none for a durable queue)."""


class FrameSink(Protocol):
    """Where an event transport hands the frames it carries: the event hub of this process."""

    def deliver(self, frame: Frame) -> None: ...

    def end_all(self, reason: str) -> None: ...

    def listening(self) -> bool:
        """Whether a stream client here wants frames: while none does, a transport may stop reading them."""


class EventTransport(Protocol):
    """How run events reach every stream client (of this process, or of every replica), with their backlogs."""

    available: bool  # while False, new streams are refused (503)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def send(self, kind: str, run_id: str, state: str, data: bytes) -> None:
        """Publish one event (never waits, never raises); it comes back to the sink with its id."""

    async def written(self, timeout: float) -> None:
        """Until the log lines sent so far are kept with their run, at most ``timeout``."""

    async def flush(self, timeout: float) -> None:
        """Until what was sent has reached the sink, at most ``timeout``."""

    async def follow(self) -> None:
        """Until each event stored from now on will reach the sink: at once while the transport reads for a client;
        after a time without one, once it has found where it reads on from (StoreUnavailable if it cannot). A new
        stream calls it after subscribing and before reading its backlog, so each event is in one or the other."""

    async def run_backlog(self, run_id: str, after: tuple[int, int] | None) -> RunBacklog:
        """The run's kept frames from ``after`` on (``after`` itself first when it is kept; all of them for
        None), oldest first, read in one go."""

    async def newest_run_event(self, run_id: str) -> str | None:
        """The id of the run's newest kept event; None when none is kept."""

    async def global_after(self, after: tuple[int, int]) -> list[Frame]: ...


class Followers:
    """The new streams waiting for an event transport's reader to follow again after a time without clients, and
    the event that wakes that idle reader."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.wake = asyncio.Event()
        self._waiting: list[asyncio.Future[None]] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(self) -> None:
        """Until the reader says it follows (``release``), ``timeout`` at most; StoreUnavailable if it cannot."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self.wake.set()
        try:
            await asyncio.wait_for(waiter, self.timeout)
        except TimeoutError:
            raise StoreUnavailable("the events reader does not follow the store") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def release(self, error: Exception | None) -> None:
        """Answer the streams waiting: the reader follows, or ``error``."""
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class Backend(Protocol):
    """Slots with leases, the queue, the run store, cancel flags, and the helpers below, behind one interface.

    ``shared``: other replicas use the same state (a run may be queued, run or cancelled elsewhere; what
    waits in the queue at shutdown stays for them). ``renew_interval``: how often a held slot's lease must
    be renewed, None when it never expires.
    """

    name: str  # "memory" or "redis": what service_started logs as the store
    shared: bool
    renew_interval: float | None
    take_again: bool  # set by take (see there)
    queue_after_take: int | None  # set by take: the queue's length after a take that answered a run, None if unknown
    # Set by finish_and_take and take: the runs whose change its step stored (the end, the taken run's RUNNING) have
    # their event in the store already; it is not to be sent again (EventHub.publish_run's appended).
    appended_events: frozenset[str]
    on_cancel: Callable[[str, str | None], object]  # a cancel (or, with ``by``, an interrupt) of a run, from anywhere
    on_work: Callable[[], None]  # a run was queued or a slot freed: look at the queue
    on_moved: Callable[[], None]  # another process took a run from the queue in a handoff: waiting runs moved
    watching: Callable[[], bool]  # whether clients here watch waiting runs' positions (EventHub.watches_queue)
    on_finished: Callable[[Run], None]  # a run with a webhook was stored terminal: its delivery is owed
    on_not_owed: Callable[[Run, str], None]  # its delivery was past the bound on those owed: dropped
    # (variable, detail): the store, reached only after start, turned out unusable by this version (Postgres: a
    # schema newer than it knows); the service refuses to start. Until a backend has checked its store, it runs
    # no work on it (StoreUnavailable), so nothing was admitted when this is called.
    on_invalid_configuration: Callable[[str, str], object]

    @property
    def idempotency_keys(self) -> IdempotencyKeys: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> None:
        """Raises StoreUnavailable when the store cannot be reached (GET /readyz)."""

    def event_transport(self, sink: FrameSink) -> EventTransport: ...

    def webhook_deliveries(self, timeout_seconds: float) -> Deliveries: ...

    # --- slots and the queue ---------------------------------------------------------------------------------

    def refusal(self, on_busy: str, queue_max: int) -> str | None:
        """"busy" or "full" when ``admit`` would refuse now and can tell without I/O, else None."""

    async def admit(self, run: Run, on_busy: str, queue_max: int, claim: builtins.list[Any] | None = None) -> str:
        """In one step: "started" on a free slot (``run.holder`` and ``run.fencing_token`` set), else "queued"
        as ``on_busy`` allows, else "busy" or "full"; "lost" when ``claim`` (IdempotencyKeys.admit_args) is no
        longer the request's."""

    async def take(self) -> Run | None:
        """The head of the queue on a free slot (``holder`` and ``fencing_token`` set), or None: one step, so never
        two takers. A slot given out mints a fencing token above every token minted before, restarts included.

        After a take that answered a run, ``take_again`` says whether another take could start one now (a run
        waits and a slot is free); False spares the caller a take that would answer None (a backend that cannot
        tell leaves it True). The caller asks again when woken (``on_work``) or on its periodic tick."""

    async def finish_and_take(self, run: Run) -> Run | None:
        """``save(run, release=True)`` for a terminal state, then ``take``: the run that ends hands its slot to the
        head of the queue, in one step where the backend can (Redis: one script), so no dispatcher wakes for it.
        A run taken comes back as ``take`` answers it; with state RUNNING (and ``started_at``) when the step stored
        it so (then the runner does not). None: nothing taken (or the backend leaves the take to the dispatcher).
        Raises WriteRefused as ``save`` does (nothing taken)."""

    async def dequeue(self, run_id: str, **changes: Any) -> Run | None:
        """A waiting run out of the queue and stored with ``changes`` (its terminal state) in one step."""

    async def queue_length(self) -> int: ...

    async def waiting(self) -> builtins.list[Run]:
        """The waiting runs, next first, with their queue positions."""

    async def interrupt_oldest(self, by: str, stopping: builtins.list[str]) -> str | None:
        """The earliest admitted run holding a slot, not ``by`` and not in ``stopping``, asked to stop for ``by``."""

    async def renew(self, run: Run) -> bool:
        """Renew the lease of ``run``'s slot; True when it was taken back. Raises LockLost, StoreUnavailable."""

    async def release(self, token: str) -> None: ...

    async def check_lease(self, run: Run) -> bool:
        """Whether ``run`` holds its slot right now (asked of the store: one round trip in Redis mode).
        Raises StoreUnavailable."""

    def holds(self, token: str) -> bool:
        """Whether this process still holds the slot of ``token`` (not released yet)."""

    async def claim_orphans(self, starting: Run | None = None) -> builtins.list[Run]:
        """Unfinished runs whose holder holds no slot any more (its replica died), claimed for the caller.

        ``starting``: the run about to record RUNNING on the slot ``admit`` or ``take`` just gave it. A backend may
        then answer [] without looking when giving out that slot showed no sign of a run left behind (Redis:
        more unfinished runs than slots held); without it, it always looks (dispatch's periodic call)."""

    # --- the run store -----------------------------------------------------------------------------------------

    async def add(self, run: Run) -> None: ...

    async def save(self, run: Run, release: bool = False) -> None:
        """Store a change; a terminal state with ``release`` frees the run's slot in the same step.
        Raises WriteRefused when the run is terminal already or held by another token (nothing is written)."""

    def note_progress(self, run: Run) -> None: ...

    async def get(self, run_id: str) -> Run | None: ...

    async def wait_finished(self, run_id: str, timeout: float) -> Run | None: ...

    async def list(self, page: Page, before: str | None = None) -> builtins.list[Run]: ...

    async def logs(self, run_id: str) -> builtins.list[bytes] | None: ...

    # --- cancel flags ----------------------------------------------------------------------------------------

    async def request_cancel(self, run_id: str, by: str | None = None) -> None:
        """Ask whichever process runs ``run_id`` to stop it (``by``: the run that interrupts it)."""

    async def cancel_requested(self, run_id: str) -> tuple[bool, str | None]: ...
