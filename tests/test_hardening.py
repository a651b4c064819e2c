"""Holes in the single-run guarantee (issue 11), each closed and kept closed, black-box where it is about HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import HERE, RedisServer, ServerProcess, new_user
from test_ecosystem import AssetHandler, chromium


def strict_json(text: str) -> Any:
    """Parse as a strict client does (JavaScript's JSON.parse): no NaN, Infinity or -Infinity."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400", "-12.5e1000"])
def test_non_finite_number_in_input_is_refused(server: ServerProcess, number: str) -> None:
    body = f'{{"agent_type": "sleeper", "user_id": "{new_user()}", "input": {{"n": {number}}}}}'
    response = server.client.post("/agents/run", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "finite" in response.json()["detail"]
    strict_json(server.client.get("/agents/runs", params={"limit": 1000}).text)


def test_large_finite_numbers_are_still_accepted(server: ServerProcess) -> None:
    body = f'{{"agent_type": "sleeper", "user_id": "{new_user()}", "input": {{"seconds": 0.01, "n": 1.5e308}}}}'
    response = server.client.post("/agents/run", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    run = server.wait_run(response.json()["run_id"])
    assert run["input"]["n"] == 1.5e308



def test_completion_fields_named_like_log_record_attributes_keep_the_terminal_line(start_server) -> None:
    srv = start_server(AGENT_MODULES="fixture_agents,fixture_hardening_agents")
    run = srv.run_to_end("log-record-fields")
    line = srv.wait_for_event("agent_complete", run_id=run["run_id"], timeout=5)
    assert (line["state"], line["decision"]) == ("DONE", "ok")
    assert {key: line[f"field_{key}"] for key in ("name", "module", "msg", "message", "asctime")} == {
        "name": "n", "module": "m", "msg": "x", "message": "hello", "asctime": "t"}


def test_completion_fields_cannot_change_the_run_or_its_terminal_line(start_server) -> None:
    srv = start_server(AGENT_MODULES="fixture_agents,fixture_hardening_agents")
    run_id = srv.start_run("run-line-fields")
    run = srv.wait_run(run_id, timeout=5)
    assert (run["state"], run["result"], run["error"]) == ("DONE", "ok", None)
    line = srv.wait_for_event("agent_complete", run_id=run_id, timeout=5)
    assert (line["state"], line["field_state"], line["field_error"], line["field_event"]) == (
        "DONE", "BOGUS", "not an error", "e")
    assert "error" not in line


@pytest.fixture
def two_replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess, str]]:
    """Two Redis-mode replicas sharing one fresh prefix, with a 30 s lock TTL (renewal every 10 s)."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    started = [ServerProcess(tmp_path / f"replica-{i}.log", REDIS_URL=redis_server.url, REDIS_PREFIX=prefix,
                             LOCK_TTL_SECONDS="30") for i in range(2)]
    yield started[0], started[1], prefix
    for replica in started:
        replica.stop(signal.SIGKILL)


def wait_for_subscribers(redis: RedisServer, channel: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while redis.command("PUBSUB", "NUMSUB", channel)[1] < count:
        assert time.monotonic() < deadline, f"fewer than {count} subscribers on {channel}"
        time.sleep(0.02)


def test_undecodable_pubsub_message_does_not_slow_cross_replica_cancel(two_replicas, redis_server) -> None:
    a, b, prefix = two_replicas
    channels = (f"{prefix}:cancel", f"{prefix}:finished")
    for channel in channels:
        wait_for_subscribers(redis_server, channel, 2)
    for channel in channels:
        redis_server.command("PUBLISH", channel, b"\xff\xfe")
    time.sleep(0.2)
    run_id = a.start_run("hanging")
    a.wait_state(run_id, "RUNNING")
    started = time.monotonic()
    response = b.client.post(f"/agents/cancel/{run_id}")
    elapsed = time.monotonic() - started
    assert (response.status_code, response.json()["state"]) == (200, "CANCELLED"), response.text
    assert elapsed < 3, f"cancel took {elapsed:.1f} s: it waited for a lock renewal instead of pub/sub"
    a.wait_for_event("pubsub_message_ignored", channel=f"{prefix}:cancel")


def test_pubsub_listener_that_fails_is_logged_and_restarted(redis_server: RedisServer) -> None:
    from redis_store import open_redis

    records: list[logging.LogRecord] = []
    logger = logging.getLogger("agent_runner.test_hardening")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    cancelled: list[str] = []

    def on_cancel(run_id: str) -> None:
        if not cancelled:
            cancelled.append("failed")
            raise RuntimeError("on_cancel failed")
        cancelled.append(run_id)

    async def scenario() -> None:
        lock, store = open_redis(redis_server.url, prefix, 30, 100, logger)
        store.on_cancel = on_cancel
        await store.start()
        try:
            await asyncio.to_thread(wait_for_subscribers, redis_server, f"{prefix}:cancel", 1)
            for run_id in ("first", "second"):
                deadline = time.monotonic() + 5
                while run_id not in cancelled and time.monotonic() < deadline:
                    await store.request_cancel(run_id)
                    await asyncio.sleep(0.2)
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
    assert cancelled[-1] == "second", cancelled
    restarted = [record for record in records if record.getMessage() == "pubsub_listener_restarted"]
    assert len(restarted) == 1 and "RuntimeError: on_cancel failed" in restarted[0].error  # type: ignore[attr-defined]


SWAGGER_UI = HERE / ".ci" / "cache" / "swagger-ui-dist"  # fetched by .ci/run


def swagger_ui_files() -> Path:
    if not (SWAGGER_UI / "swagger-ui-bundle.js").exists():
        if os.environ.get("CI"):
            pytest.fail("swagger-ui-dist is missing in CI: .ci/run must fetch it")
        pytest.skip("swagger-ui-dist is not available here (bash .ci/run fetches it)")
    return SWAGGER_UI


def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def test_docs_page_pins_swagger_ui_and_checks_its_hashes(server: ServerProcess) -> None:
    root = swagger_ui_files()
    version = json.loads((root / "package.json").read_text())["version"]
    page = server.client.get("/docs").text
    cdn = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{version}"
    for tag, name in (("script", "swagger-ui-bundle.js"), ("link", "swagger-ui.css")):
        element = re.search(rf'<{tag} [^>]*{re.escape(cdn)}/{re.escape(name)}"[^>]*>', page)
        assert element is not None, f"{name} is not loaded from {cdn}:\n{page}"
        assert f'integrity="{sri((root / name).read_bytes())}"' in element.group(0)
        assert 'crossorigin="anonymous"' in element.group(0)


def test_docs_page_sends_a_content_security_policy_for_exactly_what_it_loads(server: ServerProcess) -> None:
    response = server.client.get("/docs")
    policy = {name: sources for name, *sources in
              (directive.split() for directive in response.headers["content-security-policy"].split(";"))}
    inline = re.findall(r"<script>(.*?)</script>", response.text, re.S)
    assert len(inline) == 1
    inline_hash = "'sha256-" + base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode() + "'"
    assets = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@"
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]
    assert inline_hash in policy["script-src"] and len(policy["script-src"]) == 2
    assert [source for source in policy["script-src"] if source != inline_hash][0].startswith(assets)
    assert all(source.startswith(assets) or source in ("'unsafe-inline'", "data:")
               for name in ("style-src", "img-src") for source in policy[name])
    assert "'unsafe-eval'" not in response.headers["content-security-policy"]


@pytest.mark.parametrize("path", ["/metrics/", "/healthz/", "/agents/"])
def test_no_redirect_is_built_from_the_host_header(server: ServerProcess, path: str) -> None:
    response = server.client.get(path, headers={"host": "evil.example"})
    assert response.status_code == 404, response.headers
    assert "location" not in response.headers
    assert response.json() == {"detail": "Not Found"}


@contextlib.contextmanager
def serve_assets(root: Path) -> Iterator[str]:
    """``root`` over HTTP on 127.0.0.1 with CORS, as a CDN serves swagger-ui-dist."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(AssetHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def render_docs(tmp_path: Path, assets: str) -> tuple[int, list[str]]:
    """/docs in headless Chromium: how many operations it rendered, and the browser console's lines."""
    server = ServerProcess(tmp_path / "server.log", DOCS_ASSETS_URL=assets)
    try:
        result = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=1",
                          "--dump-dom", f"{server.url}/docs")
    finally:
        server.stop()
    operations = len(re.findall(r'class="opblock opblock-\w+[^"]*" id="operations-', result.stdout))
    return operations, [line for line in result.stderr.splitlines() if ":INFO:CONSOLE" in line]


def test_docs_render_under_their_content_security_policy(tmp_path: Path) -> None:
    spec = yaml.safe_load((HERE / "openapi.yaml").read_text())
    with serve_assets(swagger_ui_files()) as assets:
        operations, console = render_docs(tmp_path, assets)
    assert operations == sum(len(item) for item in spec["paths"].values())
    assert not [line for line in console if "Content Security Policy" in line or "integrity" in line], console


def test_docs_refuse_a_swagger_ui_file_that_does_not_match_its_hash(tmp_path: Path) -> None:
    tampered = tmp_path / "swagger-ui-dist"
    tampered.mkdir()
    for name in ("swagger-ui.css", "swagger-ui-bundle.js"):
        shutil.copy(swagger_ui_files() / name, tampered / name)
    with open(tampered / "swagger-ui-bundle.js", "a") as bundle:
        bundle.write("\n;document.title = 'tampered';\n")
    with serve_assets(tampered) as assets:
        operations, console = render_docs(tmp_path, assets)
    assert operations == 0
    assert any("integrity" in line and "swagger-ui-bundle.js" in line for line in console), console
