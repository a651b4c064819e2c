"""The handoff's script call on connections of its own (service/backends/redis/direct.py): it answers as the client
would, across a dropped connection and a Redis that lost its scripts, and a call cancelled mid-way leaves no reply
behind for the next one to read."""

from __future__ import annotations

import asyncio

import redis as sync_redis

from conftest import RedisServer
from service.backends.redis.connect import open_client, parse
from service.backends.redis.direct import DirectScript

ECHO = "return {KEYS[1], ARGV[1]}"
# Busy for ARGV[2] ms of Redis's clock (Lua cannot sleep), then answers ARGV[1]
SLOW_ECHO = """
local t = redis.call('TIME')
local until_us = t[1] * 1000000 + t[2] + tonumber(ARGV[2]) * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us
return ARGV[1]
"""


def test_a_direct_call_answers_across_a_dropped_connection_and_a_script_flush(redis_server: RedisServer) -> None:
    admin = sync_redis.Redis(port=redis_server.port)

    async def scenario() -> None:
        client = open_client(parse(redis_server.url))
        script = DirectScript(client, ECHO)
        try:
            assert await script(keys=["k"], args=["v"]) == [b"k", b"v"]
            admin.client_kill_filter(_type="normal", skipme=True)  # its idle connection is gone
            assert await script(keys=["k2"], args=["v2"]) == [b"k2", b"v2"]
            admin.script_flush()  # Redis lost its scripts: NOSCRIPT, then it loads it
            assert await script(keys=["k3"], args=["v3"]) == [b"k3", b"v3"]
            assert admin.script_exists(script.sha) == [True]
        finally:
            await script.close()
            await client.aclose()

    asyncio.run(scenario())


def test_a_cancelled_direct_call_leaves_no_reply_behind_for_the_next(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        client = open_client(parse(redis_server.url))
        script = DirectScript(client, SLOW_ECHO)
        try:
            assert await script(keys=[], args=["warm", 0]) == b"warm"
            call = asyncio.create_task(script(keys=[], args=["first", 100]))
            await asyncio.sleep(0.02)  # sent, its reply not read yet
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            assert await script(keys=[], args=["second", 0]) == b"second"  # not "first"
        finally:
            await script.close()
            await client.aclose()

    asyncio.run(scenario())
