"""The single-run guarantee under the ways a review found around it (issue 11), each in both modes where it applies.

Agents from fixture_resource_agents write start/end lines to a ledger file
from their own code; ``uses`` turns it into intervals of real resource use.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RedisServer, ServerProcess, log_time, new_user, wait_until
from redis_proxy import RedisProxy

AGENTS = "fixture_agents,fixture_resource_agents"


def uses(ledger: Path) -> dict[str, list[float]]:
    """run_id -> [start, end] (end missing while the resource is still in use)."""
    spans: dict[str, list[float]] = {}
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            what, run_id, when, _pid, *_token = line.split()
            spans.setdefault(run_id, []).append(float(when))
    return spans


def post(srv: ServerProcess, agent_type: str, **input) -> httpx.Response:
    return srv.client.post("/agents/run", json={"agent_type": agent_type, "user_id": new_user(), "input": input})


@pytest.fixture
def redis_servers(tmp_path: Path):
    """Factory: server processes in Redis mode on a given Redis URL and prefix, killed after the test."""
    started: list[ServerProcess] = []

    def start(url: str, prefix: str, **env: str) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"replica-{len(started)}.log", REDIS_URL=url, REDIS_PREFIX=prefix,
                            AGENT_MODULES=AGENTS, **env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(signal.SIGKILL)


# --- 1. executor work outlives cancel and timeout ----------------------------------------------------------------

def test_cancel_keeps_the_lock_until_the_agents_thread_returns(start_server, tmp_path: Path) -> None:
    srv = start_server(AGENT_MODULES=AGENTS)
    ledger = tmp_path / "ledger"
    run_id = post(srv, "thread-worker", ledger=str(ledger), seconds=2).json()["run_id"]
    wait_until(lambda: run_id in uses(ledger), 10, "the thread to start")
    answer: dict[str, httpx.Response] = {}
    cancel = threading.Thread(target=lambda: answer.setdefault("r", srv.client.post(f"/agents/cancel/{run_id}")))
    cancel.start()
    refused = 0
    while len(uses(ledger)[run_id]) < 2:  # the thread still uses the resource
        response = post(srv, "sleeper", seconds=0)
        state = srv.client.get(f"/agents/status/{run_id}").json()["state"]
        if len(uses(ledger)[run_id]) < 2:  # read after both answers: the thread was still using it when they came
            assert response.status_code == 409, response.text
            assert state == "RUNNING"
            refused += 1
        time.sleep(0.05)
    cancel.join(15)
    assert refused >= 5
    assert answer["r"].status_code == 200 and answer["r"].json()["state"] == "CANCELLED"
    srv.wait_run(srv.start_run("sleeper", seconds=0))


def test_timeout_waits_for_executor_work_before_the_next_run_starts(start_server, tmp_path: Path) -> None:
    srv = start_server(AGENT_MODULES=AGENTS, RUN_TIMEOUT_SECONDS="0.3")
    ledger = tmp_path / "ledger"
    first = post(srv, "thread-worker", ledger=str(ledger), seconds=1.5, executor=True).json()["run_id"]
    run = srv.wait_run(first)
    assert run["state"] == "ERROR" and run["error"] == "Run timed out after 0.3 seconds"
    second = srv.wait_run(post(srv, "thread-worker", ledger=str(ledger), seconds=0.1).json()["run_id"])
    assert second["state"] == "DONE"
    spans = uses(ledger)
    assert spans[second["run_id"]][0] >= spans[first][1], spans  # the second started after the first's thread


def test_an_agents_thread_sees_the_stop_through_self_stopping(start_server, tmp_path: Path) -> None:
    srv = start_server(AGENT_MODULES=AGENTS)
    ledger = tmp_path / "ledger"
    run_id = post(srv, "thread-worker", ledger=str(ledger), seconds=60, cooperative=True).json()["run_id"]
    wait_until(lambda: run_id in uses(ledger), 10, "the thread to start")
    started = time.monotonic()
    response = srv.client.post(f"/agents/cancel/{run_id}")
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED"
    assert time.monotonic() - started < 3
    assert len(uses(ledger)[run_id]) == 2


# --- 2. error replies while renewing (Redis) ----------------------------------------------------------------------

def test_redis_refusing_writes_stops_the_agent_before_the_lock_expires(redis_servers, own_redis: RedisServer,
                                                                       tmp_path: Path) -> None:
    srv = redis_servers(own_redis.url, "refuse", LOCK_TTL_SECONDS="2")
    ledger = tmp_path / "ledger"
    run_id = post(srv, "coroutine-worker", ledger=str(ledger), seconds=30).json()["run_id"]
    srv.wait_state(run_id, "RUNNING")
    own_redis.command("CONFIG", "SET", "min-replicas-to-write", "1")  # every write: NOREPLICAS
    refused_at = time.time()
    try:
        response = post(srv, "sleeper", seconds=0)
        assert response.status_code == 503 and response.json() == {"detail": "Run store unavailable"}
        line = srv.wait_for_event("lock_lost", timeout=5, run_id=run_id)
        assert line["level"] == "error"
        wait_until(lambda: len(uses(ledger)[run_id]) == 2, 5, "the agent to stop")
        assert uses(ledger)[run_id][1] < refused_at + 2  # stopped before the lock could expire
    finally:
        own_redis.command("CONFIG", "SET", "min-replicas-to-write", "0")
    run = srv.wait_run(run_id)
    assert run["state"] == "ERROR" and run["error"] == "Run stopped: lock lost"


# --- 3. shutdown with an agent that ignores cancellation (Redis) ---------------------------------------------------

def test_shutdown_keeps_the_lock_while_a_stubborn_agent_runs(redis_servers, redis_server: RedisServer,
                                                              tmp_path: Path) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    holder = redis_servers(redis_server.url, prefix, LOCK_TTL_SECONDS="1.5", SHUTDOWN_GRACE_SECONDS="0.2")
    other = redis_servers(redis_server.url, prefix, LOCK_TTL_SECONDS="1.5")
    ledger = tmp_path / "ledger"
    run_id = post(holder, "coroutine-worker", ledger=str(ledger), seconds=30, stubborn=True).json()["run_id"]
    holder.wait_state(run_id, "RUNNING")
    holder.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 25
    while True:
        assert time.monotonic() < deadline, "the other replica never got the lock"
        alive = holder.proc.poll() is None
        response = post(other, "sleeper", seconds=0)
        if response.status_code == 202:
            assert not alive, "another run was admitted while the stubborn agent's process was alive"
            break
        assert response.status_code == 409, response.text
        time.sleep(0.05)
    assert holder.proc.wait(5) == 0
    run = other.wait_run(run_id)
    assert run["state"] == "ERROR" and run["error"] == "Run interrupted by shutdown; the agent did not stop"
    exiting = holder.events("exit_with_agent_running")
    assert [line["run_id"] for line in exiting] == [run_id] and exiting[0]["level"] == "error", exiting
    assert log_time(holder.wait_for_event("run_interrupted", run_id=run_id)) <= log_time(exiting[0])


# --- 4. a terminal write lost in flight (Redis) --------------------------------------------------------------------

def test_a_lost_terminal_write_is_retried_with_the_lock_release(redis_servers, redis_server: RedisServer) -> None:
    proxy = RedisProxy(redis_server.port)
    try:
        srv = redis_servers(proxy.url, f"test-{uuid.uuid4().hex[:8]}")
        proxy.drop(lambda chunk: b'"state":"DONE"' in chunk, times=5)
        run = srv.wait_run(srv.start_run("sleeper", seconds=0.1))
        assert run["state"] == "DONE" and proxy.dropped == 5
        response = post(srv, "sleeper", seconds=0)  # seen DONE: the lock must be free at once
        assert response.status_code == 202, response.text
        srv.wait_run(response.json()["run_id"])
    finally:
        proxy.close()


# --- 5. a POST admitted while shutdown starts (Redis, slow acquire) -------------------------------------------------

def test_a_post_admitted_as_shutdown_starts_gets_the_grace(redis_servers, redis_server: RedisServer) -> None:
    """SIGTERM arrives while the POST's admission is in Redis (held 0.5 s by the proxy): past the draining check,
    so the drain waits for it and the run gets 202 and the grace (a 503 would be a run refused after the check)."""
    proxy = RedisProxy(redis_server.port)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    signalled = threading.Event()

    def terminate() -> None:
        srv.proc.send_signal(signal.SIGTERM)
        signalled.set()

    try:
        srv = redis_servers(proxy.url, prefix, SHUTDOWN_GRACE_SECONDS="10")
        proxy.hold(lambda chunk: b":runs" in chunk and b":lock" in chunk, 0.5, terminate)  # the admit script
        response = post(srv, "sleeper", seconds=0.2)
        assert signalled.is_set(), "the admission never reached Redis"
        assert srv.proc.wait(20) == 0
    finally:
        proxy.close()
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    assert json.loads(redis_server.command("GET", f"{prefix}:run:{run_id}"))["state"] == "DONE"
    assert redis_server.command("ZRANGE", f"{prefix}:runs", "0", "-1") == [run_id.encode()]  # the only run
    assert srv.wait_for_event("shutdown_started")["active_run_ids"] == [run_id]
    assert srv.wait_for_event("agent_complete", run_id=run_id)["state"] == "DONE"


# --- 6. records written by another version (Redis) -----------------------------------------------------------------

def test_records_from_another_version_do_not_break_other_runs(redis_servers, redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    newer, broken = str(uuid.uuid4()), str(uuid.uuid4())
    record = {"run_id": newer, "agent_type": "sleeper", "user_id": new_user(), "input": {}, "state": "RUNNING",
              "result": None, "error": None, "progress": None, "created_at": "2026-11-25T00:00:00.000Z",
              "started_at": None, "finished_at": None, "priority": 7}  # a field this version does not know
    redis_server.command("SET", f"{prefix}:run:{newer}", json.dumps(record))
    redis_server.command("SET", f"{prefix}:run:{broken}", b"\xff not json")
    redis_server.command("ZADD", f"{prefix}:runs", "1", newer, "2", broken)
    redis_server.command("HSET", f"{prefix}:unfinished", newer, "gone-token", broken, "gone-token")
    srv = redis_servers(redis_server.url, prefix)
    run = srv.run_to_end("sleeper", seconds=0)
    assert run["state"] == "DONE", run
    for _ in range(2):
        listed = srv.client.get("/agents/runs")
        assert listed.status_code == 200
        ids = [item["run_id"] for item in listed.json()["runs"]]
        assert newer in ids and broken not in ids
    orphan = srv.client.get(f"/agents/status/{newer}").json()
    assert orphan["state"] == "ERROR" and orphan["error"].startswith("Runner lost")
    assert srv.client.get(f"/agents/status/{broken}").status_code == 404
    invalid = srv.events("run_record_invalid")
    assert [line["key"] for line in invalid] == [f"{prefix}:run:{broken}"]


# --- 9. a store blip at run start (Redis) ---------------------------------------------------------------------------

def test_a_blip_at_run_start_is_retried_and_never_leaks_addresses(redis_servers, redis_server: RedisServer) -> None:
    proxy = RedisProxy(redis_server.port)
    try:
        srv = redis_servers(proxy.url, f"test-{uuid.uuid4().hex[:8]}")
        proxy.drop(lambda chunk: b'"state":"RUNNING"' in chunk, times=4)
        run = srv.run_to_end("sleeper", seconds=0)
        assert proxy.dropped == 4
        assert run["state"] == "DONE", run
    finally:
        proxy.close()


def test_a_store_away_past_the_retry_window_at_run_start_ends_the_run_with_a_generic_error(
        redis_servers, redis_server: RedisServer) -> None:
    """The store goes away (connections refused) as the run is recorded RUNNING and stays away until the
    service gives up: the run ends ERROR with a generic error; the address is only in the log's detail."""
    proxies = [RedisProxy(redis_server.port)]
    port = proxies[0].port
    try:
        srv = redis_servers(proxies[0].url, f"test-{uuid.uuid4().hex[:8]}", LOCK_TTL_SECONDS="2")

        def go_away(chunk: bytes) -> bool:
            if b'"state":"RUNNING"' not in chunk:
                return False
            proxies[0].close()  # from now on every connection is refused
            return True

        proxies[0].drop(go_away, times=1)
        run_id = srv.start_run("sleeper", seconds=0)
        failed = srv.wait_for_event("run_start_failed", timeout=15, run_id=run_id)
        proxies.append(RedisProxy(redis_server.port, port=port))  # back, so the terminal state can be stored
        run = srv.wait_run(run_id)
    finally:
        for proxy in proxies:
            proxy.close()
    assert failed["level"] == "error" and "Connection refused" in failed["detail"], failed
    assert f"127.0.0.1:{port}" in failed["detail"], failed  # the detail names the address...
    assert run["state"] == "ERROR" and run["error"] == "Run store unavailable when the run started", run
    for leak in (str(port), "127.0.0.1", "111", "Connection refused", "Redis"):  # ...and the run's error does not
        assert leak not in run["error"], (leak, run)
    shown = json.dumps(run)  # nor any other field of the run
    assert f"127.0.0.1:{port}" not in shown and "Connection refused" not in shown, run
    line = srv.wait_for_event("agent_error", run_id=run_id)
    assert line["error"] == "Run store unavailable when the run started"


def test_a_running_write_lost_past_the_retry_window_ends_the_run_after_max_ttl_or_5_s(
        redis_servers, redis_server: RedisServer) -> None:
    """Only the RUNNING write is lost (the lock is renewed meanwhile): retried every 0.5 s for max(TTL, 5 s)."""
    proxy = RedisProxy(redis_server.port)
    given_up = threading.Event()
    try:
        srv = redis_servers(proxy.url, f"test-{uuid.uuid4().hex[:8]}", LOCK_TTL_SECONDS="1")
        proxy.drop(lambda chunk: b'"state":"RUNNING"' in chunk and not given_up.is_set(), times=1000)
        accepted = time.time()
        run_id = srv.start_run("sleeper", seconds=0)
        failed = srv.wait_for_event("run_start_failed", timeout=15, run_id=run_id)
        given_up.set()
        run = srv.wait_run(run_id)
    finally:
        proxy.close()
    assert 5 <= log_time(failed) - accepted < 8, failed  # the window: max(1 s, 5 s)
    assert proxy.dropped >= 8, proxy.dropped  # tried again and again (every 0.5 s, each with its client retries)
    assert failed["level"] == "error" and failed["detail"], failed
    assert run["state"] == "ERROR" and run["error"] == "Run store unavailable when the run started", run
    assert not srv.events("lock_lost")


# --- 11. memory bounded by bytes ------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


WIDE_INPUT = {"a": [{}] * 20000}  # ~60 KB of JSON, ~1.5 MiB as Python objects


def test_memory_of_retained_runs_is_bounded_by_run_retention_mb(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "server.log", RUN_RETENTION_MB="20")
    try:
        for _ in range(5):
            srv.wait_run(srv.start_run("sleeper", seconds=0, **WIDE_INPUT))
        before = rss_mb(srv.proc.pid)
        for _ in range(150):
            srv.wait_run(srv.start_run("sleeper", seconds=0, **WIDE_INPUT))
        grown = rss_mb(srv.proc.pid) - before
        assert grown < 60, f"RSS grew by {grown:.0f} MB"
    finally:
        srv.stop(signal.SIGKILL)


def test_redis_keeps_no_more_than_run_retention_mb(redis_servers, redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    srv = redis_servers(redis_server.url, prefix, RUN_RETENTION_MB="1")
    for _ in range(30):
        srv.wait_run(srv.start_run("sleeper", seconds=0, **WIDE_INPUT))  # ~120 KB each with its result
    kept = int(redis_server.command("ZCARD", f"{prefix}:finished"))
    assert 0 < kept <= 9, kept
    assert int(redis_server.command("GET", f"{prefix}:bytes")) <= 1024 * 1024


def test_list_body_stays_under_8_mib_and_pages_on(start_server) -> None:
    srv = start_server()
    ids = [srv.run_to_end("huge", bytes=950_000)["run_id"] for _ in range(10)]
    first = srv.client.get("/agents/runs", params={"limit": 50})
    assert first.status_code == 200 and len(first.content) <= 8 * 1024 * 1024
    page = [run["run_id"] for run in first.json()["runs"]]
    assert 0 < len(page) < 10
    rest = srv.client.get("/agents/runs", params={"limit": 50, "before": page[-1]}).json()["runs"]
    assert page + [run["run_id"] for run in rest][:10 - len(page)] == ids[::-1]


# --- a script that ran, whose reply was lost: redis-py sends it again with the same arguments -----------------

def script_client(redis_server: RedisServer):
    import redis
    return redis.Redis.from_url(redis_server.url, decode_responses=True)


def test_a_take_sent_again_after_its_reply_was_lost_answers_the_run_it_took(redis_server: RedisServer) -> None:
    """Otherwise the run taken first is lost (out of the queue, holding a slot nobody renews, never started) and
    the retry takes the next run under the same token, or none."""
    from service.backends.redis.scripts import TAKE_SCRIPT
    client = script_client(redis_server)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    take = client.register_script(TAKE_SCRIPT)
    keys = [f"{prefix}:queue", f"{prefix}:unfinished", f"{prefix}:lock", f"{prefix}:lock:1", f"{prefix}:generation",
            f"{prefix}:fence", f"{prefix}:fencing"]

    def take_as(token: str) -> list[Any]:
        return take(keys=keys, args=[token, 30000, 2, 0, "gen-2", 0, f"{prefix}:run:"])

    try:
        client.set(f"{prefix}:generation", "gen-1")  # as every replica writes it as it starts
        client.set(f"{prefix}:run:run-1", '{"run_id":"run-1","fencing_token":null}')
        client.rpush(f"{prefix}:queue", "run-1", "run-2")
        first = take_as("token-a")
        assert first[:4] == ["run-1", 0, "gen-1", 0] and first[4] > 0
        assert take_as("token-a") == first  # the retry: the same run, slot and token
        assert client.get(f"{prefix}:run:run-1") == '{"run_id":"run-1","fencing_token":%d}' % first[4]
        # the record as stored, one run waits, and no RUNNING event of it is in Redis (it has no stream)
        assert first[7:] == [client.get(f"{prefix}:run:run-1"), 1, None]
        assert client.lrange(f"{prefix}:queue", 0, -1) == ["run-2"] and client.get(f"{prefix}:lock:1") is None
        second = take_as("token-b")
        assert second[:4] == ["run-2", 1, "gen-1", 0] and second[4] > first[4]
        client.rpush(f"{prefix}:queue", "run-3")
        assert take_as("token-c") == ["", -1, "gen-1", 0]  # every slot held by others: nothing taken
        assert client.lrange(f"{prefix}:queue", 0, -1) == ["run-3"]
        client.delete(f"{prefix}:generation")  # without a free slot it does not look: a renewal or the next take will
        assert take_as("token-c") == ["", -1, "", 0] and client.get(f"{prefix}:fence") is None
        client.set(f"{prefix}:generation", "gen-1")
        retried = take_as("token-a")  # a retry of a take that holds its slot still answers it (again: no slot free)
        assert retried[:6] == first[:6] and retried[6:] == [0, first[7], 1, None]
    finally:
        client.close()


def test_a_handoff_sent_again_after_its_reply_was_lost_answers_the_run_it_took(redis_server: RedisServer) -> None:
    """The script that stores a run's end and takes the next run (HANDOFF_SCRIPT) run twice with the same arguments:
    the second answers the same end and the same run on the same slot and token, and takes nothing more."""
    import asyncio
    import logging

    from service.backends.redis import open_redis
    from service.backends.records import Run, utc_now

    async def scenario() -> tuple[list[Any], list[Any], list[str], bytes | None]:
        _, store = open_redis(redis_server.url, f"test-{uuid.uuid4().hex[:8]}", 30.0, 100, 1 << 30,
                              logging.getLogger("test"))
        await store.start()
        try:
            trace = f"00-{'a' * 32}-{'b' * 16}-01 {'c' * 16}"  # kept in the record, not shown to clients
            running, *waiting = (Run.new(str(uuid.uuid4()), "sleeper", new_user(), {}, holder=None, trace=trace)
                                 for _ in range(3))
            assert await store.admit(running, "enqueue", 10) == "started"
            for run in waiting:
                assert await store.admit(run, "enqueue", 10) == "queued"
                await store.client.xadd(store.key("events", "run", run.run_id),  # its accepted event, as sent
                                        {"k": "run", "r": run.run_id, "s": "PENDING", "d": run.json()})
            running.update(state="DONE", finished_at=utc_now())
            assert running.holder is not None
            store.event_transport(lambda frame: None)  # type: ignore[arg-type]  # its caps; never started
            _, keys, args = store._handoff_call(running, uuid.uuid4().hex, retry=False, append=True)
            first = await store._handoff(keys=keys, args=args)
            again = await store._handoff(keys=keys, args=args)
            queue = [member.decode() for member in await store.client.lrange(store.key("queue"), 0, -1)]
            events = await store.client.xrange(store.key("events"))
            assert [(fields[b"r"].decode(), fields[b"s"]) for _, fields in events] == [
                (running.run_id, b"DONE"), (first[1][0].decode(), b"RUNNING")]  # appended once, by the first
            assert [entry_id for entry_id, _ in events] == first[2] == again[2]  # both say they are in Redis
            assert await store.client.xlen(store.key("events", "run", running.run_id)) == 1
            # the record as stored, RUNNING, without its trace: what the runner would have sent
            assert b'"trace":"00-' in first[1][7] and b'"trace"' not in events[1][1][b"d"]
            assert events[1][1][b"d"] == first[1][7].replace(f',"trace":"{trace}"'.encode(), b"")
            assert events[0][1][b"d"] == running.json()
            return first, again, queue, await store.client.get(store.key("run", running.run_id))
        finally:
            await store.close()

    first, again, queue, ended = asyncio.run(scenario())
    # the same end counted once (finished runs, bytes, owed), the same run, slot, token; the retry's take also
    # tells the RUNNING event the first call appended
    assert first[0] == again[0] and first[1][:9] == again[1][:9] and first[2] == again[2]
    assert first[1][9] is None and again[1][9] == first[2][1]
    assert len(queue) == 1 and first[1][0].decode() not in queue
    assert ended is not None and b'"state":"DONE"' in ended
    assert b'"state":"RUNNING"' in first[1][7]


class Lossy:
    """A registered script whose next ``times`` calls run in Redis and then lose their reply (a ConnectionError, as
    redis-py raises once its resends failed too)."""

    def __init__(self, script: Any, times: int = 1) -> None:
        self.script, self.times = script, times

    async def __call__(self, **kwargs: Any) -> Any:
        import redis

        answer = await self.script(**kwargs)
        if self.times > 0:
            self.times -= 1
            raise redis.ConnectionError("reply lost")
        return answer


def handoff_scenario(redis_server: RedisServer, scenario: Any, retention: int = 100,
                     retention_bytes: int = 1 << 30) -> Any:
    """``scenario(store, runs)`` on a started Redis backend under a prefix of its own, with one run started and
    ``waiting`` queued behind it (each with its accepted event in its stream, as the hub sends it)."""
    import asyncio
    import logging

    from service.backends.redis import open_redis
    from service.backends.records import Run

    async def opened() -> Any:
        _, store = open_redis(redis_server.url, f"test-{uuid.uuid4().hex[:8]}", 30.0, retention, retention_bytes,
                              logging.getLogger("test"), slots=2)
        await store.start()
        store.event_transport(lambda frame: None)  # type: ignore[arg-type]  # its caps; never started
        try:
            runs = [Run.new(str(uuid.uuid4()), "sleeper", new_user(), {"i": i}, holder=None) for i in range(4)]
            for run in runs:
                await store.admit(run, "enqueue", 10)
                if run.queue_position is not None:
                    await store.client.xadd(store.key("events", "run", run.run_id),
                                            {"k": "run", "r": run.run_id, "s": "PENDING", "d": run.json()})
            return await scenario(store, runs)
        finally:
            await store.close()

    return asyncio.run(opened())


async def running_events(store: Any, run_id: str) -> list[bytes]:
    return [fields[b"s"] for _, fields in await store.client.xrange(store.key("events", "run", run_id))]


def test_a_failed_trim_after_a_handoff_still_answers_the_run_it_took(redis_server: RedisServer) -> None:
    """The trim after a terminal write is best effort; its failure (a raw redis-py error: a dropped connection, a
    failover's READONLY) must not cost the run the handoff took its start: it holds a slot and is stored RUNNING."""
    import redis

    from service.backends.records import utc_now

    tried: list[bool] = []

    async def scenario(store: Any, runs: list[Any]) -> Any:
        async def trim(**kwargs: Any) -> Any:
            tried.append(True)
            raise redis.ConnectionError("gone")

        store._trim = trim
        # more finished runs past retention than an end drops in its own step (two): the trim call is needed
        await store.client.zadd(store.key("finished"), {f"old-{i}": i for i in range(5)})
        runs[0].update(state="DONE", finished_at=utc_now())
        return await store.finish_and_take(runs[0]), runs

    taken, runs = handoff_scenario(redis_server, scenario, retention=0)
    assert tried == [True]
    assert taken is not None and taken.run_id == runs[2].run_id and taken.state == "RUNNING"


def test_a_terminal_write_at_full_retention_drops_the_oldest_run_in_its_own_step(redis_server: RedisServer) -> None:
    """Once retention is full (a service that has run for a while), every run's end drops the oldest finished run.
    It does so in the terminal write's own script, handoff or not: no trim call after it, so no second round trip
    before the next run starts. Whatever is dropped goes whole: record, size, log lines, event backlog."""
    from service.backends.records import utc_now

    async def scenario(store: Any, runs: list[Any]) -> Any:
        trims: list[Any] = []

        async def trim(**kwargs: Any) -> Any:
            trims.append(kwargs)
            return 0

        store._trim = trim
        kept, dropped_left = [], []
        finished: list[Any] = []
        for run in runs:  # 0 and 1 hold the two slots; 2 and 3 wait
            if run.queue_position is not None:
                continue
            run.update(state="DONE", finished_at=utc_now())
            await store.client.hset(store.key("logbytes"), run.run_id, 10)
            await store.client.rpush(store.key("log", run.run_id), "a line")
            taken = await store.finish_and_take(run)  # a handoff: 2, then 3
            finished.append(run)
            if taken is not None:
                taken.update(state="DONE", finished_at=utc_now())
                await store.save(taken, release=True)  # the runner's plain write, no queue left to take from
                finished.append(taken)
            kept.append(int(await store.client.zcard(store.key("finished"))))
        for run in finished[:-1]:
            dropped_left.append([key for key in (store.key("run", run.run_id), store.key("log", run.run_id),
                                                 store.key("events", "run", run.run_id))
                                 if await store.client.exists(key)]
                                + ([run.run_id] if await store.client.hexists(store.key("sizes"), run.run_id) else []))
        return trims, kept, dropped_left, await store.client.zrange(store.key("finished"), 0, -1)

    trims, kept, dropped_left, newest = handoff_scenario(redis_server, scenario, retention=1)
    assert trims == [] and kept == [1, 1], (trims, kept)
    assert dropped_left == [[], [], []], dropped_left
    assert len(newest) == 1


def test_a_handoff_and_a_dispatch_take_whose_replies_were_lost_each_answer_their_own_run(
        redis_server: RedisServer) -> None:
    """Two slots, runs 0 and 1 on them, 2 and 3 waiting. Dispatch's take of run 2 loses its reply; run 0 ends and its
    handoff takes run 3 and loses its reply too. Each retry answers its own run once (before, the two shared one
    token: the handoff answered dispatch's run, whose RUNNING event nobody sent, or dispatch answered the
    handoff's and sent RUNNING twice), and each run's RUNNING event is in its stream once."""
    from service.backends.records import utc_now

    async def scenario(store: Any, runs: list[Any]) -> Any:
        runs[1].update(state="DONE", finished_at=utc_now())
        await store.save(runs[1], release=True)  # its slot free for dispatch's take (no handoff: the runner's)
        take, handoff = store._take, store._handoff
        store._take, store._handoff = Lossy(take), Lossy(handoff)
        with pytest.raises(Exception):
            await store.take()
        runs[0].update(state="DONE", finished_at=utc_now())
        with pytest.raises(Exception):
            await store.finish_and_take(runs[0])
        assert await store.take() is not None  # dispatch asks again: its own run
        dispatched = store.appended_events, (await store.get(runs[2].run_id))
        handed = await store.finish_and_take(runs[0])  # the runner's retry of the end: the handoff's run
        return dispatched, handed, store.appended_events, [await running_events(store, run.run_id) for run in runs]

    (appended_before, dispatched), handed, appended, streams = handoff_scenario(redis_server, scenario)
    assert dispatched.state == "RUNNING" and handed is not None and handed.run_id != dispatched.run_id
    assert streams[2] == [b"PENDING"]  # dispatch's take appends no event: its runner sends RUNNING
    assert streams[3] == [b"PENDING", b"RUNNING"] and handed.run_id in appended  # the handoff's, once
    assert streams[0] == [b"DONE"]


def test_a_handoff_given_up_on_leaves_dispatch_the_run_it_took_with_its_running_event_told_appended(
        redis_server: RedisServer) -> None:
    """A handoff stores its end, takes run 2, appends both events, and its reply is lost; the store stays away past
    the runner's retries, which give up and release the slot. Dispatch's next take asks again with the handoff's
    token and answers run 2, stored RUNNING: it tells that run 2's RUNNING event is in Redis already, so the runner
    does not send it a second time."""
    from service.backends.records import utc_now

    async def scenario(store: Any, runs: list[Any]) -> Any:
        store._handoff = Lossy(store._handoff)
        runs[0].update(state="DONE", finished_at=utc_now())
        with pytest.raises(Exception):
            await store.finish_and_take(runs[0])
        await store.release(runs[0].holder)  # the runner gave up on the end (save_finished)
        taken = await store.take()
        return taken, store.appended_events, await running_events(store, runs[2].run_id)

    taken, appended, stream = handoff_scenario(redis_server, scenario)
    assert taken is not None and taken.state == "RUNNING"
    assert stream == [b"PENDING", b"RUNNING"]  # the handoff's append
    assert appended == {taken.run_id}


def test_a_handoff_retried_after_its_slot_expired_answers_its_run_as_stored(redis_server: RedisServer) -> None:
    """The handoff's reply is lost and its slot expires before the retry (a store away for a lock TTL): the retry
    takes a free slot for the same run and answers its record as stored, RUNNING, its input as the client sent it
    (not marked again: the record's own state is no longer PENDING, and an input can hold that text), with one
    RUNNING event."""
    import json as json_module

    from service.backends.records import Run, utc_now

    hostile = {"x": 0, "state": "PENDING", "result": None, "started_at": None, "queue_position": 1, "y": 0}

    async def scenario(store: Any, runs: list[Any]) -> Any:
        queued = Run.new(str(uuid.uuid4()), "sleeper", new_user(), hostile, holder=None)
        for run in runs[2:]:
            await store.dequeue(run.run_id, state="CANCELLED", finished_at=utc_now())
        assert await store.admit(queued, "enqueue", 10) == "queued"  # both slots held
        await store.client.xadd(store.key("events", "run", queued.run_id),
                                {"k": "run", "r": queued.run_id, "s": "PENDING", "d": queued.json()})
        store._handoff = Lossy(store._handoff)
        runs[0].update(state="DONE", finished_at=utc_now())
        with pytest.raises(Exception):
            await store.finish_and_take(runs[0])
        token = store._handoffs[runs[0].holder][0]
        for slot in store._lock.keys:  # the taken run's slot expired meanwhile
            if await store.client.get(slot) == token.encode():
                await store.client.delete(slot)
        taken = await store.finish_and_take(runs[0])
        stored = await store.get(queued.run_id)
        return taken, stored, await running_events(store, queued.run_id)

    taken, stored, events = handoff_scenario(redis_server, scenario)
    assert taken is not None and stored is not None and taken.run_id == stored.run_id
    assert json_module.loads(stored.input_json) == hostile and stored.state == "RUNNING"
    assert events == [b"PENDING", b"RUNNING"]


def test_orphans_claimed_again_after_the_reply_was_lost_are_answered_again(redis_server: RedisServer) -> None:
    """Otherwise the orphans left the unfinished index with the lost reply and stay RUNNING for ever."""
    from service.backends.redis.scripts import ORPHANS_SCRIPT
    client = script_client(redis_server)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    orphans = client.register_script(ORPHANS_SCRIPT)

    def claim(token: str, ttl_ms: int = 30000, *own: str) -> list[str]:
        keys = [f"{prefix}:unfinished", f"{prefix}:claim:{token}", f"{prefix}:lock", f"{prefix}:lock:1"]
        return orphans(keys=keys, args=[token, ttl_ms, f"{prefix}:claim:", *own])

    try:
        client.hset(f"{prefix}:unfinished", mapping={"dead-run": "dead-token", "live-run": "live-token",
                                                     "own-run": "own-token"})
        client.set(f"{prefix}:lock", "live-token")
        assert claim("claim-a", 30000, "own-token") == ["dead-run", "dead-token"]
        assert claim("claim-a", 30000, "own-token")[0] == "dead-run"  # the retry answers it again
        assert claim("claim-b", 30000, "own-token") == []  # claim-a is alive: nobody else takes it
        assert client.hget(f"{prefix}:unfinished", "dead-run") == "claim-a"
        client.delete(f"{prefix}:claim:claim-a")  # the claimer died before recording it: its claim expired
        assert claim("claim-c", 30000, "own-token") == ["dead-run", "claim-a"]
        assert claim("claim-d")[::2] == ["own-run"]  # a token only its own replica vouched for, seen by another
    finally:
        client.close()
