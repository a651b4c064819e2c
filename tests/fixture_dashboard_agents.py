"""Agents for tests/test_dashboard.py, loaded with AGENT_MODULES=fixture_agents,fixture_dashboard_agents."""

from __future__ import annotations

import asyncio
from typing import Any

from agents import BaseAgent, register


@register
class Chatty(BaseAgent):
    agent_type = "chatty"
    description = "Logs chatty_step (n=1..input.steps) every input.interval seconds, progress n/steps after each."

    async def run(self) -> Any:
        steps, interval = int(self.input.get("steps", 5)), float(self.input.get("interval", 0.3))
        for n in range(1, steps + 1):
            await asyncio.sleep(interval)
            self.log.info("chatty_step", n=n, note=self.input.get("note", "working"))
            self.set_progress(n / steps)
        return {"steps": steps}
