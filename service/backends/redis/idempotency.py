"""Idempotency keys of POST /agents/run: a request retried with its key gets its first run, never a second.

A key is claimed by the first request that brings it ("pending"), with the
run id that request's run will have and a fingerprint of the request. Once
that run is admitted the key is "accepted" and kept IDEMPOTENCY_TTL_SECONDS
(in Redis mode by the admit script itself, so an admitted run never leaves
its key pending, and a request whose claim was lost meanwhile is not admitted);
a request that was refused (409 busy, 503) gives the key back, so a retry is
handled afresh. Because the run id is chosen when the key is claimed, a
pending key whose run exists in the run store was admitted: its first answer
was lost or has not been sent yet, and a retry replays it.

``MemoryIdempotencyKeys`` keeps keys in this process, at most RUN_RETENTION
accepted ones; ``RedisIdempotencyKeys`` keeps them under
``<prefix>:idempotency:<key>`` for every replica, each step one Lua script.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

# A pending key older than this whose run does not exist was left by a replica that died before admitting
# its run: the next request with the key takes it over. Far above the longest an admission can take; a
# pending key lives at least this long even with a shorter TTL, so a slow admission is never raced.
STALE_PENDING_SECONDS = 60.0


class Claim(NamedTuple):
    """What a request found under its key.

    ``outcome``: "new" (the key is this request's to decide), "accepted" (an
    earlier request's run was admitted), "pending" (an earlier request is
    still being decided), "mismatch" (the key came with a different request).
    ``run_id`` is the run the key stands for.
    """

    outcome: str
    run_id: str


def fingerprint(agent_type: str, user_id: str, agent_input: dict[str, Any], on_busy: str,
                webhook: str | None = None) -> str:
    """The request as the key remembers it: every body field, key order and spacing aside."""
    canonical = json.dumps([agent_type, user_id, agent_input, on_busy, webhook], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(slots=True)
class Entry:
    fingerprint: str
    run_id: str
    expires: float  # time.monotonic()


class MemoryIdempotencyKeys:
    """Keys in this process: accepted ones for ``ttl_seconds``, at most ``limit`` of them (oldest dropped first)
    besides those whose run has not finished (``unfinished``), which retention does not drop either.

    Pending keys are not counted: each belongs to a request in progress, which settles it before it answers,
    so one never expires (another request taking it over would admit a second run).
    """

    def __init__(self, ttl_seconds: float, limit: int,
                 unfinished: Callable[[str], bool] = lambda run_id: False) -> None:
        self.ttl_seconds = ttl_seconds
        self.limit = limit
        self.unfinished = unfinished
        self._pending: dict[str, Entry] = {}
        self._accepted: OrderedDict[str, Entry] = OrderedDict()  # oldest first, so expiry pops from the front

    def __len__(self) -> int:
        return len(self._pending) + len(self._accepted)

    async def claim(self, key: str, fingerprint: str, run_id: str) -> Claim:
        """The key's entry, or a new pending one for ``run_id``; no await, so racing requests see one claim."""
        now = time.monotonic()
        while self._accepted and next(iter(self._accepted.values())).expires <= now:
            self._accepted.popitem(last=False)
        if (entry := self._accepted.get(key)) is not None:
            return Claim("accepted" if entry.fingerprint == fingerprint else "mismatch", entry.run_id)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = Entry(fingerprint, run_id, math.inf)
            return Claim("new", run_id)
        return Claim("pending" if entry.fingerprint == fingerprint else "mismatch", entry.run_id)

    async def accept(self, key: str, fingerprint: str, run_id: str) -> None:
        """``run_id`` was admitted: keep the key for the TTL."""
        self._pending.pop(key, None)
        self._accepted.pop(key, None)
        self._accepted[key] = Entry(fingerprint, run_id, time.monotonic() + self.ttl_seconds)
        if len(self._accepted) > self.limit:
            self._drop_oldest(len(self._accepted) - self.limit)

    def _drop_oldest(self, count: int) -> None:
        """Drop the ``count`` oldest keys whose run has finished (or is gone); at most the unfinished are kept."""
        finished = (key for key, entry in self._accepted.items() if not self.unfinished(entry.run_id))
        dropped = list(itertools.islice(finished, count))  # stops early: only unfinished runs' keys are skipped
        for key in dropped:
            del self._accepted[key]

    def admit_args(self, key: str, fingerprint: str) -> None:
        """Nothing for the store's admit to check: a pending claim here is removed only by its own request."""
        return None

    async def release(self, key: str, run_id: str) -> None:
        """``run_id`` was refused: forget the key, if it is still this request's pending claim."""
        entry = self._pending.get(key)
        if entry is not None and entry.run_id == run_id:
            del self._pending[key]


# Claim a key. KEYS: the key's hash. ARGV: fingerprint, run_id, pending_ms (how long a pending claim lives),
# stale_ms, run key prefix. A pending entry whose run does not exist and that is older than stale_ms is taken
# over. Safe to retry after a lost reply: an entry already holding ARGV[2] is this request's own claim.
CLAIM_SCRIPT = """
local entry = redis.call('HMGET', KEYS[1], 'fingerprint', 'run_id', 'state')
if entry[1] and entry[2] ~= ARGV[2] then
  local admitted = entry[3] == 'accepted' or redis.call('EXISTS', ARGV[5] .. entry[2]) == 1
  local age = tonumber(ARGV[3]) - redis.call('PTTL', KEYS[1])
  if admitted or age < tonumber(ARGV[4]) then
    if entry[1] ~= ARGV[1] then return {'mismatch', entry[2]} end
    if admitted then return {'accepted', entry[2]} end
    return {'pending', entry[2]}
  end
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'run_id', ARGV[2], 'state', 'pending')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'new', ARGV[2]}
"""

# The run was admitted: the key is accepted for the TTL, unless another request holds it now.
# KEYS: the key's hash. ARGV: fingerprint, run_id, ttl_ms.
ACCEPT_SCRIPT = """
local holder = redis.call('HGET', KEYS[1], 'run_id')
if holder and holder ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'run_id', ARGV[2], 'state', 'accepted')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# The request was refused: delete the key if it is still its pending claim. KEYS: the key's hash. ARGV: run_id.
RELEASE_SCRIPT = """
local entry = redis.call('HMGET', KEYS[1], 'run_id', 'state')
if entry[1] == ARGV[1] and entry[2] == 'pending' then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdempotencyKeys:
    """Keys shared by every replica, as hashes (fingerprint, run_id, state) that expire after the TTL."""

    def __init__(self, client: Any, prefix: str, run_prefix: str, health: Any, ttl_seconds: float) -> None:
        self.prefix = prefix  # "<REDIS_PREFIX>:idempotency:"
        self.run_prefix = run_prefix  # "<REDIS_PREFIX>:run:", to see whether a pending key's run was admitted
        self.health = health
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self.pending_ms = max(self.ttl_ms, round(STALE_PENDING_SECONDS * 1000))
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._accept = client.register_script(ACCEPT_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    async def claim(self, key: str, fingerprint: str, run_id: str) -> Claim:
        async with self.health.guard():
            outcome, holder = await self._claim(
                keys=[self.prefix + key],
                args=[fingerprint, run_id, self.pending_ms, round(STALE_PENDING_SECONDS * 1000), self.run_prefix])
        return Claim(outcome.decode(), holder.decode())

    def admit_args(self, key: str, fingerprint: str) -> list[Any]:
        """What the admit script needs to admit the run only while the key is still this request's claim, and to
        mark it accepted in the same step."""
        return [self.prefix + key, fingerprint, self.ttl_ms]

    async def accept(self, key: str, fingerprint: str, run_id: str) -> None:
        async with self.health.guard():
            await self._accept(keys=[self.prefix + key], args=[fingerprint, run_id, self.ttl_ms])

    async def release(self, key: str, run_id: str) -> None:
        async with self.health.guard():
            await self._release(keys=[self.prefix + key], args=[run_id])
