"""The dashboard (GET /): its headers over HTTP, and the page itself in a real headless Chromium.

The browser is the system ``chromium``, driven by Playwright (``executable_path``; Playwright downloads no
browser here). Every page is checked for script errors and Content-Security-Policy refusals.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.http import dashboard
from conftest import HERE, ServerProcess, missing_tool, new_user

TOKEN = "dashboard-test-token"
AGENTS = "fixture_agents,fixture_dashboard_agents"
ARTIFACTS = HERE / ".ci" / "artifacts"
WAIT_MS = 10_000  # the longest any state may take to show on the page
CHROMIUM_FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # Playwright adds --headless, --no-sandbox
# and a fresh --user-data-dir of its own for each launch


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_tool("chromium", "apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_tool("playwright", ".venv/bin/pip install -r requirements-dev.txt")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


class Tab:
    """One browser tab on the dashboard, recording script errors and console errors (CSP refusals among them)."""

    def __init__(self, context: Any) -> None:
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))

    def open(self, url: str) -> Tab:
        self.page.goto(url + "/")
        self.page.evaluate("window.loadedOnce = true")  # gone if the page ever reloads
        return self

    def row(self, run_id: str) -> Any:
        return self.page.locator(f'#runs tr[data-run-id="{run_id}"]')

    def expect_status(self, state: str, text: str) -> None:
        from playwright.sync_api import expect
        status = self.page.locator("#status")
        expect(status).to_have_attribute("data-state", state, timeout=WAIT_MS)
        expect(status).to_contain_text(text)

    def expect_no_reload_and_no_errors(self) -> None:
        assert self.page.evaluate("window.loadedOnce") is True, "the page reloaded"
        # Chromium logs each failed fetch (the server gone, a 401) as a console error: those are expected
        assert [error for error in self.errors if "net::ERR_" not in error and "Failed to load" not in error] == []


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield Tab(context)
    context.close()


def start(server: ServerProcess, agent_type: str, token: str | None = None, **fields: Any) -> str:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = server.client.post("/agents/run", headers=headers, json={
        "agent_type": agent_type, "user_id": new_user(), **fields})
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


def inline_hash(page: str, tag: str) -> str:
    (text,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_dashboard_is_the_static_page_under_a_policy_for_exactly_its_own_style_and_script(
        server: ServerProcess) -> None:
    response = server.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.content == (HERE / "service" / "http" / "dashboard.html").read_bytes()
    page = response.text
    assert not re.search(r"<script[^>]* src=|<link[^>]* rel=\"?stylesheet|https?://", page), "loads nothing else"
    assert not re.search(r" on[a-z]+=", page), "no inline event handlers (the policy would refuse them)"
    policy = {name: sources for name, *sources in
              (directive.split() for directive in response.headers["content-security-policy"].split(";"))}
    assert policy == {"default-src": ["'none'"], "script-src": [inline_hash(page, "script")],
                      "style-src": [inline_hash(page, "style")], "img-src": ["data:"], "connect-src": ["'self'"],
                      "base-uri": ["'none'"], "form-action": ["'none'"], "frame-ancestors": ["'none'"]}
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_run_started_over_http_appears_waits_runs_shows_progress_and_ends_done_without_a_reload(
        start_server, tab: Tab) -> None:
    from playwright.sync_api import expect
    srv = start_server(AGENT_MODULES=AGENTS)
    tab.open(srv.url).expect_status("live", "Live")
    # Each state lasts longer than the 1 s between two of expect()'s late retries, so none can slip by unseen.
    first = start(srv, "sleeper", input={"seconds": 2})
    second = start(srv, "chatty", on_busy="enqueue", input={"steps": 2, "interval": 1.5})

    waiting = tab.page.locator(f'#waiting li[data-run-id="{second}"]')
    expect(waiting).to_contain_text("#1", timeout=WAIT_MS)
    expect(tab.row(second)).to_have_attribute("data-state", "PENDING")
    tab.row(second).get_by_role("button").focus()  # a keyboard user on the row, which is redrawn at each change
    running = tab.page.locator(f'#running li[data-run-id="{second}"]')
    expect(running).to_be_visible(timeout=WAIT_MS)
    expect(tab.row(second)).to_have_attribute("data-state", "RUNNING")
    expect(waiting).to_have_count(0)
    expect(running.locator(".progress-text")).to_have_text("50 % done", timeout=WAIT_MS)
    assert running.locator("progress").evaluate("bar => bar.value") == 0.5
    expect(running).to_contain_text(re.compile(r"\d(\.\d)? s"))  # elapsed time

    expect(tab.row(second)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
    expect(running).to_have_count(0)
    expect(tab.row(second).locator(".outcome")).to_have_text('{"steps":2}')
    expect(tab.row(second).locator("td").nth(4)).to_have_text(re.compile(r"^\d(\.\d)? s$"))  # duration
    expect(tab.row(first)).to_have_attribute("data-state", "DONE")
    expect(tab.page.locator("#running-empty")).to_be_visible()
    expect(tab.row(second).get_by_role("button")).to_be_focused()
    tab.expect_no_reload_and_no_errors()


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "server.log", AGENT_MODULES=AGENTS)
    yield srv
    srv.stop(signal.SIGKILL)


def finished_runs(srv: ServerProcess) -> dict[str, str]:
    """One run ended in each terminal state, by state; the error message is markup, to be shown as text."""
    cancelled = start(srv, "hanging")
    srv.wait_state(cancelled, "RUNNING")
    assert srv.client.post(f"/agents/cancel/{cancelled}").json()["state"] == "CANCELLED"
    return {"DONE": srv.run_to_end("sleeper", seconds=0)["run_id"],
            "ERROR": srv.run_to_end("failing", message="scanner <offline>")["run_id"], "CANCELLED": cancelled}


def test_history_shows_each_finished_state_with_its_outcome_and_filters_by_state_and_agent_type(
        memory_server: ServerProcess, tab: Tab) -> None:
    from playwright.sync_api import expect
    runs = finished_runs(memory_server)
    tab.open(memory_server.url).expect_status("live", "Live")
    for state, run_id in runs.items():  # from GET /agents/runs
        expect(tab.row(run_id)).to_have_attribute("data-state", state, timeout=WAIT_MS)
        expect(tab.row(run_id).locator(".badge")).to_have_text(state)
    expect(tab.row(runs["ERROR"]).locator(".outcome")).to_have_text("ValueError: scanner <offline>")  # not HTML
    assert tab.page.locator("#runs offline").count() == 0
    expect(tab.row(runs["CANCELLED"]).locator(".outcome")).to_have_text("cancelled")
    colours = {state: tab.row(run_id).locator(".badge").evaluate("badge => getComputedStyle(badge).backgroundColor")
               for state, run_id in runs.items()}
    assert len(set(colours.values())) == 3, colours

    state, agent_type = tab.page.get_by_label("State"), tab.page.get_by_label("Agent type")  # labelled controls
    state.select_option("ERROR")
    expect(tab.page.locator("#runs tr")).to_have_count(1)
    expect(tab.row(runs["ERROR"])).to_be_visible()
    state.select_option("")
    agent_type.select_option("sleeper")
    expect(tab.page.locator("#runs tr")).to_have_count(1)
    expect(tab.row(runs["DONE"])).to_be_visible()
    agent_type.select_option("")
    expect(tab.page.locator("#runs tr")).to_have_count(3)

    huge = start(memory_server, "huge", input={"bytes": 1_000_000})  # one 1 MB event: read whole, shown clipped
    expect(tab.row(huge)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
    assert tab.row(huge).locator(".outcome").inner_text() == "x" * 300 + "…"
    tab.expect_no_reload_and_no_errors()


def test_a_runs_detail_shows_its_stored_then_its_live_log_lines_each_once(
        memory_server: ServerProcess, tab: Tab) -> None:
    from playwright.sync_api import expect
    srv = memory_server
    finished_runs(srv)  # for the screenshot
    tab.open(srv.url).expect_status("live", "Live")
    chatty = start(srv, "chatty", input={"steps": 8, "interval": 0.4, "note": "<b>reading</b>"})
    srv.wait_for_event("chatty_step", n=3, run_id=chatty)  # lines 1-3 come from GET /agents/logs
    tab.row(chatty).get_by_role("button").click()
    expect(tab.page.locator("#detail-title")).to_have_text(f"Run {chatty}")
    expect(tab.page.locator("#detail-title")).to_be_focused()
    log = tab.page.locator("#log li")
    expect(log.filter(has_text="chatty_step n=5")).to_have_count(1, timeout=WAIT_MS)  # from the stream
    queued = start(srv, "sleeper", on_busy="enqueue", input={"seconds": 0.2})
    expect(tab.page.locator(f'#waiting li[data-run-id="{queued}"]')).to_contain_text("#1", timeout=WAIT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    expect(tab.page.locator("#detail-state")).to_have_text("DONE", timeout=WAIT_MS)
    steps = [line for line in log.all_inner_texts() if "chatty_step" in line]
    assert [re.search(r"n=(\d+)", line).group(1) for line in steps] == [str(n) for n in range(1, 9)], steps
    assert "note=<b>reading</b>" in steps[0]  # shown as text, never parsed as HTML
    assert tab.page.locator("#log b").count() == 0
    expect(tab.row(queued)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
    tab.page.get_by_role("button", name="Close").click()
    expect(tab.page.locator("#detail")).to_be_hidden()
    expect(tab.row(chatty).get_by_role("button")).to_be_focused()  # back where the user was
    tab.expect_no_reload_and_no_errors()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 20_000


def test_with_api_token_the_page_asks_for_the_token_and_keeps_it_for_the_tab_only(
        tmp_path: Path, tab: Tab) -> None:
    from playwright.sync_api import expect
    srv = ServerProcess(tmp_path / "server.log", AGENT_MODULES=AGENTS, API_TOKEN=TOKEN)
    try:
        assert httpx.get(srv.url + "/").status_code == 200  # the page itself is open; the data is not
        tab.open(srv.url).expect_status("token", "API token needed")
        form = tab.page.locator("#token-form")
        expect(form).to_be_visible()
        expect(tab.page.locator("#board")).to_be_hidden()
        tab.page.get_by_label("API token").fill("tökén")  # fetch() would throw on it: said, not retried forever
        tab.page.get_by_role("button", name="Connect").click()
        expect(tab.page.locator("#token-error")).to_have_text("A token is printable ASCII characters only.")
        tab.page.get_by_label("API token").fill("wrong")
        tab.page.get_by_role("button", name="Connect").click()
        expect(tab.page.locator("#token-error")).to_have_text("The service refused that token.", timeout=WAIT_MS)

        tab.page.get_by_label("API token").fill(TOKEN)
        tab.page.get_by_role("button", name="Connect").click()
        tab.expect_status("live", "Live")
        expect(form).to_be_hidden()
        run_id = start(srv, "sleeper", token=TOKEN, input={"seconds": 0.4})
        expect(tab.row(run_id)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
        assert tab.page.evaluate("sessionStorage.getItem('agent-runner-token')") == TOKEN
        assert tab.page.evaluate("localStorage.length") == 0
        assert TOKEN not in tab.page.url
        tab.expect_no_reload_and_no_errors()

        tab.page.reload()  # the same tab keeps it
        tab.expect_status("live", "Live")
        other = Tab(tab.page.context).open(srv.url)  # another tab does not
        other.expect_status("token", "API token needed")
        tab.page.get_by_role("button", name="Forget token").click()
        tab.expect_status("token", "API token needed")
        assert tab.page.evaluate("sessionStorage.length") == 0
    finally:
        srv.stop(signal.SIGKILL)


def test_the_page_shows_a_dropped_connection_and_recovers_when_the_server_comes_back(
        tmp_path: Path, tab: Tab) -> None:
    from playwright.sync_api import expect
    first = ServerProcess(tmp_path / "first.log", AGENT_MODULES=AGENTS)
    second = None
    requests: list[Any] = []
    tab.page.on("request", lambda request: request.url.endswith("/agents/events") and requests.append(request))
    try:
        tab.open(first.url).expect_status("live", "Live")
        before = start(first, "sleeper", input={"seconds": 0.2})
        expect(tab.row(before)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
        first.stop(signal.SIGKILL)

        tab.expect_status("lost", "reconnecting…")
        expect(tab.page.locator("#lost-banner")).to_be_visible()
        assert tab.page.locator("#status").get_attribute("aria-live") == "polite"
        second = ServerProcess(tmp_path / "second.log", port=first.port, AGENT_MODULES=AGENTS)
        tab.expect_status("live", "Live")
        expect(tab.page.locator("#lost-banner")).to_be_hidden()
        after = start(second, "sleeper", input={"seconds": 0.2})
        expect(tab.row(after)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
        expect(tab.row(before)).to_have_attribute("data-state", "DONE")  # what it knew stays on the page
        tab.expect_no_reload_and_no_errors()
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop(signal.SIGKILL)
    streams = [request.all_headers() for request in requests]
    assert "last-event-id" not in streams[0]
    assert all(headers.get("last-event-id") for headers in streams[1:]), streams
    assert len(streams) >= 2


class FakeService(http.server.BaseHTTPRequestHandler):
    """The page's own file, an empty history, and an event stream written in awkward pieces (class attributes:
    ``pieces`` for the first stream, ``stream_headers`` records each stream request's headers)."""

    protocol_version = "HTTP/1.0"  # the stream's body ends when the connection closes
    pieces: list[bytes] = []
    stream_headers: list[dict[str, str]] = []
    reconnected = threading.Event()  # set by the second stream request
    history: list[bytes] = []  # GET /agents/runs
    refuse_streams = False

    def do_GET(self) -> None:
        if self.path == "/":
            self.answer(200, "text/html; charset=utf-8", (HERE / "service" / "http" / "dashboard.html").read_bytes(), dashboard.HEADERS)
        elif self.path == "/agents":
            self.answer(200, "application/json", b'{"agents": [{"agent_type": "sleeper", "description": ""}]}')
        elif self.path.startswith("/agents/runs?"):
            self.answer(200, "application/json", b'{"runs": [' + b",".join(FakeService.history) + b"]}")
        elif self.path == "/agents/events" and FakeService.refuse_streams:
            self.answer(503, "application/json", b'{"detail": "Too many event streams"}')
        elif self.path == "/agents/events":
            self.stream()
        else:
            self.answer(404, "application/json", b'{"detail": "Not Found"}')

    def answer(self, status: int, media_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def stream(self) -> None:
        first = not FakeService.stream_headers
        FakeService.stream_headers.append({name.lower(): value for name, value in self.headers.items()})
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.flush()
        for piece in FakeService.pieces if first else []:
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(0.03)  # each piece arrives as its own read
        if not first:
            FakeService.reconnected.set()
            time.sleep(30)  # the second connection stays open: the page is live again

    def log_message(self, *args: object) -> None:
        pass


def fake_run(run_id: str, agent_type: str, state: str, progress: float | None) -> bytes:
    return json.dumps({"run_id": run_id, "agent_type": agent_type, "user_id": new_user(), "input": {},
                       "state": state, "result": "ok" if state == "DONE" else None, "error": None,
                       "progress": progress, "created_at": "2026-11-27T10:00:00.000Z",
                       "started_at": "2026-11-27T10:00:00.500Z",
                       "finished_at": "2026-11-27T10:00:02.000Z" if state == "DONE" else None,
                       "queue_position": None, "cancelled_by": None}, ensure_ascii=False).encode()


def test_the_pages_stream_reader_takes_frames_split_anywhere_and_resumes_from_the_last_id(tab: Tab) -> None:
    from playwright.sync_api import expect
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    running, done = fake_run(first, "sleeper", "RUNNING", 0.25), fake_run(first, "sleeper", "DONE", 1.0)
    other = fake_run(second, "ünïcode-agent", "RUNNING", 0.75)
    split = other.index("ü".encode()) + 1  # inside a two-byte UTF-8 character
    line = other.index(b'"user_id"')  # the JSON goes on in a second data line from here
    FakeService.stream_headers, FakeService.history, FakeService.refuse_streams = [], [], False
    FakeService.reconnected.clear()
    FakeService.pieces = [
        b": keep-alive\r\n\r", b"\nretry: 100\r\nid: 7-1\r\nev", b"ent: run\r\nda", b"ta: " + running + b"\r",
        b"\n\r\n",  # CRLF line ends, the CR and LF of one end in two reads
        b"id: 7-2\revent: run\rdata: " + done + b"\r\r",  # CR line ends
        b"event: run\ndata: " + other[:split], other[split:line] + b"\ndata:",  # one JSON over two data lines
        b" " + other[line:] + b"\n\n",
        b"id: 7-3\nevent: run\ndata: {not json}\n\n",  # ignored, but its id counts
        b"event: ping\ndata: {}\n\n", b"data: " + running + b"\n\n",  # other event types are ignored
        b"id: 7-4\nevent: run\ndata: " + fake_run(first, "sleeper", "RUNNING", 0.5)[:40],  # cut off: never seen
    ]
    with fake_service() as url:
        tab.open(url)
        expect(tab.row(first)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
        expect(tab.row(first).locator(".outcome")).to_have_text("ok")
        expect(tab.row(second)).to_contain_text("ünïcode-agent")
        expect(tab.page.locator(f'#running li[data-run-id="{second}"] .progress-text')).to_have_text("75 % done")
        assert FakeService.reconnected.wait(WAIT_MS / 1000), "the page did not reconnect after the stream ended"
        tab.expect_status("live", "Live")
        expect(tab.row(first)).to_have_attribute("data-state", "DONE")
        tab.expect_no_reload_and_no_errors()
    assert [headers.get("last-event-id") for headers in FakeService.stream_headers[:2]] == [None, "7-3"]


def test_a_refused_stream_shows_as_lost_and_the_history_still_shows(tab: Tab) -> None:
    from playwright.sync_api import expect
    run_id = str(uuid.uuid4())
    FakeService.history, FakeService.refuse_streams = [fake_run(run_id, "sleeper", "DONE", 1.0)], True
    with fake_service() as url:
        tab.open(url).expect_status("lost", "reconnecting…")
        expect(tab.row(run_id)).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
        expect(tab.page.locator("#lost-banner")).to_be_visible()
        tab.expect_no_reload_and_no_errors()


@contextlib.contextmanager
def fake_service() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
