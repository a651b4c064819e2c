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


@register
class OverlapCounter(BaseAgent):
    """Counts concurrent executions in Redis (input.redis_url, input.key); records the maximum seen."""

    agent_type = "overlap-counter"
    description = "Increments a Redis counter while it runs and records the highest value seen."

    async def run(self) -> Any:
        from redis.asyncio import Redis

        client = Redis.from_url(self.input["redis_url"])
        key = self.input["key"]
        try:
            now = await client.incr(f"{key}:current")
            try:
                await client.eval("if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then "
                                  "redis.call('SET', KEYS[1], ARGV[1]) end", 1, f"{key}:max", now)
                await client.incr(f"{key}:runs")
                await asyncio.sleep(float(self.input.get("seconds", 0.02)))
            finally:
                await client.decr(f"{key}:current")
        finally:
            await client.aclose()
        return {"concurrent": now}
