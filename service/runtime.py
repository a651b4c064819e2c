"""What a running service holds: the backend, the event hub, the runner, admission and the webhook deliverer.

``open_runtime`` builds it in the app's lifespan (nothing is built at import)
and ``close_runtime`` takes it down; the HTTP layer reaches it through
``from_state(request.app.state)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service import settings
from service.admission import Admission
from service.agent_work import RunTrackingExecutor
from service.backends import Backend, open_backend
from service.events import EventHub, capture_agent_logs
from service.runs import Runner
from service.webhooks import Deliverer, start_delivering

LARGE_READS_AT_ONCE = 2


@dataclass
class Runtime:
    """The state of one running service; the lifespan owns it, the handlers use it."""

    backend: Backend
    hub: EventHub
    runner: Runner
    admission: Admission
    deliverer: Deliverer | None = None  # while webhooks are on
    # Lists of runs and event replays read and built at once (each up to 8 MiB, several times that while decoded):
    # the rest wait their turn, so clients asking for many at once cannot multiply the memory they take.
    large_reads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LARGE_READS_AT_ONCE))


async def open_runtime(config: settings.Settings,
                       before_start: Callable[[Backend], Awaitable[None]] | None = None) -> Runtime:
    """Open the backend ``config`` asks for, wire the runner and the event hub to it, and start them.

    ``before_start`` sees the backend before anything starts (the one-process check of memory mode).
    """
    backend = open_backend(config)
    if before_start is not None:
        await before_start(backend)
    asyncio.get_running_loop().set_default_executor(RunTrackingExecutor(thread_name_prefix="agent-work"))
    hub = EventHub()
    runner = Runner(backend, hub)
    backend.on_cancel = runner.request_stop
    backend.on_work = runner.work_waiting.set
    await backend.start()
    transport = backend.event_transport(hub)
    hub.start(config.events_keepalive_seconds, transport)
    await transport.start()
    capture_agent_logs(hub)
    runtime = Runtime(backend, hub, runner, Admission(runner))
    backend.watching = hub.watches_queue
    backend.on_moved = runtime.admission.publish_queue
    runtime.deliverer = start_delivering(backend)
    return runtime


async def stop_delivering(runtime: Runtime) -> None:
    """Stop the webhook deliverer (memory: one last attempt for each delivery still owed)."""
    if runtime.deliverer is not None:
        await runtime.deliverer.stop()
        runtime.deliverer = None


async def close_runtime(runtime: Runtime) -> None:
    """End the event streams; close the backend, unless agent code still runs: then its slot must go on being
    renewed until exit."""
    await runtime.hub.stop()
    if not runtime.runner.agent_code_running():
        await runtime.backend.close()


class NotStarted(Exception):
    """The app's lifespan has not built the runtime (a launcher that runs none): nothing may be served."""


def from_state(state: object) -> Runtime:
    """The runtime the lifespan put on the app's state."""
    runtime = getattr(state, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise NotStarted
    return runtime
