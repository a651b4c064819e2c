"""Redis mode's pub/sub listener: runs finished, cancels asked and runs queued, heard from every replica.

A run whose slot went straight to the next run (a handoff: scripts.HANDOFF_SCRIPT) is told on a channel of its own,
``ended``, which a replica follows only while it has something to do with it: waiters (``GET ...?wait``) or stream
clients that watch queue positions. So a drain costs the other replicas nothing per run: no message, no take.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from service.backends.redis.connect import STORE_ERRORS
from service.backends.redis.lock import StoreHealth
from service.cancelling import cancel_and_wait

ENDED_LINGER_SECONDS = 5.0  # ``ended`` is followed this long after the last reason to, so bursts of waits share it
WATCH_CHECK_SECONDS = 0.25  # how often whether stream clients watch the queue is looked at (their positions)


class Listener(Protocol):
    """What the listener hears for: the Redis backend (store.py)."""

    client: Redis
    health: StoreHealth
    on_cancel: Callable[[str, str | None], object]
    on_work: Callable[[], None]
    on_moved: Callable[[], None]
    watching: Callable[[], bool]
    waiters_changed: asyncio.Event  # set when the first waiter comes or the last one goes

    def key(self, *parts: str) -> str: ...

    def has_waiters(self) -> bool: ...

    def wake(self, run_id: str) -> None: ...

    def finished_here(self, run_id: str) -> bool: ...

    def wake_all(self) -> None: ...


async def listen(backend: Listener) -> None:
    """Wake local waiters when any replica finishes a run; pass cancel requests to the runner.

    Without it a cross-replica cancel waits for the next lock renewal, so it must not die: a
    message it cannot decode is skipped, and any other failure is logged and it subscribes again.
    """
    finished, cancel, queued, ended = (backend.key(name).encode() for name in ("finished", "cancel", "queued", "ended"))
    while True:
        follower: asyncio.Task[None] | None = None
        try:
            await backend.client.ping()  # a cluster client learns the slots here: its pubsub does not
            async with backend.client.pubsub() as pubsub:
                await pubsub.subscribe(finished, cancel, queued)
                follower = asyncio.create_task(follow_ended(backend, pubsub, ended), name="redis-follow-ended")
                backend.wake_all()  # anything finished while we were not subscribed
                async for message in pubsub.listen():
                    if message["type"] == "subscribe" and message["channel"] == ended:
                        backend.wake_all()  # waiters read their run again: a handoff before now passed by unheard
                    if message["type"] != "message":
                        continue
                    try:
                        run_id = message["data"].decode()
                    except UnicodeDecodeError:
                        backend.health.log.warning("pubsub_message_ignored",
                                                   extra={"channel": message["channel"].decode(errors="replace")})
                        continue
                    heard(backend, message["channel"], run_id, finished, cancel, ended)
        except STORE_ERRORS:
            await asyncio.sleep(0.5)
        except Exception as exc:
            backend.health.log.error("pubsub_listener_restarted", exc_info=exc,
                                     extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(0.5)
        finally:
            if follower is not None:
                await cancel_and_wait(follower)


def heard(backend: Listener, channel: bytes, run_id: str, finished: bytes, cancel: bytes, ended: bytes) -> None:
    if channel == finished:
        backend.wake(run_id)
        if not backend.finished_here(run_id):  # a slot freed elsewhere: look at the queue
            backend.on_work()
    elif channel == ended:  # handed on to the next run: no slot to take, but the queue moved
        backend.wake(run_id)
        backend.on_moved()
    elif channel == cancel:
        run_id, _, by = run_id.partition(" ")
        backend.on_cancel(run_id, by or None)
    else:  # queued
        backend.on_work()


async def follow_ended(backend: Listener, pubsub: PubSub, channel: bytes) -> None:
    """Keep ``pubsub`` subscribed to ``channel`` while the replica wants its messages (waiters, or stream clients of
    queue positions), and for ENDED_LINGER_SECONDS after. Once Redis confirms the subscription, the listener wakes
    every waiter to read its run again, so a waiter that came before it misses nothing."""
    subscribed = False
    while True:
        backend.waiters_changed.clear()
        wanted = backend.has_waiters() or backend.watching()
        if wanted and not subscribed:
            await pubsub.subscribe(channel)
            subscribed = True
        elif not wanted and subscribed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(backend.waiters_changed.wait(), ENDED_LINGER_SECONDS)
                continue  # a waiter came (or went) meanwhile: look again
            if not (backend.has_waiters() or backend.watching()):
                await pubsub.unsubscribe(channel)
                subscribed = False
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(backend.waiters_changed.wait(), WATCH_CHECK_SECONDS)

