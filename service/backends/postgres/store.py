"""Postgres mode's backend: slots, queue, runs and cancel flags in tables of DATABASE_SCHEMA, shared by every replica.

Every step that gives out or frees a slot, or moves the queue, is one transaction that first takes the row lock
``locks.admission`` (FOR UPDATE): replicas take these steps one at a time, so QUEUE_MAX and MAX_CONCURRENT_RUNS
hold exactly under any burst. Reads and a holder's own non-terminal writes take no lock. Leases use the
database's clock (clock_timestamp()), so the replicas' clocks never matter. Imported only when DATABASE_URL is set.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from service.backends.base import FrameSink
from service.backends.postgres.database import Connection, Database
from service.backends.postgres.events import PostgresEvents
from service.backends.postgres.keys import PostgresDeliveries, PostgresIdempotencyKeys
from service.backends.postgres.listener import Listener
from service.backends.postgres.reads import POSITION, CoalescedReads, RecordReader, RunReads
from service.backends.postgres.terminal import TerminalSteps
from service.backends.postgres.schema import migrate
from service.backends.records import MAX_OWED, MAX_OWED_BYTES, LockLost, Run, StoreUnavailable, WriteRefused
from service.cancelling import cancel_and_wait
from service.settings import ConfigError

# A free slot taken for a token, and the fencing token it mints (a row only when a slot was free): the
# sequence's next value, raised (setval) to the database's clock in microseconds and above the highest token the
# caller has seen, so it stays above every earlier one even if the sequence was lost. The outer UPDATE checks the
# slot is free again: after waiting for a renewal's row lock PostgreSQL re-checks only its own WHERE on the renewed
# row, not the subquery's snapshot, and without the check a lease renewed just before it lapsed would be taken.
TAKE_SLOT = """
WITH taken AS (
  UPDATE slots SET token = %(token)s, expires_at = clock_timestamp() + %(ttl)s * interval '1 second'
  WHERE slot = (SELECT slot FROM slots WHERE slot < %(slots)s AND (token IS NULL OR expires_at <= clock_timestamp())
                ORDER BY slot LIMIT 1)
    AND (token IS NULL OR expires_at <= clock_timestamp())
  RETURNING slot)
SELECT CASE WHEN n >= f THEN n ELSE setval('fencing_tokens', f) END
FROM taken, LATERAL (SELECT nextval('fencing_tokens') AS n,
                            greatest(%(floor)s + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) AS f)
  AS mint
"""
LIVE_TOKENS = "SELECT token FROM slots WHERE token IS NOT NULL AND expires_at > clock_timestamp()"
RETRY_MIGRATION_SECONDS = 1.0


class PostgresBackend(TerminalSteps, RunReads):
    """Runs as rows of ``runs`` (their record is the client-facing JSON), trimmed to ``retention`` finished runs."""

    name = "postgres"
    shared = True  # every replica on the same database and schema shares slots, queue and runs
    take_again = True  # it cannot tell from a take whether another could start a run: the caller asks again
    queue_after_take: int | None = None  # not told by take: the caller asks queue_length
    appended_events: frozenset[str] = frozenset()  # the hub sends every event (finish_and_take appends none)

    def __init__(self, db: Database, slots: int, lock_ttl_seconds: float, retention: int, retention_bytes: int,
                 log: logging.Logger, idempotency_ttl_seconds: float = 86400.0) -> None:
        self.db = db
        self.slots = slots
        self.ttl_seconds = lock_ttl_seconds
        self.renew_interval: float | None = lock_ttl_seconds / 3
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.log = log
        self.on_cancel: Callable[[str, str | None], object] = lambda run_id, by: None
        self.on_work: Callable[[], None] = lambda: None
        self.on_moved: Callable[[], None] = lambda: None  # never called here: Redis mode's handoffs
        self.watching: Callable[[], bool] = lambda: False
        self.on_finished: Callable[[Run], None] = lambda run: None
        self.on_not_owed: Callable[[Run, str], None] = lambda run, detail: None
        self.on_invalid_configuration: Callable[[str, str], object] = lambda variable, detail: None
        self.idempotency_keys = PostgresIdempotencyKeys(db, idempotency_ttl_seconds)
        self.listener = Listener(db, log, self)
        self._held: set[str] = set()  # tokens of the slots this replica holds (until it releases them)
        self._releasing: set[str] = set()  # tokens whose slot a terminal write out now frees (holds)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._progress: dict[str, asyncio.Task[None]] = {}
        self._progress_dirty: set[str] = set()
        self._migrating: asyncio.Task[None] | None = None
        self._records = RecordReader(log, f"{db.schema}.runs")
        self._reads = CoalescedReads(db)
        self.highest_token = 0
        self._take_token: str | None = None  # a take not answered yet (take)

    # --- life ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the schema to this version (ConfigError on a newer one), then listen. A database not reachable
        yet is migrated as soon as it is: until then no work runs on it (StoreUnavailable, 503), and a newer
        schema found then goes to ``on_invalid_configuration``, the work still refused."""
        try:
            await self._migrate()
        except StoreUnavailable:
            self._migrating = asyncio.create_task(self._migrate_when_reachable(), name="postgres-migrate")
            return
        await self.listener.start()

    async def _migrate(self) -> None:
        async with self.db.guard():
            connection = await self.db.connect()
            try:
                await migrate(connection, self.db.schema)
            finally:
                await connection.close()
        self.db.schema_checked = True

    async def _migrate_when_reachable(self) -> None:
        while True:
            await asyncio.sleep(RETRY_MIGRATION_SECONDS)
            try:
                await self._migrate()
            except StoreUnavailable:
                continue
            except ConfigError as exc:  # a schema newer than this version knows: never worked on
                self.on_invalid_configuration(exc.variable, exc.detail)
                return
            await self.listener.start()  # after the check: event streams are refused (503) until then
            return

    async def close(self) -> None:
        if self._migrating is not None:
            await cancel_and_wait(self._migrating)
        await self.listener.stop()
        await self.db.close()

    async def check(self) -> None:
        await self.db.run(lambda connection: connection.execute("SELECT 1 FROM locks LIMIT 1"), transaction=False)

    def event_transport(self, sink: FrameSink) -> PostgresEvents:
        return PostgresEvents(self.db, sink, self.log, self.listener)

    def webhook_deliveries(self, timeout_seconds: float) -> PostgresDeliveries:
        return PostgresDeliveries(self.db, timeout_seconds)

    # --- what the listener hears -----------------------------------------------------------------------------

    def wake(self, run_id: str) -> None:
        for event in self._waiters.get(run_id, ()):
            event.set()

    def wake_all(self) -> None:
        for run_id in list(self._waiters):
            self.wake(run_id)

    # --- slots and the queue -----------------------------------------------------------------------------------

    def refusal(self, on_busy: str, queue_max: int) -> str | None:
        return None  # only the admission transaction can tell, one step with the other replicas

    async def _take_slot(self, connection: Connection, token: str) -> int | None:
        """A free slot for ``token`` and the fencing token minted with it; None when every slot is taken."""
        row = await (await connection.execute(TAKE_SLOT, {"token": token, "ttl": self.ttl_seconds,
                                                          "slots": self.slots, "floor": self.highest_token})).fetchone()
        if row is None:
            return None
        self.highest_token = max(self.highest_token, int(row[0]))
        return int(row[0])

    async def admit(self, run: Run, on_busy: str, queue_max: int, claim: builtins.list[Any] | None = None) -> str:
        """As MemoryBackend.admit, across replicas: one transaction under the admission lock. A retry after a
        lost reply finds the run stored and answers what the first attempt did."""
        token = uuid.uuid4().hex

        async def admit(connection: Connection) -> tuple[str, int | None, int | None]:
            await self.db.lock(connection)
            row = await (await connection.execute(
                f"SELECT holder, CASE WHEN queue_rank IS NULL THEN NULL ELSE {POSITION} END FROM runs "
                "WHERE run_id = %s", (run.run_id,))).fetchone()
            if row is not None:  # a retry: the first attempt was committed
                return ("started", None, None) if row[0] == token else ("queued", row[1], None)
            if claim and not await self.idempotency_keys.holds_claim(connection, claim[0], run.run_id):
                return "lost", None, None
            waiting_row = await (await connection.execute(
                "SELECT count(*) FROM runs WHERE queue_rank IS NOT NULL")).fetchone()
            waiting = int(waiting_row[0]) if waiting_row is not None else 0
            if waiting == 0 and (fencing := await self._take_slot(connection, token)) is not None:
                started = run.copy()
                started.update(fencing_token=fencing)
                await connection.execute("INSERT INTO runs (run_id, record, holder) VALUES (%s, %s, %s)",
                                         (run.run_id, started.record(), token))
                if claim:
                    await self.idempotency_keys.accept_in(connection, claim[0], claim[1], run.run_id)
                return "started", None, fencing
            if on_busy == "reject":
                return "busy", None, None
            if waiting >= queue_max:
                return "full", None, None
            queued = run.copy()
            queued.update(queue_position=0)  # stored as "queued"; the position is read from the queue
            rank = "-nextval('queue_seq')" if on_busy == "interrupt" else "nextval('queue_seq')"
            await connection.execute(f"INSERT INTO runs (run_id, record, queue_rank) VALUES (%s, %s, {rank})",
                                     (run.run_id, queued.record()))
            if claim:
                await self.idempotency_keys.accept_in(connection, claim[0], claim[1], run.run_id)
            await connection.execute("SELECT pg_notify(%s, %s)", (self.listener.channel("queued"), run.run_id))
            return "queued", 1 if on_busy == "interrupt" else waiting + 1, None

        outcome, position, fencing = await self.db.run(admit)
        if outcome == "started":
            run.holder = token
            self._held.add(token)
            if fencing is not None:
                run.update(fencing_token=fencing)
            else:
                stored = await self.get(run.run_id)
                run.update(fencing_token=stored.fencing_token if stored is not None else None)
        elif outcome == "queued":
            run.update(queue_position=position or None)
        return outcome

    async def take(self) -> Run | None:
        """The head of the queue on a free slot, or None: one transaction under the admission lock.

        The token is kept until a take is answered: a take whose reply was lost is asked again with it at the next
        call, and answers the same run (not left to end as an orphan when the token's lease lapses).
        """
        token = self._take_token = self._take_token or uuid.uuid4().hex

        async def take(connection: Connection) -> Run | None:
            await self.db.lock(connection)
            taken = await connection.execute(
                "SELECT run_id, record FROM runs WHERE holder = %s AND finished_seq IS NULL", (token,))
            head = await connection.execute(
                "SELECT run_id, record FROM runs WHERE queue_rank IS NOT NULL ORDER BY queue_rank LIMIT 1")
            row = await taken.fetchone()  # pipelined: one round trip for the lock and both reads
            if row is not None:  # a retry: the first attempt was committed
                return self._read(row[0], row[1], holder=token)
            row = await head.fetchone()
            if row is None or (fencing := await self._take_slot(connection, token)) is None:
                return None
            run = self._read(row[0], row[1], holder=token)
            if run is None:  # unreadable: out of the queue, left for orphan recovery under a dead token
                await connection.execute("UPDATE runs SET queue_rank = NULL, holder = %s WHERE run_id = %s",
                                         (uuid.uuid4().hex, row[0]))
                await connection.execute("UPDATE slots SET token = NULL, expires_at = NULL WHERE token = %s", (token,))
                return None
            run.update(queue_position=None, fencing_token=fencing)
            await connection.execute("UPDATE runs SET record = %s, holder = %s, queue_rank = NULL WHERE run_id = %s",
                                     (run.record(), token, run.run_id))
            return run

        run = await self.db.run(take)
        self._take_token = None
        if run is not None:
            self._held.add(token)
        return run

    async def finish_and_take(self, run: Run) -> Run | None:
        """The terminal write alone: the dispatcher, woken by the slot freed, takes the next run."""
        await self.save(run, release=True)
        return None

    async def dequeue(self, run_id: str, **changes: Any) -> Run | None:
        """A waiting run out of the queue with its terminal state, in one transaction; None if it no longer waits."""
        ended: builtins.list[Run] = []  # what the first attempt wrote, for a retry to recognise

        async def dequeue(connection: Connection) -> tuple[Run | None, tuple[int, int, int]]:
            await self.db.lock(connection)
            row = await (await connection.execute(
                "SELECT record FROM runs WHERE run_id = %s AND queue_rank IS NOT NULL FOR UPDATE",
                (run_id,))).fetchone()
            if row is None and ended:  # Database.run's retry: was it the first attempt that ended it?
                stored = await (await connection.execute(
                    "SELECT record FROM runs WHERE run_id = %s AND finished_seq IS NOT NULL", (run_id,))).fetchone()
                mine = stored is not None and bytes(stored[0]) == ended[0].record()
                return (ended[0] if mine else None), (0, 0, 0)
            run = self._read(run_id, row[0]) if row is not None else None
            if run is None:
                return None, (0, 0, 0)
            run.update(queue_position=None, **changes)
            ended[:] = [run]
            return run, await self._finish(connection, run, "")

        run, answer = await self.db.run(dequeue)
        if run is not None:
            await self._after_finish(run, *answer)
        return run

    async def queue_length(self) -> int:
        async def count(connection: Connection) -> int:
            row = await (await connection.execute("SELECT count(*) FROM runs WHERE queue_rank IS NOT NULL")).fetchone()
            return int(row[0]) if row is not None else 0

        return await self.db.run(count, transaction=False)

    async def interrupt_oldest(self, by: str, stopping: builtins.list[str]) -> str | None:
        """The earliest admitted run holding a live slot on any replica, not ``by``, not stopping and not asked to
        stop yet, asked to stop for ``by`` (a cancel row and a notification) in one step; a retry answers it."""
        async def interrupt(connection: Connection) -> str | None:
            await self.db.lock(connection)
            row = await (await connection.execute("SELECT run_id FROM cancels WHERE by_run = %s", (by,))).fetchone()
            if row is not None:
                return str(row[0])
            row = await (await connection.execute(
                f"SELECT run_id FROM runs WHERE finished_seq IS NULL AND holder IN ({LIVE_TOKENS}) "
                "AND run_id <> %s AND run_id <> ALL(%s) AND run_id NOT IN (SELECT run_id FROM cancels) "
                "ORDER BY seq LIMIT 1", (by, list(stopping)))).fetchone()
            if row is None:
                return None
            await connection.execute("INSERT INTO cancels (run_id, by_run) VALUES (%s, %s)", (row[0], by))
            await connection.execute("SELECT pg_notify(%s, %s)", (self.listener.channel("cancel"), f"{row[0]} {by}"))
            return str(row[0])

        return await self.db.run(interrupt)

    # --- leases --------------------------------------------------------------------------------------------

    def holds(self, token: str) -> bool:
        """Whether ``token``'s slot is this replica's: not once a terminal write that frees it is out (a renewal
        answered meanwhile finds the slot gone by that write's doing, not lost)."""
        return token in self._held and token not in self._releasing

    async def renew(self, run: Run) -> bool:
        """Extend the lease of ``run``'s slot; True when it had lapsed and was taken back (the run still this
        holder's and a slot free). Raises LockLost when another holds the run or no slot is free."""
        token = run.holder
        assert token is not None
        if token not in self._held:
            return False

        async def renew(connection: Connection) -> bool | None:
            cursor = await connection.execute(
                "UPDATE slots SET expires_at = clock_timestamp() + %s * interval '1 second' "
                "WHERE token = %s AND expires_at > clock_timestamp() RETURNING slot", (self.ttl_seconds, token))
            if await cursor.fetchone() is not None:
                return False
            await self.db.lock(connection)
            owner = await (await connection.execute(
                "SELECT holder FROM runs WHERE run_id = %s AND finished_seq IS NULL", (run.run_id,))).fetchone()
            if owner is None or owner[0] != token:
                return None
            await connection.execute("UPDATE slots SET token = NULL, expires_at = NULL WHERE token = %s", (token,))
            return True if await self._take_slot(connection, token) is not None else None

        taken_back = await self.db.run(renew)
        if taken_back is None:
            raise LockLost("the lease lapsed and the run is another's, or every slot is taken")
        return taken_back

    async def release(self, token: str) -> None:
        if token not in self._held:
            return
        self._held.discard(token)
        with contextlib.suppress(StoreUnavailable):  # unreachable: the lease expires by itself
            await self.db.run(lambda connection: connection.execute(
                "UPDATE slots SET token = NULL, expires_at = NULL WHERE token = %s", (token,)), transaction=False)

    async def check_lease(self, run: Run) -> bool:
        """Whether ``run`` holds its slot right now: its lease has not passed and the run is still its holder's."""
        if run.holder is None or run.holder not in self._held:
            return False

        async def check(connection: Connection) -> bool:
            row = await (await connection.execute(
                f"SELECT EXISTS (SELECT 1 FROM slots WHERE token = %s AND expires_at > clock_timestamp()) "
                "AND EXISTS (SELECT 1 FROM runs WHERE run_id = %s AND holder = %s AND finished_seq IS NULL)",
                (run.holder, run.run_id, run.holder))).fetchone()
            return bool(row is not None and row[0])

        return await self.db.run(check, transaction=False)

    async def claim_orphans(self, starting: Run | None = None) -> builtins.list[Run]:
        """Unfinished runs whose holder holds no live slot (and no live claim), passed to a claim of this call for a
        lock TTL while the caller records them; if the caller dies, its claim lapses and they are orphans again.
        It always looks, ``starting`` or not (one indexed query)."""
        claim = uuid.uuid4().hex

        async def any_orphan(connection: Connection) -> bool:
            cursor = await connection.execute(
                "SELECT 1 FROM runs WHERE finished_seq IS NULL AND holder IS NOT NULL AND holder <> ALL(%s) "
                f"AND holder NOT IN ({LIVE_TOKENS}) AND (claimed_until IS NULL OR claimed_until <= clock_timestamp())"
                " LIMIT 1", (list(self._held),))
            return await cursor.fetchone() is not None

        attempts = 0

        async def orphans(connection: Connection) -> builtins.list[tuple[str, bytes]]:
            nonlocal attempts
            attempts += 1
            await self.db.lock(connection)
            if attempts > 1:  # Database.run's retry: the first attempt may have committed, its reply lost
                cursor = await connection.execute(
                    "SELECT run_id, record FROM runs WHERE holder = %s AND finished_seq IS NULL", (claim,))
                if found := [(str(row[0]), bytes(row[1])) for row in await cursor.fetchall()]:
                    return found
            # waits for renewals in flight (they take no admission lock), so the next statement's snapshot sees
            # a lease renewed just before it lapsed as live; renewals wait in turn until this step commits
            await connection.execute("SELECT 1 FROM slots FOR SHARE")
            cursor = await connection.execute(
                "UPDATE runs SET holder = %s, claimed_until = clock_timestamp() + %s * interval '1 second' "
                "WHERE finished_seq IS NULL AND holder IS NOT NULL AND holder <> ALL(%s) "
                f"AND holder NOT IN ({LIVE_TOKENS}) AND (claimed_until IS NULL OR claimed_until <= clock_timestamp())"
                " RETURNING run_id, record", (claim, self.ttl_seconds, list(self._held)))
            return [(str(row[0]), bytes(row[1])) for row in await cursor.fetchall()]

        if not await self.db.run(any_orphan, transaction=False):
            return []  # the usual answer: one read, no lock
        runs = [self._read(run_id, raw, holder=claim) for run_id, raw in await self.db.run(orphans)]
        return [run for run in runs if run is not None and not run.finished]

    # --- the run store ---------------------------------------------------------------------------------------

    async def add(self, run: Run) -> None:
        await self.db.run(lambda connection: connection.execute(
            "INSERT INTO runs (run_id, record, holder) VALUES (%s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
            (run.run_id, run.record(), run.holder)))

    def note_progress(self, run: Run) -> None:
        """Write a progress change soon, coalescing bursts; save() waits for the write so order holds."""
        self._progress_dirty.add(run.run_id)
        if run.run_id not in self._progress:
            self._progress[run.run_id] = asyncio.create_task(self._write_progress(run))

    async def _write_progress(self, run: Run) -> None:
        try:
            while run.run_id in self._progress_dirty:
                self._progress_dirty.discard(run.run_id)
                if not await self._save_unfinished(run):
                    return
        except StoreUnavailable:
            pass  # best effort: the next state change writes the whole run
        finally:
            self._progress.pop(run.run_id, None)

    async def _save_unfinished(self, run: Run) -> bool:
        """A change of a run that is not terminal (RUNNING, progress), while it is still the writer's."""
        async def save(connection: Connection) -> bool:
            cursor = await connection.execute(
                "UPDATE runs SET record = %s WHERE run_id = %s AND holder IS NOT DISTINCT FROM %s "
                "AND finished_seq IS NULL AND queue_rank IS NULL RETURNING 1", (run.record(), run.run_id, run.holder))
            return await cursor.fetchone() is not None

        return await self.db.run(save, transaction=False)

    async def save(self, run: Run, release: bool = False) -> None:
        """Store a change; a terminal state also frees the slot (with ``release``), clears the cancel flag, owes the
        webhook delivery, counts the run for retention and notifies, in one transaction. A retry of the same
        terminal write is accepted; any other write of a run not the writer's raises WriteRefused."""
        self._progress_dirty.discard(run.run_id)
        pending = self._progress.get(run.run_id)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        if not run.finished:
            if not await self._save_unfinished(run):
                raise WriteRefused("the run is terminal already, or held by another token")
            return
        token = run.holder if release and run.holder is not None else ""

        async def finish(connection: Connection) -> tuple[int, int, int]:
            await self.db.lock(connection)
            return await self._finish(connection, run, token)

        if token:
            self._releasing.add(token)
        try:
            answer = await self.db.run(finish)
        finally:
            self._releasing.discard(token)
        if token:
            self._held.discard(token)
        if answer[2] == -2:
            raise WriteRefused("the run is terminal already, or held by another token")
        await self._after_finish(run, *answer)

    async def _after_finish(self, run: Run, finished_count: int, finished_bytes: int, owed: int) -> None:
        if owed == -1:
            self.on_not_owed(run, f"too many deliveries owed already (at most {MAX_OWED}, {MAX_OWED_BYTES} bytes)")
        elif owed == 1:
            self.on_finished(run)

    # --- cancel flags ----------------------------------------------------------------------------------------

    async def request_cancel(self, run_id: str, by: str | None = None) -> None:
        """Ask whichever replica runs ``run_id`` to cancel it: a row its renewal reads, and a notification."""
        async def cancel(connection: Connection) -> None:
            await connection.execute(
                "INSERT INTO cancels (run_id, by_run) VALUES (%s, %s) "
                "ON CONFLICT (run_id) DO UPDATE SET by_run = excluded.by_run", (run_id, by))
            await connection.execute("SELECT pg_notify(%s, %s)",
                                     (self.listener.channel("cancel"), f"{run_id} {by}" if by else run_id))

        await self.db.run(cancel)

    async def cancel_requested(self, run_id: str) -> tuple[bool, str | None]:
        async def asked(connection: Connection) -> tuple[bool, str | None]:
            row = await (await connection.execute("SELECT by_run FROM cancels WHERE run_id = %s",
                                                  (run_id,))).fetchone()
            return (False, None) if row is None else (True, row[0])

        return await self.db.run(asked, transaction=False)
