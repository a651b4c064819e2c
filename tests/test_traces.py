"""Tracing (docs/tracing.md): OpenTelemetry spans of requests and runs, their context across replicas, trace ids
in log lines, traceparent on webhooks; off, and nothing of OpenTelemetry loaded, unless OTEL_ turns it on.

The in-process tests run the app (one or two replicas) on httpx's ASGI transport with the SDK's in-memory
exporter; the last one exports over OTLP/HTTP from a real server to a receiver of this test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import fixture_agents  # noqa: F401  (registers the test agents)
import fixture_traced_agents  # noqa: F401
from conftest import HERE, RedisServer, ServerProcess, new_user
from service import settings, tracing
from service.backends.records import Run, split_record
from service.http.app import build_app
from service.logs import LogFormatter

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"

# --- in process ------------------------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"



@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, spans kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing.start(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.stop()
        exporter.shutdown()


class LogLines(logging.Handler):
    """The JSON lines the service's and the agents' loggers write, formatted as on stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(LogFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, Any]]]:
    handler = LogLines()
    loggers = [logging.getLogger("agent_runner"), logging.getLogger("agents")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.lines
    for logger, level in zip(loggers, levels):
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.asynccontextmanager
async def replica(**env: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, in this process, and a client speaking to it over the ASGI transport."""
    settings.current = settings.Settings.from_env({"AGENT_SLEEP_SECONDS": "0", "SHUTDOWN_GRACE_SECONDS": "1", **env})
    app = build_app("test")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica",
                                     timeout=20) as client:
            yield client
    settings.current = settings.Settings()


async def post_run(client: httpx.AsyncClient, agent_type: str = "sleeper", on_busy: str = "reject",
                   headers: dict[str, str] | None = None, **input: Any) -> dict[str, Any]:
    response = await client.post("/agents/run", headers=headers or {}, json={
        "agent_type": agent_type, "user_id": new_user(), "input": input, "on_busy": on_busy})
    assert response.status_code == 202, response.text
    return response.json()


async def wait_run(client: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    for _ in range(40):
        run = (await client.get(f"/agents/status/{run_id}", params={"wait": 5})).json()
        if run["state"] in ("DONE", "ERROR", "CANCELLED"):
            return run
    raise AssertionError(f"run {run_id} did not end")


def hex_id(value: int, digits: int = 16) -> str:
    return f"{value:0{digits}x}"


def run_spans(exporter: InMemorySpanExporter, run_id: str) -> dict[str, ReadableSpan]:
    found = {span.name: span for span in exporter.get_finished_spans()
             if (span.attributes or {}).get("run_id") == run_id}
    return found


def server_span(exporter: InMemorySpanExporter, trace_id: int) -> ReadableSpan:
    return next(span for span in exporter.get_finished_spans()
                if span.name == "POST /agents/run" and span.context.trace_id == trace_id)


def wait_for_span(exporter: InMemorySpanExporter, run_id: str, name: str = "run") -> dict[str, ReadableSpan]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = run_spans(exporter, run_id)
        if name in found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"no {name} span for run {run_id}")


@pytest.mark.anyio
async def test_a_request_span_continues_the_clients_trace_with_the_semantic_attributes(
        spans: InMemorySpanExporter) -> None:
    async with replica() as client:
        accepted = await post_run(client, seconds=0, headers={"traceparent": TRACEPARENT})
        await wait_run(client, accepted["run_id"])
        assert (await client.get("/nowhere")).status_code == 404
    post = server_span(spans, int(CLIENT_TRACE, 16))
    assert post.parent is not None and hex_id(post.parent.span_id) == CLIENT_SPAN and post.parent.is_remote
    assert post.kind.name == "SERVER"
    assert {key: post.attributes[key] for key in ("http.request.method", "http.route", "http.response.status_code",
                                                  "url.path", "url.scheme")} == {
        "http.request.method": "POST", "http.route": "/agents/run", "http.response.status_code": 202,
        "url.path": "/agents/run", "url.scheme": "http"}
    unmatched = next(span for span in spans.get_finished_spans() if span.attributes.get("url.path") == "/nowhere")
    assert unmatched.name == "GET" and "http.route" not in unmatched.attributes  # no route: the method alone
    assert unmatched.attributes["http.response.status_code"] == 404 and unmatched.parent is None


@pytest.mark.anyio
async def test_a_run_span_lasts_from_acceptance_to_its_end_with_queue_wait_execution_and_terminal_write(
        spans: InMemorySpanExporter) -> None:
    async with replica() as client:
        blocker = await post_run(client, seconds=0.3)
        queued = await post_run(client, on_busy="enqueue", headers={"traceparent": TRACEPARENT}, seconds=0)
        assert queued["queue_position"] == 1
        run = await wait_run(client, queued["run_id"])
        await wait_run(client, blocker["run_id"])
    found = wait_for_span(spans, run["run_id"])
    run_span, post = found["run"], server_span(spans, int(CLIENT_TRACE, 16))
    assert run_span.context.trace_id == int(CLIENT_TRACE, 16)  # the client's trace goes on into the run
    assert run_span.parent is not None and run_span.parent.span_id == post.context.span_id
    assert [link.context.span_id for link in run_span.links] == [post.context.span_id]
    assert isinstance(run["fencing_token"], int)
    assert dict(run_span.attributes or {}) == {"run_id": run["run_id"], "agent_type": "sleeper", "state": "DONE",
                                               "queue_position": 1, "fencing_token": run["fencing_token"]}
    assert {"run queue wait", "run execution", "run terminal write"} <= set(found)
    for name in ("run queue wait", "run execution", "run terminal write"):
        assert found[name].parent is not None and found[name].parent.span_id == run_span.context.span_id, name
    wait, execution, write = found["run queue wait"], found["run execution"], found["run terminal write"]
    assert run_span.start_time <= post.end_time and wait.start_time == run_span.start_time  # from acceptance
    assert wait.end_time <= execution.start_time <= execution.end_time <= write.start_time <= write.end_time
    assert write.end_time <= run_span.end_time
    started_at_once = wait_for_span(spans, blocker["run_id"])
    assert started_at_once["run"].attributes["queue_position"] == 0 and "run queue wait" not in started_at_once


@pytest.mark.anyio
async def test_a_run_cancelled_in_the_queue_has_its_span_and_an_error_run_is_marked_error(
        spans: InMemorySpanExporter) -> None:
    async with replica() as client:
        blocker = await post_run(client, seconds=0.5)
        queued = await post_run(client, on_busy="enqueue", seconds=0)
        assert (await client.post(f"/agents/cancel/{queued['run_id']}")).json()["state"] == "CANCELLED"
        failing = await post_run(client, "failing", on_busy="enqueue", message="boom")
        await wait_run(client, blocker["run_id"])
        await wait_run(client, failing["run_id"])
    cancelled = wait_for_span(spans, queued["run_id"])
    assert cancelled["run"].attributes["state"] == "CANCELLED"
    assert {"run queue wait", "run terminal write"} <= set(cancelled) and "run execution" not in cancelled
    failed = wait_for_span(spans, failing["run_id"])["run"]
    assert failed.attributes["state"] == "ERROR" and failed.status.status_code.name == "ERROR"
    assert "boom" in (failed.status.description or "")


@pytest.mark.anyio
async def test_the_run_span_is_current_in_the_agent_and_its_executor_threads_and_log_lines_carry_its_ids(
        spans: InMemorySpanExporter, log_lines: list[dict[str, Any]]) -> None:
    async with replica() as client:
        blocker = await post_run(client, seconds=0.2)
        accepted = await post_run(client, "traced", on_busy="enqueue", headers={"traceparent": TRACEPARENT})
        assert accepted["queue_position"] == 1
        assert (await wait_run(client, accepted["run_id"]))["state"] == "DONE"
        await wait_run(client, blocker["run_id"])
    run_span = wait_for_span(spans, accepted["run_id"])["run"]
    own = {span.name: span for span in spans.get_finished_spans() if span.name.startswith("agent ")}
    assert set(own) == {"agent coroutine", "agent to_thread", "agent run_in_executor"}
    for span in own.values():
        assert span.parent is not None and span.parent.span_id == run_span.context.span_id, span.name
    run_ids = {"trace_id": CLIENT_TRACE, "span_id": hex_id(run_span.context.span_id)}
    agent_lines = [line for line in log_lines if line["event"] in ("traced_coroutine", "traced_thread")]
    assert len(agent_lines) == 3
    for line in agent_lines:  # inside each agent span, the line names that span
        name = "agent coroutine" if line["event"] == "traced_coroutine" else line["span"]
        assert (line["trace_id"], line["span_id"]) == (CLIENT_TRACE, hex_id(own[name].context.span_id))
    for event in ("run_dequeued", "agent_complete"):  # the run's own lines, written by the service
        line = next(line for line in log_lines if line["event"] == event and line["run_id"] == accepted["run_id"])
        assert {key: line[key] for key in run_ids} == run_ids, event
    post = server_span(spans, int(CLIENT_TRACE, 16))
    accepted_line = next(line for line in log_lines if line["event"] == "run_accepted"
                         and line["run_id"] == accepted["run_id"])
    assert accepted_line["span_id"] == hex_id(post.context.span_id)  # written inside the POST's span


@pytest.mark.anyio
async def test_the_trace_context_travels_in_the_record_but_not_in_the_public_json(
        spans: InMemorySpanExporter) -> None:
    async with replica() as client:
        accepted = await post_run(client, seconds=0, headers={"traceparent": TRACEPARENT})
        run = await wait_run(client, accepted["run_id"])
        listed = (await client.get("/agents/runs")).json()["runs"]
    assert "trace" not in run and all("trace" not in listed_run for listed_run in listed)
    stored = Run.new(str(uuid.uuid4()), "sleeper", new_user(), {}, holder=None,
                     trace=f"{TRACEPARENT} 1a2b3c4d5e6f7a8b 3")
    assert Run.from_json(stored.record()).trace == stored.trace
    assert split_record(stored.record()) == (stored.json(), stored.trace)
    assert split_record(stored.json()) == (stored.json(), None)
    assert b"trace" not in Run.from_json(stored.record()).json()


@pytest.mark.anyio
async def test_the_run_span_crosses_replicas_in_redis_mode(spans: InMemorySpanExporter,
                                                            redis_server: RedisServer) -> None:
    """Replica A accepts the run into the queue and stops; replica B runs it: one trace, B's spans under A's POST."""
    shared = {"REDIS_URL": redis_server.url, "REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}"}
    async with replica(**shared) as b:
        blocker = await post_run(b, seconds=0.5)
        async with replica(**shared) as a:
            queued = await post_run(a, on_busy="enqueue", headers={"traceparent": TRACEPARENT}, seconds=0)
            assert queued["queue_position"] == 1
        settings.current = settings.Settings.from_env({"AGENT_SLEEP_SECONDS": "0", **shared})
        run = await wait_run(b, queued["run_id"])
        assert run["state"] == "DONE" and "trace" not in run  # read from Redis, where the record has it
        assert isinstance(run["fencing_token"], int)  # minted in Redis, in the record the trace context rides in
        await wait_run(b, blocker["run_id"])
        assert all("trace" not in listed for listed in (await b.get("/agents/runs")).json()["runs"])
    found = wait_for_span(spans, queued["run_id"])
    post = server_span(spans, int(CLIENT_TRACE, 16))
    assert found["run"].context.trace_id == int(CLIENT_TRACE, 16)
    assert found["run"].parent is not None and found["run"].parent.span_id == post.context.span_id
    assert {"run queue wait", "run execution", "run terminal write"} <= set(found)
    assert found["run"].attributes["state"] == "DONE"
    assert found["run"].attributes["fencing_token"] == run["fencing_token"]


def test_which_variables_turn_tracing_on() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "runner"})  # names the service; exports nothing


# --- real processes --------------------------------------------------------------------------------------------

PROBE = """
import asyncio, json, os, sys
import agent_runner
from service import settings
from service.runtime import close_runtime, open_runtime
settings.current = settings.Settings.from_env(os.environ)
async def start_and_close():
    await close_runtime(await open_runtime(settings.current))
asyncio.run(start_and_close())
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules if name.startswith("opentelemetry")})))
"""


def test_tracing_off_loads_no_opentelemetry_module() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_an_unknown_exporter_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "agent_runner.py"], cwd=HERE, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin", "PORT": "1"})
    assert done.returncode == 2
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["event"] == "invalid_configuration" and line["variable"] == "OTEL_TRACES_EXPORTER"


class Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector (POST /v1/traces) and a webhook receiver (POST /hook) in one."""

    received: list[tuple[str, dict[str, str], bytes]]

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.received.append((self.path, headers, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf" if self.path == "/v1/traces" else "text/plain")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def exported_spans(received: list[tuple[str, dict[str, str], bytes]]) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    found = []
    for path, headers, body in received:
        if path != "/v1/traces":
            continue
        assert headers["content-type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {attribute.key: attribute.value.string_value
                        for attribute in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                found.extend((resource, span) for span in scope_spans.spans)
    return found


def test_spans_are_exported_over_otlp_http_with_log_lines_and_the_webhook_carrying_the_trace(
        tmp_path: Path, receiver: ThreadingHTTPServer) -> None:
    port = receiver.server_address[1]
    server = ServerProcess(tmp_path / "server.log", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                           OTEL_BSP_SCHEDULE_DELAY="50", OTEL_SERVICE_NAME="runner-under-test",
                           WEBHOOK_SECRET="0123456789abcdef-secret", WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    try:
        response = server.client.post("/agents/run", headers={"traceparent": TRACEPARENT}, json={
            "agent_type": "sleeper", "user_id": new_user(), "input": {"seconds": 0.05},
            "webhook": f"http://127.0.0.1:{port}/hook"})
        assert response.status_code == 202, response.text
        run_id = response.json()["run_id"]
        assert server.wait_run(run_id)["state"] == "DONE"
        server.wait_for_event("webhook_delivered", run_id=run_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                span.name == "run" for _, span in exported_spans(receiver.received)):  # type: ignore[attr-defined]
            time.sleep(0.05)
    finally:
        server.stop()
    exported = exported_spans(receiver.received)  # type: ignore[attr-defined]
    by_name = {span.name: span for _, span in exported if span.trace_id.hex() == CLIENT_TRACE}
    assert {"POST /agents/run", "run", "run execution", "run terminal write"} <= set(by_name)
    assert all(resource["service.name"] == "runner-under-test" for resource, _ in exported)
    post, run = by_name["POST /agents/run"], by_name["run"]
    assert post.parent_span_id.hex() == CLIENT_SPAN and run.parent_span_id == post.span_id
    assert by_name["run execution"].parent_span_id == run.span_id
    attributes = {attribute.key: attribute.value for attribute in run.attributes}
    assert attributes["run_id"].string_value == run_id and attributes["state"].string_value == "DONE"

    hook = next((headers, body) for path, headers, body in receiver.received  # type: ignore[attr-defined]
                if path == "/hook")
    assert hook[1] and b"trace" not in hook[1] and json.loads(hook[1])["run_id"] == run_id
    assert hook[0]["traceparent"] == f"00-{CLIENT_TRACE}-{run.span_id.hex()}-01"

    lines = server.log_lines()
    request_line = next(line for line in lines if line["event"] == "http_request" and line["status"] == 202)
    assert (request_line["trace_id"], request_line["span_id"]) == (CLIENT_TRACE, post.span_id.hex())
    complete = next(line for line in lines if line["event"] == "agent_complete")
    assert (complete["trace_id"], complete["span_id"]) == (CLIENT_TRACE, run.span_id.hex())
    started = next(line for line in lines if line["event"] == "service_started")
    assert "trace_id" not in started  # outside any request or run
