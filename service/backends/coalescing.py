"""Reads that callers ready at the same moment share: the first ``get`` of a batch schedules one fetch for every key
asked before the loop next runs, so a burst of status requests costs one round trip to the store, not one each.
Nothing is cached: each key is fetched by a request sent after its ``get``."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

Value = TypeVar("Value")


class Coalesced(Generic[Value]):
    """``await reads.get(key)``: the key's value (or None), fetched with the others asked for meanwhile; a subclass
    says how (``_fetch`` resolves every future, with a value or the store's error)."""

    def __init__(self) -> None:
        self._keys: list[str] = []
        self._futures: list[asyncio.Future[Value | None]] = []
        self._fetches: set[asyncio.Task[None]] = set()  # strong references until each is done

    async def get(self, key: str) -> Value | None:
        loop = asyncio.get_running_loop()
        if not self._keys:  # the first key of a batch: sent once the callers ready now have asked too
            loop.call_soon(self._send)
        future: asyncio.Future[Value | None] = loop.create_future()
        self._keys.append(key)
        self._futures.append(future)
        return await future

    def _send(self) -> None:
        keys, futures = self._keys, self._futures
        self._keys, self._futures = [], []
        fetch = asyncio.ensure_future(self._fetch(keys, futures))
        self._fetches.add(fetch)
        fetch.add_done_callback(self._fetches.discard)

    async def _fetch(self, keys: list[str], futures: list[asyncio.Future[Value | None]]) -> None:
        raise NotImplementedError
