"""Redis mode: every replica on one Redis shares slots, queue, runs, events and webhook deliveries.

The only package that imports redis-py; ``open_backend`` imports it only when REDIS_URL is set.
"""

from __future__ import annotations

import logging

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.backends.redis.lock import RedisRunLock, StoreHealth
from service.backends.redis.store import RedisBackend
from service.settings import ConfigError

__all__ = ["RedisBackend", "check_url", "open_redis"]


def check_url(url: str) -> None:
    """REDIS_URL as redis-py will read it (a port that is not a number, an unknown scheme); ConfigError if not."""
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError("REDIS_URL", str(exc)) from None


def open_redis(url: str, prefix: str, lock_ttl_seconds: float, retention: int, retention_bytes: int,
               log: logging.Logger, slots: int = 1,
               idempotency_ttl_seconds: float = 86400.0) -> tuple[RedisRunLock, RedisBackend]:
    """The backend on one client of ``url``, and its run lock (the backend's own; returned for tests)."""
    # A blocking pool: a burst of requests waits briefly for a connection instead of failing.
    # Retry once on a dropped connection, so pooled connections left over from before a
    # Redis restart do not turn into 503s.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=5, socket_timeout=2, socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError])
    client = Redis(connection_pool=pool)
    health = StoreHealth(log)
    lock = RedisRunLock(client, prefix, slots, lock_ttl_seconds, health)
    backend = RedisBackend(client, url, prefix, lock, retention, retention_bytes, health, log,
                           idempotency_ttl_seconds)
    return lock, backend
