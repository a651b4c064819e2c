"""Which code belongs to which run: the default executor tags the work an agent submits.

An agent's coroutine runs with ``current_run`` set in its task's context.
``asyncio.to_thread`` and ``loop.run_in_executor(None, ...)`` submit to the
loop's default executor from the calling task's context, so the executor
sees which run submitted the work, and the runner can wait for all of it
before it releases the run lock.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# The run whose agent code is executing in this context; the default executor tags work with it.
current_run: contextvars.ContextVar[Any] = contextvars.ContextVar("current_run", default=None)


class RunTrackingExecutor(ThreadPoolExecutor):
    """The loop's default executor: work submitted from an agent's context is counted as that agent's code.

    ``asyncio.to_thread`` and ``loop.run_in_executor(None, ...)`` both submit
    here from the calling task's context, so the agent needs to do nothing.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        active = current_run.get()
        if active is not None:
            active.executor_work.append(future)
        return future
