"""Redis mode's run lock: MAX_CONCURRENT_RUNS slots shared by every replica, and the health of the store.

Private to the Redis backend: slots are taken by its admit and take scripts, renewed and released here.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError

from service.backends.records import LockLost, Run, StoreUnavailable
from service.backends.redis.connect import STORE_ERRORS
from service.backends.redis.scripts import RENEW_SCRIPT
from service.settings import MAX_CONCURRENT_RUNS_LIMIT


class StoreHealth:
    """Logs store_unavailable / store_recovered once per transition, not per request."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.healthy = True

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        try:
            yield
        except STORE_ERRORS as exc:  # unreachable, or an error reply (READONLY, MISCONF, OOM...)
            if isinstance(exc, LockError):
                raise
            if self.healthy:
                self.healthy = False
                self.log.error("store_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise StoreUnavailable(str(exc)) from exc
        if not self.healthy:
            self.healthy = True
            self.log.info("store_recovered")

    def data_lost(self, lost: int, generation: bytes, made: str, detected_by: str, fence_seconds: float) -> None:
        """Log store_data_lost if the script call that answered found Redis without its generation key.

        ``lost`` is the script's flag, ``generation`` the generation it answered and ``made`` the new one the call
        sent: a call run again after its reply was lost no longer sees the key missing, but answers the
        generation it made, so the loss is logged once, by the call that found it, either way.
        """
        if not lost and generation.decode() != made:
            return
        self.log.error("store_data_lost", extra={
            "detected_by": detected_by, "fence_seconds": fence_seconds,
            "detail": "Redis lost its data (the generation key was gone); no run is admitted until the fence "
                      "ends and every running run has taken its slot back"})


class RedisRunLock:
    """MAX_CONCURRENT_RUNS slots, each a redis-py Lock (a key holding a token, compare-and-delete release).

    Slot 0 is ``<prefix>:lock`` (the key of the single lock before slots
    existed), slot i ``<prefix>:lock:<i>``. Slots are taken only by the
    store's admit and take scripts, atomically with the queue, and only
    while ``<prefix>:generation`` exists and ``<prefix>:fence`` does not
    (scripts.FENCE); this class renews and releases them.
    """

    def __init__(self, client: Redis, prefix: str, slots: int, ttl_seconds: float, health: StoreHealth) -> None:
        self.client = client
        self.prefix = prefix
        self.generation_key, self.fence_key = f"{prefix}:generation", f"{prefix}:fence"
        self.keys = [f"{prefix}:lock"] + [f"{prefix}:lock:{slot}" for slot in range(1, slots)]
        # Every slot any replica may use: a run holding one is alive, whatever this replica's MAX_CONCURRENT_RUNS
        self.all_keys = [f"{prefix}:lock"] + [f"{prefix}:lock:{slot}" for slot in range(1, MAX_CONCURRENT_RUNS_LIMIT)]
        self.ttl_seconds = ttl_seconds
        self.renew_interval: float | None = ttl_seconds / 3
        self.health = health
        self._held: dict[str, RedisLock] = {}
        self._generations: dict[str, str] = {}  # token -> the generation its run was last written under
        self._renew = client.register_script(RENEW_SCRIPT)

    def adopt(self, token: str, slot: int, generation: str = "") -> None:
        """Remember a slot a script took with ``token`` under ``generation``, to renew and release it."""
        lock = self.client.lock(self.keys[slot], timeout=self.ttl_seconds, blocking=False, thread_local=False)
        lock.local.token = token.encode()
        self._held[token] = lock
        self._generations[token] = generation

    def generation_of(self, token: str) -> str:
        """The generation the run of ``token`` was last written under ('' if not known)."""
        return self._generations.get(token, "")

    def tokens(self) -> list[str]:
        """The tokens of the slots this replica holds (or held, until it releases them)."""
        return list(self._held)

    def key_of(self, token: str) -> str:
        lock = self._held.get(token)
        return str(lock.name) if lock is not None else self.keys[0]

    async def renew(self, run: Run) -> bool:
        """Reset the TTL of the slot ``run`` holds; True when its key was gone and was taken back (RENEW_SCRIPT).

        Raises LockLost when another token holds it or the run is no longer this holder's, StoreUnavailable when
        Redis is unreachable or answers an error.
        """
        assert run.holder is not None
        token, record = run.holder, b"-"
        if token not in self._held:  # released (finish_run stored the run): nothing left to renew
            return False
        keys = [self._held[token].name, self.generation_key, self.fence_key, f"{self.prefix}:unfinished",
                f"{self.prefix}:run:{run.run_id}", f"{self.prefix}:runs", f"{self.prefix}:seq"]
        while True:
            new_generation = uuid.uuid4().hex  # made by this call if it finds the data lost (even when run again)
            async with self.health.guard():
                outcome, generation, lost = await self._renew(keys=keys, args=[
                    token, int(self.ttl_seconds * 1000), self.generation_of(token), new_generation, run.run_id,
                    record])
            self.health.data_lost(lost, generation, new_generation, "renewal", self.ttl_seconds)
            if outcome == 0:
                raise LockLost("the slot is held by another token, or its run is no longer this holder's")
            if outcome == 3:  # Redis lost the run's record: send it (the generation stays the old one till then)
                record = b"" if run.finished else run.record()
                continue
            self._generations[token] = generation.decode()
            return bool(outcome == 2)

    def forget(self, token: str) -> None:
        self._held.pop(token, None)
        self._generations.pop(token, None)

    async def release(self, token: str) -> None:
        self._generations.pop(token, None)
        lock = self._held.pop(token, None)
        if lock is None:
            return
        try:
            async with self.health.guard():
                await lock.release()
        except (LockError, StoreUnavailable):
            pass  # lost or unreachable: the key expires by its TTL
