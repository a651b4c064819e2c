"""Redis mode's pub/sub listener: runs finished, cancels asked and runs queued, heard from every replica."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis

from service.backends.redis.connect import STORE_ERRORS
from service.backends.redis.lock import StoreHealth


class Listener(Protocol):
    """What the listener hears for: the Redis backend (store.py)."""

    client: Redis
    health: StoreHealth
    on_cancel: Callable[[str, str | None], object]
    on_work: Callable[[], None]

    def key(self, *parts: str) -> str: ...

    def wake(self, run_id: str) -> None: ...

    def finished_here(self, run_id: str) -> bool: ...

    def wake_all(self) -> None: ...


async def listen(backend: Listener) -> None:
    """Wake local waiters when any replica finishes a run; pass cancel requests to the runner.

    Without it a cross-replica cancel waits for the next lock renewal, so it must not die: a
    message it cannot decode is skipped, and any other failure is logged and it subscribes again.
    """
    finished, cancel, queued = (backend.key(name).encode() for name in ("finished", "cancel", "queued"))
    while True:
        try:
            await backend.client.ping()  # a cluster client learns the slots here: its pubsub does not
            async with backend.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(finished, cancel, queued)
                backend.wake_all()  # anything finished while we were not subscribed
                async for message in pubsub.listen():
                    try:
                        run_id = message["data"].decode()
                    except UnicodeDecodeError:
                        backend.health.log.warning("pubsub_message_ignored",
                                                   extra={"channel": message["channel"].decode(errors="replace")})
                        continue
                    if message["channel"] == finished:
                        backend.wake(run_id)
                        if not backend.finished_here(run_id):  # a slot freed elsewhere: look at the queue
                            backend.on_work()
                    elif message["channel"] == cancel:
                        run_id, _, by = run_id.partition(" ")
                        backend.on_cancel(run_id, by or None)
                    elif message["channel"] == queued:
                        backend.on_work()
        except STORE_ERRORS:
            await asyncio.sleep(0.5)
        except Exception as exc:
            backend.health.log.error("pubsub_listener_restarted", exc_info=exc,
                                     extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(0.5)
