"""Torture: two replicas, misbehaving agents and an unlucky operator, and no two real uses of the resource overlap.

Agents write start/end lines from their own code (coroutines and threads, some
ignoring cancellation) to one ledger. Meanwhile the test cancels runs through
the other replica, lets runs time out, drops every store connection (Redis: through a proxy mid-transaction;
PostgreSQL: pg_terminate_backend), makes the store refuse writes for two seconds (Redis: min-replicas-to-write;
PostgreSQL: the slot and run tables locked away, so statements time out), and SIGTERMs
the replica that holds the lock (starting a new one). At the end every
accepted run is terminal, the ledger's intervals never overlap and their fencing tokens only grow; a use
cut short by its process's end counts until that process was seen gone.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import (TERMINAL, PostgresServer, RedisServer, ServerProcess, new_user, require_postgres,
                      require_redis_server)
from redis_proxy import RedisProxy

CHAOS_SECONDS = 24
ENV = {"AGENT_MODULES": "fixture_agents,fixture_resource_agents", "LOCK_TTL_SECONDS": "1.5",
       "RUN_TIMEOUT_SECONDS": "1", "SHUTDOWN_GRACE_SECONDS": "0.3"}


class RedisChaos:
    """The store a fleet shares, and what the chaos does to it: Redis, behind a proxy."""

    def __init__(self, tmp_path: Path) -> None:
        require_redis_server()
        self.redis = RedisServer(tmp_path)
        self.proxy = RedisProxy(self.redis.port)
        self.env = {"REDIS_URL": self.proxy.url, "REDIS_PREFIX": "torture"}

    def cut(self) -> None:
        self.proxy.cut_all()

    def refuse(self) -> None:
        self.redis.command("CONFIG", "SET", "min-replicas-to-write", "1")

    def accept(self) -> None:
        self.redis.command("CONFIG", "SET", "min-replicas-to-write", "0")

    def close(self) -> None:
        self.proxy.close()
        self.redis.stop()


class PostgresChaos:
    """PostgreSQL, its statements bounded to 300 ms (DATABASE_URL's options): connections killed, and the slot
    and run tables locked by another session for a while (every statement on them times out meanwhile)."""

    def __init__(self, tmp_path: Path) -> None:
        require_postgres()
        self.postgres = PostgresServer()
        self.env = {"DATABASE_URL": self.postgres.url + "?options=-c%20statement_timeout%3D300",
                    "DATABASE_SCHEMA": "torture"}
        self.locker: subprocess.Popen[bytes] | None = None

    def cut(self) -> None:
        self.postgres.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")

    def refuse(self) -> None:
        self.locker = subprocess.Popen(
            ["psql", "-X", "-q", self.postgres.url, "-c", "BEGIN; LOCK TABLE torture.slots, torture.runs "
             "IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(1.9); COMMIT;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accept(self) -> None:
        if self.locker is not None:
            self.locker.wait(10)

    def close(self) -> None:
        self.accept()
        self.postgres.close()


class Fleet:
    """The replicas, restarted when one exits; remembers when each process was seen gone."""

    def __init__(self, tmp_path: Path, store: dict[str, str]) -> None:
        self.tmp_path, self.store = tmp_path, store
        self.replicas: list[ServerProcess] = []
        self.all: list[ServerProcess] = []
        self.gone_at: dict[int, float] = {}  # pid -> time the process had exited
        self.restarts = 0

    def start(self) -> ServerProcess:
        srv = ServerProcess(self.tmp_path / f"replica-{len(self.all)}.log", **self.store, **ENV)
        self.all.append(srv)
        self.replicas.append(srv)
        threading.Thread(target=self._watch, args=(srv,), daemon=True).start()
        return srv

    def _watch(self, srv: ServerProcess) -> None:
        srv.proc.wait()
        self.gone_at[srv.proc.pid] = time.time()

    def live(self) -> list[ServerProcess]:
        for srv in list(self.replicas):
            if srv.proc.poll() is not None:
                self.replicas.remove(srv)
                self.restarts += 1
                self.start()
        return self.replicas

    def stop_all(self) -> None:
        for srv in self.all:
            srv.stop(signal.SIGKILL)


def start_stubborn_run(fleet: Fleet, ledger: Path, accepted: list[str]) -> ServerProcess:
    """Queue a 1.4 s agent that ignores cancellation and wait until it runs; returns the replica running it.

    Queued, it waits for whatever runs now instead of being refused; it outlasts the 1 s timeout, so the
    moment the caller acts on (a refusal, a SIGTERM) always finds it running. A run the chaos ended
    before it started (a store blip) is replaced by another.
    """
    deadline = time.monotonic() + 15
    run_id = None
    while True:
        assert time.monotonic() < deadline, "no stubborn run started"
        srv = fleet.live()[0]
        try:
            if run_id is None:
                response = srv.client.post("/agents/run", json={
                    "agent_type": "coroutine-worker", "user_id": new_user(), "on_busy": "enqueue",
                    "input": {"ledger": str(ledger), "seconds": 1.4, "stubborn": True}}, timeout=10)
                if response.status_code == 202:
                    run_id = response.json()["run_id"]
                    accepted.append(run_id)
            else:
                state = srv.client.get(f"/agents/status/{run_id}").json().get("state")
                if state == "RUNNING":  # the queue hands it to either replica: the one running an agent
                    running = [replica for replica in fleet.live()
                               if "agent_runner_running 1.0" in replica.client.get("/metrics").text]
                    if len(running) == 1:  # else the replica of the run before has not counted it out yet
                        return running[0]
                elif state in TERMINAL:
                    run_id = None
        except httpx.TransportError:
            pass  # a replica going away
        time.sleep(0.01)


def random_agent(rng: random.Random, ledger: Path) -> tuple[str, dict]:
    base = {"ledger": str(ledger), "seconds": round(rng.uniform(0.05, 1.4), 2)}
    kind = rng.choice(["thread", "thread", "executor", "cooperative", "coroutine", "stubborn"])
    if kind == "thread":
        return "thread-worker", base
    if kind == "executor":
        return "thread-worker", {**base, "executor": True}
    if kind == "cooperative":
        return "thread-worker", {**base, "cooperative": True}
    return "coroutine-worker", {**base, "stubborn": kind == "stubborn"}


@pytest.mark.parametrize("store", ["redis", "postgres"])
def test_no_two_uses_of_the_resource_overlap_under_chaos(tmp_path: Path, store: str) -> None:
    chaos = RedisChaos(tmp_path) if store == "redis" else PostgresChaos(tmp_path)
    fleet = Fleet(tmp_path, chaos.env)
    ledger = tmp_path / "ledger"
    rng = random.Random(11)
    accepted: list[str] = []
    signalled: list[ServerProcess] = []
    cancels = ThreadPoolExecutor(4)
    events = {5.0: "cut", 9.0: "refuse", 14.0: "sigterm", 19.0: "cut", 21.0: "sigterm"}  # accept: 2 s after refuse
    try:
        fleet.start()
        fleet.start()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < CHAOS_SECONDS:
            for at in [at for at in events if at <= elapsed]:
                act = events.pop(at)
                if act == "cut":
                    chaos.cut()
                elif act == "refuse":  # during a 1.4 s stubborn run: a lock renewal (every 0.5 s) meets it
                    start_stubborn_run(fleet, ledger, accepted)
                    chaos.refuse()
                    events[time.monotonic() - started + 2.0] = "accept"
                elif act == "accept":
                    chaos.accept()
                elif act == "sigterm":  # the replica running a 1.4 s stubborn run started for it
                    holder = start_stubborn_run(fleet, ledger, accepted)
                    holder.proc.send_signal(signal.SIGTERM)
                    signalled.append(holder)
            replicas = fleet.live()
            srv = rng.choice(replicas)
            agent_type, agent_input = random_agent(rng, ledger)
            try:
                response = srv.client.post("/agents/run", json={
                    "agent_type": agent_type, "user_id": new_user(), "input": agent_input}, timeout=10)
            except httpx.TransportError:
                continue  # the replica is going away
            assert response.status_code in (202, 409, 503), response.text
            if response.status_code == 202:
                run_id = response.json()["run_id"]
                accepted.append(run_id)
                if rng.random() < 0.3:
                    other = rng.choice(replicas)
                    cancels.submit(lambda url=other.url, rid=run_id: httpx.post(
                        f"{url}/agents/cancel/{rid}", timeout=10))
            time.sleep(rng.uniform(0.02, 0.15))
        cancels.shutdown(wait=True)

        # Settle: one more run makes the lock holder recover runs orphaned by a replica that went away.
        srv = fleet.live()[0]
        deadline = time.monotonic() + 30
        while True:
            response = srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user(),
                                                           "input": {"seconds": 0}})
            if response.status_code == 202:
                srv.wait_run(response.json()["run_id"])
                break
            assert time.monotonic() < deadline, "the lock never became free after the chaos"
            time.sleep(0.1)
        states = {}
        for run_id in accepted:
            run = srv.wait_run(run_id, timeout=30)
            assert run["state"] in TERMINAL
            states[run["state"]] = states.get(run["state"], 0) + 1

        spans = []
        for run_id, lines in parse_ledger(ledger).items():
            start, pid, token = lines["start"]
            end = lines.get("end", (fleet.gone_at.get(pid), pid, token))[0]
            assert end is not None, f"run {run_id} still uses the resource in a live process"
            spans.append((start, end, run_id, token))
        spans.sort()
        for (_, end, first, _), (start, _, second, _) in zip(spans, spans[1:]):
            assert start >= end, f"{second} started {end - start:.3f} s before {first} ended"
        tokens = [token for _, _, _, token in spans]  # along the ledger of uses, fencing tokens only grow
        assert all(earlier < later for earlier, later in zip(tokens, tokens[1:])), list(zip(spans, tokens))

        logs = [line for srv in fleet.all for line in srv.log_lines()]
        seen = {line["event"] for line in logs}
        assert len(spans) >= 20 and len(accepted) >= 20, (len(spans), len(accepted))
        assert {"run_cancelled", "run_timeout", "store_unavailable"} <= seen, seen
        assert "lock_lost" in seen or "lock_renewal_failed" in seen, seen
        assert len(signalled) == 2 and all(srv.proc.wait(timeout=15) is not None for srv in signalled)
        print(f"torture: {len(accepted)} runs {states}, {len(spans)} uses, {fleet.restarts} restarts")
    finally:
        fleet.stop_all()
        chaos.close()


def parse_ledger(ledger: Path) -> dict[str, dict[str, tuple[float, int, int]]]:
    """Each run's start and end: when, by which process, under which fencing token."""
    runs: dict[str, dict[str, tuple[float, int, int]]] = {}
    for line in ledger.read_text().splitlines():
        what, run_id, when, pid, token = line.split()
        runs.setdefault(run_id, {})[what] = (float(when), int(pid), int(token))
    return runs


pytestmark = pytest.mark.timeout(120)
