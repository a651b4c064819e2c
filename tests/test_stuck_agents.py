"""Agent code that will not stop: the last resorts docs/agents.md promises (issue 11, items 1 and 2).

A thread that never returns keeps the lock for as long as its process lives;
in Redis mode, a lock that can no longer be renewed while such code runs ends
the process with status 70. Agents come from fixture_resource_agents: the
``thread-worker`` with ``seconds=3600`` sits in ``asyncio.to_thread`` and never
looks at ``self.stopping``.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import RedisServer, ServerProcess, log_time, new_user, wait_until

AGENTS = "fixture_agents,fixture_resource_agents"
FOREVER = 3600  # seconds: longer than any test's server lives


def ledger_lines(ledger: Path, run_id: str) -> list[str]:
    """What the agent's own thread wrote: "start" when it began using the resource, "end" when it stopped."""
    if not ledger.exists():
        return []
    return [line.split()[0] for line in ledger.read_text().splitlines() if line.split()[1] == run_id]


def post(srv: ServerProcess, agent_type: str, **input) -> httpx.Response:
    return srv.client.post("/agents/run", json={"agent_type": agent_type, "user_id": new_user(), "input": input})


def start_stuck_thread(srv: ServerProcess, ledger: Path) -> str:
    response = post(srv, "thread-worker", ledger=str(ledger), seconds=FOREVER)
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    wait_until(lambda: ledger_lines(ledger, run_id) == ["start"], 10, "the thread to start")
    return run_id


# --- Redis mode: the lock cannot be renewed and the agent's code goes on: exit 70 --------------------------------

@pytest.mark.parametrize("cancelled_first", [False, True], ids=["running", "cancelled-first"])
def test_lock_expiring_under_a_thread_that_ignores_the_stop_exits_70(own_redis: RedisServer, tmp_path: Path,
                                                                     cancelled_first: bool) -> None:
    """With ``cancelled_first`` the run is already stopping (cancel answered 202) when renewals start failing:
    the lock loss is logged once all the same, not at every failed renewal until the exit."""
    ttl = 1.0
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=own_redis.url, REDIS_PREFIX="expire",
                        AGENT_MODULES=AGENTS, LOCK_TTL_SECONDS=f"{ttl:g}")
    ledger = tmp_path / "ledger"
    try:
        run_id = start_stuck_thread(srv, ledger)
        srv.wait_state(run_id, "RUNNING")
        if cancelled_first:
            assert srv.client.post(f"/agents/cancel/{run_id}").status_code == 202  # the thread goes on
        own_redis.command("CONFIG", "SET", "min-replicas-to-write", "1")  # every write, renewals too: NOREPLICAS
        refused_at = time.time()
        assert srv.proc.wait(10) == 70
    finally:
        own_redis.command("CONFIG", "SET", "min-replicas-to-write", "0")
        srv.stop(signal.SIGKILL)
    expired = srv.events("lock_expired_agent_running")
    assert len(expired) == 1, srv.log_path.read_text()
    line = expired[0]
    assert line["level"] == "critical" and line["run_id"] == run_id and line["agent_type"] == "thread-worker"
    assert line["detail"] == "the agent did not stop before its lock expired; exiting"
    # First the agent was asked to stop (half the TTL without a renewal); it went on, and the whole TTL passed.
    (lost,) = srv.events("lock_lost")
    assert lost["run_id"] == run_id and log_time(lost) <= log_time(line)
    assert refused_at + ttl / 2 <= log_time(line) < refused_at + ttl + 2.5, (refused_at, line["timestamp"])
    assert ledger_lines(ledger, run_id) == ["start"]  # the thread was still using the resource when the process went
    assert not srv.events("run_start_failed") and not srv.events("agent_error")


# --- both modes: a thread that never returns holds the lock for the life of the process ---------------------------

def test_a_thread_that_never_returns_holds_the_lock_for_the_life_of_the_process(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """docs/agents.md: every later POST gets 409, the run stays RUNNING (cancel answers 202) and
    ``agent_still_running`` is logged every 10 s; only a restart frees it (Redis: once the lock's TTL passes).

    Both modes in one test, side by side: most of it is waiting for the 10 s log line.
    """
    env = {"AGENT_MODULES": AGENTS, "RUN_TIMEOUT_SECONDS": "0.5"}
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    redis_env = {**env, "REDIS_URL": redis_server.url, "REDIS_PREFIX": prefix, "LOCK_TTL_SECONDS": "2"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # a second Redis replica on the same prefix: other
        starting = [pool.submit(ServerProcess, tmp_path / f"{name}.log", **server_env)
                    for name, server_env in (("memory", env), ("holder", redis_env), ("other", redis_env))]
    started = [future.result() for future in starting if future.exception() is None]
    try:
        assert len(started) == 3, [future.exception() for future in starting]
        memory, holder, other = started
        runs = {"memory": (memory, memory, start_stuck_thread(memory, tmp_path / "memory-ledger")),
                # in Redis mode the cancel goes through the other replica, and every POST is tried at both
                "redis": (holder, other, start_stuck_thread(holder, tmp_path / "redis-ledger"))}

        def held(mode: str) -> None:
            srv, via, run_id = runs[mode]
            for replica in {srv, via}:
                response = post(replica, "sleeper", seconds=0)
                assert response.status_code == 409, (mode, response.text)
                assert response.json() == {"detail": "An agent is already running, please retry later"}
            run = via.client.get(f"/agents/status/{run_id}").json()
            assert run["state"] == "RUNNING", (mode, run)

        for mode in runs:
            held(mode)
        time.sleep(0.6)  # past the run's timeout (0.5 s): the agent has been asked to stop
        for mode in runs:
            held(mode)

        cancels: dict[str, httpx.Response] = {}
        threads = [threading.Thread(target=lambda m=mode, via=via, run_id=run_id: cancels.setdefault(
            m, via.client.post(f"/agents/cancel/{run_id}"))) for mode, (_, via, run_id) in runs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        for mode, (_, _, run_id) in runs.items():
            assert cancels[mode].status_code == 202, (mode, cancels[mode].text)
            assert cancels[mode].json()["state"] == "RUNNING", (mode, cancels[mode].text)
            held(mode)

        for mode, (srv, _, run_id) in runs.items():
            line = srv.wait_for_event("agent_still_running", timeout=12, run_id=run_id)
            run = srv.client.get(f"/agents/status/{run_id}").json()
            stopped_at = log_time({"timestamp": run["started_at"]}) + 0.5  # the timeout asked it to stop
            assert 9 <= log_time(line) - stopped_at < 12, (mode, line, run)
            assert line["level"] == "warning" and line["waited_s"] == 10, (mode, line)
            assert line["stop_reason"] == "timeout" and line["threads"] == 1, (mode, line)
            assert len([x for x in srv.events("agent_still_running") if x["run_id"] == run_id]) == 1, mode
            held(mode)
        assert ledger_lines(tmp_path / "memory-ledger", runs["memory"][2]) == ["start"]
        assert ledger_lines(tmp_path / "redis-ledger", runs["redis"][2]) == ["start"]

        # Redis mode: a restart frees it, once the lock's TTL has passed without the holder renewing it.
        holder.stop(signal.SIGKILL)
        killed = time.monotonic()
        first = post(other, "sleeper", seconds=0)
        assert first.status_code == 409, first.text  # the lock was renewed until the kill: it is still there
        response = wait_until(lambda: (r := post(other, "sleeper", seconds=0)).status_code == 202 and r, 10,
                              "the lock to expire")
        assert time.monotonic() - killed < 2 + 3
        other.wait_run(response.json()["run_id"])
        orphan = other.client.get(f"/agents/status/{runs['redis'][2]}").json()
        assert orphan["state"] == "ERROR" and orphan["error"].startswith("Runner lost"), orphan
    finally:
        for srv in started:
            srv.stop(signal.SIGKILL)
