"""A test double loaded as an agent module (AGENT_MODULES=fixture_agents,fixture_flaky_dns): the webhook
host look-up POST /agents/run makes succeeds once, then fails, as a DNS server that stopped answering."""

from __future__ import annotations

from typing import Any

from service.http import validation
from service.webhook_http import WebhookUnresolved

real_resolve = validation.resolve
lookups = 0


async def flaky_resolve(target: Any, timeout: float) -> list[str]:
    global lookups
    lookups += 1
    if lookups > 1:
        raise WebhookUnresolved(f"host {target.host!r} does not resolve: [Errno -3] Temporary failure")
    return await real_resolve(target, timeout)


validation.resolve = flaky_resolve
