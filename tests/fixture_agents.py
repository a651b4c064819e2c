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
    description = ("Sleeps input.seconds (default AGENT_SLEEP_SECONDS), reporting progress 0.5 halfway; "
                   "logs sleeper_done when input.announce is true.")

    async def run(self) -> Any:
        seconds = float(self.input.get("seconds", self.sleep_seconds))
        self.set_progress(0.0)
        await asyncio.sleep(seconds / 2)
        self.set_progress(0.5)
        await asyncio.sleep(seconds / 2)
        self.set_progress(1.0)
        if self.input.get("announce"):  # for tests that must know the agent ended while its store is away
            self.log.info("sleeper_done")
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
        self.log.info("stubborn_stopped", ignored=ignored)  # its code has stopped: tests order other lines by it
        return {"ignored_cancels": ignored}


@register
class Tidy(BaseAgent):
    agent_type = "tidy"
    description = "Waits until cancelled, then cleans up for input.cleanup seconds, logging cleanup_started/_done."

    async def run(self) -> Any:
        try:
            await asyncio.Event().wait()
        finally:
            self.log.info("cleanup_started")
            await asyncio.sleep(float(self.input.get("cleanup", 0.5)))
            self.log.info("cleanup_done")


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
        # A cancel can land after Redis applied the INCR but before its reply came back. The INCR
        # therefore runs as a task of its own that the cancel does not reach, and the way out waits
        # for it: every increment Redis applied is matched by a decrement.
        entered = asyncio.ensure_future(client.incr(f"{key}:current"))
        try:
            now = await asyncio.shield(entered)
            await client.eval("if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then "
                              "redis.call('SET', KEYS[1], ARGV[1]) end", 1, f"{key}:max", now)
            await client.incr(f"{key}:runs")
            await asyncio.sleep(float(self.input.get("seconds", 0.02)))
        finally:
            # A cancel may also land here, even after the body ended (the sleep was over): the way out
            # is a task of its own too, and the agent ends only once it is done, cancelled or not.
            leaving = asyncio.ensure_future(self.leave(client, key, entered))
            while not leaving.done():
                try:
                    await asyncio.shield(leaving)
                except asyncio.CancelledError:
                    continue
        return {"concurrent": now}

    @staticmethod
    async def leave(client: Any, key: str, entered: asyncio.Future[int]) -> None:
        await asyncio.wait({entered})
        if not entered.cancelled() and entered.exception() is None:
            await client.decr(f"{key}:current")
        await client.aclose()


@register
class Huge(BaseAgent):
    agent_type = "huge"
    description = "Returns a string of input.bytes characters."

    async def run(self) -> Any:
        return "x" * int(self.input.get("bytes", 2 * 1024 * 1024))


@register
class Blocker(BaseAgent):
    agent_type = "blocker"
    description = "Blocks the event loop with time.sleep(input.seconds): what an agent must not do."

    async def run(self) -> Any:
        time.sleep(float(self.input.get("seconds", 1.5)))
        return "blocked"


@register
class ConcurrencyProbe(BaseAgent):
    """Counts how many probes execute at once in this process; input.mode picks a misbehaviour.

    Modes: ok, raise, hang (until cancelled or timed out), stubborn (swallows the
    first cancellation), garbage (an unserialisable result).
    """

    agent_type = "probe"
    description = "Counts concurrent executions; misbehaves as input.mode says."
    running = 0
    most = 0

    async def run(self) -> Any:
        cls = type(self)
        cls.running += 1
        cls.most = max(cls.most, cls.running)
        try:
            mode = self.input.get("mode", "ok")
            await asyncio.sleep(float(self.input.get("seconds", 0.01)))
            if mode == "raise":
                raise RuntimeError("probe failure")
            if mode == "hang":
                await asyncio.Event().wait()
            if mode == "stubborn":
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    await asyncio.sleep(0.2)
            if mode == "garbage":
                return {"most": cls.most, "garbage": object()}
            return {"most": cls.most}
        finally:
            cls.running -= 1
            self.log.info("probe_end", most=cls.most, running=cls.running)


@register
class Stamped(BaseAgent):
    agent_type = "stamped"
    description = "Returns at once with the wall-clock times it started and ended (tools/bench.py's handoff gaps)."

    async def run(self) -> Any:
        started = time.time()
        return {"started": started, "ended": time.time()}
