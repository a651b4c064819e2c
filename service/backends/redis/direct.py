"""A Lua script called on connections of its own rather than through redis-py's client: the handoff's (store.py,
HANDOFF_SCRIPT), the one Redis call on the path from one run's end to the next run's start.

The client's way to a reply (the blocking pool's condition and timeout timer, its health and observability hooks,
the retry wrapper, and the same way back) costs about 25-50 µs a call, a tenth of the handoff. Here a call takes an
idle connection of its own (or makes one with the pool's settings: TLS, credentials, a Sentinel's current primary),
sends EVALSHA and reads the reply. As the client does, it sends the call once more on a new connection when the
connection drops or times out (the script is safe to run again), and loads the script when Redis answers NOSCRIPT.
A connection that failed in any other way, or whose call was cancelled (its reply may still come), is closed, never
used again. A cluster client routes each call by its key and follows redirections: it keeps the client's way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

IDLE_MAX = 8  # connections kept for the next calls (one per handoff in flight at once; more are closed)


class DirectScript:
    """``await script(keys=..., args=...)``: as redis-py's registered script answers it, on connections of its own."""

    def __init__(self, client: Redis, text: str) -> None:
        self._script = client.register_script(text)  # its sha, and the client's way for a cluster
        self._pool = None if isinstance(client, RedisCluster) else client.connection_pool
        self._idle: list[AbstractConnection] = []

    @property
    def sha(self) -> str:
        return str(self._script.sha)

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self._pool is None:
            return await self._script(keys=keys, args=args)
        command = ("EVALSHA", self._script.sha, len(keys), *keys, *args)
        for last_try in (False, True):
            connection = self._idle.pop() if self._idle else self._new_connection()
            try:
                try:
                    reply = await self._ask(connection, command)
                except NoScriptError:  # Redis lost its scripts (a restart, SCRIPT FLUSH, a failover)
                    await self._ask(connection, ("SCRIPT", "LOAD", self._script.script))
                    reply = await self._ask(connection, command)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await connection.disconnect(nowait=True)
                if last_try:
                    raise
                continue  # a connection that dropped (Redis restarted, failed over): once more on a new one
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            if len(self._idle) < IDLE_MAX:
                self._idle.append(connection)
            else:
                await connection.disconnect()
            return reply
        raise AssertionError("unreachable: the last try returns or raises")

    def _new_connection(self) -> AbstractConnection:
        assert self._pool is not None
        return cast(AbstractConnection, self._pool.make_connection())  # type: ignore[no-untyped-call]

    @staticmethod
    async def _ask(connection: AbstractConnection, command: tuple[Any, ...]) -> Any:
        if not connection.is_connected:  # connected as the pool connects one (a Sentinel's asks for the primary)
            await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_command(*command)
        return await connection.read_response()

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().disconnect()
