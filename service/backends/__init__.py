"""Where the service's state lives: ``open_backend`` picks memory, Redis or PostgreSQL, the one place a mode is
chosen."""

from __future__ import annotations

import logging

from service.backends.base import Backend
from service.backends.memory import MemoryBackend
from service.settings import ConfigError, Settings

__all__ = ["Backend", "check_settings", "open_backend"]

LOG = logging.getLogger("agent_runner")  # the service's logger (service/logs.py): store_unavailable and such


def check_settings(config: Settings) -> None:
    """What only the chosen backend can judge in the settings; raises ConfigError (checked at start, not later)."""
    if config.redis_url:
        from service.backends.redis import check_url

        check_url(config.redis_url)
    if config.database_url:
        try:
            from service.backends.postgres import check_url as check_database_url
        except ImportError as exc:  # psycopg is optional (requirements-postgres.txt)
            raise ConfigError("DATABASE_URL", f"PostgreSQL mode needs psycopg ({exc}): "
                                              "pip install -r requirements-postgres.txt") from None
        check_database_url(config.database_url)


def open_backend(config: Settings, log: logging.Logger = LOG) -> Backend:
    """The backend ``config`` asks for: Redis with REDIS_URL, PostgreSQL with DATABASE_URL, else this process's
    memory. Not started yet."""
    if config.redis_url:
        from service.backends.redis import open_redis  # redis-py is only imported when it is used

        _, backend = open_redis(config.redis_url, config.redis_prefix, config.lock_ttl_seconds, config.run_retention,
                                config.run_retention_bytes, log, slots=config.max_concurrent_runs,
                                idempotency_ttl_seconds=config.idempotency_ttl_seconds)
        return backend
    if config.database_url:
        from service.backends.postgres import open_postgres  # psycopg is only imported when it is used

        return open_postgres(config.database_url, config.database_schema, config.lock_ttl_seconds,
                             config.run_retention, config.run_retention_bytes, log,
                             slots=config.max_concurrent_runs, idempotency_ttl_seconds=config.idempotency_ttl_seconds)
    return MemoryBackend(config.run_retention, config.run_retention_bytes, slots=config.max_concurrent_runs,
                         idempotency_ttl_seconds=config.idempotency_ttl_seconds, log=log,
                         fencing_state_path=config.fencing_state_path or None)
