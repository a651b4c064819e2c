"""Postgres mode: every replica on one PostgreSQL database (and schema) shares slots, queue, runs, events and
webhook deliveries.

The only package that imports psycopg; ``open_backend`` imports it only when DATABASE_URL is set.
"""

from __future__ import annotations

import logging
import re

import psycopg

from service.backends.postgres.database import Database
from service.backends.postgres.store import PostgresBackend
from service.settings import ConfigError

__all__ = ["PostgresBackend", "check_url", "open_postgres"]


def check_url(url: str) -> None:
    """DATABASE_URL as libpq will read it (an unknown parameter, a malformed URL); ConfigError if not, whose
    detail (logged) never holds the password, which libpq's message may echo."""
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError("DATABASE_URL", without_password(str(exc).strip(), url)) from None


def without_password(message: str, url: str) -> str:
    """``message`` with the password of ``url`` (a URL's userinfo, or ``password=``) replaced by ``***``."""
    secrets = [match[1] for match in re.finditer(r"://[^:/@\[]*:([^@]*)@", url)]
    secrets += [match[1] for match in re.finditer(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url)]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        message = message.replace(secret, "***")
    return re.sub(r"(://[^:/@\[\s\"]*:)[^@\s\"]*@", r"\1***@", message)


def open_postgres(url: str, schema: str, lock_ttl_seconds: float, retention: int, retention_bytes: int,
                  log: logging.Logger, slots: int = 1, idempotency_ttl_seconds: float = 86400.0) -> PostgresBackend:
    """The backend on a pool of ``url``, its tables in ``schema``; not started yet."""
    return PostgresBackend(Database(url, schema, log), slots, lock_ttl_seconds, retention, retention_bytes, log,
                           idempotency_ttl_seconds)
