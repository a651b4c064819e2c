"""Run lifecycle and operations: timeout, cancel, wait, list, retention, auth, metrics, shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import signal
import threading
import time
import uuid

import httpx
import pytest

from conftest import ServerProcess, log_time, new_user, own_namespace
from service.backends import Backend
from service.backends.memory import MemoryBackend
from service.backends.records import Page, Run, utc_now

BUSY = "An agent is already running, please retry later"


# --- timeout ---------------------------------------------------------------

def test_run_that_never_returns_times_out_as_error_and_frees_the_lock(start_server) -> None:
    srv = start_server(RUN_TIMEOUT_SECONDS="0.5")
    started = time.monotonic()
    run = srv.wait_run(srv.start_run("hanging"))
    assert run["state"] == "ERROR"
    assert run["error"] == "Run timed out after 0.5 seconds"
    assert 0.5 <= time.monotonic() - started < 5
    line = srv.wait_for_event("run_timeout", run_id=run["run_id"])
    assert line["level"] == "error"
    assert srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()}).status_code == 202


# --- cancel ----------------------------------------------------------------

def test_cancel_while_running_ends_cancelled_and_frees_the_lock(server: ServerProcess) -> None:
    run_id = server.start_run("hanging")
    server.wait_state(run_id, "RUNNING")
    response = server.client.post(f"/agents/cancel/{run_id}")
    assert response.status_code == 200
    run = response.json()
    assert run["state"] == "CANCELLED" and run["finished_at"] and run["error"] is None
    assert server.wait_for_event("run_cancelled", run_id=run_id)["level"] == "info"
    server.wait_run(server.start_run("sleeper", seconds=0))


def test_cancel_while_pending_or_running_never_runs_two_agents(server: ServerProcess) -> None:
    # Each cancel is followed at once by the next run; the probe agent counts how many execute at once.
    # A stubborn probe takes 0.2 s to stop after its cancel: a lock freed any earlier would run two.
    for mode, once_running in [("hang", False), ("stubborn", True), ("hang", True), ("stubborn", False),
                               ("stubborn", True), ("hang", False)]:
        run_id = server.start_run("probe", mode=mode, seconds=0)
        if once_running:
            server.wait_state(run_id, "RUNNING")  # else cancelled right after the 202, perhaps still PENDING
        response = server.client.post(f"/agents/cancel/{run_id}")
        assert response.status_code == 200 and response.json()["state"] == "CANCELLED"
    last = server.start_run("probe", mode="ok", seconds=0)
    assert server.wait_run(last)["state"] == "DONE"
    # "most" is the highest number of probes this process ever saw executing at once.
    assert server.wait_for_event("probe_end", run_id=last)["most"] == 1


def test_a_second_cancel_does_not_cut_the_cleanup_of_an_agent_stopping_after_the_first(server: ServerProcess) -> None:
    run_id = server.start_run("tidy", cleanup=0.5)
    server.wait_state(run_id, "RUNNING")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(server.client.post, f"/agents/cancel/{run_id}")
        server.wait_for_event("cleanup_started", run_id=run_id)
        second = server.client.post(f"/agents/cancel/{run_id}")
        assert first.result().status_code == 200 and second.status_code == 200
    assert server.wait_run(run_id)["state"] == "CANCELLED"
    # The cleanup ran to its end: only the supervisor's retry a second later may cancel an agent again.
    assert server.wait_for_event("cleanup_done", run_id=run_id)


def test_cancel_after_done_is_409_with_the_state(server: ServerProcess) -> None:
    run = server.run_to_end("sleeper", seconds=0)
    response = server.client.post(f"/agents/cancel/{run['run_id']}")
    assert response.status_code == 409
    assert response.json() == {"detail": f"Run {run['run_id']} already finished (DONE)"}


def test_cancel_unknown_is_404_and_malformed_is_400(server: ServerProcess) -> None:
    unknown = str(uuid.uuid4())
    response = server.client.post(f"/agents/cancel/{unknown}")
    assert response.status_code == 404 and response.json() == {"detail": f"Run {unknown} not found"}
    assert server.client.post("/agents/cancel/42").status_code == 400


def test_agent_that_swallows_cancellation_is_cancelled_every_second_and_keeps_the_lock(server: ServerProcess) -> None:
    run_id = server.start_run("stubborn", hold=6.5)
    server.wait_state(run_id, "RUNNING")
    response = server.client.post(f"/agents/cancel/{run_id}")
    # The agent ignores cancellation longer than the cancel endpoint waits: 202, still RUNNING.
    assert response.status_code == 202
    assert response.json()["state"] == "RUNNING"
    busy = server.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()})
    assert busy.status_code == 409
    assert server.wait_run(run_id)["state"] == "CANCELLED"
    next_run = server.start_run("sleeper", seconds=0)
    server.wait_run(next_run)

    server.wait_for_event("run_accepted", run_id=next_run)
    lines = server.log_lines()

    # Cancelled at once, then again every second until it stopped 6.5 s later.
    ignored = [log_time(line) for line in lines if line["event"] == "cancel_ignored" and line["run_id"] == run_id]
    gaps = [later - earlier for earlier, later in zip(ignored, ignored[1:])]
    assert len(ignored) >= 6, ignored
    assert all(0.9 <= gap <= 2.0 for gap in gaps), gaps
    # The lock was held until the agent's code had stopped: the next run was accepted only after that.
    events = [(line["event"], line.get("run_id")) for line in lines]
    assert events.index(("stubborn_stopped", run_id)) < events.index(("run_accepted", next_run))


# --- long-poll ---------------------------------------------------------------

def test_wait_returns_as_soon_as_the_run_finishes(server: ServerProcess) -> None:
    run_id = server.start_run("sleeper", seconds=0.3)
    started = time.monotonic()
    run = server.client.get(f"/agents/status/{run_id}", params={"wait": 30}).json()
    assert run["state"] == "DONE"
    assert time.monotonic() - started < 5


def test_wait_times_out_with_the_run_as_it_stands(server: ServerProcess) -> None:
    run_id = server.start_run("hanging")
    started = time.monotonic()
    run = server.client.get(f"/agents/status/{run_id}", params={"wait": 0.5}).json()
    elapsed = time.monotonic() - started
    assert run["state"] in ("PENDING", "RUNNING")
    assert 0.45 <= elapsed < 3
    server.client.post(f"/agents/cancel/{run_id}")


def test_wait_on_a_finished_run_returns_at_once(server: ServerProcess) -> None:
    run = server.run_to_end("sleeper", seconds=0)
    started = time.monotonic()
    assert server.client.get(f"/agents/status/{run['run_id']}", params={"wait": 60}).json()["state"] == "DONE"
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("wait", ["abc", "0", "-1", "60.5", "nan", "inf", ""])
def test_wait_out_of_range_is_400(server: ServerProcess, wait: str) -> None:
    run = server.run_to_end("sleeper", seconds=0)
    response = server.client.get(f"/agents/status/{run['run_id']}", params={"wait": wait})
    assert response.status_code == 400
    assert "wait" in response.json()["detail"]


# --- list ------------------------------------------------------------------

def test_list_is_newest_first_with_filters_and_paging(start_server) -> None:
    srv = start_server()
    alice, bob = new_user(), new_user()
    ids = []
    for agent_type, user, extra in [("sleeper", alice, {"seconds": 0}), ("failing", bob, {}),
                                    ("sleeper", bob, {"seconds": 0}), ("policy-checker", alice, {}),
                                    ("sleeper", alice, {"seconds": 0})]:
        ids.append(srv.wait_run(srv.start_run(agent_type, user_id=user, **extra))["run_id"])
    newest_first = ids[::-1]

    def listed(**params) -> list[str]:
        response = srv.client.get("/agents/runs", params=params)
        assert response.status_code == 200, response.text
        return [run["run_id"] for run in response.json()["runs"]]

    assert listed() == newest_first
    assert listed(state="ERROR") == [ids[1]]
    assert listed(agent_type="sleeper") == [ids[4], ids[2], ids[0]]
    assert listed(user_id=alice) == [ids[4], ids[3], ids[0]]
    assert listed(user_id=bob.upper()) == [ids[2], ids[1]]
    assert listed(agent_type="sleeper", user_id=bob) == [ids[2]]
    assert listed(limit=2) == newest_first[:2]
    assert listed(limit=2, before=newest_first[1]) == newest_first[2:4]
    assert listed(before=ids[0]) == []
    assert listed(state="RUNNING") == []


def test_list_returns_50_runs_by_default(start_server) -> None:
    srv = start_server()
    ids = [srv.run_to_end("sleeper", seconds=0)["run_id"] for _ in range(51)]
    listed = srv.client.get("/agents/runs").json()["runs"]
    assert [run["run_id"] for run in listed] == ids[:0:-1]  # the newest 50, newest first


@pytest.mark.parametrize(("params", "word"), [
    ({"state": "FINISHED"}, "state"), ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
    ({"limit": "ten"}, "limit"), ({"limit": "\u00b2"}, "limit"), ({"limit": "\u0663"}, "limit"),
    ({"user_id": "bob"}, "user_id"), ({"user_id": f"{uuid.uuid4()}\n"}, "user_id"), ({"before": "x"}, "before"),
    ({"before": str(uuid.uuid4())}, "before"),
])
def test_list_rejects_bad_query_with_400(server: ServerProcess, params: dict[str, str], word: str) -> None:
    response = server.client.get("/agents/runs", params=params)
    assert response.status_code == 400
    assert word in response.json()["detail"]


# --- retention -------------------------------------------------------------

def test_retention_drops_the_oldest_finished_runs(start_server) -> None:
    srv = start_server(RUN_RETENTION="3")
    ids = [srv.run_to_end("sleeper", seconds=0)["run_id"] for _ in range(5)]
    for dropped in ids[:2]:
        response = srv.client.get(f"/agents/status/{dropped}")
        assert response.status_code == 404
    for kept in ids[2:]:
        assert srv.client.get(f"/agents/status/{kept}").status_code == 200
    assert [run["run_id"] for run in srv.client.get("/agents/runs").json()["runs"]] == ids[:1:-1]


def test_retention_trim_keeps_pending_and_running_runs(backend: dict[str, str]) -> None:
    # Over HTTP a trim never meets a live run (one run at a time, trimmed when it finishes), so this
    # drives the store itself: two live runs older than every finished run, then a trim to 1.
    def new_run() -> Run:
        return Run.new(str(uuid.uuid4()), "sleeper", new_user(), {}, holder=None)

    pending, running, *finished = (new_run() for _ in range(5))

    async def scenario() -> tuple[list[bool], list[str]]:
        store: Backend
        if "DATABASE_URL" in backend:
            from service.backends.postgres import open_postgres
            store = open_postgres(backend["DATABASE_URL"], f"{backend['DATABASE_SCHEMA']}_trim", 30, 1, 2**30,
                                  logging.getLogger("test"))
        elif backend:
            from service.backends.redis import open_redis
            _, store = open_redis(backend["REDIS_URL"], f"{backend['REDIS_PREFIX']}-trim", 30, 1, 2**30,
                                  logging.getLogger("test"))
        else:
            store = MemoryBackend(retention=1)
        await store.start()
        try:
            await store.add(pending)
            await store.add(running)
            running.update(state="RUNNING", started_at=utc_now())
            await store.save(running)
            for run in finished:
                await store.add(run)
                run.update(state="DONE", finished_at=utc_now())
                await store.save(run)
            present = [await store.get(run.run_id) is not None for run in (pending, running, *finished)]
            return present, [run.run_id for run in await store.list(Page(10))]
        finally:
            await store.close()

    present, listed = asyncio.run(scenario())
    assert present == [True, True, False, False, True]
    assert listed == [finished[-1].run_id, running.run_id, pending.run_id]


# --- progress --------------------------------------------------------------

def test_progress_is_visible_while_running(server: ServerProcess) -> None:
    run_id = server.start_run("sleeper", seconds=1.0)
    deadline = time.monotonic() + 5
    seen = set()
    while time.monotonic() < deadline:
        run = server.client.get(f"/agents/status/{run_id}").json()
        if run["state"] == "RUNNING":
            seen.add(run["progress"])
        if run["state"] == "DONE":
            break
    assert 0.5 in seen
    assert run["progress"] == 1.0


# --- auth ------------------------------------------------------------------

TOKEN = "s3cret-token-value-42"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, backend: dict[str, str]) -> ServerProcess:
    own_prefix = own_namespace(backend)  # not the module server's
    srv = ServerProcess(tmp_path_factory.mktemp("auth") / "server.log", API_TOKEN=TOKEN, **{**backend, **own_prefix})
    yield srv
    srv.stop(signal.SIGKILL)


UNKNOWN_RUN = "5f0c2b1e-8d3a-4c6e-9b7f-1a2d3e4f5a6b"  # fixed, so the test ids are the same in every collection
PROTECTED = [("GET", "/agents"), ("POST", "/agents/run"), ("GET", f"/agents/status/{UNKNOWN_RUN}"),
             ("GET", "/agents/runs"), ("POST", f"/agents/cancel/{UNKNOWN_RUN}")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"])
def test_protected_paths_need_the_bearer_token(token_server: ServerProcess, method: str, path: str,
                                               authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.request(method, token_server.url + path, headers=headers, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]


def test_open_paths_need_no_token(token_server: ServerProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.yaml", "/openapi.json", "/"):
        assert httpx.get(token_server.url + path).status_code == 200, path


def test_token_lets_a_run_through_and_never_appears_in_logs(token_server: ServerProcess) -> None:
    client = httpx.Client(base_url=token_server.url, headers={"authorization": f"Bearer {TOKEN}"})
    assert client.get("/agents").status_code == 200
    response = client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user(),
                                                "input": {"seconds": 0}})
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    assert client.get(f"/agents/status/{run_id}", params={"wait": 10}).json()["state"] == "DONE"
    assert client.get("/agents/runs").status_code == 200
    httpx.get(token_server.url + "/agents", headers={"authorization": "Bearer wrong-" + TOKEN})
    token_server.wait_for_event("http_request", path="/agents", status=401)
    assert TOKEN not in token_server.log_path.read_text()


# --- metrics ---------------------------------------------------------------

def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return 0.0


def test_metrics_count_runs_rejections_durations_and_requests(start_server) -> None:
    srv = start_server()
    srv.run_to_end("sleeper", seconds=0)
    srv.run_to_end("sleeper", seconds=0)
    srv.run_to_end("failing")
    running = srv.start_run("hanging")
    srv.wait_state(running, "RUNNING")
    assert srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()}).status_code == 409
    text = srv.client.get("/metrics").text
    assert metric(text, "agent_runner_running") == 1
    srv.client.post(f"/agents/cancel/{running}")
    response = srv.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "agent_runner_runs_total", agent_type="sleeper", state="DONE") == 2
    assert metric(text, "agent_runner_runs_total", agent_type="failing", state="ERROR") == 1
    assert metric(text, "agent_runner_runs_total", agent_type="hanging", state="CANCELLED") == 1
    assert metric(text, "agent_runner_rejected_total") == 1
    assert metric(text, "agent_runner_running") == 0
    assert metric(text, "agent_runner_run_duration_seconds_count", agent_type="sleeper") == 2
    assert metric(text, "agent_runner_http_requests_total", method="POST", route="/agents/run", status="409") == 1
    assert metric(text, "agent_runner_http_requests_total", method="GET",
                  route="/agents/status/{run_id}", status="200") >= 4
    assert "/agents/status/" + running not in text  # the route template, never the raw path


def test_metrics_include_the_standard_process_and_python_series(server: ServerProcess) -> None:
    text = server.client.get("/metrics").text
    assert metric(text, "process_resident_memory_bytes") > 10e6
    assert metric(text, "process_cpu_seconds_total") > 0
    assert metric(text, "process_open_fds") > 0
    assert metric(text, "python_info", implementation="CPython") == 1
    assert re.search(r"^python_gc_objects_collected_total\{generation=\"0\"\} \d", text, re.M)


def test_the_first_scrape_declares_every_series_and_shows_the_unlabelled_ones(start_server) -> None:
    srv = start_server()
    text = srv.client.get("/metrics").text  # prometheus_client is imported by this first scrape
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert {name: kind for name, kind in types.items() if name.startswith("agent_runner_")} == {
        "agent_runner_runs_total": "counter", "agent_runner_rejected_total": "counter",
        "agent_runner_run_duration_seconds": "histogram", "agent_runner_running": "gauge",
        "agent_runner_queue_depth": "gauge", "agent_runner_queue_wait_seconds": "histogram",
        "agent_runner_webhook_attempts_total": "counter", "agent_runner_webhooks_undelivered_total": "counter",
        "agent_runner_event_streams": "gauge", "agent_runner_event_streams_dropped_total": "counter",
        "agent_runner_http_requests_total": "counter", "agent_runner_http_request_duration_seconds": "histogram",
        "agent_runner_build_info": "gauge"}
    assert list(types).index("process_cpu_seconds_total") < list(types).index("agent_runner_runs_total")
    for line in ("agent_runner_rejected_total 0.0", "agent_runner_running 0.0", "agent_runner_queue_depth 0.0",
                 'agent_runner_queue_wait_seconds_bucket{le="0.01"} 0.0',
                 'agent_runner_queue_wait_seconds_bucket{le="+Inf"} 0.0', "agent_runner_queue_wait_seconds_count 0.0",
                 "agent_runner_queue_wait_seconds_sum 0.0", "agent_runner_webhooks_undelivered_total 0.0",
                 "agent_runner_event_streams 0.0", "agent_runner_event_streams_dropped_total 0.0"):
        assert line in text.splitlines(), line
    assert "_created" not in text
    srv.run_to_end("sleeper", seconds=0)
    buckets = re.findall(r'^agent_runner_run_duration_seconds_bucket\{agent_type="sleeper",le="([^"]+)"\} (\S+)$',
                         srv.client.get("/metrics").text, re.M)
    assert [le for le, _ in buckets] == ["0.01", "0.05", "0.1", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0",
                                         "120.0", "300.0", "600.0", "+Inf"]
    assert buckets[-1][1] == "1.0" and all(float(count) <= 1 for _, count in buckets)


# --- readiness and graceful shutdown --------------------------------------

def test_readyz_is_ready_while_accepting(server: ServerProcess) -> None:
    response = server.client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready"}


def test_sigterm_drains_the_running_run_then_exits_0(start_server) -> None:
    srv = start_server(SHUTDOWN_GRACE_SECONDS="10")
    run_id = srv.start_run("sleeper", seconds=1.5)
    srv.wait_state(run_id, "RUNNING")
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for_event("shutdown_started")
    ready = srv.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["detail"]
    refused = srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()})
    assert refused.status_code == 503 and refused.json() == {"detail": "Shutting down"}
    assert srv.client.get("/healthz").status_code == 200
    assert srv.client.get(f"/agents/status/{run_id}", params={"wait": 10}).json()["state"] == "DONE"
    assert srv.proc.wait(20) == 0
    events = [line["event"] for line in srv.log_lines()]
    assert "agent_complete" in events
    assert events.index("agent_complete") < len(events) - 1
    assert srv.wait_for_event("agent_complete", run_id=run_id)


def test_sigterm_past_the_grace_interrupts_the_run_as_error(start_server) -> None:
    srv = start_server(SHUTDOWN_GRACE_SECONDS="0.5")
    run_id = srv.start_run("hanging")
    srv.wait_state(run_id, "RUNNING")
    waiter: dict[str, dict] = {}
    poll = threading.Thread(target=lambda: waiter.setdefault(
        "run", srv.client.get(f"/agents/status/{run_id}", params={"wait": 20}).json()))
    poll.start()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    poll.join(5)
    line = srv.wait_for_event("run_interrupted", run_id=run_id)
    assert line["level"] == "error" and line["state"] == "ERROR"
    assert waiter["run"]["state"] == "ERROR"
    assert waiter["run"]["error"] == "Run interrupted by shutdown"


def test_sigint_also_drains(start_server) -> None:
    srv = start_server(SHUTDOWN_GRACE_SECONDS="10")
    run_id = srv.start_run("sleeper", seconds=0.5)
    srv.wait_state(run_id, "RUNNING")
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(20) == 0
    assert srv.wait_for_event("agent_complete", run_id=run_id)


def test_second_signal_stops_at_once(start_server) -> None:
    srv = start_server(SHUTDOWN_GRACE_SECONDS="60")
    run_id = srv.start_run("hanging")
    srv.wait_state(run_id, "RUNNING")
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for_event("shutdown_started")  # draining: the first signal alone would wait up to 60 s
    second = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(10)
    assert time.monotonic() - second < 3


def test_cancel_status_and_list_keep_working_while_draining(start_server) -> None:
    srv = start_server(SHUTDOWN_GRACE_SECONDS="60")
    run_id = srv.start_run("hanging")
    srv.wait_state(run_id, "RUNNING")
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for_event("shutdown_started")
    assert srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()}).status_code == 503
    status = srv.client.get(f"/agents/status/{run_id}")
    assert status.status_code == 200 and status.json()["state"] == "RUNNING"
    waited = srv.client.get(f"/agents/status/{run_id}", params={"wait": 0.2})
    assert waited.status_code == 200 and waited.json()["state"] == "RUNNING"
    assert [run["run_id"] for run in srv.client.get("/agents/runs", params={"limit": 1}).json()["runs"]] == [run_id]
    cancelled = srv.client.post(f"/agents/cancel/{run_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    assert srv.proc.wait(10) == 0  # nothing left to drain: it exits long before the grace is over


def test_shutdown_with_an_agent_that_ignores_cancellation_records_error_and_exits_0(start_server) -> None:
    # Both modes; tests/test_guarantee.py also checks, in Redis mode, that no other replica gets the lock meanwhile.
    srv = start_server(SHUTDOWN_GRACE_SECONDS="0.5")
    run_id = srv.start_run("stubborn", hold=120)
    srv.wait_state(run_id, "RUNNING")
    waiter: dict[str, httpx.Response] = {}
    poll = threading.Thread(target=lambda: waiter.setdefault(
        "reply", srv.client.get(f"/agents/status/{run_id}", params={"wait": 30})))
    poll.start()
    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert time.monotonic() - signalled < 15  # the grace, then a few seconds for the agent: not its 120 s
    poll.join(5)
    run = waiter["reply"].json()
    assert run["state"] == "ERROR" and run["error"] == "Run interrupted by shutdown; the agent did not stop", run
    line = srv.wait_for_event("run_interrupted", run_id=run_id)
    assert line["level"] == "error" and line["state"] == "ERROR"
    assert line["error"] == "Run interrupted by shutdown; the agent did not stop"
    # It was cancelled and kept going: its code never stopped before the process exited, which it said.
    assert srv.wait_for_event("cancel_ignored", run_id=run_id)
    assert not [line for line in srv.events("stubborn_stopped") if line["run_id"] == run_id]
    exiting = srv.events("exit_with_agent_running")
    assert [line["run_id"] for line in exiting] == [run_id] and exiting[0]["level"] == "error", exiting
    assert log_time(line) <= log_time(exiting[0])


def test_a_cancel_heard_before_its_run_starts_here_stops_the_run_as_it_starts() -> None:
    """A take's answer and the message of a cancel asked right after it race on two connections: the message may be
    heard first, while the run is not this process's yet. The runner remembers it, and the run stops as it starts
    (else it would run until its next lease renewal read the flag)."""
    import asyncio

    import agents
    from service.backends.memory import MemoryBackend
    from service.backends.records import Run
    from service.events import EventHub
    from service.runs import Runner

    async def scenario() -> Run:
        backend = MemoryBackend(retention=10, slots=1)
        runner = Runner(backend, EventHub())
        run = Run.new(str(uuid.uuid4()), "policy-checker", str(uuid.uuid4()), {}, holder=None)
        assert runner.request_stop(run.run_id, by="the-interrupting-run") is False  # not running here (yet)
        assert await backend.admit(run, "reject", 10) == "started"
        active = runner.start(run, agents.registry["policy-checker"], {}, waited=True)
        assert active.driver is not None
        await asyncio.wait_for(active.driver, 10)
        return run

    run = asyncio.run(scenario())
    assert (run.state, run.cancelled_by) == ("CANCELLED", "the-interrupting-run")
