"""Postgres mode's connections: one pool per replica, every connection on the schema DATABASE_SCHEMA names,
each statement bounded in time, and the store's health logged once per transition.

psycopg (3) speaks through libpq, so every libpq parameter of DATABASE_URL (sslmode, sslrootcert,
target_session_attrs, options...) means what libpq's documentation says.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from service.backends.records import StoreUnavailable

T = TypeVar("T")
Connection = AsyncConnection[TupleRow]
STATEMENT_TIMEOUT_MS = 5000  # a statement (or a wait for a lock) longer than this fails: 503, not a hang
IDLE_IN_TRANSACTION_MS = 10000  # a replica paused inside a transaction gives its row locks back after this
CONNECT_TIMEOUT_SECONDS = 3
POOL_MAX = 20


class Database:
    """The pool of one replica, and ``transaction``/``run``: a unit of work, retried once on a dropped connection
    (a pooled connection left over from before a restart of the database), its failures as StoreUnavailable."""

    def __init__(self, url: str, schema: str, log: logging.Logger) -> None:
        self.url = url
        self.schema = schema
        self.log = log
        self.healthy = True
        self.pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url, min_size=2, max_size=POOL_MAX, timeout=CONNECT_TIMEOUT_SECONDS + 2, open=False,
            kwargs=connect_kwargs(url), configure=self._configure, reconnect_timeout=0)

    async def _configure(self, connection: Connection) -> None:
        await connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        await connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        await connection.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close(timeout=2)

    async def connect(self) -> Connection:
        """A connection of its own (not pooled), on the schema: for LISTEN and for migrations."""
        connection = await AsyncConnection.connect(self.url, **connect_kwargs(self.url))
        await self._configure(connection)
        return connection

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Driver and pool failures as StoreUnavailable, logged as store_unavailable once per outage."""
        try:
            yield
        except (psycopg.Error, OSError, TimeoutError) as exc:  # the pool's own timeout too (no connection)
            if self.healthy:
                self.healthy = False
                self.log.error("store_unavailable", extra={"error": f"{type(exc).__name__}: {exc}".strip()})
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        if not self.healthy:
            self.healthy = True
            self.log.info("store_recovered")

    async def run(self, work: Callable[[Connection], Awaitable[T]], transaction: bool = True) -> T:
        """``work`` on a pooled connection (in one transaction when asked); once more on a fresh connection when
        the first was found dropped. Every unit of work here is safe to run again after a lost reply."""
        async with self.guard():
            for attempt in (1, 2):
                try:
                    async with self.pool.connection() as connection:
                        if not transaction:
                            return await work(connection)
                        async with connection.transaction():
                            return await work(connection)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    if attempt == 2 or not dropped(exc):
                        raise
            raise AssertionError("unreachable")

    async def lock(self, connection: Connection, name: str = "admission") -> None:
        """Take the row lock ``name`` for the rest of the transaction: one step at a time across replicas."""
        await connection.execute("SELECT 1 FROM locks WHERE name = %s FOR UPDATE", (name,))


def dropped(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection was gone (a restart, pg_terminate_backend), not a refusal."""
    if isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CrashShutdown | psycopg.InterfaceError):
        return True
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None  # no answer: the socket died


def connect_kwargs(url: str) -> dict[str, Any]:
    """What every connection adds to DATABASE_URL: autocommit, and a connect timeout unless the URL sets one."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(url):
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return kwargs

