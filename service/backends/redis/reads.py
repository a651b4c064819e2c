"""Reading run records from Redis cheaply: concurrent GETs share one MGET, and bytes read again are not parsed again.

Under load many status requests wait on Redis at the same moment. Each
command costs a write and a read on the socket and redis-py's own work
around them, so one MGET for all of them is several times cheaper than a GET
each. Nothing is cached: every caller's key is read by a command sent after
its call, so it sees every write that landed before it asked. What is kept
is only the parse of a record's bytes (the same bytes make the same run).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from redis.asyncio import Redis

from service.backends.coalescing import Coalesced
from service.backends.records import Run, RunRecordInvalid


class CoalescedReads(Coalesced[bytes]):
    """``await reads.get(key)``: a key's value (or None), read together with the others asked for meanwhile."""

    def __init__(self, client: Redis) -> None:
        super().__init__()
        self.client = client

    async def _fetch(self, keys: list[str], futures: list[asyncio.Future[bytes | None]]) -> None:
        try:
            values = cast("list[bytes | None]",
                          [await self.client.get(keys[0])] if len(keys) == 1 else await self.client.mget(keys))
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # each caller gets the failure (its store guard turns it into a 503)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, value in zip(futures, values):
            if not future.done():  # a caller that was cancelled meanwhile is left alone
                future.set_result(value)


class RecordReader:
    """Run records (their client-facing JSON) to Runs; the last PARSED_MAX small ones are kept parsed."""

    PARSED_MAX, PARSED_MAX_BYTES = 256, 4096  # at most 1 MiB of records kept parsed

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._parsed: dict[bytes, Run] = {}  # record bytes -> the Run they make, oldest first
        self._invalid_logged: set[str] = set()

    def read(self, key: str, raw: bytes | None, holder: str | None = None) -> Run | None:
        """The Run in ``raw`` (a copy: callers may change it), or None; an unreadable record is logged once."""
        if raw is None:
            return None
        parsed = self._parsed.get(raw) if holder is None else None
        if parsed is not None:  # a run polled for its status: the same bytes again
            return parsed.copy()
        try:
            run = Run.from_json(raw, holder=holder)
        except RunRecordInvalid as exc:
            if key not in self._invalid_logged and len(self._invalid_logged) < 10000:
                self._invalid_logged.add(key)
                self.log.error("run_record_invalid", extra={"key": key, "detail": str(exc)})
            return None
        if holder is None and len(raw) <= self.PARSED_MAX_BYTES:
            if len(self._parsed) >= self.PARSED_MAX:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[raw] = run.copy()
        return run
