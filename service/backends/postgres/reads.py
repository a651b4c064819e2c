"""Reading run records from PostgreSQL cheaply: concurrent reads share one query, and bytes read again are not
parsed again.

Under load many status requests wait at the same moment; each query costs a round trip and the driver's own
work around it, so one ``WHERE run_id = ANY(...)`` for all of them is several times cheaper than one each.
Nothing is cached: every caller's run is read by a query sent after its call, so it sees every write
committed before it asked. What is kept is only the parse of a record's bytes (the same bytes make the same
run).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from typing import Any

from service.backends.coalescing import Coalesced
from service.backends.postgres.database import Connection, Database
from service.backends.records import Page, Run, RunRecordInvalid

# A waiting run's place in the queue, computed only for a run that waits
POSITION = "(SELECT count(*) FROM runs AS ahead WHERE ahead.queue_rank < runs.queue_rank) + 1"
Found = tuple[bytes, int | None]  # a record and its queue position (None when it does not wait)


class CoalescedReads(Coalesced[Found]):
    """``await reads.get(run_id)``: the run's record and position, read together with the others asked for
    meanwhile (one query per batch)."""

    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db

    async def _fetch(self, ids: list[str], futures: list[asyncio.Future[Found | None]]) -> None:
        async def read(connection: Connection) -> dict[str, Found]:
            cursor = await connection.execute(
                f"SELECT run_id, record, CASE WHEN queue_rank IS NULL THEN NULL ELSE {POSITION} END FROM runs "
                "WHERE run_id = ANY(%s)", (list(set(ids)),), binary=True)
            return {str(row[0]): (bytes(row[1]), row[2]) for row in await cursor.fetchall()}

        try:
            found = await self.db.run(read, transaction=False)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # each caller gets the failure (StoreUnavailable: a 503)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for run_id, future in zip(ids, futures):
            if not future.done():  # a caller that was cancelled meanwhile is left alone
                future.set_result(found.get(run_id))


class RecordReader:
    """Run records to Runs; the last PARSED_MAX small ones are kept parsed (a polled run's bytes come again)."""

    PARSED_MAX, PARSED_MAX_BYTES = 256, 4096

    def __init__(self, log: logging.Logger, where: str) -> None:
        self.log = log
        self.where = where  # "<schema>.runs", named in run_record_invalid
        self._parsed: dict[bytes, Run] = {}
        self._invalid_logged: set[str] = set()

    def read(self, run_id: str, raw: Any, holder: str | None = None) -> Run | None:
        """The Run in ``raw`` (a copy: callers may change it), or None; an unreadable record is logged once."""
        if raw is None:
            return None
        raw = bytes(raw)
        parsed = self._parsed.get(raw) if holder is None else None
        if parsed is not None:
            return parsed.copy()
        try:
            run = Run.from_json(raw, holder=holder)
        except RunRecordInvalid as exc:
            if run_id not in self._invalid_logged and len(self._invalid_logged) < 10000:
                self._invalid_logged.add(run_id)
                self.log.error("run_record_invalid", extra={"key": f"{self.where}:{run_id}", "detail": str(exc)})
            return None
        if holder is None and len(raw) <= self.PARSED_MAX_BYTES:
            if len(self._parsed) >= self.PARSED_MAX:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[raw] = run.copy()
        return run


class RunReads:
    """The run-store reads of the Postgres backend (a part of it: PostgresBackend): no lock, no transaction
    but where two reads must agree."""

    POLL_SECONDS = 1.0  # waiters re-read the run this often in case a notification was missed
    db: Database
    _reads: CoalescedReads
    _records: RecordReader
    _waiters: dict[str, set[asyncio.Event]]

    async def waiting(self) -> builtins.list[Run]:
        async def waiting(connection: Connection) -> builtins.list[tuple[str, bytes]]:
            cursor = await connection.execute(
                "SELECT run_id, record FROM runs WHERE queue_rank IS NOT NULL ORDER BY queue_rank", binary=True)
            return [(str(row[0]), bytes(row[1])) for row in await cursor.fetchall()]

        runs = []
        for position, (run_id, raw) in enumerate(await self.db.run(waiting, transaction=False), 1):
            run = self._read(run_id, raw)
            if run is not None:
                run.update(queue_position=position)
                runs.append(run)
        return runs

    def _read(self, run_id: str, raw: bytes | None, holder: str | None = None) -> Run | None:
        """A stored record as a Run; an unreadable one is logged once (run_record_invalid) and skipped."""
        return self._records.read(run_id, raw, holder)

    async def get(self, run_id: str) -> Run | None:
        """The run (with its queue position while it waits), or None; concurrent reads share one query."""
        found = await self._reads.get(run_id)
        if found is None:
            return None
        run = self._read(run_id, found[0])
        if run is not None and found[1] is not None:
            run.update(queue_position=int(found[1]))
        return run

    async def wait_finished(self, run_id: str, timeout: float) -> Run | None:
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                run = await self.get(run_id)
                left = deadline - loop.time()
                if run is None or run.finished or left <= 0:
                    return run
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, self.POLL_SECONDS))
                event.clear()
        finally:
            waiters = self._waiters[run_id]
            waiters.discard(event)
            if not waiters:
                del self._waiters[run_id]

    async def list(self, page: Page, before: str | None = None) -> builtins.list[Run]:
        """As MemoryBackend.list; fetched in small batches so a page of large runs stays small in memory."""
        batch = min(max(page.limit, 10), 50)

        async def rows(connection: Connection, top: int | None) -> builtins.list[tuple[str, bytes, int, int | None]]:
            cursor = await connection.execute(
                f"SELECT run_id, record, seq, CASE WHEN queue_rank IS NULL THEN NULL ELSE {POSITION} END FROM runs "
                "WHERE seq < %s ORDER BY seq DESC LIMIT %s", (top if top is not None else 2 ** 62, batch), binary=True)
            return [(str(r[0]), bytes(r[1]), int(r[2]), r[3]) for r in await cursor.fetchall()]

        async def listing(connection: Connection) -> None:
            top: int | None = None
            if before is not None:
                row = await (await connection.execute("SELECT seq FROM runs WHERE run_id = %s", (before,))).fetchone()
                if row is None:
                    return
                top = int(row[0])
            while True:
                found = await rows(connection, top)
                for run_id, raw, _, position in found:
                    run = self._read(run_id, raw)
                    if run is None:
                        continue
                    if position is not None:
                        run.update(queue_position=int(position))
                    if not page.offer(run):
                        return
                if len(found) < batch:
                    return
                top = found[-1][2]

        await self.db.run(listing, transaction=False)
        return page.runs

    async def logs(self, run_id: str) -> builtins.list[bytes] | None:
        async def logs(connection: Connection) -> builtins.list[bytes] | None:
            if await (await connection.execute("SELECT 1 FROM runs WHERE run_id = %s", (run_id,))).fetchone() is None:
                return None
            cursor = await connection.execute("SELECT line FROM run_logs WHERE run_id = %s ORDER BY id", (run_id,),
                                              binary=True)
            return [bytes(row[0]) for row in await cursor.fetchall()]

        return await self.db.run(logs)
