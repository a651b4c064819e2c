"""Redis mode's run lock: MAX_CONCURRENT_RUNS slots shared by every replica, and the health of the store.

Imported only when REDIS_URL is set (through redis_store).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, RedisError

from settings import MAX_CONCURRENT_RUNS_LIMIT
from store import LockLost, StoreUnavailable


class StoreHealth:
    """Logs store_unavailable / store_recovered once per transition, not per request."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.healthy = True

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:  # unreachable, or an error reply (READONLY, MISCONF, OOM...)
            if isinstance(exc, LockError):
                raise
            if self.healthy:
                self.healthy = False
                self.log.error("store_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise StoreUnavailable(str(exc)) from exc
        if not self.healthy:
            self.healthy = True
            self.log.info("store_recovered")


class RedisRunLock:
    """MAX_CONCURRENT_RUNS slots, each a redis-py Lock (a key holding a token, compare-and-delete release).

    Slot 0 is ``<prefix>:lock`` (the key of the single lock before slots
    existed), slot i ``<prefix>:lock:<i>``. Slots are taken only by the
    store's admit and take scripts, atomically with the queue; this class
    renews and releases them.
    """

    def __init__(self, client: Redis, prefix: str, slots: int, ttl_seconds: float, health: StoreHealth) -> None:
        self.client = client
        self.keys = [f"{prefix}:lock"] + [f"{prefix}:lock:{slot}" for slot in range(1, slots)]
        # Every slot any replica may use: a run holding one is alive, whatever this replica's MAX_CONCURRENT_RUNS
        self.all_keys = [f"{prefix}:lock"] + [f"{prefix}:lock:{slot}" for slot in range(1, MAX_CONCURRENT_RUNS_LIMIT)]
        self.ttl_seconds = ttl_seconds
        self.renew_interval: float | None = ttl_seconds / 3
        self.health = health
        self._held: dict[str, RedisLock] = {}

    def adopt(self, token: str, slot: int) -> None:
        """Remember a slot a script took with ``token``, to renew and release it."""
        lock = self.client.lock(self.keys[slot], timeout=self.ttl_seconds, blocking=False, thread_local=False)
        lock.local.token = token.encode()
        self._held[token] = lock

    def tokens(self) -> list[str]:
        """The tokens of the slots this replica holds (or held, until it releases them)."""
        return list(self._held)

    def key_of(self, token: str) -> str:
        lock = self._held.get(token)
        return lock.name if lock is not None else self.keys[0]

    async def renew(self, token: str) -> None:
        """Reset the slot's TTL; raises LockLost when it was lost, StoreUnavailable when unreachable."""
        try:
            async with self.health.guard():
                await self._held[token].reacquire()
        except LockError as exc:
            raise LockLost(str(exc)) from exc

    def forget(self, token: str) -> None:
        self._held.pop(token, None)

    async def release(self, token: str) -> None:
        lock = self._held.pop(token, None)
        if lock is None:
            return
        try:
            async with self.health.guard():
                await lock.release()
        except (LockError, StoreUnavailable):
            pass  # lost or unreachable: the key expires by its TTL
