"""Postgres mode's listener: one connection per replica LISTENs for runs finished, cancels asked, runs queued and
events written by any replica (NOTIFY, channels ``<DATABASE_SCHEMA>_<name>``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import psycopg
from psycopg import sql

from service.backends.postgres.database import Database
from service.cancelling import cancel_and_wait

RETRY_SECONDS = 0.5
CHANNELS = ("finished", "cancel", "queued", "events")


class Hearer(Protocol):
    """What the listener tells: the Postgres backend (store.py)."""

    on_cancel: Callable[[str, str | None], object]
    on_work: Callable[[], None]

    def wake(self, run_id: str) -> None: ...

    def wake_all(self) -> None: ...


class Listener:
    """LISTENs on its own connection; reconnects after a failure, then wakes everything (something may have
    been missed). ``on_events`` and ``on_connected`` are the event transport's (events.py)."""

    def __init__(self, db: Database, log: logging.Logger, backend: Hearer) -> None:
        self.db = db
        self.log = log
        self.backend = backend
        self.connected = False
        self.on_events: Callable[[], None] = lambda: None
        self.on_connected: Callable[[bool], None] = lambda connected: None
        self._task: asyncio.Task[None] | None = None

    def channel(self, name: str) -> str:
        return f"{self.db.schema}_{name}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="postgres-listener")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_connected(connected)

    async def _listen_forever(self) -> None:
        while True:
            try:
                connection = await self.db.connect()
                try:
                    for name in CHANNELS:
                        await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel(name))))
                    self._set_connected(True)
                    self.backend.wake_all()  # anything finished while not listening
                    self.backend.on_work()
                    self.on_events()
                    async for notify in connection.notifies():
                        self._heard(notify.channel, notify.payload)
                finally:
                    with contextlib.suppress(Exception):
                        await connection.close()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError):
                pass
            except Exception as exc:
                self.log.error("pubsub_listener_restarted", exc_info=exc,
                               extra={"error": f"{type(exc).__name__}: {exc}"})
            self._set_connected(False)
            await asyncio.sleep(RETRY_SECONDS)

    def _heard(self, channel: str, payload: str) -> None:
        name = channel.removeprefix(f"{self.db.schema}_")
        if name == "finished":
            self.backend.wake(payload)
            self.backend.on_work()
        elif name == "cancel":
            run_id, _, by = payload.partition(" ")
            self.backend.on_cancel(run_id, by or None)
        elif name == "queued":
            self.backend.on_work()
        elif name == "events":
            self.on_events()
