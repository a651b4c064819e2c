"""A test double loaded as an agent module (AGENT_MODULES=fixture_agents,fixture_slow_dns): the webhook host
look-up POST /agents/run makes takes SLOW_DNS_SECONDS (default 2) before it answers, as a slow DNS server."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from service.http import validation

real_resolve = validation.resolve


async def slow_resolve(target: Any, timeout: float) -> list[str]:
    await asyncio.sleep(float(os.environ.get("SLOW_DNS_SECONDS", "2")))
    return await real_resolve(target, timeout)


validation.resolve = slow_resolve
