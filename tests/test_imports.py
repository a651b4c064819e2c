"""What the service imports: redis-py only in Redis mode, psycopg only in Postgres mode, prometheus_client only for
/metrics, one way, no cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from conftest import HERE, PostgresServer, RedisServer

# In a fresh interpreter: import the service, then open its runtime as the lifespan does; print which of the
# optional libraries were loaded after the import and after the start.
PROBE = """
import asyncio, json, os, sys
import agent_runner
from service import settings
from service.runtime import close_runtime, open_runtime

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & {"redis", "prometheus_client", "psycopg"})

after_import = loaded()
settings.current = settings.Settings.from_env(os.environ)

async def start_and_close():
    await close_runtime(await open_runtime(settings.current))

asyncio.run(start_and_close())
print(json.dumps({"after_import": after_import, "after_start": loaded()}))
"""


def loaded_modules(**env: str) -> dict[str, list[str]]:
    inherited = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DATABASE_URL")}
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


def test_postgres_mode_loads_psycopg_and_not_redis(postgres_server: PostgresServer) -> None:
    """DATABASE_URL is parsed by libpq's parser (through psycopg) at import; redis-py is never loaded."""
    loaded = loaded_modules(DATABASE_URL=postgres_server.url, DATABASE_SCHEMA=f"test_{uuid.uuid4().hex[:8]}")
    assert loaded == {"after_import": ["psycopg"], "after_start": ["psycopg"]}


# Layers, lowest first: a module imports its own layer or lower ones, never a higher one.
LAYERS = ("leaf", "backends", "core", "http", "launcher")
LEAVES = {"agents", "service", "service.settings", "service.logs", "service.console_logs", "service.metrics",
          "service.cancelling"}


def layer_of(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    if module.startswith("service.backends"):
        return "backends"
    if module.startswith("service.http"):
        return "http"
    if module == "agent_runner":
        return "launcher"
    return "core"


def project_imports() -> dict[str, set[str]]:
    """Each product module's imports of other product modules (anywhere in the module, functions included)."""
    import ast

    from conftest import module_name, product_modules

    names = {module_name(path).removesuffix(".py").removesuffix("/__init__").replace("/", "."): path
             for path in product_modules()}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in found if module in names and module != name}
    return graph


def test_imports_run_one_way_from_the_launcher_down_to_the_backends() -> None:
    upward = [(module, imported) for module, imports in project_imports().items() for imported in imports
              if LAYERS.index(layer_of(imported)) > LAYERS.index(layer_of(module))]
    assert upward == []


def test_no_module_imports_itself_through_others() -> None:
    import graphlib

    # a package's __init__ importing its own submodules is how a package exports them: not a cycle
    graph = {module: {imported for imported in imports if not imported.startswith(module + ".")}
             for module, imports in project_imports().items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_only_each_store_backend_imports_its_driver_and_only_the_http_layer_starlette_or_uvicorn() -> None:
    import ast

    from conftest import module_name, product_modules

    owners = {"redis": "service/backends/redis/", "psycopg": "service/backends/postgres/",
              "starlette": "service/http/", "uvicorn": "service/http/",
              "opentelemetry": "service/tracing.py"}  # and that one only while tracing is on (test_traces.py)
    strays = []
    for path in product_modules():
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for module in modules:
                owner = owners.get(module.split(".")[0])
                if owner is not None and not name.startswith(owner):
                    strays.append((name, module))
    assert strays == []
