"""Registers an agent_type that fixture_agents already has: the service must refuse to start."""

from agents import BaseAgent, register


@register
class SecondSleeper(BaseAgent):
    agent_type = "sleeper"
    description = "A second agent claiming the sleeper type."

    async def run(self) -> None:
        return None
