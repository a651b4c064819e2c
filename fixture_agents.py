"""Agents the test suite loads with AGENT_MODULES=fixture_agents.

Each one misbehaves, or behaves, in one controlled way; ``input`` tunes it.
They double as examples of writing an agent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agents import BaseAgent, register


@register
class Sleeper(BaseAgent):
    agent_type = "sleeper"
    description = "Sleeps input.seconds (default AGENT_SLEEP_SECONDS), reporting progress 0.5 halfway."

    async def run(self) -> Any:
        seconds = float(self.input.get("seconds", self.sleep_seconds))
        self.set_progress(0.0)
        await asyncio.sleep(seconds / 2)
        self.set_progress(0.5)
        await asyncio.sleep(seconds / 2)
        self.set_progress(1.0)
        return {"slept": seconds, "input": self.input}


@register
class Failing(BaseAgent):
    agent_type = "failing"
    description = "Raises ValueError(input.message)."

    async def run(self) -> Any:
        raise ValueError(self.input.get("message", "boom"))


@register
class Hanging(BaseAgent):
    agent_type = "hanging"
    description = "Never returns (until cancelled)."

    async def run(self) -> Any:
        await asyncio.Event().wait()


@register
class Stubborn(BaseAgent):
    agent_type = "stubborn"
    description = "Swallows CancelledError and keeps working until input.hold seconds have passed."

    async def run(self) -> Any:
        deadline = time.monotonic() + float(self.input.get("hold", 2.0))
        ignored = 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                ignored += 1
                self.log.info("cancel_ignored", ignored=ignored)
        return {"ignored_cancels": ignored}


@register
class Unserialisable(BaseAgent):
    agent_type = "unserialisable"
    description = "Returns a value JSON cannot encode."

    async def run(self) -> Any:
        return {"when": object()}
