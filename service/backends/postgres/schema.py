"""Postgres mode's schema: the SQL files of ``migrations/`` applied in order at start, under an advisory lock.

``schema_version`` in the schema records each file applied. A replica applies the files it has that are
missing (one at a time across replicas: the advisory lock), and refuses to start on a schema newer than
every file it knows (a replica of an older version beside a newer one): its queries could not be trusted.
The migration's connection has no statement_timeout (a replica waits for another's migration, and a migration
may take long) but lock timeouts of its own: for the advisory lock, and shorter for a table's lock (an ALTER
waiting for one makes every query of the table wait behind it).
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

from psycopg import sql

from service.backends.postgres.database import STATEMENT_TIMEOUT_MS, Connection
from service.settings import ConfigError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
MIGRATION_LOCK_TIMEOUT_MS = 120000  # waiting for another replica's migration (then: unavailable, tried again)


def migrations() -> list[tuple[int, str, str]]:
    """Every migration this version has: (version, file name, SQL), in order."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = FILE_NAME.fullmatch(path.name)
        if match is not None:
            found.append((int(match[1]), path.name, path.read_text()))
    return found


def advisory_key(schema: str) -> int:
    """The advisory lock of one schema's migrations (advisory locks are per database: the schema names it)."""
    return zlib.crc32(f"agent-runner:{schema}".encode())


async def migrate(connection: Connection, schema: str) -> int:
    """Bring ``schema`` to this version's newest migration; the version it is at. Raises ConfigError when the
    schema is newer than this version knows."""
    known = migrations()
    newest = known[-1][0] if known else 0
    await connection.execute("SET statement_timeout = 0")  # the connection is the migration's own
    await connection.execute(f"SET lock_timeout = {int(MIGRATION_LOCK_TIMEOUT_MS)}")
    await connection.execute("SELECT pg_advisory_lock(%s)", (advisory_key(schema),))
    try:
        await connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        await connection.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                                 "version integer PRIMARY KEY, name text NOT NULL, "
                                 "applied_at timestamptz NOT NULL DEFAULT now())")
        cursor = await connection.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = await cursor.fetchone()
        current = int(row[0]) if row is not None else 0
        if current > newest:
            raise ConfigError("DATABASE_SCHEMA", f"schema {schema!r} is at version {current}, newer than this "
                                                 f"version of agent-runner knows ({newest}): upgrade this replica")
        for version, name, statements in known:
            if version <= current:
                continue
            async with connection.transaction():
                await connection.execute(f"SET LOCAL lock_timeout = {STATEMENT_TIMEOUT_MS}")
                await connection.execute(statements.encode())
                await connection.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                                         (version, name))
        return max(current, newest)
    finally:
        await connection.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(schema),))
