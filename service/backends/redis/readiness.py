"""Redis mode's readiness: the store answers /readyz ready only when it can run the service's scripts."""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis

from service.backends.records import StoreUnavailable
from service.backends.redis.connect import STORE_ERRORS

# The probe: one write of a key of its own through EVALSHA, as every script of the service writes. A sentinel
# (unknown command), a read-only replica (READONLY), a user without a command or key permission (NOPERM) or a
# node that does not own the prefix's slot (MOVED) answers an error. KEYS: ready. ARGV: its expiry (ms).
READY_SCRIPT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""
CACHE_SECONDS = 1.0  # probes within this long of a check share its answer


class Readiness:
    """One EVALSHA round trip at most every CACHE_SECONDS; logs store_not_ready once when it stops passing."""

    def __init__(self, client: Redis, key: str, log: logging.Logger) -> None:
        self.key = key
        self.log = log
        self._script = client.register_script(READY_SCRIPT)
        self._checked_at = float("-inf")
        self._error: str | None = None

    async def check(self) -> None:
        """Raises StoreUnavailable with the reason when the store cannot run the service's scripts."""
        if time.monotonic() - self._checked_at >= CACHE_SECONDS:
            error = None
            try:
                await self._script(keys=[self.key], args=[10000])
            except STORE_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is not None and self._error is None:
                self.log.error("store_not_ready", extra={"error": error})
            self._error, self._checked_at = error, time.monotonic()
        if self._error is not None:
            raise StoreUnavailable(self._error)
