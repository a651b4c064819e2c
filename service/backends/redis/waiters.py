"""The ``?wait=`` waiters of this replica (store.RedisBackend.wait_finished), by run.

The listener wakes a run's waiters when it hears the run's end, and follows ``ended:<run_id>`` only while the run
has waiters here: each run's first waiter coming and last one going are told to it (``changed``, ``changed_for``).
"""

from __future__ import annotations

import asyncio


class Waiters:
    def __init__(self) -> None:
        self._by_run: dict[str, set[asyncio.Event]] = {}
        self.changed = asyncio.Event()  # a run's first waiter came or its last one went (changed_for)
        self._changed_for: set[str] = set()  # those runs

    def runs(self) -> list[str]:
        return list(self._by_run)

    def has(self, run_id: str) -> bool:
        return run_id in self._by_run

    def changed_for(self) -> set[str]:
        """The runs whose first waiter came or last one went since the last call."""
        changed, self._changed_for = self._changed_for, set()
        return changed

    def wake(self, run_id: str) -> None:
        for event in self._by_run.get(run_id, ()):
            event.set()

    def wake_all(self) -> None:
        for run_id in list(self._by_run):
            self.wake(run_id)

    def waiting(self, run_id: str, event: asyncio.Event, comes: bool) -> None:
        """A waiter of ``run_id`` (its ``event``, set to wake it) comes or goes."""
        waiters = self._by_run.setdefault(run_id, set())
        if comes:
            waiters.add(event)
        else:
            waiters.discard(event)
        first_or_last = len(waiters) == (1 if comes else 0)
        if not waiters:
            del self._by_run[run_id]
        if first_or_last:
            self._changed_for.add(run_id)
            self.changed.set()
