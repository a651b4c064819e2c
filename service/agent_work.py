"""Which code belongs to which run: the default executor tags the work an agent submits.

An agent's coroutine runs with ``current_run`` set in its task's context.
``asyncio.to_thread`` and ``loop.run_in_executor(None, ...)`` submit to the
loop's default executor from the calling task's context, so the executor
sees which run submitted the work, and the runner can wait for all of it
before it releases the run lock. With tracing on, the work runs in the submitter's context, so the run's
span is current in it (``asyncio.to_thread`` copies the context itself; ``run_in_executor`` does not).
"""

from __future__ import annotations

import contextvars
import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from service import tracing

# The run whose agent code is executing in this context; the default executor tags work with it.
current_run: contextvars.ContextVar[Any] = contextvars.ContextVar("current_run", default=None)


class RunTrackingExecutor(ThreadPoolExecutor):
    """The loop's default executor: work submitted from an agent's context is counted as that agent's code.

    ``asyncio.to_thread`` and ``loop.run_in_executor(None, ...)`` both submit
    here from the calling task's context, so the agent needs to do nothing.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        active = current_run.get()
        if active is not None and tracing.tracer is not None:  # run_in_executor copies no context: the run's span
            fn = functools.partial(contextvars.copy_context().run, fn)
        future = super().submit(fn, *args, **kwargs)
        if active is not None:
            active.executor_work.append(future)
        return future
