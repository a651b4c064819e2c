"""Agents for tests/test_hardening.py, loaded with AGENT_MODULES=fixture_agents,fixture_hardening_agents."""

from __future__ import annotations

from typing import Any

from agents import BaseAgent, register


@register
class CompletionFields(BaseAgent):
    agent_type = "completion-fields"
    description = "Returns \"ok\"; its completion_fields are input.fields, whatever their names."

    async def run(self) -> Any:
        return "ok"

    def completion_fields(self, result: Any) -> dict[str, Any]:
        return dict(self.input.get("fields", {}))
