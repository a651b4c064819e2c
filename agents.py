"""Agents: the BaseAgent contract, the registry, and the built-in agents.

An agent is a class with an ``agent_type``, a ``description`` and an async
``run()`` that returns the run's result (any JSON value). Decorate it with
``@register`` in a module named in AGENT_MODULES and the runner offers it.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

registry: dict[str, type[BaseAgent]] = {}


class AgentRegistrationError(Exception):
    """An agent class cannot be registered (no agent_type, or a duplicate one)."""


class LeaseLost(Exception):
    """``ensure_lease`` found that the run no longer holds its slot: its lease expired or was taken over, the
    store could not confirm it, or the run is stopping. Stop using the resource; let it propagate."""


class RunLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose lines carry the run's run_id, agent_type and user_id.

    Keyword arguments become fields of the JSON line:
    ``self.log.info("pages_read", pages=3)``. ``message=`` adds a human sentence.
    """

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        passthrough = {key: kwargs.pop(key) for key in ("exc_info", "stack_info", "stacklevel") if key in kwargs}
        fields = {**(self.extra or {}), **kwargs.pop("extra", {}), **kwargs}
        if "message" in fields:  # "message" is reserved on LogRecord; the formatter renames it back
            fields["human_message"] = fields.pop("message")
        return msg, {**passthrough, "extra": fields}


class BaseAgent(abc.ABC):
    """Base class of every agent.

    Subclasses set ``agent_type`` and ``description`` and implement ``run``.
    Inside ``run`` an agent has ``self.run_id``, ``self.user_id``,
    ``self.input`` (the request's ``input`` object), ``self.sleep_seconds``
    (AGENT_SLEEP_SECONDS), ``self.log`` and ``self.set_progress``.

    ``run`` must not block the event loop: wrap blocking or CPU-bound work in
    ``await asyncio.to_thread(...)``. Cancellation (timeout, cancel, shutdown)
    arrives as ``asyncio.CancelledError``; clean up and let it propagate.

    Work in a thread cannot be cancelled: the run keeps the lock, and stays
    RUNNING, until every ``asyncio.to_thread`` / ``run_in_executor(None, ...)``
    call the agent started has returned. Such work should check
    ``self.stopping`` (a ``threading.Event``, set on cancel, timeout, shutdown
    or lock loss) between steps and return early once it is set.
    ``set_progress`` and ``self.log`` may be called from those threads too.

    ``self.fencing_token`` is an integer minted as the run took its slot, greater than every token minted
    before it (across slots, replicas and restarts). Before each use of a shared resource, ``await
    self.ensure_lease()``, and pass the token to a resource that can keep the highest one it has seen and
    refuse lower ones: the lease alone cannot stop a holder paused past it (docs/agents.md).
    """

    agent_type: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(
        self,
        run_id: str,
        user_id: str,
        input: Mapping[str, Any],
        *,
        sleep_seconds: float = 0.0,
        on_progress: Callable[[float], None] | None = None,
        stopping: threading.Event | None = None,
        fencing_token: int | None = None,
        lease: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.user_id = user_id
        self.input = input
        self.sleep_seconds = sleep_seconds
        self.stopping = stopping if stopping is not None else threading.Event()
        self.fencing_token = fencing_token
        self._lease = lease
        self._on_progress = on_progress
        self._loop_thread = threading.get_ident()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop (a unit test): progress is reported directly
            self._loop, self._loop_thread = None, -1
        self.log = RunLogger(
            logging.getLogger(f"agents.{self.agent_type}"),
            {"run_id": run_id, "agent_type": self.agent_type, "user_id": user_id},
        )

    def set_progress(self, fraction: float) -> None:
        """Report how far the run is, from 0 to 1; shows as ``progress`` on the run."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"progress must be a number from 0 to 1, got {fraction!r}")
        if self._on_progress is None:
            return
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._on_progress(float(fraction))
        else:  # called from a worker thread: hand it to the event loop
            self._loop.call_soon_threadsafe(self._on_progress, float(fraction))

    async def ensure_lease(self) -> None:
        """Return if the run still holds its slot right now, else raise ``LeaseLost``.

        In Redis mode it asks Redis (one round trip), so after a pause longer than the lease it fails at once.
        Call it before each use of the resource; it is no substitute for passing ``fencing_token`` to it.
        """
        if self.stopping.is_set():
            raise LeaseLost("the run is stopping")
        if self._lease is not None and (reason := await self._lease()) is not None:
            raise LeaseLost(reason)

    @abc.abstractmethod
    async def run(self) -> Any:
        """Do the work and return the result (any JSON-serialisable value)."""

    def completion_fields(self, result: Any) -> dict[str, Any]:
        """Extra fields for the run's ``agent_complete`` log line (none by default)."""
        return {}


def register(cls: type[BaseAgent]) -> type[BaseAgent]:
    """Class decorator that adds an agent to the registry under its ``agent_type``."""
    agent_type = getattr(cls, "agent_type", None)
    if not isinstance(agent_type, str) or not agent_type:
        raise AgentRegistrationError(f"{cls.__qualname__} has no agent_type")
    if agent_type in registry and registry[agent_type] is not cls:
        raise AgentRegistrationError(
            f"agent_type {agent_type!r} is registered twice "
            f"({registry[agent_type].__module__}.{registry[agent_type].__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__})"
        )
    registry[agent_type] = cls
    return cls


class _GreetingAgent(BaseAgent):
    """Shared shape of the built-ins: greet, work for AGENT_SLEEP_SECONDS, decide."""

    async def run(self) -> Any:
        self.log.info("agent_start", message=f"Hello, I am a {self.agent_type} agent for {self.user_id}")
        self.set_progress(0.0)
        await asyncio.sleep(self.sleep_seconds)
        self.set_progress(1.0)
        return self.decide()

    @abc.abstractmethod
    def decide(self) -> Any:
        """The run's result."""


@register
class DocumentExtractor(_GreetingAgent):
    agent_type = "document-extractor"
    description = "Extracts the fields of a document (demo: returns a fixed set of fields)."

    def decide(self) -> Any:
        return {
            "document_id": self.input.get("document_id"),
            "fields": {"title": "Quarterly report", "pages": 12, "language": "en"},
        }


@register
class PolicyChecker(_GreetingAgent):
    agent_type = "policy-checker"
    description = "Checks a request against policy and answers approved or rejected (demo: at random)."

    def decide(self) -> Any:
        return random.choice(["approved", "rejected"])

    def completion_fields(self, result: Any) -> dict[str, Any]:
        return {"decision": result}
