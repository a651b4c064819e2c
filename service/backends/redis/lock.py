"""Redis mode's run lock: MAX_CONCURRENT_RUNS slots shared by every replica, and the health of the store.

Imported only when REDIS_URL is set (through redis_store).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, RedisError

from settings import MAX_CONCURRENT_RUNS_LIMIT
from store import LockLost, Run, StoreUnavailable

# Renew a slot (RedisRunLock.renew): reset its TTL while it still holds the token. A slot key that is gone (not
# taken by another token) is taken back, so the fence (redis_scripts.FENCE) keeps others out until every live
# holder has its slot again. When the generation is still the one the holder knows, only the key went (deleted,
# or lost in a failover), and it is taken back while the run is still the holder's in the unfinished index (not
# claimed as an orphan, not finished); when the generation changed or is gone, Redis lost its data, and the
# run's record, its index entries and the slot are written back (the generation and fence made if nobody has
# yet). ARGV[6] is the record: '-' when not sent (the answer 3 asks for it), '' when there is none to write back
# (the run is finished).
# KEYS: slot, generation, fence, unfinished, run, runs, seq. ARGV: token, ttl_ms, known generation, new generation,
# run_id, record. Returns {outcome, generation, lost}: outcome 1 renewed, 2 taken back, 3 send the record,
# 0 lost (held by another token, or the run is no longer the holder's); generation: the one in Redis (a re-run
# after a lost reply must not leave its caller with an old one); lost: 1 when this call found the data lost.
RENEW_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, redis.call('GET', KEYS[2]) or ARGV[3], 0}
end
if held then return {0, '', 0} end
local owner = redis.call('HGET', KEYS[4], ARGV[5])
if owner and owner ~= ARGV[1] then return {0, '', 0} end
local generation, lost = redis.call('GET', KEYS[2]), 0
if generation == ARGV[3] then
  if not owner then return {0, '', 0} end
else
  if not generation then
    generation, lost = ARGV[4], 1
    redis.call('SET', KEYS[2], generation)
    redis.call('SET', KEYS[3], generation, 'PX', ARGV[2])
  end
  if ARGV[6] == '-' then return {3, generation, lost} end
  if ARGV[6] ~= '' then
    redis.call('SET', KEYS[5], ARGV[6])
    if not redis.call('ZSCORE', KEYS[6], ARGV[5]) then
      redis.call('ZADD', KEYS[6], redis.call('INCR', KEYS[7]), ARGV[5])
    end
    redis.call('HSET', KEYS[4], ARGV[5], ARGV[1])
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {2, generation, lost}
"""


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
    (redis_scripts.FENCE); this class renews and releases them.
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
        return lock.name if lock is not None else self.keys[0]

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
                record = b"" if run.finished else run.json()
                continue
            self._generations[token] = generation.decode()
            return outcome == 2

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
