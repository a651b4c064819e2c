"""GET /agents/status/{run_id} is answered by the Shortcut middleware ahead of Starlette's router: every answer it
gives is the route's own, byte for byte, with the same log line and metrics sample.

Each case is sent as the same ASGI request to the app and to the app without the shortcut (sharing one
runtime), in this process; the messages each sends back, its ``http_request`` line (but the duration) and the
metric series it counts must be equal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import fixture_agents  # noqa: F401  (registers the test agents)
from conftest import new_user
from service import logs, metrics, settings
from service.backends.records import StoreUnavailable
from service.http.app import build_app
from service.http.middleware import Shortcut

TOKEN = "shortcut-token"
AUTH = (b"authorization", b"Bearer " + TOKEN.encode())

Answer = tuple[list[dict[str, Any]], dict[str, Any], dict[tuple[str, ...], float]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def hot_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The per-request log lines, kept in memory (not written to stdout) while the test reads them."""
    monkeypatch.setattr(logs, "write_hot_lines", lambda: None)
    logger = logging.getLogger("agent_runner")
    level = logger.level
    logger.setLevel(logging.INFO)
    logs.hot_lines.clear()
    yield logs.hot_lines
    logger.setLevel(level)
    logs.hot_lines.clear()


def without_shortcut(app: Starlette) -> Starlette:
    app.user_middleware = [entry for entry in app.user_middleware if entry.cls is not Shortcut]
    return app


@contextlib.asynccontextmanager
async def both_apps(started: bool = True) -> AsyncIterator[tuple[Starlette, Starlette, str]]:
    """The app and the app without its shortcut on one runtime, and the id of a run that is DONE."""
    configure()
    app, plain = build_app("test"), without_shortcut(build_app("test"))
    assert any(entry.cls is Shortcut for entry in app.user_middleware)
    try:
        if not started:
            yield app, plain, ""
            return
        async with app.router.lifespan_context(app):
            plain.state.runtime = app.state.runtime
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                posted = await client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user(),
                                                                "input": {"seconds": 0}})
                run_id = posted.json()["run_id"]
                done = await client.get(f"/agents/status/{run_id}", params={"wait": 10})
                assert done.json()["state"] == "DONE"
            configure()  # what each test sets is in force from here
            yield app, plain, run_id
    finally:
        settings.current = settings.Settings()


def configure(**env: str) -> None:
    settings.current = settings.Settings.from_env({"AGENT_SLEEP_SECONDS": "0", "SHUTDOWN_GRACE_SECONDS": "1", **env})


def request_counts() -> dict[tuple[str, ...], float]:
    return {values: child.value for values, child in metrics.HTTP_REQUESTS_TOTAL.series()}


async def answer(app: Starlette, lines: list[str], method: str, path: str, query: bytes = b"",
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    """What the app sends for one request (as uvicorn's scope has it), its log line and the series it counted."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "server": ("127.0.0.1", 8000), "client": ("10.0.0.7", 51000), "scheme": "http", "root_path": "",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": [(b"host", b"127.0.0.1:8000"), *headers], "state": {}}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    before, lines_before = request_counts(), len(lines)
    try:
        await app(scope, receive, send)
    except RuntimeError as exc:  # an unhandled error: answered 500, then raised on to the server, as Starlette does
        sent.append({"raised": repr(exc)})
    assert len(lines) == lines_before + 1, lines[lines_before:]
    line = json.loads(lines[-1])
    del line["timestamp"], line["duration_ms"]
    counted = {key: value - before.get(key, 0) for key, value in request_counts().items()
               if value != before.get(key, 0)}
    return sent, line, counted


async def same_answer(apps: tuple[Starlette, Starlette, str], lines: list[str], method: str, path: str,
                      query: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = ()) -> Answer:
    app, plain, _ = apps
    shortcut = await answer(app, lines, method, path, query, headers)
    ordinary = await answer(plain, lines, method, path, query, headers)
    assert shortcut == ordinary
    return shortcut


def status_of(sent: list[dict[str, Any]]) -> int:
    return int(sent[0]["status"])


@pytest.mark.anyio
async def test_found_unknown_and_malformed_ids_are_answered_as_the_route_answers(hot_lines: list[str]) -> None:
    async with both_apps() as apps:
        run_id = apps[2]
        found = await same_answer(apps, hot_lines, "GET", f"/agents/status/{run_id}")
        assert status_of(found[0]) == 200 and json.loads(found[0][1]["body"])["run_id"] == run_id
        assert found[2] == {("GET", "/agents/status/{run_id}", "200"): 1}  # under the route's label
        upper = await same_answer(apps, hot_lines, "GET", f"/agents/status/{run_id.upper()}")
        assert upper[0] == found[0]
        unknown = await same_answer(apps, hot_lines, "GET", f"/agents/status/{uuid.uuid4()}")
        assert status_of(unknown[0]) == 404 and b"not found" in unknown[0][1]["body"]
        malformed = await same_answer(apps, hot_lines, "GET", "/agents/status/not-a-uuid")
        assert status_of(malformed[0]) == 400 and json.loads(malformed[0][1]["body"])["detail"].startswith("run_id")
        long_path = await same_answer(apps, hot_lines, "GET", "/agents/status/" + "x" * 300)
        assert status_of(long_path[0]) == 400 and long_path[1]["path_chars"] == len("/agents/status/") + 300


@pytest.mark.anyio
async def test_head_and_other_methods_are_answered_as_the_route_answers(hot_lines: list[str]) -> None:
    async with both_apps() as apps:
        head = await same_answer(apps, hot_lines, "HEAD", f"/agents/status/{apps[2]}")
        assert status_of(head[0]) == 200
        post = await same_answer(apps, hot_lines, "POST", f"/agents/status/{apps[2]}")
        assert status_of(post[0]) == 405
        nested = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}/more")
        assert status_of(nested[0]) == 404 and nested[2] == {("GET", "<unmatched>", "404"): 1}


@pytest.mark.anyio
async def test_wait_queries_are_answered_as_the_route_answers(hot_lines: list[str]) -> None:
    async with both_apps() as apps:
        waited = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}", b"wait=1")
        assert status_of(waited[0]) == 200
        refused = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}", b"wait=forever")
        assert status_of(refused[0]) == 400 and b"wait" in refused[0][1]["body"]
        unknown = await same_answer(apps, hot_lines, "GET", f"/agents/status/{uuid.uuid4()}", b"wait=1")
        assert status_of(unknown[0]) == 404


@pytest.mark.anyio
async def test_the_token_is_checked_as_the_route_checks_it(hot_lines: list[str]) -> None:
    async with both_apps() as apps:
        configure(API_TOKEN=TOKEN)
        missing = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}")
        assert status_of(missing[0]) == 401 and (b"www-authenticate", b"Bearer") in missing[0][0]["headers"]
        wrong = await same_answer(apps, hot_lines, "GET", "/agents/status/not-a-uuid",
                                  headers=((b"authorization", b"Bearer nope"),))
        assert status_of(wrong[0]) == 401  # the token is checked before the id
        given = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}", headers=(AUTH,))
        assert status_of(given[0]) == 200


@pytest.mark.anyio
async def test_a_prefix_forwarded_client_and_cors_are_applied_as_for_the_route(hot_lines: list[str]) -> None:
    async with both_apps() as apps:
        configure(ROOT_PATH="/runner", FORWARDED_ALLOW_IPS="10.0.0.7", CORS_ALLOW_ORIGINS="https://app.example.com")
        headers = ((b"x-forwarded-for", b"203.0.113.9"), (b"origin", b"https://app.example.com"))
        stripped = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}", headers=headers)
        assert status_of(stripped[0]) == 200 and stripped[1]["path"] == f"/runner/agents/status/{apps[2]}"
        assert stripped[1]["client"] == "203.0.113.9"
        assert (b"access-control-allow-origin", b"https://app.example.com") in stripped[0][0]["headers"]
        passed_on = await same_answer(apps, hot_lines, "GET", f"/runner/agents/status/{apps[2]}", headers=headers)
        assert passed_on[0] == stripped[0]
        outside = await same_answer(apps, hot_lines, "GET", f"/runnerx/agents/status/{apps[2]}")
        assert status_of(outside[0]) == 404


@pytest.mark.anyio
async def test_store_errors_are_answered_as_the_route_answers(hot_lines: list[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async with both_apps() as apps:
        backend = apps[0].state.runtime.backend

        async def unavailable(run_id: str) -> None:
            raise StoreUnavailable("down")

        monkeypatch.setattr(backend, "get", unavailable)
        down = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}")
        assert status_of(down[0]) == 503 and (b"retry-after", b"1") in down[0][0]["headers"]

        async def broken(run_id: str) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(backend, "get", broken)
        failed = await same_answer(apps, hot_lines, "GET", f"/agents/status/{apps[2]}")
        assert status_of(failed[0]) == 500 and failed[0][-1] == {"raised": "RuntimeError('bug')"}


@pytest.mark.anyio
async def test_a_service_not_started_is_answered_as_the_route_answers(hot_lines: list[str]) -> None:
    async with both_apps(started=False) as apps:
        idle = await same_answer(apps, hot_lines, "GET", f"/agents/status/{uuid.uuid4()}")
        assert status_of(idle[0]) == 503 and b"lifespan" in idle[0][1]["body"]
