"""Agents for the event stream tests (AGENT_MODULES=fixture_agents,fixture_event_agents)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from agents import BaseAgent, register


@register
class Chatty(BaseAgent):
    agent_type = "chatty"
    description = ("After input.delay seconds, logs input.lines lines (line_loop, n=i, each padded with input.pad characters), then one from "
                   "a worker thread (line_thread), sleeping input.seconds between lines.")

    async def run(self) -> Any:
        pad = "x" * int(self.input.get("pad", 0))
        pause = float(self.input.get("seconds", 0))
        await asyncio.sleep(float(self.input.get("delay", 0)))
        for n in range(int(self.input.get("lines", 3))):
            self.log.info("line_loop", n=n, pad=pad)
            self.set_progress(min(1.0, (n + 1) / max(1, int(self.input.get("lines", 3)))))
            await asyncio.sleep(pause)
        await asyncio.to_thread(self.log.info, "line_thread", from_thread=True)
        return {"lines": int(self.input.get("lines", 3))}


@register
class Scorer(BaseAgent):
    agent_type = "scorer"
    description = "Logs input.value as a float (line_score), as an agent that parses a number from its input does."

    async def run(self) -> Any:
        value = float(self.input.get("value", "nan"))  # "nan", "inf": Python parses them
        self.log.info("line_score", value=value)
        return {"scored": True}


@register
class Flood(BaseAgent):
    agent_type = "flood"
    description = ("Logs input.lines lines (line_flood, n=i, padded with input.pad characters when given) in a loop "
                   "that never yields to the event loop.")

    async def run(self) -> Any:
        lines = int(self.input.get("lines", 3000))
        padding = {"pad": "x" * int(self.input["pad"])} if "pad" in self.input else {}
        for n in range(lines):
            self.log.info("line_flood", n=n, **padding)
        return {"lines": lines}


@register
class Straggler(BaseAgent):
    agent_type = "straggler"
    description = ("Returns at once, leaving a thread of its own (not executor work) that reports progress 0.9 "
                   "input.after seconds later, then logs straggler_reported.")

    async def run(self) -> Any:
        def late() -> None:
            time.sleep(float(self.input.get("after", 0.3)))
            self.set_progress(0.9)
            time.sleep(0.2)  # the progress frame, had it been published, would be out by now
            self.log.info("straggler_reported")

        threading.Thread(target=late, daemon=True).start()
        return {"left": "a thread"}
