"""Fencing tokens and the lease an agent can check (issue 23): what holds even when the holder is paused.

Agents from fixture_resource_agents: ``fenced-writer`` writes to a SQLite row that keeps the highest token
(docs/agents.md's worked example), each write after ``ensure_lease()``, and notes each use in a ledger;
``coroutine-worker`` uses the resource with no check of its own (the runner must stop it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (RedisServer, ServerProcess, log_time, missing_tool, new_user, require_redis_server,
                      wait_until)

AGENTS = "fixture_agents,fixture_resource_agents"
TERMINAL_EVENTS = {"agent_complete", "agent_error", "run_timeout", "run_cancelled", "run_interrupted",
                   "run_orphaned"}


def post(srv: ServerProcess, agent_type: str, **input: Any) -> str:
    response = srv.client.post("/agents/run", json={"agent_type": agent_type, "user_id": new_user(), "input": input})
    assert response.status_code == 202, response.text
    return str(response.json()["run_id"])


def uses(ledger: Path, run_id: str | None = None) -> list[tuple[str, float, int]]:
    """The resource's uses in the order they happened: (run_id, time, fencing token)."""
    if not ledger.exists():
        return []
    return [(fields[1], float(fields[2]), int(fields[4])) for fields in map(str.split, ledger.read_text().splitlines())
            if fields[0] == "use" and run_id in (None, fields[1])]


def resource_fence(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("SELECT fence FROM resource WHERE id = 1").fetchone()[0])


def terminal_lines(servers: list[ServerProcess], run_id: str) -> list[dict[str, Any]]:
    return [line for srv in servers for line in srv.log_lines()
            if line.get("run_id") == run_id and line.get("event") in TERMINAL_EVENTS]


def process_stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


# --- both modes: the token in the record, the log line, the agent and the resource -------------------------------

@pytest.mark.parametrize("mode", ["memory", "redis"])
def test_each_run_gets_a_larger_token_in_its_record_its_run_started_line_and_its_agent(
        mode: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = {"AGENT_MODULES": AGENTS, "FENCING_STATE_PATH": str(tmp_path / "fencing")}
    if mode == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
        env["REDIS_PREFIX"] = f"test-{os.urandom(4).hex()}"
    srv = ServerProcess(tmp_path / "server.log", **env)
    try:
        ledger, database = tmp_path / "ledger", tmp_path / "resource.db"
        runs = [srv.wait_run(post(srv, "fenced-writer", ledger=str(ledger), db=str(database), writes=2))
                for _ in range(2)]
        tokens = [run["fencing_token"] for run in runs]
        assert [run["state"] for run in runs] == ["DONE", "DONE"] and tokens[0] < tokens[1], runs
        assert [run["result"]["fencing_token"] for run in runs] == tokens  # self.fencing_token, before run()
        started = [srv.wait_for_event("run_started", run_id=run["run_id"])["fencing_token"] for run in runs]
        assert started == tokens
        assert [token for _, _, token in uses(ledger)] == [tokens[0]] * 2 + [tokens[1]] * 2
        assert resource_fence(database) == tokens[1]
        stream = srv.client.get(f"/agents/events/{runs[1]['run_id']}", timeout=10).text  # ends: the run is terminal
        frames = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: {")]
        assert frames and frames[-1]["state"] == "DONE" and frames[-1]["fencing_token"] == tokens[1]
    finally:
        srv.stop(signal.SIGKILL)


@pytest.mark.parametrize("mode", ["memory", "redis"])
def test_ensure_lease_raises_lease_lost_once_the_run_is_stopping(mode: str, tmp_path: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    """An agent that swallows the cancel and goes on meets LeaseLost at its next check, and uses nothing more."""
    env = {"AGENT_MODULES": AGENTS}
    if mode == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
        env["REDIS_PREFIX"] = f"test-{os.urandom(4).hex()}"
    srv = ServerProcess(tmp_path / "server.log", **env)
    try:
        ledger = tmp_path / "ledger"
        run_id = post(srv, "fenced-writer", ledger=str(ledger), db=str(tmp_path / "resource.db"), writes=500,
                      interval=0.05, stubborn=True)
        wait_until(lambda: uses(ledger, run_id), 10, "the agent to use the resource")
        assert srv.client.post(f"/agents/cancel/{run_id}").status_code in (200, 202)
        run = srv.wait_run(run_id)
        lines = ledger.read_text().splitlines()
        assert run["state"] == "CANCELLED" and lines[-1].split()[0] == "lease_lost", (run, lines[-3:])
        assert lines[-1].split()[-1] == "the_run_is_stopping"
    finally:
        srv.stop(signal.SIGKILL)


def test_memory_mode_tokens_stay_above_every_earlier_one_after_a_restart(tmp_path: Path) -> None:
    """The highest token is kept in FENCING_STATE_PATH: a token far above the clock written there before a start
    proves the next run's is read from it, not only from the clock."""
    state = tmp_path / "fencing"

    def token_of_one_run(name: str) -> int:
        srv = ServerProcess(tmp_path / f"{name}.log", FENCING_STATE_PATH=str(state))
        try:
            return int(srv.run_to_end("sleeper", seconds=0.01)["fencing_token"])
        finally:
            srv.stop()

    first = token_of_one_run("first")
    second = token_of_one_run("restarted")
    assert second > first
    far_ahead = second + 10 ** 12  # days of the clock ahead
    state.write_text(f"{far_ahead}\n")
    assert token_of_one_run("after-state") > far_ahead


# --- Redis mode: a holder paused past its lease ------------------------------------------------------------------

def test_a_holder_paused_past_its_lease_never_uses_the_resource_again(replicas: Any, tmp_path: Path) -> None:
    """SIGSTOP the replica whose agent uses the resource, past the lock's TTL: the other replica takes the slot
    with a larger token. After SIGCONT the paused agent never passes ensure_lease() again (or its process exits
    70), its run ends in one terminal state, and the resource kept the larger token."""
    holder, other = replicas(2, LOCK_TTL_SECONDS="2", ON_BUSY="enqueue", AGENT_MODULES=AGENTS)
    ledger, database = tmp_path / "ledger", tmp_path / "resource.db"
    first = post(holder, "fenced-writer", ledger=str(ledger), db=str(database), writes=600, interval=0.05)
    wait_until(lambda: len(uses(ledger, first)) >= 3, 10, "the first run to use the resource")
    second = post(other, "fenced-writer", ledger=str(ledger), db=str(database), writes=20, interval=0.05)
    paused_at = time.time()
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: uses(ledger, second), 15, "the other replica to take the slot")
        took_over_at = uses(ledger, second)[0][1]
        time.sleep(max(0.0, paused_at + 2.5 - time.time()))
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    resumed_at = time.time()
    finished = other.wait_run(second, timeout=20)
    assert finished["state"] == "DONE", finished
    lost = other.wait_run(first, timeout=20)
    time.sleep(1.0)  # whatever the resumed replica still does, it does now
    lost = other.client.get(f"/agents/status/{first}").json()
    assert lost["state"] == "ERROR", lost
    assert lost["fencing_token"] < finished["fencing_token"]
    order = [run_id for run_id, _, _ in uses(ledger)]
    assert first not in order[order.index(second):], "the paused agent used the resource after the take-over"
    assert max(when for _, when, _ in uses(ledger, first)) < paused_at + 0.1
    assert resource_fence(database) == finished["fencing_token"]
    assert len(terminal_lines([holder, other], first)) == 1, terminal_lines([holder, other], first)
    print(f"\npaused at 0; the other replica's agent first used the resource at +{took_over_at - paused_at:.2f} s; "
          f"resumed at +{resumed_at - paused_at:.2f} s; lost run: {lost['error']}; tokens {lost['fencing_token']} "
          f"< {finished['fencing_token']}; holder exit code {holder.proc.poll()}")


def test_a_holder_paused_while_storing_its_end_never_writes_over_the_end_another_recorded(
        replicas: Any, tmp_path: Path) -> None:
    """The holder stops itself as it stores its run's log lines, its agent done; the other replica records the
    run ERROR ("Runner lost"). Resumed, the holder's DONE is refused: one record, one terminal line."""
    holder, other = replicas(2, LOCK_TTL_SECONDS="3", AGENT_MODULES=AGENTS)
    run_id = post(holder, "paused-at-the-end")
    wait_until(lambda: process_stopped(holder.proc.pid), 10, "the holder to stop itself")
    try:
        lost = wait_until(lambda: (run := other.client.get(f"/agents/status/{run_id}").json()).get("state") == "ERROR"
                          and run, 15, "the other replica to record the run lost")
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    refused = holder.wait_for_event("run_write_refused", run_id=run_id, timeout=10)
    assert refused["state"] == "DONE" and refused["fencing_token"] == lost["fencing_token"]
    time.sleep(0.5)
    stored = other.client.get(f"/agents/status/{run_id}").json()
    assert (stored["state"], stored["error"]) == ("ERROR", lost["error"]) and lost["error"].startswith("Runner lost")
    assert [line["event"] for line in terminal_lines([holder, other], run_id)] == ["run_orphaned"]
    assert holder.client.get("/healthz").status_code == 200  # it goes on serving


# --- Redis mode: a half-open partition (packets dropped, no reset) -----------------------------------------------

@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (name, the address here, the address in it)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        missing_tool("root and iproute2 (network namespaces)", "run the suite as root with iproute2 installed")
    if not shutil.which("iptables"):
        missing_tool("iptables", "apt-get install iptables")
    tag = f"{os.getpid() % 100000}{os.urandom(1).hex()}"
    name, here, there = f"ar{tag}", f"arh{tag}", f"arn{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{int.from_bytes(os.urandom(1), 'big')}"
    steps = [["ip", "netns", "add", name], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", name], ["ip", "addr", "add", f"{subnet}.1/30", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/30", "dev", there],
             ["ip", "netns", "exec", name, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            made = subprocess.run(step, capture_output=True, text=True)
            if made.returncode != 0:
                missing_tool(f"a network namespace ({' '.join(step)}: {made.stderr.strip()})",
                             "run the suite as root on a kernel that allows network namespaces")
        yield name, f"{subnet}.1", f"{subnet}.2"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


def test_a_replica_cut_off_from_redis_without_a_reset_stops_its_agent_before_its_lease_can_expire(
        namespace: tuple[str, str, str], tmp_path: Path) -> None:
    """Its packets to Redis are dropped (iptables DROP: no reset, a renewal just hangs) while its agent runs. It
    stops its agent within half the TTL, as when Redis refuses connections; the other replica starts the next run
    only after that, with a larger token; once the partition heals the first run is recorded once."""
    require_redis_server()
    name, here, there = namespace
    redis = RedisServer(tmp_path, bind=f"127.0.0.1 {here}")
    ttl = 3.0
    env = {"LOCK_TTL_SECONDS": str(ttl), "ON_BUSY": "enqueue", "AGENT_MODULES": AGENTS, "REDIS_PREFIX": "cut"}
    cut_off = ServerProcess(tmp_path / "cut-off.log", command=["ip", "netns", "exec", name, sys.executable,
                                                                "agent_runner.py"],
                            host=there, REDIS_URL=f"redis://{here}:{redis.port}/0", **env)
    other = ServerProcess(tmp_path / "other.log", REDIS_URL=redis.url, **env)
    drop = ["ip", "netns", "exec", name, "iptables", "-A", "OUTPUT", "-d", here, "-p", "tcp", "--dport",
            str(redis.port), "-j", "DROP"]
    try:
        ledger = tmp_path / "ledger"
        first = post(cut_off, "coroutine-worker", ledger=str(ledger), seconds=60)
        wait_until(lambda: ledger.exists() and f"start {first}" in ledger.read_text(), 10, "the first agent")
        second = post(other, "coroutine-worker", ledger=str(ledger), seconds=0.2)
        time.sleep(0.5)
        subprocess.run(drop, check=True)
        cut_at = time.time()
        lock_lost = cut_off.wait_for_event("lock_lost", timeout=ttl * 2, run_id=first)
        finished = other.wait_run(second, timeout=30)
        subprocess.run([*drop[:5], "-D", *drop[6:]], check=True)  # the partition heals
        healed_at = time.time()
        assert finished["state"] == "DONE", finished
        lines = [line.split() for line in ledger.read_text().splitlines()]
        first_end = next(float(fields[2]) for fields in lines if fields[:2] == ["end", first])
        second_start = next(float(fields[2]) for fields in lines if fields[:2] == ["start", second])
        assert log_time(lock_lost) < cut_at + ttl * 2 / 3, "stopped after its lease could have expired"
        assert first_end < second_start, "the second agent started while the first still used the resource"
        recorded = wait_until(lambda: (run := other.client.get(f"/agents/status/{first}").json())
                              .get("state") == "ERROR" and run, 30, "the first run to be recorded")
        assert recorded["fencing_token"] < finished["fencing_token"]
        time.sleep(2.0)  # the cut-off replica's own write of its end, if it is still trying, arrives now
        again = other.client.get(f"/agents/status/{first}").json()
        assert (again["state"], again["error"]) == (recorded["state"], recorded["error"])
        listed = other.client.get("/agents/runs", params={"limit": 100}).json()["runs"]
        assert [run["run_id"] for run in listed].count(first) == 1
        print(f"\ncut at 0; lock_lost at +{log_time(lock_lost) - cut_at:.2f} s; first agent ended at "
              f"+{first_end - cut_at:.2f} s; second started at +{second_start - cut_at:.2f} s; healed at "
              f"+{healed_at - cut_at:.2f} s; first recorded: {recorded['error']}")
    finally:
        cut_off.stop(signal.SIGKILL)
        other.stop(signal.SIGKILL)
        redis.stop()
