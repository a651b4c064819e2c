"""An agent that makes OpenTelemetry spans of its own (tests/test_traces.py): in its coroutine, in a thread
started with ``asyncio.to_thread`` and in one started with ``run_in_executor(None, ...)``; it logs in each."""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry import trace

from agents import BaseAgent, register


@register
class TracedAgent(BaseAgent):
    agent_type = "traced"
    description = "Makes a span and logs a line in its coroutine and in two executor threads."

    async def run(self) -> Any:
        tracer = trace.get_tracer("fixture_traced_agents")
        with tracer.start_as_current_span("agent coroutine"):
            self.log.info("traced_coroutine")

        def in_thread(name: str) -> None:
            with tracer.start_as_current_span(name):
                self.log.info("traced_thread", span=name)

        await asyncio.to_thread(in_thread, "agent to_thread")
        await asyncio.get_running_loop().run_in_executor(None, in_thread, "agent run_in_executor")
        return {"ok": True}
