"""Agents for tests/test_hardening.py, loaded with AGENT_MODULES=fixture_agents,fixture_hardening_agents."""

from __future__ import annotations

from typing import Any

from agents import BaseAgent, register


@register
class LogRecordFields(BaseAgent):
    agent_type = "log-record-fields"
    description = "Returns completion_fields named like LogRecord attributes (name, module, msg...)."

    async def run(self) -> Any:
        return "ok"

    def completion_fields(self, result: Any) -> dict[str, Any]:
        return {"name": "n", "module": "m", "msg": "x", "message": "hello", "asctime": "t", "decision": result}


@register
class RunLineFields(BaseAgent):
    agent_type = "run-line-fields"
    description = "Returns completion_fields named like the terminal line's own fields (state, error, run_id...)."

    async def run(self) -> Any:
        return "ok"

    def completion_fields(self, result: Any) -> dict[str, Any]:
        return {"state": "BOGUS", "error": "not an error", "result": "other", "run_id": "other", "event": "e"}
