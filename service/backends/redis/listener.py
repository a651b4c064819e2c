"""Redis mode's pub/sub listener: runs finished, cancels asked and runs queued, heard from every replica.

A run whose slot went straight to the next run (a handoff: scripts.HANDOFF_SCRIPT) frees no slot: its end is told
on ``ended:<run_id>``, which a replica follows only while it has waiters (``GET ...?wait``) for that run, and on
``ended``, which it follows while stream clients watch queue positions (the queue moved). So a drain costs the other
replicas nothing per run, and a replica with waiters hears only the ends of their runs.
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
from service.backends.redis.waiters import Waiters
from service.cancelling import cancel_and_wait

MOVED_LINGER_SECONDS = 5.0  # ``ended`` is followed this long after the last client of queue positions left
WATCH_CHECK_SECONDS = 0.25  # how often whether stream clients watch the queue is looked at (their positions)


class Listener(Protocol):
    """What the listener hears for: the Redis backend (store.py)."""

    client: Redis
    health: StoreHealth
    on_cancel: Callable[[str, str | None], object]
    on_work: Callable[[], None]
    on_moved: Callable[[], None]
    watching: Callable[[], bool]
    waiters: Waiters  # of ?wait= requests here, by run

    def key(self, *parts: str) -> str: ...

    def finished_here(self, run_id: str) -> bool: ...


async def listen(backend: Listener) -> None:
    """Wake local waiters when any replica finishes a run; pass cancel requests to the runner.

    Without it a cross-replica cancel waits for the next lock renewal, so it must not die: a
    message it cannot decode is skipped, and any other failure is logged and it subscribes again.
    """
    finished, cancel, queued, moved = (backend.key(name).encode() for name in ("finished", "cancel", "queued", "ended"))
    while True:
        try:
            await backend.client.ping()  # a cluster client learns the slots here: its pubsub does not
            async with backend.client.pubsub() as pubsub:
                await pubsub.subscribe(finished, cancel, queued)
                follower = asyncio.create_task(follow(backend, pubsub, moved), name="redis-follow-ended")
                backend.waiters.wake_all()  # anything finished while we were not subscribed
                try:
                    await hear(backend, pubsub, finished, cancel, moved)
                finally:  # before the pubsub closes: a follower left running would subscribe on a new connection
                    await cancel_and_wait(follower)
        except STORE_ERRORS:
            await asyncio.sleep(0.5)
        except Exception as exc:
            backend.health.log.error("pubsub_listener_restarted", exc_info=exc,
                                     extra={"error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(0.5)


async def hear(backend: Listener, pubsub: PubSub, finished: bytes, cancel: bytes, moved: bytes) -> None:
    ended = moved + b":"  # ended:<run_id>
    async for message in pubsub.listen():
        kind, channel = message["type"], message["channel"]
        if kind not in ("message", "subscribe") or kind == "subscribe" and not channel.startswith(ended):
            continue
        try:
            run_id = (channel[len(ended):] if kind == "subscribe" else message["data"]).decode()
        except UnicodeDecodeError:
            backend.health.log.warning("pubsub_message_ignored", extra={"channel": channel.decode(errors="replace")})
            continue
        if kind == "subscribe":  # its waiters read it again: an end before now passed by unheard
            backend.waiters.wake(run_id)
        elif channel == finished:
            backend.waiters.wake(run_id)
            if not backend.finished_here(run_id):  # a slot freed elsewhere: look at the queue
                backend.on_work()
        elif channel == moved:  # a handoff: no slot to take, but the queue moved
            backend.on_moved()
        elif channel.startswith(ended):
            backend.waiters.wake(run_id)
        elif channel == cancel:
            run_id, _, by = run_id.partition(" ")
            backend.on_cancel(run_id, by or None)
        else:  # queued
            backend.on_work()


async def follow(backend: Listener, pubsub: PubSub, moved: bytes) -> None:
    """Keep ``pubsub`` subscribed to ``ended:<run_id>`` for each run this replica has waiters for, and to ``moved``
    while stream clients here watch queue positions (and MOVED_LINGER_SECONDS after). Once Redis confirms a run's
    subscription, the listener wakes its waiters to read it again, so a waiter that came before misses nothing.

    A turn looks at the runs whose first waiter came or last one went since the last turn; the first turn, one
    after a failure (its SUBSCRIBE failed while the listener's read reconnected under it) and one every
    WATCH_CHECK_SECONDS at every waited run. What is subscribed is redis-py's own record
    (``pubsub.channels``): its reconnects subscribe again to all of it, also to a channel whose UNSUBSCRIBE was not
    confirmed."""
    ended = moved + b":"
    watched_until, every_run_due, everything = 0.0, 0.0, True
    while True:
        backend.waiters.changed.clear()
        now = asyncio.get_running_loop().time()
        if backend.watching():
            watched_until = now + MOVED_LINGER_SECONDS
        channels, leaving = pubsub.channels, pubsub.pending_unsubscribe_channels

        def held(channel: bytes) -> bool:
            return channel in channels and channel not in leaving

        if everything or now >= every_run_due:  # (a reconnect subscribed again to all it held)
            every_run_due = now + WATCH_CHECK_SECONDS
            backend.waiters.changed_for()  # looked at with every other run
            wanted = {ended + run_id.encode() for run_id in backend.waiters.runs()}
            subscribed = {channel for channel in channels if channel.startswith(ended) and held(channel)}
            join, leave = wanted - subscribed, subscribed - wanted
        else:
            changed = {ended + run_id.encode(): backend.waiters.has(run_id) for run_id in backend.waiters.changed_for()}
            join = {channel for channel, waited in changed.items() if waited and not held(channel)}
            leave = {channel for channel, waited in changed.items() if not waited and held(channel)}
        if now < watched_until and not held(moved):
            join.add(moved)
        elif now >= watched_until and held(moved):
            leave.add(moved)
        try:
            if join:
                await pubsub.subscribe(*join)
            if leave:
                await pubsub.unsubscribe(*leave)
        except Exception:  # noqa: BLE001 - the listener's read reconnecting under it; asked again, for every run
            everything = True
            await asyncio.sleep(0.5)
            continue
        everything = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(backend.waiters.changed.wait(), WATCH_CHECK_SECONDS)
