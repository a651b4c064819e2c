"""The run record, and the run lock and run store behind one small interface.

Memory mode keeps both in this process. The runner only ever calls the
methods below, so another backend (Redis) slots in without touching it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


STATES = ("PENDING", "RUNNING", "DONE", "ERROR", "CANCELLED")
TERMINAL_STATES = frozenset({"DONE", "ERROR", "CANCELLED"})


def utc_now() -> str:
    """The current time as RFC 3339 UTC with millisecond precision, ending in Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Run:
    """One run of one agent, as clients see it (plus the lock holder's token)."""

    run_id: str
    agent_type: str
    user_id: str
    input: dict[str, Any]
    state: str = "PENDING"
    result: Any = None
    error: str | None = None
    progress: float | None = None
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    holder: str | None = None  # token of the run lock taken for this run; not shown to clients
    _json: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def update(self, **changes: Any) -> None:
        """Change fields; the cached JSON is rebuilt on the next read."""
        for name, value in changes.items():
            setattr(self, name, value)
        self._json = None

    def public(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "agent_type": self.agent_type, "user_id": self.user_id, "input": self.input,
                "state": self.state, "result": self.result, "error": self.error, "progress": self.progress,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at}

    def json(self) -> bytes:
        """The client-facing JSON, serialised once per change rather than per request."""
        if self._json is None:
            self._json = json.dumps(self.public(), separators=(",", ":"), allow_nan=False).encode()
        return self._json

    @classmethod
    def from_json(cls, raw: bytes, holder: str | None = None) -> Run:
        """A run read back from its client-facing JSON, which it then serves as it is."""
        run = cls(**json.loads(raw), holder=holder)
        run._json = raw
        return run


class MemoryRunLock:
    """The single-run lock of one process: a holder token or nothing. Never waits."""

    renew_interval: float | None = None  # nothing to renew in memory

    def __init__(self) -> None:
        self._token: str | None = None

    async def try_acquire(self) -> str | None:
        """Take the lock if it is free and return its token; None when it is held."""
        if self._token is not None:
            return None
        self._token = uuid.uuid4().hex
        return self._token

    async def release(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def renew(self, token: str) -> None:
        pass


class MemoryRunStore:
    """Runs in a dict in creation order; keeps at most ``retention`` finished runs."""

    def __init__(self, retention: int) -> None:
        self.retention = retention
        self.on_cancel: Callable[[str], None] = lambda run_id: None
        self._runs: dict[str, Run] = {}
        self._finished: deque[str] = deque()  # finished run ids, oldest first
        self._finish_events: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def check(self) -> None:
        pass

    def note_progress(self, run: Run) -> None:
        pass  # the stored run is the object the agent updates

    async def unfinished(self) -> list[Run]:
        return []  # one process: no other holder can leave a run behind

    async def request_cancel(self, run_id: str) -> None:
        pass  # one process: the runner cancels its own run directly

    async def cancel_requested(self, run_id: str) -> bool:
        return False

    async def add(self, run: Run) -> None:
        self._runs[run.run_id] = run
        self._finish_events[run.run_id] = asyncio.Event()

    async def save(self, run: Run, release: MemoryRunLock | None = None) -> None:
        """Store a change; a terminal state wakes its waiters and may drop the oldest finished run.

        With ``release``, the run's lock is released in the same step (nothing
        in between yields), so a client that sees the terminal state can start
        the next run at once.
        """
        self._runs[run.run_id] = run
        if not run.finished:
            return
        if release is not None and run.holder is not None:
            await release.release(run.holder)
        event = self._finish_events.pop(run.run_id, None)
        if event is not None:
            event.set()
        self._finished.append(run.run_id)
        while len(self._finished) > self.retention:
            del self._runs[self._finished.popleft()]

    async def get(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    async def wait_finished(self, run_id: str, timeout: float) -> Run | None:
        """The run once it is terminal, or as it stands after ``timeout`` seconds."""
        event = self._finish_events.get(run_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                pass
        return self._runs.get(run_id)

    async def list(
        self,
        *,
        limit: int,
        state: str | None = None,
        agent_type: str | None = None,
        user_id: str | None = None,
        before: str | None = None,
    ) -> list[Run]:
        """Runs newest first, filtered; ``before`` starts after that run (it must exist)."""
        runs: list[Run] = []
        skipping = before is not None
        for run in reversed(self._runs.values()):
            if skipping:
                skipping = run.run_id != before
                continue
            if (
                (state is None or run.state == state)
                and (agent_type is None or run.agent_type == agent_type)
                and (user_id is None or run.user_id == user_id)
            ):
                runs.append(run)
                if len(runs) == limit:
                    break
        return runs


class StoreUnavailable(Exception):
    """The run store (Redis) cannot be reached; the request gets 503."""


class LockLost(Exception):
    """The run lock was taken over or expired while its holder still ran (Redis mode)."""
