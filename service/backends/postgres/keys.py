"""Postgres mode's Idempotency-Keys and webhook deliveries, shared by every replica (tables ``idempotency_keys``
and ``webhooks``), with the semantics of Redis mode's (redis/idempotency.py, redis/webhooks.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from service.backends.base import Claim, Delivery
from service.backends.postgres.database import Connection, Database
from service.backends.records import MAX_ATTEMPTS, Run

# A pending key older than this whose run does not exist was left by a replica that died before admitting its
# run: the next request with the key takes it over (as in Redis mode).
STALE_PENDING_SECONDS = 60.0
SWEEP_EVERY = 200  # claims between two sweeps of expired keys
POLL_SECONDS = 1.0  # with nothing owed, the queue is looked at this often (other replicas' deliveries)


class PostgresIdempotencyKeys:
    """Keys as rows (fingerprint, run_id, state, expiry); a pending one lives at least STALE_PENDING_SECONDS."""

    def __init__(self, db: Database, ttl_seconds: float) -> None:
        self.db = db
        self.ttl_seconds = ttl_seconds
        self.pending_seconds = max(ttl_seconds, STALE_PENDING_SECONDS)
        self._claims = 0

    async def claim(self, key: str, fingerprint: str, run_id: str) -> Claim:
        self._claims += 1
        sweep = self._claims % SWEEP_EVERY == 1

        async def claim(connection: Connection) -> Claim:
            if sweep:
                await connection.execute("DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys "
                                         "WHERE expires_at <= clock_timestamp() LIMIT 1000)")
            await connection.execute("INSERT INTO idempotency_keys VALUES (%s, '', '', 'none', clock_timestamp(), "
                                     "clock_timestamp()) ON CONFLICT (key) DO NOTHING", (key,))
            row = await (await connection.execute(
                "SELECT fingerprint, run_id, state, expires_at > clock_timestamp(), "
                "extract(epoch FROM clock_timestamp() - claimed_at), "
                "EXISTS (SELECT 1 FROM runs WHERE runs.run_id = idempotency_keys.run_id) "
                "FROM idempotency_keys WHERE key = %s FOR UPDATE", (key,))).fetchone()
            assert row is not None
            held_fingerprint, holder, state, alive, age, run_exists = row
            if alive and state != "none" and holder != run_id:
                admitted = state == "accepted" or run_exists
                if admitted or age < STALE_PENDING_SECONDS:
                    if held_fingerprint != fingerprint:
                        return Claim("mismatch", holder)
                    return Claim("accepted" if admitted else "pending", holder)
            await connection.execute(
                "UPDATE idempotency_keys SET fingerprint = %s, run_id = %s, state = 'pending', "
                "claimed_at = clock_timestamp(), expires_at = clock_timestamp() + %s * interval '1 second' "
                "WHERE key = %s", (fingerprint, run_id, self.pending_seconds, key))
            return Claim("new", run_id)

        return await self.db.run(claim)

    def admit_args(self, key: str, fingerprint: str) -> list[Any] | None:
        """What admit needs to admit the run only while the key is still this request's claim, and to mark it
        accepted in the same transaction."""
        return [key, fingerprint]

    async def holds_claim(self, connection: Connection, key: str, run_id: str) -> bool:
        row = await (await connection.execute(
            "SELECT run_id FROM idempotency_keys WHERE key = %s AND expires_at > clock_timestamp() FOR UPDATE",
            (key,))).fetchone()
        return row is not None and row[0] == run_id

    async def accept_in(self, connection: Connection, key: str, fingerprint: str, run_id: str) -> None:
        """Mark the key accepted for the TTL, unless another request holds it now (inside the caller's transaction)."""
        await connection.execute(
            "INSERT INTO idempotency_keys VALUES (%(key)s, %(fingerprint)s, %(run_id)s, 'accepted', clock_timestamp(), "
            "clock_timestamp() + %(ttl)s * interval '1 second') ON CONFLICT (key) DO UPDATE SET "
            "fingerprint = excluded.fingerprint, state = 'accepted', expires_at = excluded.expires_at "
            "WHERE idempotency_keys.run_id = excluded.run_id OR idempotency_keys.expires_at <= clock_timestamp()",
            {"key": key, "fingerprint": fingerprint, "run_id": run_id, "ttl": self.ttl_seconds})

    async def accept(self, key: str, fingerprint: str, run_id: str) -> None:
        async def accept(connection: Connection) -> None:
            await self.accept_in(connection, key, fingerprint, run_id)

        await self.db.run(accept)

    async def release(self, key: str, run_id: str) -> None:
        await self.db.run(lambda connection: connection.execute(
            "DELETE FROM idempotency_keys WHERE key = %s AND run_id = %s AND state = 'pending'", (key, run_id)))


class PostgresDeliveries:
    """The queue in the database: it outlives every replica. A claim leases a due delivery (FOR UPDATE SKIP
    LOCKED, then its due time moved past the lease) and counts its attempt; a claimer that dies leaves it due
    again when the lease ends, and any replica picks it up; the count stops it after MAX_ATTEMPTS."""

    durable = True

    def __init__(self, db: Database, timeout_seconds: float) -> None:
        self.db = db
        self.lease_seconds = 2 * timeout_seconds + 5  # longer than an attempt can last
        self.on_owed: Callable[[], None] = lambda: None

    def owe(self, run: Run) -> None:
        self.on_owed()  # stored with the terminal state; look at the queue now

    async def claim(self) -> tuple[Delivery | None, float]:
        token = uuid.uuid4().hex
        claimed_at = time.monotonic()
        attempts = 0
        columns = "SELECT run_id, attempt, url, body, message_id FROM webhooks"

        def leased(row: Any, attempt: int) -> Delivery:
            return Delivery(str(row[0]), str(row[2]), bytes(row[3]), attempt=attempt, lease=token,
                            send_by=claimed_at + self.lease_seconds - 1, message_id=row[4] or "")

        async def claim(connection: Connection) -> tuple[Delivery | None, float]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # Database.run's retry: the first attempt may have committed, its reply lost
                row = await (await connection.execute(f"{columns} WHERE lease = %s", (token,))).fetchone()
                if row is not None:
                    return leased(row, int(row[1])), 0.0
            row = await (await connection.execute(
                f"{columns} WHERE due_at <= clock_timestamp() ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED")).fetchone()
            if row is None:
                due = await (await connection.execute(
                    "SELECT extract(epoch FROM min(due_at) - clock_timestamp()) FROM webhooks")).fetchone()
                wait = float(due[0]) if due is not None and due[0] is not None else POLL_SECONDS
                return None, max(0.0, min(wait, POLL_SECONDS))
            run_id, made = str(row[0]), int(row[1])
            if made >= MAX_ATTEMPTS:
                await connection.execute("DELETE FROM webhooks WHERE run_id = %s", (run_id,))
                return Delivery(run_id, "", b"", attempt=made, exhausted=True), 0.0
            await connection.execute(
                "UPDATE webhooks SET attempt = attempt + 1, lease = %s, "
                "due_at = clock_timestamp() + %s * interval '1 second' WHERE run_id = %s",
                (token, self.lease_seconds, run_id))
            return leased(row, made + 1), 0.0

        return await self.db.run(claim)

    async def report(self, delivery: Delivery, retry_in: float | None) -> None:
        if retry_in is None:
            await self.db.run(lambda connection: connection.execute(
                "DELETE FROM webhooks WHERE run_id = %s AND lease = %s", (delivery.run_id, delivery.lease or "")))
            return
        await self.db.run(lambda connection: connection.execute(
            "UPDATE webhooks SET lease = NULL, due_at = clock_timestamp() + %s * interval '1 second' "
            "WHERE run_id = %s AND lease = %s", (retry_in, delivery.run_id, delivery.lease or "")))

    def take_all(self) -> list[Delivery]:
        return []  # what is owed stays in the database for the other replicas
