"""Redis mode: every replica on one Redis shares slots, queue, runs, events and webhook deliveries.

The only package that imports redis-py; ``open_backend`` imports it only when REDIS_URL is set.
"""

from __future__ import annotations

import logging

from service.backends.redis.connect import open_client, parse
from service.backends.redis.lock import RedisRunLock, StoreHealth
from service.backends.redis.store import RedisBackend
from service.settings import ConfigError

__all__ = ["RedisBackend", "check_url", "open_redis"]


def check_url(url: str) -> None:
    """REDIS_URL as the client will read it (a port that is not a number, an unknown scheme); ConfigError if not."""
    try:
        parse(url)
    except ValueError as exc:
        raise ConfigError("REDIS_URL", str(exc)) from None


def open_redis(url: str, prefix: str, lock_ttl_seconds: float, retention: int, retention_bytes: int,
               log: logging.Logger, slots: int = 1,
               idempotency_ttl_seconds: float = 86400.0) -> tuple[RedisRunLock, RedisBackend]:
    """The backend on one client of ``url``, and its run lock (the backend's own; returned for tests)."""
    endpoint = parse(url)
    client = open_client(endpoint)
    prefix = endpoint.key_prefix(prefix)  # the one place keys get their cluster hash tag
    health = StoreHealth(log)
    lock = RedisRunLock(client, prefix, slots, lock_ttl_seconds, health)
    backend = RedisBackend(client, endpoint, prefix, lock, retention, retention_bytes, health, log,
                           idempotency_ttl_seconds)
    return lock, backend
