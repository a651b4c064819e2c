"""Postgres mode's connections: one pool per replica, every connection on the schema DATABASE_SCHEMA names,
each statement bounded in time, and the store's health logged once per transition.

psycopg (3) speaks through libpq, so every libpq parameter of DATABASE_URL (sslmode, sslrootcert,
target_session_attrs, options...) means what libpq's documentation says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, pq, sql
from psycopg.rows import TupleRow

from service.backends.records import StoreUnavailable

T = TypeVar("T")
Connection = AsyncConnection[TupleRow]
STATEMENT_TIMEOUT_MS = 5000  # a statement (or a wait for a lock) longer than this fails: 503, not a hang
IDLE_IN_TRANSACTION_MS = 10000  # a replica paused inside a transaction gives its row locks back after this
CONNECT_TIMEOUT_SECONDS = 3
POOL_MAX = 20  # connections of one replica at most (a request waits POOL_WAIT_SECONDS for one, then 503)
POOL_WAIT_SECONDS = 5.0
# a unit of work without an answer after this fails (503) and its connection is closed at once: the bound a
# black-holed network (no reply, no reset) otherwise lacks, as keepalives only probe idle connections
WORK_TIMEOUT_SECONDS = 2 * STATEMENT_TIMEOUT_MS / 1000
TCP_USER_TIMEOUT_MS = 10000  # data unacknowledged this long: the kernel closes the connection (the listener's too)


class Database:
    """The pool of one replica, and ``run``: a unit of work, retried once on a dropped connection (a pooled
    connection left over from before a restart of the database, or killed), its failures as StoreUnavailable.

    No work runs before ``schema_checked`` (set once the schema is found at this version, by the migration):
    until then every unit of work fails as StoreUnavailable, so nothing is read or written in a schema whose
    version this replica has not checked (one newer than it knows above all)."""

    def __init__(self, url: str, schema: str, log: logging.Logger) -> None:
        self.url = url
        self.schema = schema
        self.log = log
        self.healthy = True
        self.schema_checked = False
        self.pool = Pool(self.connect, POOL_MAX, POOL_WAIT_SECONDS)

    async def _configure(self, connection: Connection) -> None:
        """The schema, and the time bounds unless DATABASE_URL set its own (``options=-c statement_timeout=...``)."""
        await connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        cursor = await connection.execute("SELECT current_setting('statement_timeout'), "
                                          "current_setting('idle_in_transaction_session_timeout')")
        row = await cursor.fetchone()
        if row is not None and row[0] == "0":
            await connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        if row is not None and row[1] == "0":
            await connection.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")

    async def close(self) -> None:
        await self.pool.close()

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
        if not self.schema_checked:
            raise StoreUnavailable(f"schema {self.schema!r} not checked yet")
        async with self.guard():
            for attempt in (1, 2):
                pooled = self.pool.has_idle()
                try:
                    async with self.pool.connection() as connection:
                        return await bounded(connection, unit(connection, work, transaction))
                except psycopg.Error as exc:
                    if attempt == 2 or not pooled or not dropped(exc):  # a new connection failing: no retry
                        raise
                    await self.pool.close_idle()  # the idle ones were likely dropped with it: new ones instead
            raise AssertionError("unreachable")

    async def lock(self, connection: Connection, name: str = "admission") -> None:
        """Take the row lock ``name`` for the rest of the transaction: one step at a time across replicas."""
        await connection.execute("SELECT 1 FROM locks WHERE name = %s FOR UPDATE", (name,))


async def unit(connection: Connection, work: Callable[[Connection], Awaitable[T]], transaction: bool) -> T:
    if not transaction:
        return await work(connection)
    # pipelined: statements whose results are not awaited go out with the next one
    async with connection.pipeline(), connection.transaction():
        return await work(connection)


async def bounded(connection: Connection, work: Coroutine[Any, Any, T]) -> T:
    """``work`` on ``connection``, for WORK_TIMEOUT_SECONDS at most (TimeoutError). When it runs out, or the caller
    is cancelled (a renewal's own deadline), the connection is closed at once: psycopg's way, a cancel request
    and a wait for the query to end, takes ~10 s more when the network drops everything."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), WORK_TIMEOUT_SECONDS)
    except BaseException:
        if not task.done():
            connection.pgconn.finish()  # no transaction left ACTIVE: psycopg skips its cancel request
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: its error (the connection closed under it) is not the caller's
        raise


def dropped(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection was gone (a restart, pg_terminate_backend, the server's idle timeouts),
    not a refusal: a connection exception (class 08), an operator intervention ending it (57P0x), a session ended
    for idling in a transaction (25P03), or no answer at all (the socket died)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith(("08", "57P0")) or state == "25P03"


def connect_kwargs(url: str) -> dict[str, Any]:
    """What every connection adds to DATABASE_URL: autocommit, and a connect timeout, keepalives and a TCP user
    timeout unless the URL sets its own."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    # TCP keepalives: a connection to a server that vanished without a word (a failover, a cut network) is
    # found dead in about 20 s, not hours; the listener's above all, which otherwise only waits
    defaults = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "keepalives": 1, "keepalives_idle": 10,
                "keepalives_interval": 5, "keepalives_count": 2, "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
    return {"autocommit": True, **{name: value for name, value in defaults.items() if name not in given}}



class Pool:
    """At most ``size`` connections, idle ones kept for the next caller; one is made when none is idle. Made on
    demand, so a database that is down fails the caller at once (connection refused) instead of making it wait
    for a background reconnection; a connection that broke, or was left inside a transaction, is not kept."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]], size: int, wait_seconds: float) -> None:
        self._connect = connect
        self._wait_seconds = wait_seconds
        self._idle: list[Connection] = []
        self._free = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        await asyncio.wait_for(self._free.acquire(), self._wait_seconds)
        try:
            while self._idle and self._idle[-1].closed:
                self._idle.pop()
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                yield connection
            finally:
                if connection.closed or connection.info.transaction_status != pq.TransactionStatus.IDLE:
                    with contextlib.suppress(Exception):
                        await connection.close()
                else:
                    self._idle.append(connection)
        finally:
            self._free.release()

    def has_idle(self) -> bool:
        return any(not connection.closed for connection in self._idle)

    async def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        await self.close_idle()
