"""A test double loaded as an agent module (AGENT_MODULES=fixture_agents,fixture_rebinding_dns): the host
``rebind.example.com`` resolves to a public address at its first look-up (POST /agents/run checks it) and to
127.0.0.1 at every later one (the delivery), as a DNS rebinding attack would. Other names resolve as usual.

The service runs on uvloop, whose look-ups never reach socket.getaddrinfo, so the double stands in for the
event loop's getaddrinfo as webhook_http sees it; webhook_http's own resolve and address checks run as written.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from service import webhook_http

HOST = "rebind.example.com"
PUBLIC = "93.184.215.14"  # a global unicast address; nothing connects to it: the first look-up is only checked
lookups = 0


class RebindingLoop:
    """The running loop, but for its look-ups of HOST."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> Any:
        global lookups
        if host != HOST:
            return await self.loop.getaddrinfo(host, port, **kwargs)
        lookups += 1
        address = PUBLIC if lookups == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


class AsyncioWithRebindingDns:
    """asyncio, as webhook_http's module global, with get_running_loop giving a RebindingLoop."""

    @staticmethod
    def get_running_loop() -> RebindingLoop:
        return RebindingLoop(asyncio.get_running_loop())

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


webhook_http.asyncio = AsyncioWithRebindingDns()  # type: ignore[assignment]
