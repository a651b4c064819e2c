"""Postgres mode's terminal write: a run's end, the release of its slot, the delivery it owes, its retention and the
``finished`` notification, in the caller's transaction under the admission lock (store.py's save and dequeue)."""

from __future__ import annotations

import builtins

from service.backends.base import new_message_id
from service.backends.postgres.database import Connection
from service.backends.postgres.listener import Listener
from service.backends.records import MAX_OWED, MAX_OWED_BYTES, Run


class TerminalSteps:
    """The terminal-state steps of the Postgres backend (a part of it: PostgresBackend)."""

    retention: int
    retention_bytes: int
    listener: Listener

    async def _finish(self, connection: Connection, run: Run, token: str) -> tuple[int, int, int]:
        """A terminal state stored under the admission lock: (finished runs, their bytes, owed) as Redis's FINISH:
        owed 1 a delivery is owed, -1 past the bound, 0 none, -2 the write was refused."""
        if token:
            await connection.execute("UPDATE slots SET token = NULL, expires_at = NULL WHERE token = %s", (token,))
        record = run.record()
        row = await (await connection.execute(
            "SELECT holder, finished_seq, record, log_bytes FROM runs WHERE run_id = %s FOR UPDATE",
            (run.run_id,))).fetchone()
        if row is None:
            return 0, 0, 0  # dropped by retention since (a retry), or never stored: nothing to write back
        holder, finished_seq, stored, log_bytes = row
        if finished_seq is not None or (run.holder is not None and holder != run.holder):
            if bytes(stored) == record:
                return 0, 0, 0  # this very write, again
            return 0, 0, -2
        size = run.size + int(log_bytes)
        await connection.execute(
            "UPDATE runs SET record = %s, holder = NULL, claimed_until = NULL, queue_rank = NULL, size = %s, "
            "finished_seq = nextval('finish_seq') WHERE run_id = %s", (record, size, run.run_id))
        await connection.execute("DELETE FROM cancels WHERE run_id = %s", (run.run_id,))
        totals = await (await connection.execute(
            "UPDATE totals SET finished_count = finished_count + 1, finished_bytes = finished_bytes + %s "
            "WHERE name = 'finished' RETURNING finished_count, finished_bytes", (size,))).fetchone()
        owed = 0
        if run.webhook is not None:
            owed_row = await (await connection.execute(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM webhooks")).fetchone()
            assert owed_row is not None
            if owed_row[0] >= MAX_OWED or owed_row[1] + len(record) > MAX_OWED_BYTES:
                owed = -1
            else:
                await connection.execute(
                    "INSERT INTO webhooks (run_id, url, body, due_at, message_id) "
                    "VALUES (%s, %s, %s, clock_timestamp(), %s) ON CONFLICT (run_id) DO NOTHING",
                    (run.run_id, run.webhook, record, new_message_id()))
                owed = 1
        await connection.execute("SELECT pg_notify(%s, %s)", (self.listener.channel("finished"), run.run_id))
        assert totals is not None
        count, total = int(totals[0]), int(totals[1])
        if count > self.retention or total > self.retention_bytes:
            count, total = await self._trim(connection, count, total)
        return count, total, owed

    async def _trim(self, connection: Connection, count: int, total: int) -> tuple[int, int]:
        """Drop the oldest finished runs (with their log lines and events) past retention, inside the terminal
        state's transaction: a client that sees the terminal state sees the runs it pushed out gone."""
        cursor = await connection.execute(
            "SELECT run_id, size FROM runs WHERE finished_seq IS NOT NULL ORDER BY finished_seq LIMIT 1000")
        dropped: builtins.list[str] = []
        for run_id, size in await cursor.fetchall():
            if count <= self.retention and total <= self.retention_bytes:
                break
            dropped.append(run_id)
            count, total = count - 1, total - int(size)
        if dropped:
            await connection.execute("DELETE FROM runs WHERE run_id = ANY(%s)", (dropped,))
            await connection.execute("DELETE FROM run_logs WHERE run_id = ANY(%s)", (dropped,))
            await connection.execute("DELETE FROM events WHERE run_id = ANY(%s)", (dropped,))
            await connection.execute("DELETE FROM cancels WHERE run_id = ANY(%s)", (dropped,))  # asked after its end
            await connection.execute("UPDATE totals SET finished_count = %s, finished_bytes = %s "
                                     "WHERE name = 'finished'", (count, total))
        return count, total
