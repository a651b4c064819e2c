"""Agents that record when they really use "the resource": the guarantee tests check these records never overlap.

Each agent appends ``start <run_id> <time>`` and ``end <run_id> <time>`` lines
to the file ``input.ledger`` from its own code (a coroutine or a worker
thread), so the test sees what ran, not what the service says ran.
Load with AGENT_MODULES=fixture_agents,fixture_resource_agents.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx

from agents import BaseAgent, register


def note(ledger: str, what: str, run_id: str) -> None:
    """One line, appended with O_APPEND in one write, so lines from two processes never interleave."""
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {run_id} {time.time():.6f} {os.getpid()}\n".encode())
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


def use_resource_blocking(ledger: str, run_id: str, seconds: float, stopping: Any = None) -> str:
    note(ledger, "start", run_id)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                return "stopped early"
            time.sleep(0.01)
        return "done"
    finally:
        note(ledger, "end", run_id)


@register
class ThreadWorker(BaseAgent):
    agent_type = "thread-worker"
    description = "Uses the resource for input.seconds in asyncio.to_thread (or run_in_executor), ignoring stops."

    async def run(self) -> Any:
        args = (self.input["ledger"], self.run_id, float(self.input.get("seconds", 1.0)))
        if self.input.get("cooperative"):
            args = (*args, self.stopping)
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
        note(ledger, "start", self.run_id)
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
            note(ledger, "end", self.run_id)
