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
import re
import resource
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
import yaml

from service import settings
from conftest import HERE, RedisServer, ServerProcess, missing_tool, new_user
from service.http.limits import MAX_CONNECTIONS
from service.backends.redis import open_redis
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
    run = srv.run_to_end("completion-fields", fields={"name": "n", "module": "m", "msg": "x", "message": "hello",
                                                      "asctime": "t", "decision": "ok"})
    line = srv.wait_for_event("agent_complete", run_id=run["run_id"], timeout=5)
    assert (line["state"], line["decision"]) == ("DONE", "ok")
    assert {key: line[f"field_{key}"] for key in ("name", "module", "msg", "message", "asctime")} == {
        "name": "n", "module": "m", "msg": "x", "message": "hello", "asctime": "t"}


def test_completion_fields_cannot_change_the_run_or_its_terminal_line(start_server) -> None:
    srv = start_server(AGENT_MODULES="fixture_agents,fixture_hardening_agents")
    run_id = srv.start_run("completion-fields", fields={"state": "BOGUS", "error": "not an error", "result": "other",
                                                        "run_id": "other", "event": "e"})
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
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("agent_runner.test_hardening")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    cancelled: list[str] = []

    def on_cancel(run_id: str, by: str | None = None) -> None:
        if not cancelled:
            cancelled.append("failed")
            raise RuntimeError("on_cancel failed")
        cancelled.append(run_id)

    async def scenario() -> None:
        _, store = open_redis(redis_server.url, prefix, 30, 100, 256 * 1024 * 1024, logger)
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
        missing_tool("swagger-ui-dist", "bash .ci/run (it fetches swagger-ui-dist into .ci/cache with npm pack)")
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
    assets = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{settings.SWAGGER_UI_VERSION}/"
    assert policy == {"default-src": ["'none'"], "script-src": [assets, inline_hash], "style-src": [assets],
                      "img-src": [assets, "data:"], "connect-src": ["'self'"], "base-uri": ["'none'"],
                      "form-action": ["'none'"], "frame-ancestors": ["'none'"]}


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
    # every operation renders, the webhooks' (OpenAPI 3.1's top-level `webhooks`) included
    assert operations == sum(len(item) for section in ("paths", "webhooks") for item in spec.get(section, {}).values())
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


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A memory-mode server for limits that sit below the app (the store makes no difference there)."""
    srv = ServerProcess(tmp_path_factory.mktemp("plain") / "server.log")
    yield srv
    srv.stop(signal.SIGKILL)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


def answer_to(head: bytes, port: int, more: bytes = b"", times: int = 0) -> bytes | None:
    """What the server sends back for ``head`` followed by ``more`` ``times`` times: b"" when it closes
    the connection first, None when it says nothing within 5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(head)
            for _ in range(times):
                sock.sendall(more)
            answer = sock.recv(65536)
            sock.settimeout(1)
            with contextlib.suppress(TimeoutError, ConnectionResetError):  # the rest of a reply sent in pieces
                while answer and (chunk := sock.recv(65536)):
                    answer += chunk
            return answer
        except (BrokenPipeError, ConnectionResetError):
            return b""
        except TimeoutError:
            return None


def test_request_headers_over_64_kib_are_refused(plain_server: ServerProcess) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70)) + b"\r\n"
    answer = answer_to(head, plain_server.port)
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer
    assert answer.endswith(b'\r\n\r\n{"detail":"Request headers are larger than 65536 bytes"}')
    plain_server.wait_for_event("request_refused", reason="headers_too_large")
    assert plain_server.client.get("/healthz").status_code == 200


def test_headers_over_64_kib_on_a_kept_alive_connection_are_refused(plain_server: ServerProcess) -> None:
    with httpx.Client(base_url=plain_server.url) as client:
        assert client.get("/healthz").status_code == 200
        pad = {f"x-pad-{i}": "a" * 1000 for i in range(70)}
        assert client.get("/healthz", headers=pad).status_code == 431


def test_header_limits_apply_before_authentication(tmp_path: Path) -> None:
    """With API_TOKEN set, a client without a token still gets 431 for headers over 64 KiB, not 401: the
    limit is checked before the app (and its authentication) sees the request."""
    srv = ServerProcess(tmp_path / "server.log", API_TOKEN="limits-before-auth-token")
    try:
        small = b"GET /agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert (answer_to(small, srv.port) or b"").startswith(b"HTTP/1.1 401 ")  # the token is in force
        for request_line in (b"GET /agents HTTP/1.1", b"POST /agents/run HTTP/1.1"):
            head = request_line + b"\r\nHost: x\r\n" + b"".join(
                b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70)) + b"\r\n"
            answer = answer_to(head, srv.port)
            assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), (request_line, answer)
            assert answer.endswith(b'{"detail":"Request headers are larger than 65536 bytes"}'), answer
        srv.wait_for_event("request_refused", reason="headers_too_large")
    finally:
        srv.stop(signal.SIGKILL)


def test_request_headers_under_the_limit_are_served(plain_server: ServerProcess) -> None:
    pad = {f"x-pad-{i}": "a" * 1000 for i in range(40)}
    assert plain_server.client.get("/healthz", headers=pad).status_code == 200


def test_a_huge_header_is_not_read_into_memory(plain_server: ServerProcess) -> None:
    before = rss_bytes(plain_server.proc.pid)
    answer = answer_to(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ", plain_server.port,
                       more=b"a" * (1024 * 1024), times=32)  # 32 MiB in one header value
    grown = rss_bytes(plain_server.proc.pid) - before
    assert grown < 16 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert answer == b"" or answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer
    assert plain_server.client.get("/healthz").status_code == 200


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (a non-blocking socket whose answers, if any, were read)."""
    try:
        while data := sock.recv(65536):
            assert data.startswith(b"HTTP/1.1 200 "), data  # the kept-alive client's first answer
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_client_that_never_finishes_its_headers_is_dropped_within_about_10_s(plain_server: ServerProcess) -> None:
    started = time.monotonic()
    clients = {name: socket.create_connection(("127.0.0.1", plain_server.port))
               for name in ("silent", "trickling", "kept_alive")}
    clients["trickling"].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    clients["kept_alive"].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
    closed: dict[str, float] = {}
    try:
        for sock in clients.values():
            sock.setblocking(False)
        tick = 0
        while len(closed) < len(clients) and time.monotonic() - started < 15:
            time.sleep(0.25)
            tick += 1
            for name, sock in clients.items():
                if name in closed:
                    continue
                try:
                    if name != "silent" and tick % 4 == 0:
                        sock.send(b"X-Line-%d: 1\r\n" % tick)  # one header line a second, forever
                    if closed_by_server(sock):
                        closed[name] = time.monotonic() - started
                except (BrokenPipeError, ConnectionResetError):
                    closed[name] = time.monotonic() - started
            if tick % 4 == 0:
                assert plain_server.client.get("/healthz").status_code == 200  # others are served meanwhile
    finally:
        for sock in clients.values():
            sock.close()
    assert set(closed) == set(clients), f"still connected after 15 s; closed: {closed}"
    assert all(9.5 <= after <= 12 for after in closed.values()), closed
    plain_server.wait_for_event("request_refused", reason="header_timeout")


def test_the_header_time_limit_counts_from_the_first_byte_of_each_kept_alive_request(
        plain_server: ServerProcess) -> None:
    """A request that begins 2 s into a kept-alive connection gets its own 10 s, not what was left of the first's
    (which would close it 8 s after it began)."""
    with socket.create_connection(("127.0.0.1", plain_server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):  # the whole answer: its body may come in a second packet
            answer += sock.recv(65536) or pytest.fail(f"closed after {answer!r}")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        time.sleep(2)
        begun = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never ends its headers
        sock.setblocking(False)
        closed_after = None
        while closed_after is None and time.monotonic() - begun < 14:
            time.sleep(0.25)
            try:
                sock.send(b"X-Line: 1\r\n")
                if closed_by_server(sock):
                    closed_after = time.monotonic() - begun
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - begun
    assert closed_after is not None, "still connected 14 s after the second request began"
    assert 9.5 <= closed_after <= 12, closed_after


def test_connections_past_the_limit_are_answered_503_in_json_but_liveness(tmp_path: Path) -> None:
    """Past MAX_CONNECTIONS the API answers a JSON 503 (issue 24) while /healthz still answers, so a liveness
    probe does not restart a process that is only busy."""
    files = 2 * MAX_CONNECTIONS + 200  # the sockets held here, and the server's ends of them
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < files:
        missing_tool(f"an open-files hard limit of {files} (it is {hard})", f"ulimit -Hn {files} (as root)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, files), hard))  # the server inherits it
    srv = ServerProcess(tmp_path / "server.log")
    held: list[socket.socket] = []
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(MAX_CONNECTIONS)]
        statuses = []
        deadline = time.monotonic() + 10
        while 503 not in statuses and time.monotonic() < deadline:
            answer = httpx.get(f"{srv.url}/agents")
            statuses.append(answer.status_code)
        assert statuses[-1] == 503, f"no 503 with {MAX_CONNECTIONS} connections open: {statuses[-5:]}"
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {"detail": "Too many connections, please retry later"}
        assert answer.headers["connection"] == "close"
        health = httpx.get(f"{srv.url}/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/agents").status_code != 200:
            assert time.monotonic() < deadline, "still 503 after the connections closed"
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
        srv.stop(signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
