"""Redis mode's backend: slots, queue, runs and cancel flags live in Redis, shared by every replica.

Imported only when REDIS_URL is set (``open_backend``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

from redis.asyncio import Redis

from service.backends.base import FrameSink, new_message_id, unique_id
from service.backends.records import MAX_OWED, MAX_OWED_BYTES, Page, Run, StoreUnavailable, WriteRefused
from service.backends.redis.connect import Endpoint
from service.backends.redis.direct import DirectScript
from service.backends.redis.events import RedisEvents
from service.backends.redis.idempotency import RedisIdempotencyKeys
from service.backends.redis.listener import listen
from service.backends.redis.lock import RedisRunLock, StoreHealth
from service.backends.redis.readiness import Readiness
from service.backends.redis.waiters import Waiters
from service.backends.redis.reads import CoalescedReads, RecordReader
from service.backends.records import utc_now
from service.backends.redis.scripts import (ADMIT_SCRIPT, CANCEL_WAITING_SCRIPT, FINISH_SCRIPT, HANDOFF_SCRIPT,
                                            INTERRUPT_SCRIPT, LEASE_SCRIPT, ORPHANS_SCRIPT, SAVE_SCRIPT, TAKE_SCRIPT,
                                            TRIM_SCRIPT)
from service.backends.redis.webhooks import RedisDeliveries
from service.cancelling import cancel_and_wait


FREED_MARKS = 1024  # terminal writes whose "finished" message is still to come (RedisBackend.finished_here)


class RedisBackend:
    """Runs as their client-facing JSON under ``<prefix>:run:<id>``, trimmed to ``retention`` finished runs.

    Keys: ``runs`` (zset of all run ids by creation sequence), ``finished``
    (zset of finished run ids by finish sequence), ``unfinished`` (hash of
    PENDING/RUNNING run ids to the token of the lock each was started under),
    ``seq`` (counter), ``cancel:<id>`` (a cancel request), ``log:<id>`` (the lines its agent logged;
    ``logbytes`` holds each run's total, counted in its size once it finishes), ``generation`` and ``fence``
    (scripts.FENCE: Redis lost its data). Channels:
    ``finished`` and ``cancel`` carry run ids. The slots are ``lock``'s (lock.py), private to this backend.
    """

    POLL_SECONDS = 1.0  # waiters re-read the run this often in case a pub/sub message was missed
    name = "redis"
    shared = True  # every replica on the same Redis (and prefix) shares slots, queue and runs

    def __init__(self, client: Redis, endpoint: Endpoint, prefix: str, lock: RedisRunLock, retention: int,
                 retention_bytes: int, health: StoreHealth, log: logging.Logger,
                 idempotency_ttl_seconds: float = 86400.0) -> None:
        self.client = client
        self.endpoint = endpoint
        self.prefix = prefix
        self._lock = lock
        self.renew_interval: float | None = lock.renew_interval
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.health = health
        self.log = log
        self._records = RecordReader(log)
        self.on_cancel: Callable[[str, str | None], object] = lambda run_id, by: None
        self.on_work: Callable[[], None] = lambda: None  # a run was queued or a slot freed, on any replica
        self.on_moved: Callable[[], None] = lambda: None  # a run was taken in a handoff, on any replica
        self.watching: Callable[[], bool] = lambda: False  # clients here watch queue positions (listener.follow)
        self.on_finished: Callable[[Run], None] = lambda run: None  # a run with a webhook was stored terminal
        self.on_not_owed: Callable[[Run, str], None] = lambda run, detail: None  # its delivery was past the bound
        self.on_invalid_configuration: Callable[[str, str], object] = lambda variable, detail: None  # never found later
        self.idempotency_keys = RedisIdempotencyKeys(client, self.key("idempotency", ""), self.key("run", ""), health,
                                                     idempotency_ttl_seconds)
        self.waiters = Waiters()  # of ?wait= requests here, by run (listener.follow)
        self._progress_writes: dict[str, asyncio.Task[None]] = {}
        self._progress_dirty: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self._take_token: str | None = None  # dispatch's take not answered yet (take)
        self._taking = asyncio.Lock()  # one of dispatch's takes at a time: they share the token above
        self._suspects: set[str] = set()  # slots given out with a run maybe left behind (claim_orphans)
        self._freed_here: dict[str, None] = {}  # runs whose slot this replica frees with their end (finished_here)
        self._releasing: set[str] = set()  # tokens whose slot a terminal write out now frees (holds)
        self.take_again = True  # after a take that answered a run: whether another could start one now
        self.queue_after_take: int | None = None  # and the queue's length after it
        self.appended_events: frozenset[str] = frozenset()  # set by finish_and_take (see Backend)
        self._events: RedisEvents | None = None  # the event transport, once made: finish_and_take appends events
        # Handoffs not answered yet, by the token of the run that ends: their take's token, and whether they
        # append the events (finish_and_take). A retry asks again with both; one given up on goes to dispatch.
        self._handoffs: dict[str, tuple[str, bool]] = {}
        # the keys (and key prefixes, ending with ':') the terminal writes and takes name, made once
        self._fixed = {name: self.key(*name.split(":")) for name in (
            "run:", "cancel:", "webhook:", "events:run:", "finished", "unfinished", "sizes", "bytes", "seq", "lock",
            "logbytes", "webhooks", "generation", "runs", "queue", "fencing", "events", "events:runs", "ended")}
        self._reads = CoalescedReads(client)  # concurrent record reads share one MGET
        self._finish = client.register_script(FINISH_SCRIPT)
        self._trim = client.register_script(TRIM_SCRIPT)
        self._admit = client.register_script(ADMIT_SCRIPT)
        self._take = client.register_script(TAKE_SCRIPT)
        # the one call between a run's end and the next run's start: on connections of its own (direct.py)
        self._handoff_script = self._handoff = DirectScript(client, HANDOFF_SCRIPT)
        self._orphans = client.register_script(ORPHANS_SCRIPT)
        self._cancel_waiting = client.register_script(CANCEL_WAITING_SCRIPT)
        self._interrupt = client.register_script(INTERRUPT_SCRIPT)
        self._save = client.register_script(SAVE_SCRIPT)
        self._lease = client.register_script(LEASE_SCRIPT)
        self._readiness = Readiness(client, self.key("ready"), log)
        self.highest_token = 0  # the highest fencing token this replica has seen: a floor for the next (MINT)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def start(self) -> None:
        # The generation (scripts.FENCE): a Redis without one when a slot is given out has lost its data.
        # Unreachable now: the first admission after it is back finds none and waits out the fence (a lock TTL).
        with contextlib.suppress(StoreUnavailable):
            async with self.health.guard():
                await self.client.set(self.key("generation"), uuid.uuid4().hex, nx=True)
        self._listener = asyncio.create_task(listen(self), name="redis-listener")

    async def close(self) -> None:
        if self._listener is not None:
            await cancel_and_wait(self._listener)
        await self._handoff_script.close()
        await self.client.aclose()

    async def check(self) -> None:
        await self._readiness.check()

    def event_transport(self, sink: FrameSink) -> RedisEvents:
        self._events = RedisEvents(self.client, self.endpoint, self.prefix, sink, self.log)
        return self._events

    def webhook_deliveries(self, timeout_seconds: float) -> RedisDeliveries:
        return RedisDeliveries(self.client, self.key, self.health, timeout_seconds)

    def holds(self, token: str) -> bool:
        """Whether ``token``'s slot is this replica's: not once a terminal write that frees it is out (a renewal
        answered meanwhile finds the slot gone by that write's doing, not lost)."""
        return token in self._lock.tokens() and token not in self._releasing

    async def renew(self, run: Run) -> bool:
        return await self._lock.renew(run)

    async def release(self, token: str) -> None:
        """Let go of the slot of ``token``; a handoff of its run given up on (the store stayed away) leaves its take
        to dispatch, whose next take asks again with its token (or, if one of its own is pending, to orphan
        recovery: the run it may have taken ends "Runner lost" a lock TTL later)."""
        pending = self._handoffs.pop(token, None)
        if pending is not None and self._take_token is None:
            self._take_token = pending[0]
        await self._lock.release(token)

    def finished_here(self, run_id: str) -> bool:
        """Whether ``run_id``'s "finished" message is the echo of a terminal write of this replica that freed its
        slot: the runner woke dispatch itself once the write was answered, so the echo need not wake it again (a
        take that would find nothing). Each write is recognised once; the oldest marks go past FREED_MARKS."""
        if run_id not in self._freed_here:
            return False
        del self._freed_here[run_id]
        return True

    async def add(self, run: Run) -> None:
        async with self.health.guard():
            seq = await self.client.incr(self.key("seq"))
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.key("run", run.run_id), run.record())
                pipe.zadd(self.key("runs"), {run.run_id: seq})
                pipe.hset(self.key("unfinished"), run.run_id, run.holder or "")
                await pipe.execute()

    def note_progress(self, run: Run) -> None:
        """Write a progress change soon, coalescing bursts; save() waits for the write so order holds."""
        self._progress_dirty.add(run.run_id)
        if run.run_id not in self._progress_writes:
            self._progress_writes[run.run_id] = asyncio.create_task(self._write_progress(run))

    async def _write_progress(self, run: Run) -> None:
        try:
            while run.run_id in self._progress_dirty:  # changes made during a write get one more write
                self._progress_dirty.discard(run.run_id)
                if run.finished:  # its terminal write carries the progress (and alone frees the slot with it)
                    return
                async with self.health.guard():
                    if not await self._save_unfinished(run):
                        return  # no longer this holder's run: its next write is refused and says so
        except StoreUnavailable:
            pass  # progress is best effort; the next state change writes the whole run
        finally:
            self._progress_writes.pop(run.run_id, None)

    async def save(self, run: Run, release: bool = False) -> None:
        """Store a change; a terminal state also updates the indexes, publishes, trims to retention,
        and (with ``release``) releases the run's slot, all in one atomic script that is safe to retry.
        Raises WriteRefused when the run is no longer its holder's: terminal already, or claimed by another.
        """
        await self._progress_written(run)
        async with self.health.guard():
            if not run.finished:
                if not await self._save_unfinished(run):
                    raise WriteRefused("the run is terminal already, or held by another token")
                return
            token = run.holder if release and run.holder is not None else ""
            keys, args = self._finish_call(run, token, run.holder or "")
            with self._freeing(run, token):
                answer = await self._finish(keys=keys, args=args)
            self._finished(run, token, answer)
            await self._after_finish(run, *answer)

    async def finish_and_take(self, run: Run) -> Run | None:
        """The terminal write, its slot released, and the take of the next run on it, in one script (HANDOFF_SCRIPT),
        which stores the run it takes RUNNING and, when the events writer has nothing waiting (so they come after
        every event published before), appends the two events.

        The take has a token of its own, kept until the handoff is answered: a retry of the same end (the runner's,
        after a failure) asks again with it and answers the same run; a handoff given up on (``release``) passes
        it to dispatch's next take. Dispatch's takes keep theirs, so neither answers a run the other took.
        """
        if run.holder is None:
            await self.save(run, release=True)
            self.appended_events = frozenset()  # after the last await, as below
            return None
        await self._progress_written(run)
        retry = run.holder in self._handoffs
        token, append = self._handoffs.setdefault(
            run.holder, (unique_id(), self._events is not None and self._events.idle()))
        async with self.health.guard():
            take_args, keys, args = self._handoff_call(run, token, retry, append)
            with self._freeing(run, run.holder):
                finished, *took = await self._handoff(keys=keys, args=args)
            del self._handoffs[run.holder]
            if took and took[0][0]:  # handed on: its message went to "ended", not to "finished" (no echo to await)
                self._freed_here.pop(run.run_id, None)
                self.waiters.wake(run.run_id)
            self._finished(run, run.holder, finished)  # refused: nothing was taken, nothing appended
            taken = await self._taken(token, take_args, took[0], "handoff")
            ended_id, taken_id = took[1]
        appended = set()
        for run_id, entry_id in ((run.run_id, ended_id), (taken.run_id if taken else "", taken_id)):
            if entry_id and self._events is not None:  # in Redis, by this call or by the one it retries
                self._events.appended(entry_id)
                appended.add(run_id)
        with contextlib.suppress(StoreUnavailable):  # a trim left undone is done by the next terminal write
            async with self.health.guard():
                await self._after_finish(run, *finished)
        self.appended_events = frozenset(appended)  # after the last await: a take meanwhile sets it too
        return taken

    def _handoff_call(self, run: Run, token: str, retry: bool, append: bool) -> tuple[
            builtins.list[str | int], builtins.list[str], builtins.list[bytes | str | int]]:
        """HANDOFF_SCRIPT's arguments of TAKE, and its keys and arguments, for ``run``'s end and a take under
        ``token`` (``retry``: asked before), ``append``: with the events."""
        assert run.holder is not None
        keys, args = self._finish_call(run, run.holder, run.holder)
        take_keys, take_args = self._take_call(token, retry)
        caps = self._events.stream_caps() if self._events is not None else [0] * 7
        return take_args, [*keys, *take_keys, self._fixed["events"], self._fixed["events:runs"]], \
            [*args, *take_args, "1" if append else "", self._fixed["events:run:"], run.state, *caps, run.json(),
             self._fixed["ended"]]

    async def _progress_written(self, run: Run) -> None:
        """A progress write of ``run`` in flight lands first: it never overwrites the write to come."""
        self._progress_dirty.discard(run.run_id)
        pending = self._progress_writes.get(run.run_id)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)

    @contextlib.contextmanager
    def _freeing(self, run: Run, token: str) -> Iterator[None]:
        """Around a terminal write that frees the slot of ``token`` (none when ''): its "finished" message may come
        before its answer, and must not wake this replica's dispatch (finished_here); while it is out, the slot is
        no longer held (holds)."""
        if not token:
            yield
            return
        self._freed_here[run.run_id] = None
        if len(self._freed_here) > FREED_MARKS:  # messages lost (pub/sub is best effort) leave marks
            del self._freed_here[next(iter(self._freed_here))]
        self._releasing.add(token)
        try:
            yield
        finally:
            self._releasing.discard(token)

    def _finished(self, run: Run, token: str, answer: builtins.list[int]) -> None:
        """FINISH_SCRIPT answered ``answer`` for ``run``'s terminal write that freed the slot of ``token`` (none
        when ''); raises WriteRefused when the write was refused."""
        if token:
            self._lock.forget(token)
            self._suspects.discard(token)
        if answer[2] == -2:
            self._freed_here.pop(run.run_id, None)  # refused: it published nothing
            raise WriteRefused("the run is terminal already, or held by another token")

    async def _save_unfinished(self, run: Run) -> bool:
        """Write a run that is not terminal while it is still its holder's (SAVE_SCRIPT); False when refused."""
        generation = self._lock.generation_of(run.holder) if run.holder else ""
        return bool(await self._save(keys=[self.key("run", run.run_id), self.key("unfinished"),
                                           self._lock.generation_key],
                                     args=[run.record(), run.run_id, run.holder or "", generation]))

    async def check_lease(self, run: Run) -> bool:
        """Whether ``run`` holds its slot right now, asked of Redis in one round trip (LEASE_SCRIPT)."""
        if run.holder is None or run.holder not in self._lock.tokens():
            return False
        async with self.health.guard():
            left = await self._lease(keys=[self._lock.key_of(run.holder), self.key("unfinished")],
                                     args=[run.holder, run.run_id])
        return bool(left)

    def _finish_call(self, run: Run, token: str,
                     holder: str) -> tuple[builtins.list[str], builtins.list[bytes | str | int]]:
        """FINISH_SCRIPT's keys and arguments for ``run``'s terminal state; ``token``: the slot released with it,
        ``holder``: the token the run is held under ('' for a run that never held a slot)."""
        run_id, fixed = run.run_id, self._fixed
        return ([fixed["run:"] + run_id, fixed["finished"], fixed["unfinished"], fixed["cancel:"] + run_id,
                 fixed["sizes"], fixed["bytes"], fixed["seq"], self._lock.key_of(token) if token else fixed["lock"],
                 fixed["logbytes"], fixed["webhooks"], fixed["webhook:"] + run_id,
                 f"{fixed['events:run:']}{run_id}:bytes", fixed["generation"], fixed["runs"]],
                [run.record(), run_id, fixed["finished"], token, run.size, run.webhook or "", MAX_OWED,
                 MAX_OWED_BYTES, self._lock.generation_of(run.holder) if run.holder else "",  # releasing or not
                 holder, new_message_id() if run.webhook else "",  # the id: stored with the delivery it owes
                 self.retention, self.retention_bytes])

    async def _after_finish(self, run: Run, finished_count: int, finished_bytes: int, owed: int) -> None:
        """After a terminal state was stored: wake the webhook deliverer (or report the delivery refused), trim."""
        if owed == -1:
            self.on_not_owed(run, f"too many deliveries owed already (at most {MAX_OWED}, {MAX_OWED_BYTES} bytes)")
        elif run.webhook is not None:
            self.on_finished(run)  # owed in Redis already; this only wakes the local deliverer
        if finished_count > self.retention or finished_bytes > self.retention_bytes:
            await self._trim(keys=[self.key("finished"), self.key("runs"), self.key("sizes"), self.key("bytes"),
                                   self.key("logbytes")],
                             args=[self.retention, self.retention_bytes, self.key("run", ""), self.key("log", ""),
                                   self.key("events", "run", "")])

    async def get(self, run_id: str) -> Run | None:
        """The run, or None when it is not stored (or its record cannot be read: see ``read``)."""
        async with self.health.guard():
            raw = await self._reads.get(self.key("run", run_id))
        run = self.read(run_id, raw)
        if run is not None and run.queue_position is not None:
            await self._place([run])
        return run

    async def _place(self, runs: list[Run]) -> None:
        """Fill in the queue positions of waiting runs (stored only as "queued": positions move)."""
        waiting = [run for run in runs if run.queue_position is not None and run.state == "PENDING"]
        if not waiting:
            return
        async with self.health.guard():
            if len(waiting) == 1:
                found = [cast("int | None", await self.client.lpos(self.key("queue"), waiting[0].run_id))]
            else:
                async with self.client.pipeline(transaction=False) as pipe:
                    for run in waiting:
                        pipe.lpos(self.key("queue"), run.run_id)
                    found = cast("list[int | None]", await pipe.execute())
        for run, index in zip(waiting, found):
            run.update(queue_position=None if index is None else index + 1)

    def read(self, run_id: str, raw: bytes | None, holder: str | None = None) -> Run | None:
        """A stored record as a Run; an unreadable one is logged once (run_record_invalid) and skipped."""
        return self._records.read(self.key("run", run_id), raw, holder)

    async def wait_finished(self, run_id: str, timeout: float) -> Run | None:
        """The run once it is terminal, or as it stands after ``timeout``. Woken by the message of its end from
        whichever replica stores it: on ``finished``, or on ``ended:<run_id>`` when its slot went to the next run,
        which the listener follows only while the run has waiters here (and wakes them once Redis confirms it)."""
        deadline = asyncio.get_running_loop().time() + timeout
        run = await self.get(run_id)
        if run is None or run.finished or timeout <= 0:
            return run  # no waiter: nothing to subscribe to
        event = asyncio.Event()
        self.waiters.waiting(run_id, event, comes=True)
        try:
            while True:
                run = await self.get(run_id)  # (again once waiting: a message of its end would wake it from now)
                left = deadline - asyncio.get_running_loop().time()
                if run is None or run.finished or left <= 0:
                    return run
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, self.POLL_SECONDS))
                event.clear()
        finally:
            self.waiters.waiting(run_id, event, comes=False)

    async def list(self, page: Page, before: str | None = None) -> builtins.list[Run]:
        """As MemoryBackend.list; fetches in small batches so a page of large runs stays small in memory."""
        async with self.health.guard():
            top: float | str = "+inf"
            if before is not None:
                score = await self.client.zscore(self.key("runs"), before)
                if score is None:
                    return []
                top = f"({score}"
            batch = min(max(page.limit, 10), 50)
            wanted = True
            while wanted:
                ids = cast("list[tuple[bytes, float]]", await self.client.zrevrangebyscore(
                    self.key("runs"), top, "-inf", start=0, num=batch, withscores=True))
                if not ids:
                    break
                members = [member.decode() for member, _ in ids]
                records = cast("list[bytes | None]",
                               await self.client.mget([self.key("run", run_id) for run_id in members]))
                for run_id, raw in zip(members, records):
                    run = self.read(run_id, raw)
                    if run is not None and not (wanted := page.offer(run)):
                        break
                top = f"({ids[-1][1]}"
        await self._place(page.runs)
        return page.runs

    async def request_cancel(self, run_id: str, by: str | None = None) -> None:
        """Ask whichever replica runs ``run_id`` to cancel it (pub/sub, plus a flag its renewal checks);
        ``by`` is the run that interrupts it."""
        async with self.health.guard():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.key("cancel", run_id), by or "-", ex=3600)
                pipe.publish(self.key("cancel"), f"{run_id} {by}" if by else run_id)
                await pipe.execute()

    async def cancel_requested(self, run_id: str) -> tuple[bool, str | None]:
        """Whether a cancel of ``run_id`` was asked for, and by which interrupting run."""
        async with self.health.guard():
            flag = cast("bytes | None", await self.client.get(self.key("cancel", run_id)))
        if flag is None:
            return False, None
        return True, None if flag == b"-" else flag.decode(errors="replace")

    # --- the queue -------------------------------------------------------------------------------------------

    def refusal(self, on_busy: str, queue_max: int) -> str | None:
        return None  # only the admit script can tell, atomically with the other replicas

    async def admit(self, run: Run, on_busy: str, queue_max: int, claim: builtins.list[Any] | None = None) -> str:
        """As MemoryBackend.admit, across replicas: one script takes a slot or a place in the queue.

        ``claim`` (RedisIdempotencyKeys.admit_args): admit only while the Idempotency-Key is still this
        request's, and mark it accepted in the same step; "lost" when it no longer is.
        """
        token, new_generation = uuid.uuid4().hex, uuid.uuid4().hex
        waiting = Run.from_json(run.record())
        waiting.update(queue_position=0)  # stored as "queued"; the position is read from the queue
        async with self.health.guard():
            outcome, value, generation, lost, *minted = await self._admit(
                keys=[self.key("queue"), self.key("run", run.run_id), self.key("runs"), self.key("seq"),
                      self.key("unfinished"), *self._lock.keys, self._lock.generation_key, self._lock.fence_key,
                      self.key("fencing")],
                args=[run.record(), waiting.record(), run.run_id, on_busy, queue_max, token,
                      int(self._lock.ttl_seconds * 1000), len(self._lock.keys), self.key("queued"),
                      *(claim or ["", "", 0]), new_generation, self.highest_token])
        self.health.data_lost(lost, generation, new_generation, "admit", self._lock.ttl_seconds)
        if outcome == 1:
            run.holder = token
            run.update(fencing_token=self._seen(minted[0]))
            self._note_suspect(token, minted[1])
            self._lock.adopt(token, int(value), generation.decode())
            return "started"
        if outcome == 2:
            run.update(queue_position=int(value) or None)  # 0: a retry found it already out of the queue
            return "queued"
        return {0: "busy", -1: "full"}.get(outcome, "lost")

    async def take(self) -> Run | None:
        """The head of the queue on a free slot, or None; one script, so a run is taken once. The run taken is
        stored RUNNING by the same script when nothing asks the runner to write it (TAKE_SCRIPT). Its RUNNING
        event is in ``appended_events`` when it is in Redis already (a handoff given up on appended it).

        The token is kept until the take is answered: a take whose reply was lost (or whose run could not be
        read) is asked again with it at dispatch's next take, and answers the same run (a handoff has a token of its
        own: finish_and_take).
        """
        async with self._taking:
            retry = self._take_token is not None
            token = self._take_token = self._take_token or uuid.uuid4().hex
            keys, args = self._take_call(token, retry)
            async with self.health.guard():
                answer = await self._take(keys=keys, args=args)
            self._take_token = None  # answered: a failed call keeps it, and the next take answers this run again
            run = await self._taken(token, args, answer, "take")
            event: bytes | None = answer[9] if len(answer) > 9 else None
            if run is not None and event and self._events is not None:  # appended by a handoff given up on
                self._events.appended(event)
                self.appended_events = frozenset((run.run_id,))
            else:
                self.appended_events = frozenset()
            return run

    def _take_call(self, token: str, retry: bool) -> tuple[builtins.list[str], builtins.list[str | int]]:
        """TAKE_SCRIPT's keys and arguments for a take under ``token`` (``retry``: asked before, its answer lost)."""
        fixed = self._fixed
        return [fixed["queue"], fixed["unfinished"], *self._lock.keys, self._lock.generation_key,
                self._lock.fence_key, fixed["fencing"]], \
            [token, int(self._lock.ttl_seconds * 1000), len(self._lock.keys), int(retry), unique_id(),
             self.highest_token, fixed["run:"], utc_now()]

    async def _taken(self, token: str, args: builtins.list[str | int], answer: builtins.list[Any],
                     step: str) -> Run | None:
        """The run TAKE_SCRIPT, called with ``args``, answered for ``token``, holding its slot, or None. It awaits
        nothing on the way to a run: its caller starts the run before anything else here runs (a cancel heard)."""
        taken, slot, generation, lost, *minted = answer
        self.health.data_lost(lost, generation, str(args[4]), step, self._lock.ttl_seconds)
        if not taken:
            self.queue_after_take = None
            return None
        run_id = taken.decode()
        self._lock.adopt(token, int(slot), generation.decode())
        fencing_token, suspect, self.take_again, record, self.queue_after_take = minted[:5]
        self.take_again = bool(self.take_again)
        run = self.read(run_id, record)  # as the take stored it, its token in it; its position: none now
        if run is None:  # missing or unreadable: give the slot back; the run stays unfinished for orphan recovery
            await self._lock.release(token)
            return None
        run.holder = token
        run.update(queue_position=None, fencing_token=self._seen(fencing_token))
        self._note_suspect(token, suspect)
        return run

    def _note_suspect(self, token: str, suspect: int) -> None:
        """Whether the script that gave out the slot of ``token`` saw a sign of a run left behind (ORPHANS_SUSPECT):
        claim_orphans for the run starting on it looks only then."""
        if suspect:
            self._suspects.add(token)

    def _seen(self, token: int) -> int:
        """A fencing token minted for this replica: the floor of the next one it asks for."""
        self.highest_token = max(self.highest_token, token)
        return token

    async def dequeue(self, run_id: str, **changes: object) -> Run | None:
        """Take a waiting run out of the queue and store it with ``changes`` (its terminal state) in one script,
        safe to retry: a run never leaves the line without its end stored. None if it no longer waits."""
        run = await self.get(run_id)
        if run is None or run.queue_position is None:
            return None
        run.update(queue_position=None, **changes)
        keys, args = self._finish_call(run, "", "")
        async with self.health.guard():
            answer = await self._cancel_waiting(keys=[*keys, self.key("queue")], args=args)
            if answer is None:
                return None
            await self._after_finish(run, *answer)
        return run

    async def queue_length(self) -> int:
        async with self.health.guard():
            return await self.client.llen(self.key("queue"))

    async def waiting(self) -> builtins.list[Run]:
        """The waiting runs, next first, with their queue positions (two round trips)."""
        async with self.health.guard():
            ids = [member.decode()
                   for member in cast("list[bytes]", await self.client.lrange(self.key("queue"), 0, -1))]
            raws = cast("list[bytes | None]",
                        await self.client.mget([self.key("run", run_id) for run_id in ids]) if ids else [])
        runs = []
        for position, (run_id, raw) in enumerate(zip(ids, raws), 1):
            run = self.read(run_id, raw)
            if run is not None:
                run.update(queue_position=position)
                runs.append(run)
        return runs

    async def logs(self, run_id: str) -> builtins.list[bytes] | None:
        """The lines the run's agent logged, oldest first; None when the run is not stored."""
        async with self.health.guard():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.exists(self.key("run", run_id))
                pipe.lrange(self.key("log", run_id), 0, -1)
                exists, lines = await pipe.execute()
        return lines if exists else None

    async def interrupt_oldest(self, by: str, stopping: builtins.list[str]) -> str | None:
        """Ask the earliest admitted run holding a slot, on any replica, to stop for ``by``; skips runs already
        asked to stop (and ``stopping``, this replica's). Returns its id, or None when there is none."""
        async with self.health.guard():
            picked = await self._interrupt(keys=[self.key("unfinished"), self.key("runs"), *self._lock.all_keys],
                                           args=[self.key("cancel", ""), by, self.key("cancel"), *stopping])
        return picked.decode() if picked is not None else None

    async def claim_orphans(self, starting: Run | None = None) -> builtins.list[Run]:
        """Unfinished runs whose holder holds no slot any more, passed atomically to a claim of this call (alive
        for a lock TTL) until their terminal state is stored; a retry after a lost reply answers them again.

        With ``starting`` (a run about to record RUNNING on the slot it was just given), the scan is made only
        when the script that gave out that slot saw more unfinished runs than slots held (ORPHANS_SUSPECT)."""
        if starting is not None and starting.holder is not None:
            if starting.holder not in self._suspects:
                return []
            self._suspects.discard(starting.holder)
        claim = uuid.uuid4().hex
        async with self.health.guard():
            flat = await self._orphans(keys=[self.key("unfinished"), self.key("claim", claim), *self._lock.all_keys],
                                       args=[claim, int(self._lock.ttl_seconds * 1000), self.key("claim", ""),
                                             *self._lock.tokens()])
            pairs = [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]
            raws = cast("list[bytes | None]",
                        await self.client.mget([self.key("run", run_id) for run_id, _ in pairs]) if pairs else [])
            runs = [self.read(run_id, raw, holder=claim) for (run_id, _), raw in zip(pairs, raws)]  # the claim's now
            done = [run_id for (run_id, _), run in zip(pairs, runs) if run is None or run.finished]
            if done:  # unreadable, or recorded already: nothing to recover, out of the index
                await self.client.hdel(self.key("unfinished"), *done)
        return [run for run in runs if run is not None and not run.finished]
