"""Agents that record when they really use "the resource": the guarantee tests check these records never overlap.

Each agent appends ``start <run_id> <time>`` and ``end <run_id> <time>`` lines
to the file ``input.ledger`` from its own code (a coroutine or a worker
thread), so the test sees what ran, not what the service says ran.
Load with AGENT_MODULES=fixture_agents,fixture_resource_agents.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from typing import Any

import httpx

from agents import BaseAgent, LeaseLost, register


def note(ledger: str, what: str, run_id: str, *more: object) -> None:
    """One line, appended with O_APPEND in one write, so lines from two processes never interleave."""
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, " ".join(map(str, (what, run_id, f"{time.time():.6f}", os.getpid(), *more))).encode() + b"\n")
    finally:
        os.close(fd)


async def note_waiting(queue_log: str, run_id: str) -> None:
    """Append ``<run_id> <ids of the runs waiting in the queue, comma-separated, or ->``, asked of this service
    as the run starts: a causal check of queue order that no clock skew between replicas can blur."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{os.environ['PORT']}/agents/runs",
                                    params={"state": "PENDING", "limit": 1000})
    waiting = [run["run_id"] for run in response.json()["runs"] if run["queue_position"] is not None]
    fd = os.open(queue_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run_id} {','.join(waiting) or '-'}\n".encode())
    finally:
        os.close(fd)


def use_resource_blocking(ledger: str, run_id: str, seconds: float, stopping: Any = None, token: int = 0) -> str:
    note(ledger, "start", run_id, token)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                return "stopped early"
            time.sleep(0.01)
        return "done"
    finally:
        note(ledger, "end", run_id, token)


@register
class ThreadWorker(BaseAgent):
    agent_type = "thread-worker"
    description = "Uses the resource for input.seconds in asyncio.to_thread (or run_in_executor), ignoring stops."

    async def run(self) -> Any:
        args = (self.input["ledger"], self.run_id, float(self.input.get("seconds", 1.0)),
                self.stopping if self.input.get("cooperative") else None, self.fencing_token or 0)
        if self.input.get("executor"):
            return await asyncio.get_running_loop().run_in_executor(None, use_resource_blocking, *args)
        return await asyncio.to_thread(use_resource_blocking, *args)


@register
class CoroutineWorker(BaseAgent):
    agent_type = "coroutine-worker"
    description = ("Uses the resource for input.seconds in its coroutine; input.stubborn: ignores cancellation; "
                   "input.gate: first holds the resource until that file exists.")

    async def run(self) -> Any:
        ledger = self.input["ledger"]
        if queue_log := self.input.get("queue_log"):
            await note_waiting(queue_log, self.run_id)
        note(ledger, "start", self.run_id, self.fencing_token or 0)
        try:
            if gate := self.input.get("gate"):  # a run that outlasts whatever the test does first, however slow
                while not os.path.exists(gate):
                    await asyncio.sleep(0.01)
            deadline = time.monotonic() + float(self.input.get("seconds", 1.0))
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.sleep(left)
                except asyncio.CancelledError:
                    if not self.input.get("stubborn"):
                        raise
            return "done"
        finally:
            note(ledger, "end", self.run_id, self.fencing_token or 0)


def fenced_write(database: str, token: int, value: str) -> bool:
    """docs/agents.md's worked example: a row that keeps the highest fencing token it has seen; a write under a
    lower token changes nothing (the holder's own token may write again)."""
    with sqlite3.connect(database, timeout=10) as db:
        db.execute("CREATE TABLE IF NOT EXISTS resource (id INTEGER PRIMARY KEY, fence INTEGER NOT NULL, value TEXT)")
        db.execute("INSERT OR IGNORE INTO resource VALUES (1, 0, NULL)")
        updated = db.execute("UPDATE resource SET fence = ?, value = ? WHERE id = 1 AND fence <= ?",
                             (token, value, token))
        return updated.rowcount == 1


@register
class FencedWriter(BaseAgent):
    agent_type = "fenced-writer"
    description = ("Writes input.writes times (every input.interval s) to the SQLite row in input.db that keeps the "
                   "highest fencing token, each after ensure_lease; notes each use in input.ledger with its token. "
                   "input.stubborn: swallows cancellation.")

    async def run(self) -> Any:
        assert self.fencing_token is not None
        writes = int(self.input.get("writes", 1))
        for write in range(writes):
            while True:
                try:
                    await self.ensure_lease()
                    break
                except LeaseLost as exc:
                    note(self.input["ledger"], "lease_lost", self.run_id, self.fencing_token,
                         str(exc).replace(" ", "_"))
                    raise
                except asyncio.CancelledError:  # arrived during the check itself: check again
                    if not self.input.get("stubborn"):
                        raise
            note(self.input["ledger"], "use", self.run_id, self.fencing_token)
            try:
                if not await asyncio.to_thread(fenced_write, self.input["db"], self.fencing_token, self.run_id):
                    raise RuntimeError(f"the resource refused token {self.fencing_token}: a larger one wrote first")
                if write + 1 < writes:
                    await asyncio.sleep(float(self.input.get("interval", 0.05)))
            except asyncio.CancelledError:
                if not self.input.get("stubborn"):  # stubborn: goes on, and must meet LeaseLost next
                    raise
        return {"fencing_token": self.fencing_token, "writes": writes}


@register
class PausedAtTheEnd(BaseAgent):
    agent_type = "paused-at-the-end"
    description = ("Logs a line and returns; its process then stops itself (SIGSTOP) as the runner waits for the "
                   "run's log lines to be stored, before it stores the end (the moment issue 23 paused).")

    async def run(self) -> Any:
        from service.events import EventHub  # the runner's own: this fault needs its moment exactly

        waits_for_lines = EventHub.logs_stored

        async def stop_first(hub: EventHub, timeout: float) -> None:
            EventHub.logs_stored = waits_for_lines  # type: ignore[method-assign]
            os.kill(os.getpid(), signal.SIGSTOP)
            await waits_for_lines(hub, timeout)

        EventHub.logs_stored = stop_first  # type: ignore[method-assign]
        self.log.info("last_line")
        return "done"
