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
import logging
from typing import Any

from service.backends.postgres.database import Connection, Database
from service.backends.records import Run, RunRecordInvalid

# A waiting run's place in the queue, computed only for a run that waits
POSITION = "(SELECT count(*) FROM runs AS ahead WHERE ahead.queue_rank < runs.queue_rank) + 1"
Found = tuple[bytes, int | None]  # a record and its queue position (None when it does not wait)


class CoalescedReads:
    """``await reads.get(run_id)``: the run's record and position, read together with the others asked for
    meanwhile (one query per batch)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._ids: list[str] = []
        self._futures: list[asyncio.Future[Found | None]] = []
        self._fetches: set[asyncio.Task[None]] = set()  # strong references until each is done

    async def get(self, run_id: str) -> Found | None:
        loop = asyncio.get_running_loop()
        if not self._ids:  # the first of a batch: sent once the callers ready now have asked too
            loop.call_soon(self._send)
        future: asyncio.Future[Found | None] = loop.create_future()
        self._ids.append(run_id)
        self._futures.append(future)
        return await future

    def _send(self) -> None:
        ids, futures = self._ids, self._futures
        self._ids, self._futures = [], []
        fetch = asyncio.ensure_future(self._fetch(ids, futures))
        self._fetches.add(fetch)
        fetch.add_done_callback(self._fetches.discard)

    async def _fetch(self, ids: list[str], futures: list[asyncio.Future[Found | None]]) -> None:
        async def read(connection: Connection) -> dict[str, Found]:
            cursor = await connection.execute(
                f"SELECT run_id, record, CASE WHEN queue_rank IS NULL THEN NULL ELSE {POSITION} END FROM runs "
                "WHERE run_id = ANY(%s)", (list(set(ids)),))
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
