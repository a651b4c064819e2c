"""The core HTTP contract, black-box against a real server process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import yaml
from openapi_spec_validator import validate

import agent_runner
import service.http.app
from service import settings
from conftest import DOCS, HERE, TESTS, ServerProcess, free_port, module_name, new_user, product_modules

BUSY = "An agent is already running, please retry later"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_post_run_answers_202_with_run_id_and_location(server: ServerProcess) -> None:
    response = server.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()})
    assert response.status_code == 202
    body = response.json()
    assert body["state"] == "PENDING"
    assert uuid.UUID(body["run_id"]).version == 4
    assert response.headers["location"] == f"/agents/status/{body['run_id']}"
    server.wait_run(body["run_id"])


def test_run_object_has_every_field_and_timestamps_in_rfc3339(server: ServerProcess) -> None:
    user = new_user()
    run = server.wait_run(server.start_run("sleeper", user_id=user, seconds=0.05, note="hi"))
    assert set(run) == {"run_id", "agent_type", "user_id", "input", "state", "result", "error", "progress",
                        "created_at", "started_at", "finished_at", "queue_position", "cancelled_by", "webhook",
                        "fencing_token"}
    assert isinstance(run["fencing_token"], int) and run["fencing_token"] > 0
    assert run["queue_position"] is None and run["cancelled_by"] is None and run["webhook"] is None
    assert run["state"] == "DONE" and run["user_id"] == user and run["error"] is None
    assert run["input"] == {"seconds": 0.05, "note": "hi"}
    assert run["result"] == {"slept": 0.05, "input": {"seconds": 0.05, "note": "hi"}}
    for key in ("created_at", "started_at", "finished_at"):
        assert TIMESTAMP.match(run[key]), run[key]
    assert run["created_at"] <= run["started_at"] <= run["finished_at"]


def test_run_states_are_seen_in_order(server: ServerProcess) -> None:
    run_id = server.start_run("sleeper", seconds=0.4)
    seen: list[str] = []
    first = server.client.get(f"/agents/status/{run_id}").json()
    assert first["finished_at"] is None and first["result"] is None
    deadline = time.monotonic() + 10
    while not seen or seen[-1] not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, f"run never ended; states seen: {seen}"
        state = server.client.get(f"/agents/status/{run_id}").json()["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
    assert seen in (["PENDING", "RUNNING", "DONE"], ["RUNNING", "DONE"])
    assert "RUNNING" in seen


def test_busy_answers_409_with_exact_detail_and_retry_after(server: ServerProcess) -> None:
    run_id = server.start_run("hanging")  # busy until cancelled, however slow the machine
    user = new_user()
    response = server.client.post("/agents/run", json={"agent_type": "policy-checker", "user_id": user})
    assert response.status_code == 409
    assert response.json() == {"detail": BUSY}
    assert int(response.headers["retry-after"]) >= 1
    assert server.client.post(f"/agents/cancel/{run_id}").json()["state"] == "CANCELLED"
    assert server.wait_for_event("run_rejected", user_id=user)["agent_type"] == "policy-checker"


def test_client_that_sees_done_can_start_the_next_run_at_once(server: ServerProcess) -> None:
    for _ in range(5):
        assert server.run_to_end("sleeper", seconds=0)["state"] == "DONE"
        # No sleep between: the lock is free the moment DONE is visible.
        server.wait_run(server.start_run("sleeper", seconds=0))


def test_burst_of_100_concurrent_posts_admits_exactly_one(server: ServerProcess) -> None:
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            # The run outlasts the burst however slow the machine: it ends only when cancelled below.
            body = {"agent_type": "hanging", "user_id": new_user()}
            return await asyncio.gather(*(client.post("/agents/run", json=body) for _ in range(100)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == 1 and codes.count(409) == 99, codes
    accepted = next(r for r in responses if r.status_code == 202)
    assert all(r.json() == {"detail": BUSY} for r in responses if r.status_code == 409)
    cancelled = server.client.post(f"/agents/cancel/{accepted.json()['run_id']}")
    assert cancelled.json()["state"] == "CANCELLED"


VALID = {"agent_type": "sleeper", "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10"}

BAD_INPUT = [
    # (name, headers, body bytes, status, words the detail must contain)
    ("no content type", {"content-type": None}, b'{"agent_type": "sleeper"}', 415, "application/json"),
    ("text/plain", {"content-type": "text/plain"}, b"{}", 415, "application/json"),
    ("form", {"content-type": "application/x-www-form-urlencoded"}, b"a=b", 415, "application/json"),
    ("latin-1 charset", {"content-type": "application/json; charset=latin-1"}, b"{}", 415, "utf-8"),
    ("empty body", {}, b"", 400, "empty"),
    ("whitespace body", {}, b"  \n", 400, "empty"),
    ("invalid utf-8", {}, b'{"agent_type": "\xff\xfe"}', 400, "UTF-8"),
    ("invalid json", {}, b'{"agent_type": ', 400, "not valid JSON"),
    ("NaN", {}, b'{"agent_type": "sleeper", "user_id": "x", "input": {"a": NaN}}', 400, "not valid JSON"),
    ("too deep", {}, b'{"input": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, 400, "nested deeper"),
    ("very deep", {}, b"[" * 30000 + b"]" * 30000, 400, "nested deeper"),
    ("array", {}, b"[1, 2]", 400, "JSON object"),
    ("string", {}, b'"sleeper"', 400, "JSON object"),
    ("null", {}, b"null", 400, "JSON object"),
    ("missing agent_type", {}, b'{"user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10"}', 400, "agent_type"),
    ("agent_type number", {}, b'{"agent_type": 7, "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10"}', 400,
     "agent_type"),
    ("missing user_id", {}, b'{"agent_type": "sleeper"}', 400, "user_id"),
    ("user_id number", {}, b'{"agent_type": "sleeper", "user_id": 5}', 400, "user_id"),
    ("user_id not uuid", {}, b'{"agent_type": "sleeper", "user_id": "bob"}', 400, "user_id"),
    ("input list", {}, b'{"agent_type": "sleeper", "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10", '
     b'"input": [1]}', 400, "input"),
    ("input null", {}, b'{"agent_type": "sleeper", "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10", '
     b'"input": null}', 400, "input"),
    ("unknown field", {}, b'{"agent_type": "sleeper", "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10", '
     b'"priority": 1}', 400, "priority"),
    ("unknown agent_type", {}, b'{"agent_type": "nope", "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10"}', 400,
     "'nope'"),
]


def newest_run_id(server: ServerProcess) -> str | None:
    runs = server.client.get("/agents/runs", params={"limit": 1}).json()["runs"]
    return runs[0]["run_id"] if runs else None


@pytest.mark.parametrize(("headers", "body", "status", "words"),
                         [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_json_4xx_creates_no_run_and_leaves_the_lock_free(
        server: ServerProcess, headers: dict[str, str | None], body: bytes, status: int, words: str) -> None:
    before = newest_run_id(server)
    sent = {key: value for key, value in {"content-type": "application/json", **headers}.items() if value}
    response = server.client.post("/agents/run", content=body, headers=sent)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["detail"]
    assert newest_run_id(server) == before
    server.wait_run(server.start_run("sleeper", seconds=0))


def test_body_over_max_body_bytes_is_413_by_content_length_and_by_streamed_size(server: ServerProcess) -> None:
    before = newest_run_id(server)
    big = b'{"agent_type": "sleeper", "input": {"pad": "' + b"x" * 70000 + b'"}}'
    response = server.client.post("/agents/run", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "65536" in response.json()["detail"]

    def chunks():  # no Content-Length: the server must count what arrives
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    response = server.client.post("/agents/run", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert newest_run_id(server) == before
    server.wait_run(server.start_run("sleeper", seconds=0))


def test_unknown_agent_type_names_it_lists_supported_and_logs_a_warning(server: ServerProcess) -> None:
    response = server.client.post("/agents/run", json={"agent_type": "translator", "user_id": new_user()})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "'translator'" in detail
    for agent_type in ("document-extractor", "policy-checker", "sleeper"):
        assert agent_type in detail
    line = server.wait_for_event("unsupported_agent_type", agent_type="translator")
    assert line["level"] == "warning"


def test_warning_lines_are_written_before_the_answer(server: ServerProcess) -> None:
    agent_type = f"nope-{uuid.uuid4().hex[:8]}"
    run_id = server.start_run("sleeper", seconds=0)  # info lines just before, which may wait up to 0.2 s
    response = server.client.post("/agents/run", json={"agent_type": agent_type, "user_id": new_user()})
    assert response.status_code == 400
    # Read at once, no waiting: the warning is flushed before the answer goes out.
    assert [line["agent_type"] for line in server.events("unsupported_agent_type")][-1:] == [agent_type]
    server.wait_run(run_id)


def test_status_of_malformed_id_is_400_and_of_unknown_id_is_404(server: ServerProcess) -> None:
    for malformed in ("not-a-uuid", f"{uuid.uuid4()}%0A", f"{uuid.uuid4()}x"):
        response = server.client.get(f"/agents/status/{malformed}")
        assert response.status_code == 400
        assert "run_id" in response.json()["detail"]
    unknown = str(uuid.uuid4())
    response = server.client.get(f"/agents/status/{unknown}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"Run {unknown} not found"}


def test_agent_exception_ends_in_error_with_traceback_logged(server: ServerProcess) -> None:
    run = server.run_to_end("failing", message="disk on fire")
    assert run["state"] == "ERROR"
    assert run["error"] == "ValueError: disk on fire"
    assert run["result"] is None and run["finished_at"]
    line = server.wait_for_event("agent_error", run_id=run["run_id"])
    assert line["level"] == "error"
    assert line["error"] == "ValueError: disk on fire"
    assert "Traceback" in line["traceback"] and "ValueError: disk on fire" in line["traceback"]
    assert line["agent_type"] == "failing" and line["user_id"] == run["user_id"]
    assert server.run_to_end("sleeper", seconds=0)["state"] == "DONE"


def test_unserialisable_result_ends_in_error_and_status_still_answers(server: ServerProcess) -> None:
    run = server.run_to_end("unserialisable")
    assert run["state"] == "ERROR"
    assert "not JSON-serialisable" in run["error"]
    assert server.client.get(f"/agents/status/{run['run_id']}").status_code == 200


def test_policy_checker_greets_decides_and_logs_completion(server: ServerProcess) -> None:
    user = new_user()
    run = server.wait_run(server.start_run("policy-checker", user_id=user))
    assert run["state"] == "DONE"
    assert run["result"] in ("approved", "rejected")
    start = server.wait_for_event("agent_start", run_id=run["run_id"])
    assert start["message"] == f"Hello, I am a policy-checker agent for {user}"
    assert start["agent_type"] == "policy-checker" and start["user_id"] == user
    complete = server.wait_for_event("agent_complete", run_id=run["run_id"])
    assert complete["level"] == "info"
    assert complete["decision"] == run["result"]
    assert complete["duration_ms"] >= 200  # AGENT_SLEEP_SECONDS=0.2 in the harness


def test_document_extractor_returns_a_json_object(server: ServerProcess) -> None:
    user = new_user()
    run = server.wait_run(server.start_run("document-extractor", user_id=user, document_id="inv-7"))
    assert run["state"] == "DONE"
    assert run["result"]["document_id"] == "inv-7"
    assert isinstance(run["result"]["fields"], dict)
    start = server.wait_for_event("agent_start", run_id=run["run_id"])
    assert start["message"] == f"Hello, I am a document-extractor agent for {user}"


def test_agents_endpoint_lists_types_with_descriptions(server: ServerProcess) -> None:
    body = server.client.get("/agents").json()
    listed = {agent["agent_type"]: agent["description"] for agent in body["agents"]}
    assert {"document-extractor", "policy-checker", "sleeper", "failing"} <= set(listed)
    assert all(isinstance(text, str) and text for text in listed.values())


def test_healthz(server: ServerProcess) -> None:
    response = server.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_unmatched_path_is_404_json_and_wrong_method_is_405_json(server: ServerProcess) -> None:
    response = server.client.get("/nowhere")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    response = server.client.delete("/agents/run")
    assert response.status_code == 405 and "detail" in response.json()
    assert "POST" in response.headers["allow"]
    response = server.client.get("/agents/run")
    assert response.status_code == 405


def test_openapi_yaml_is_served_as_is_and_is_valid(server: ServerProcess) -> None:
    response = server.client.get("/openapi.yaml")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/yaml")
    assert response.content == (HERE / "openapi.yaml").read_bytes()
    validate(yaml.safe_load(response.content))


def test_openapi_paths_and_methods_equal_the_apps_routes() -> None:
    spec = yaml.safe_load((HERE / "openapi.yaml").read_text())
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    served = {(route.path, method) for route in service.http.app.routes for method in route.methods if method != "HEAD"}
    assert documented == served


# Every status each operation answers (401: API_TOKEN; 503: shutting down or the Redis store unreachable).
STATUSES = {
    ("GET", "/agents"): {"200", "401"},
    ("POST", "/agents/run"): {"202", "400", "401", "408", "409", "413", "415", "422", "503"},
    ("GET", "/agents/status/{run_id}"): {"200", "400", "401", "404", "503"},
    ("POST", "/agents/cancel/{run_id}"): {"200", "202", "400", "401", "404", "409", "503"},
    ("GET", "/agents/runs"): {"200", "400", "401", "503"},
    ("GET", "/agents/events"): {"200", "401", "503"},
    ("GET", "/agents/events/{run_id}"): {"200", "204", "400", "401", "404", "503"},
    ("GET", "/agents/logs/{run_id}"): {"200", "400", "401", "404", "503"},
    ("GET", "/healthz"): {"200"},
    ("GET", "/readyz"): {"200", "503"},
    ("GET", "/metrics"): {"200"},
    ("GET", "/openapi.yaml"): {"200"},
    ("GET", "/openapi.json"): {"200"},
    ("GET", "/docs"): {"200"},
    ("GET", "/"): {"200"},
}


def test_openapi_documents_every_status_each_operation_returns() -> None:
    spec = yaml.safe_load((HERE / "openapi.yaml").read_text())
    documented = {(method.upper(), path): set(operation["responses"])
                  for path, item in spec["paths"].items() for method, operation in item.items()}
    assert documented == STATUSES


def test_docs_page_loads_swagger_ui_for_the_spec(start_server) -> None:
    srv = start_server(DOCS_ASSETS_URL="http://127.0.0.1:9/swagger/")
    response = srv.client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'data-spec="/openapi.json"' in response.text
    assert 'src="http://127.0.0.1:9/swagger/swagger-ui-bundle.js"' in response.text
    assert 'href="http://127.0.0.1:9/swagger/swagger-ui.css"' in response.text


def test_docs_assets_come_from_a_cdn_by_default(server: ServerProcess) -> None:
    assert "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js" in server.client.get("/docs").text


def test_every_stdout_line_is_json_with_timestamp_level_event(server: ServerProcess) -> None:
    run = server.run_to_end("policy-checker")
    marker = f"/nowhere-{uuid.uuid4()}"
    server.client.get(marker)
    server.wait_for_event("agent_complete", run_id=run["run_id"])
    server.wait_for_event("http_request", path=marker)
    lines = server.log_path.read_text().splitlines()
    assert len(lines) > 10
    for text in lines:
        line = json.loads(text)  # raises on any plain-text line
        assert TIMESTAMP.match(line["timestamp"]), line
        assert line["level"] in ("debug", "info", "warning", "error"), line
        assert isinstance(line["event"], str) and line["event"], line
    events = {line["event"] for line in server.log_lines()}
    assert {"run_accepted", "agent_start", "agent_complete", "http_request", "server_log"} <= events


def test_http_request_line_per_request(server: ServerProcess) -> None:
    marker = f"/nowhere-{uuid.uuid4()}"
    server.client.get(marker)
    line = server.wait_for_event("http_request", path=marker)
    assert line["method"] == "GET" and line["status"] == 404 and line["duration_ms"] >= 0
    assert line["level"] == "info"


def test_run_lines_carry_run_id_agent_type_user_id(server: ServerProcess) -> None:
    user = new_user()
    run_id = server.start_run("sleeper", user_id=user, seconds=0)
    server.wait_run(run_id)
    for event in ("run_accepted", "agent_complete"):
        line = server.wait_for_event(event, run_id=run_id)
        assert line["agent_type"] == "sleeper" and line["user_id"] == user


BAD_SETTINGS = [
    ({"PORT": "abc"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"AGENT_SLEEP_SECONDS": "-1"}, "AGENT_SLEEP_SECONDS"),
    ({"AGENT_SLEEP_SECONDS": "soon"}, "AGENT_SLEEP_SECONDS"),
    ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"),
    ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    ({"AGENT_MODULES": "no_such_module_here"}, "AGENT_MODULES"),
    ({"AGENT_MODULES": "fixture_agents,fixture_duplicate_agent"}, "AGENT_MODULES"),
    ({"RUN_TIMEOUT_SECONDS": "0"}, "RUN_TIMEOUT_SECONDS"),
    ({"RUN_RETENTION": "many"}, "RUN_RETENTION"),
    ({"SHUTDOWN_GRACE_SECONDS": "-5"}, "SHUTDOWN_GRACE_SECONDS"),
    ({"HOST": " "}, "HOST"),
    ({"HOST": "256.1.1.1"}, "HOST"),
    ({"HOST": "bad host!"}, "HOST"),
    ({"REDIS_URL": "http://127.0.0.1:6379/0"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://127.0.0.1:port/0"}, "REDIS_URL"),
    ({"REDIS_URL": "redis+sentinel://127.0.0.1:26379"}, "REDIS_URL"),  # no master name
    ({"REDIS_URL": "redis+cluster://127.0.0.1:7000/1"}, "REDIS_URL"),  # a cluster has only db 0
    ({"LOCK_TTL_SECONDS": "0.1"}, "LOCK_TTL_SECONDS"),
    ({"LOCK_TTL_SECONDS": "soon"}, "LOCK_TTL_SECONDS"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"WEBHOOK_SECRET": "short"}, "WEBHOOK_SECRET"),
    ({"WEBHOOK_SECRET": "s" * 32}, "WEBHOOK_ALLOWED_HOSTS"),
    ({"WEBHOOK_SECRET": "s" * 32, "WEBHOOK_ALLOWED_HOSTS": "hooks.example.com,bad host"}, "WEBHOOK_ALLOWED_HOSTS"),
    ({"WEBHOOK_BACKOFF_SECONDS": "0"}, "WEBHOOK_BACKOFF_SECONDS"),
    ({"WEBHOOK_TIMEOUT_SECONDS": "31"}, "WEBHOOK_TIMEOUT_SECONDS"),
]


@pytest.mark.parametrize(("env", "variable"), BAD_SETTINGS,
                         ids=[" ".join(f"{key}={value!r}" for key, value in env.items()) for env, _ in BAD_SETTINGS])
def test_bad_setting_stops_start_with_exit_2_and_one_json_line_naming_it(env: dict[str, str], variable: str) -> None:
    result = subprocess.run([sys.executable, "agent_runner.py"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env={**os.environ, "PORT": str(free_port()), "PYTHONPATH": str(TESTS), **env})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [json.loads(text) for text in result.stdout.splitlines()]
    assert len(lines) == 1, result.stdout + result.stderr
    assert lines[0]["event"] == "invalid_configuration" and lines[0]["level"] == "error"
    assert lines[0]["variable"] == variable
    assert result.stderr == ""


def documented_settings() -> dict[str, str]:
    """The configuration page's table (docs/configuration.md): variable -> its default as written there.

    Only the rows Markdown shows as the table count: those that follow its header without a break (a blank
    line in the table ends it, and the rows after it show as plain text).
    """
    lines = (DOCS / "configuration.md").read_text().splitlines()
    header = lines.index("| variable | default | meaning |")
    assert lines[header + 1] == "|---|---|---|"
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    table = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+?) \|", "\n".join(rows), re.M))
    assert len(table) == len(rows), [row for row in rows if not re.match(r"^\| `[A-Z_]+` \|", row)]
    return table


def test_settings_defaults_match_the_configuration_page_table() -> None:
    table = documented_settings()
    assert set(table) == {name for name, _, _ in settings.SETTINGS_TABLE}  # all of them in one unbroken table
    defaults = settings.Settings.from_env({})
    for name, shown in table.items():
        # Setting a variable to the documented default (or to nothing, where it has none) changes nothing.
        given = "" if shown in ("(unset)", "(empty)") else shown.strip("`")
        assert settings.Settings.from_env({name: given}) == defaults, (name, shown)
    # ...and the documented defaults are not all ignored: a different value does change something.
    assert settings.Settings.from_env({"PORT": "8001"}) != defaults


def test_agent_sleep_seconds_zero_is_allowed(start_server) -> None:
    srv = start_server(AGENT_SLEEP_SECONDS="0")
    started = time.monotonic()
    run = srv.wait_run(srv.start_run("policy-checker"))
    assert run["state"] == "DONE" and time.monotonic() - started < 2


def test_help_prints_the_configuration_table_and_version_the_version() -> None:
    shown = subprocess.run([sys.executable, "agent_runner.py", "--help"], cwd=HERE, capture_output=True,
                           text=True, timeout=30)
    version = subprocess.run([sys.executable, "agent_runner.py", "--version"], cwd=HERE, capture_output=True,
                             text=True, timeout=30)
    assert shown.returncode == 0 and version.returncode == 0
    rows = {line.split()[0]: line.split(None, 1)[1] for line in shown.stdout.splitlines()
            if line.startswith("  ") and line.split()[0].isupper()}
    assert list(rows) == [name for name, _, _ in settings.SETTINGS_TABLE]
    for name, default, meaning in settings.SETTINGS_TABLE:
        assert rows[name] == meaning + (f" (default: {default})" if default else ""), name
    assert version.stdout.strip() == f"agent-runner {agent_runner.__version__}"


def test_every_setting_is_in_the_configuration_page_and_env_example_with_its_default() -> None:
    page = (DOCS / "configuration.md").read_text()
    env_example = (HERE / ".env.example").read_text()
    for name, default, _ in settings.SETTINGS_TABLE:
        shown = f"`{default}`" if default else "(unset)" if name in ("API_TOKEN", "REDIS_URL", "DATABASE_URL") \
            else "(empty)"
        assert re.search(rf"^\| `{name}` \| {re.escape(shown)} \|", page, re.M), name
        assert f"\n#{name}={default}\n" in env_example, name
    defaults = settings.Settings.from_env({})
    assert str(defaults.redis_prefix) == "agent-runner" and defaults.lock_ttl_seconds == 30


def docs_table(page: str, heading: str) -> dict[str, list[str]]:
    """The first table under the ``heading`` line of the docs page ``page``: its first column's name (without
    backticks) -> the other cells. The table ends at its first line that is not a row."""
    section = ("\n" + (DOCS / page).read_text()).split(f"\n{heading}\n", 1)[1]
    lines = section[section.index("\n|") + 1:].splitlines()
    rows = {}
    for line in lines[2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        name, *cells = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows[name.strip("`")] = cells
    return rows


def code_log_events() -> dict[str, set[str]]:
    """Every event the service's modules log, with the levels their calls name: ``<logger>.<level>("event", ...)``,
    ``log_hot("event", ...)`` (info), and the terminal events a run's outcome names (``{"event": ...}``), logged
    with a level finish_run chooses, as ``log.log(level, "event")`` is (no level named: an empty set)."""
    import ast

    levels = {"debug": "debug", "info": "info", "warning": "warning", "error": "error", "exception": "error",
              "critical": "critical"}
    events: dict[str, set[str]] = {}
    for path in product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            name, level = None, None
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                args = node.args[1:] if called == "log" else node.args
                if called in (*levels, "log", "log_hot") and args and isinstance(args[0], ast.Constant):
                    name, level = args[0].value, "info" if called == "log_hot" else levels.get(called)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "event" and isinstance(value, ast.Constant):
                        name = value.value
            if isinstance(name, str) and re.fullmatch(r"[a-z]+(_[a-z]+)+|[a-z]+", name):
                events.setdefault(name, set()).update([level] if level else [])
    return events


def test_the_logs_page_table_has_every_event_the_code_logs_at_its_levels() -> None:
    table = docs_table("logs.md", "# Logs")
    code = code_log_events()
    assert {"agent_complete", "run_rejected", "webhook_failed", "agent_start"} <= set(code)  # the scan finds them
    assert sorted(set(code) - set(table)) == [], "logged by the code, missing from docs/logs.md's table"
    assert sorted(set(table) - set(code)) == [], "in docs/logs.md's table, logged nowhere"
    for event, named in code.items():
        shown = table[event][0]
        assert all(level in shown for level in named), (event, named, shown)


def test_the_development_page_layout_table_names_every_product_module() -> None:
    listed = {re.sub(r"\[`(.+?)`\]\(.*\)", r"\1", name) for name in docs_table("development.md", "## Layout")}
    modules = {module_name(path) for path in product_modules()}
    assert sorted(modules - listed) == [], "product modules docs/development.md's Layout table lacks"
    assert sorted(listed - modules) == [], "in docs/development.md's Layout table, but no such module"


def test_the_metrics_page_table_has_every_metric_with_its_type_and_labels() -> None:
    from service import metrics

    table = docs_table("metrics.md", "# Metrics")
    assert sorted(table) == sorted(metric.name for metric in metrics.ALL)
    for metric in metrics.ALL:
        kind, labels, _meaning = table[metric.name]
        assert kind == type(metric).__name__.lower(), metric.name
        shown = [label.strip() for label in re.sub(r"\(.*?\)", "", labels).split(",") if label.strip()]
        assert shown == list(metric.labelnames), metric.name
