"""Redis mode's webhook delivery queue, shared by every replica.

The FINISH script owes a delivery in the same step as the terminal state:
``<prefix>:webhook:<run_id>`` (url, body, attempt, webhook-id) and ``<prefix>:webhooks``
(run ids by due time). A replica claims a due delivery with a lease (the
CLAIM script moves its due time past the lease and counts the attempt), so
two live replicas never send it at once; if the claimer dies, the delivery
is due again when the lease ends, and any replica picks it up. The attempt
count lives in Redis, so a delivery whose claimers keep dying still stops
after MAX_ATTEMPTS.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis

from service.backends.base import Delivery
from service.backends.records import MAX_ATTEMPTS, Run
from service.backends.redis.lock import StoreHealth
from service.backends.redis.side_scripts import CLAIM_WEBHOOK_SCRIPT, REPORT_WEBHOOK_SCRIPT

POLL_SECONDS = 1.0  # with nothing owed, the queue is looked at this often (other replicas' deliveries)


class RedisDeliveries:
    """The queue in Redis: it outlives every replica, so nothing is lost when this one stops."""

    durable = True

    def __init__(self, client: Redis, key: Callable[..., str], health: StoreHealth, timeout_seconds: float) -> None:
        self.key = key
        self.health = health
        # Longer than an attempt can last (it is cut at the timeout), with room for a slow event loop.
        self.lease_seconds = 2 * timeout_seconds + 5
        self.on_owed: Callable[[], None] = lambda: None
        self._claim = client.register_script(CLAIM_WEBHOOK_SCRIPT)
        self._report = client.register_script(REPORT_WEBHOOK_SCRIPT)

    def owe(self, run: Run) -> None:
        self.on_owed()  # the FINISH script stored it; look at the queue now

    async def claim(self) -> tuple[Delivery | None, float]:
        """The next due delivery, leased to this replica with its attempt counted; or None and the wait."""
        token = uuid.uuid4().hex
        claimed_at = time.monotonic()
        async with self.health.guard():
            reply = await self._claim(keys=[self.key("webhooks")],
                                      args=[int(self.lease_seconds * 1000), token, self.key("webhook", ""),
                                            MAX_ATTEMPTS])
        if reply[0] == 0:
            wait = reply[1] / 1000 if reply[1] >= 0 else POLL_SECONDS
            return None, wait
        run_id = reply[1].decode()
        if reply[0] == 2:
            return Delivery(run_id, "", b"", attempt=int(reply[2]), exhausted=True), 0.0
        message_id = reply[5].decode() if len(reply) > 5 and reply[5] else ""  # none: owed by an older version
        return Delivery(run_id, reply[3].decode(), reply[4], attempt=int(reply[2]), lease=token,
                        send_by=claimed_at + self.lease_seconds - 1, message_id=message_id), 0.0

    async def report(self, delivery: Delivery, retry_in: float | None) -> None:
        async with self.health.guard():
            await self._report(keys=[self.key("webhooks"), self.key("webhook", delivery.run_id)],
                               args=[delivery.lease or "", "done" if retry_in is None else int(retry_in * 1000),
                                     delivery.run_id])

    def take_all(self) -> list[Delivery]:
        return []  # what is owed stays in Redis for the other replicas
