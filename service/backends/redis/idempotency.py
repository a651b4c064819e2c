"""Redis mode's Idempotency-Keys of POST /agents/run, shared by every replica: ``<prefix>:idempotency:<key>``.

A key is claimed by the first request that brings it ("pending"), with the
run id that request's run will have and a fingerprint of the request. Once
that run is admitted the key is "accepted" and kept IDEMPOTENCY_TTL_SECONDS,
by the admit script itself, so an admitted run never leaves its key pending,
and a request whose claim was lost meanwhile is not admitted; a request that
was refused (409 busy, 503) gives the key back, so a retry is handled afresh.
Because the run id is chosen when the key is claimed, a pending key whose run
exists in the run store was admitted: its first answer was lost or has not
been sent yet, and a retry replays it. Each step is one Lua script
(scripts.py).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from service.backends.base import Claim
from service.backends.redis.lock import StoreHealth
from service.backends.redis.side_scripts import (IDEMPOTENCY_ACCEPT_SCRIPT, IDEMPOTENCY_CLAIM_SCRIPT,
                                            IDEMPOTENCY_RELEASE_SCRIPT)

# A pending key older than this whose run does not exist was left by a replica that died before admitting
# its run: the next request with the key takes it over. Far above the longest an admission can take; a
# pending key lives at least this long even with a shorter TTL, so a slow admission is never raced.
STALE_PENDING_SECONDS = 60.0


class RedisIdempotencyKeys:
    """Keys shared by every replica, as hashes (fingerprint, run_id, state) that expire after the TTL."""

    def __init__(self, client: Redis, prefix: str, run_prefix: str, health: StoreHealth,
                 ttl_seconds: float) -> None:
        self.prefix = prefix  # "<REDIS_PREFIX>:idempotency:"
        self.run_prefix = run_prefix  # "<REDIS_PREFIX>:run:", to see whether a pending key's run was admitted
        self.health = health
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self.pending_ms = max(self.ttl_ms, round(STALE_PENDING_SECONDS * 1000))
        self._claim = client.register_script(IDEMPOTENCY_CLAIM_SCRIPT)
        self._accept = client.register_script(IDEMPOTENCY_ACCEPT_SCRIPT)
        self._release = client.register_script(IDEMPOTENCY_RELEASE_SCRIPT)

    async def claim(self, key: str, fingerprint: str, run_id: str) -> Claim:
        async with self.health.guard():
            outcome, holder = await self._claim(
                keys=[self.prefix + key],
                args=[fingerprint, run_id, self.pending_ms, round(STALE_PENDING_SECONDS * 1000), self.run_prefix])
        return Claim(outcome.decode(), holder.decode())

    def admit_args(self, key: str, fingerprint: str) -> list[Any] | None:
        """What the admit script needs to admit the run only while the key is still this request's claim, and to
        mark it accepted in the same step."""
        return [self.prefix + key, fingerprint, self.ttl_ms]

    async def accept(self, key: str, fingerprint: str, run_id: str) -> None:
        async with self.health.guard():
            await self._accept(keys=[self.prefix + key], args=[fingerprint, run_id, self.ttl_ms])

    async def release(self, key: str, run_id: str) -> None:
        async with self.health.guard():
            await self._release(keys=[self.prefix + key], args=[run_id])
