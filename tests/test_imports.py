"""What each mode imports (issue 12, Shape): redis-py only in Redis mode, prometheus_client only for /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from conftest import HERE, RedisServer

# In a fresh interpreter: import the service, then open its runtime as the lifespan does; print which of the
# optional libraries were loaded after the import and after the start.
PROBE = """
import asyncio, json, os, sys
import agent_runner, settings
from service.runtime import close_runtime, open_runtime

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & {"redis", "prometheus_client"})

after_import = loaded()
settings.current = settings.Settings.from_env(os.environ)

async def start_and_close():
    await close_runtime(await open_runtime(settings.current))

asyncio.run(start_and_close())
print(json.dumps({"after_import": after_import, "after_start": loaded()}))
"""


def loaded_modules(**env: str) -> dict[str, list[str]]:
    inherited = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=HERE, env={**inherited, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_mode_loads_neither_redis_nor_prometheus_client() -> None:
    assert loaded_modules() == {"after_import": [], "after_start": []}


def test_redis_mode_loads_redis_to_check_redis_url_at_import(redis_server: RedisServer) -> None:
    """Every launcher imports the app, which reads its settings then: REDIS_URL is parsed by redis-py's parser."""
    loaded = loaded_modules(REDIS_URL=redis_server.url, REDIS_PREFIX=f"test-{uuid.uuid4().hex[:8]}")
    assert loaded == {"after_import": ["redis"], "after_start": ["redis"]}
