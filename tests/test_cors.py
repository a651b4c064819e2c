"""CORS_ALLOW_ORIGINS: a page on another origin calls the API and reads a stream, in a real headless Chromium.

Pages are served from 127.0.0.1 on ports of their own: another port is another origin.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE, TESTS, ServerProcess, free_port, new_user, wait_until
from test_dashboard import browser  # noqa: F401 (a fixture: the system Chromium, driven by Playwright)

TOKEN = "cors-test-token"
PAGE = b"<!doctype html><title>another origin</title><p>a web app on another origin</p>"


@contextlib.contextmanager
def page_server() -> Iterator[str]:
    """An empty page served on 127.0.0.1 on a port of its own; yields its origin."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """The origin the tests' scripts run in, listed in CORS_ALLOW_ORIGINS."""
    with page_server() as origin:
        yield origin


@pytest.fixture(scope="module")
def unlisted_origin() -> Iterator[str]:
    """Another 127.0.0.1 port: another origin, never listed."""
    with page_server() as origin:
        yield origin


@pytest.fixture(scope="module")
def cors_servers(tmp_path_factory: pytest.TempPathFactory, page_origin: str) -> Iterator[dict[str, ServerProcess]]:
    """Two servers that allow the page's origin: one with API_TOKEN, one without (where EventSource can read)."""
    logs = tmp_path_factory.mktemp("cors")
    allowed = {"CORS_ALLOW_ORIGINS": f"https://app.example.com, {page_origin}/"}
    servers = {"token": ServerProcess(logs / "token.log", API_TOKEN=TOKEN, **allowed),
               "open": ServerProcess(logs / "open.log", **allowed)}
    yield servers
    for server in servers.values():
        server.stop()


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(url)
    return page


CALL_THE_API = """async ([api, token, userId]) => {
  const auth = {"Authorization": `Bearer ${token}`};
  const posted = await fetch(`${api}/agents/run`, {method: "POST", headers: {...auth,
    "Content-Type": "application/json", "Idempotency-Key": `"${userId}"`},
    body: JSON.stringify({agent_type: "sleeper", user_id: userId, input: {seconds: 0.05}})});
  const accepted = await posted.json();
  const status = await (await fetch(`${api}/agents/status/${accepted.run_id}?wait=5`, {headers: auth})).json();
  const stream = await (await fetch(`${api}/agents/events/${accepted.run_id}`, {headers: auth})).text();
  const refused = await fetch(`${api}/agents/runs`);
  return {posted: posted.status, location: posted.headers.get("Location"), accepted, status, stream,
          refused: refused.status, refusedBody: await refused.json(),
          challenge: refused.headers.get("WWW-Authenticate")};
}"""


def test_a_page_on_an_allowed_origin_calls_the_api_with_the_token_and_reads_a_stream_with_fetch(
        browser, page_origin: str, cors_servers: dict[str, ServerProcess]) -> None:
    api = cors_servers["token"].url
    page = open_page(browser, page_origin)
    result = page.evaluate(CALL_THE_API, [api, TOKEN, new_user()])
    run_id = result["accepted"]["run_id"]
    assert result["posted"] == 202 and result["location"] == f"/agents/status/{run_id}"  # an exposed header
    assert result["status"]["state"] == "DONE"
    assert '"state":"DONE"' in result["stream"] and result["stream"].startswith("retry: 2000\n\nid: ")  # read to its end
    assert result["refused"] == 401 and result["refusedBody"] == {"detail": "Missing or invalid bearer token"}
    assert result["challenge"] == "Bearer"
    preflights = wait_until(lambda: [line for line in cors_servers["token"].events("http_request")
                                     if line["method"] == "OPTIONS"], 5, "the preflights' log lines")
    assert {line["status"] for line in preflights} == {200}  # answered without the token


EVENT_SOURCE = """([url]) => new Promise((resolve) => {
  const source = new EventSource(url);
  source.addEventListener("run", (event) => {  // the run's events from its first: resolved on its end
    const run = JSON.parse(event.data);
    if (["DONE", "ERROR", "CANCELLED"].includes(run.state)) { source.close(); resolve({run}); }
  });
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) resolve({error: "closed"}); };
  setTimeout(() => { source.close(); resolve({error: "no event in 5 s"}); }, 5000);
})"""


def test_a_page_on_an_allowed_origin_reads_a_run_stream_with_event_source(
        browser, page_origin: str, cors_servers: dict[str, ServerProcess]) -> None:
    server = cors_servers["open"]
    run_id = server.start_run("sleeper", seconds=0.05)
    server.wait_run(run_id)
    result = open_page(browser, page_origin).evaluate(EVENT_SOURCE, [f"{server.url}/agents/events/{run_id}"])
    assert result.get("run", {}).get("run_id") == run_id and result["run"]["state"] == "DONE", result


def test_a_page_on_an_origin_not_listed_is_blocked(browser, unlisted_origin: str,
                                                   cors_servers: dict[str, ServerProcess]) -> None:
    page = open_page(browser, unlisted_origin)
    blocked = page.evaluate("""async ([api, token]) => {
      try { await fetch(`${api}/agents`, {headers: {"Authorization": `Bearer ${token}`}}); return "read"; }
      catch (error) { return error.name; }
    }""", [cors_servers["token"].url, TOKEN])
    assert blocked == "TypeError"  # the preflight's answer does not name this origin
    server = cors_servers["open"]
    run_id = server.start_run("sleeper", seconds=0.05)
    server.wait_run(run_id)
    assert page.evaluate(EVENT_SOURCE, [f"{server.url}/agents/events/{run_id}"]) == {"error": "closed"}


def test_a_preflight_needs_no_token_and_a_refused_one_is_json(cors_servers: dict[str, ServerProcess],
                                                               page_origin: str) -> None:
    client = cors_servers["token"].client
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,idempotency-key"}
    allowed = client.options("/agents/run", headers={"Origin": page_origin, **asked})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == page_origin
    assert "Idempotency-Key" in allowed.headers["access-control-allow-headers"]
    refused = client.options("/agents/run", headers={"Origin": "https://evil.example.com", **asked})
    assert refused.status_code == 400 and refused.json() == {"detail": "Disallowed CORS origin (preflight refused)"}
    assert "access-control-allow-origin" not in refused.headers
    answered = client.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert answered.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Location" in answered.headers["access-control-expose-headers"]


def test_without_cors_allow_origins_no_cors_header_is_sent(tmp_path: Path, page_origin: str) -> None:
    server = ServerProcess(tmp_path / "server.log")
    try:
        answered = server.client.get("/agents", headers={"Origin": page_origin})
        assert answered.status_code == 200 and not any(name.startswith("access-control-") for name in answered.headers)
        preflight = server.client.options("/agents/run", headers={"Origin": page_origin,
                                                                  "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 405 and "detail" in preflight.json()
        assert "access-control-allow-origin" not in preflight.headers
    finally:
        server.stop()


@pytest.mark.parametrize("origins", ["app.example.com", "https://app.example.com/path", "ftp://app.example.com"])
def test_a_bad_origin_stops_start_with_exit_2(origins: str) -> None:
    result = subprocess.run([sys.executable, "agent_runner.py"], cwd=HERE, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PORT": str(free_port()), "PYTHONPATH": str(TESTS),
                                 "CORS_ALLOW_ORIGINS": origins})
    assert result.returncode == 2, result.stdout + result.stderr
    line = json.loads(result.stdout.splitlines()[0])
    assert line["event"] == "invalid_configuration" and line["variable"] == "CORS_ALLOW_ORIGINS"

