"""Stopping a background task for sure: a cancel can be lost, so it is repeated until the task has ended.

On Python 3.11 ``asyncio.wait_for`` returns its result instead of raising
CancelledError when the future it waits for completes in the same loop turn
as the cancel (fixed in 3.12, where it is built on ``asyncio.timeout``).
redis-py awaits ``wait_for`` on every command it sends, and our own loops
wait for their wake-up events with it, so a task cancelled once may simply
go on: a reader blocked in its next XREAD, a process that never exits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

CANCEL_AGAIN_SECONDS = 0.1


async def cancel_and_wait(task: asyncio.Task[Any], within: float = 5.0) -> bool:
    """Cancel ``task`` until it has ended, for at most ``within`` seconds; True if it ended.

    Its outcome (result, exception or cancellation) is consumed: the caller stops it, it does not read it.
    """
    deadline = time.monotonic() + within
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=min(CANCEL_AGAIN_SECONDS, max(0.0, deadline - time.monotonic())))
    if not task.done():
        return False
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved
    return True
