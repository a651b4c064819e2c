"""Redis mode across replicas: one single-run guarantee shared through a real redis-server."""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid

import httpx
import pytest

from conftest import RedisServer, ServerProcess, log_time, new_user

BUSY = "An agent is already running, please retry later"


def post_until_accepted(server: ServerProcess, timeout: float = 10, **input: object) -> str:
    """POST a sleeper run until it is accepted; only 503 (Redis just back) and 409 may come first."""
    deadline = time.monotonic() + timeout
    body = {"agent_type": "sleeper", "user_id": new_user(), "input": input}
    while (response := server.client.post("/agents/run", json=body)).status_code != 202:
        assert response.status_code in (409, 503), response.text
        assert time.monotonic() < deadline, f"no 202 in {timeout} s: {response.status_code} {response.text}"
        time.sleep(0.1)
    return response.json()["run_id"]


def test_burst_across_two_replicas_admits_exactly_one(replicas) -> None:
    a, b = replicas(2)

    async def burst() -> list[httpx.Response]:
        # The run outlasts the burst however slow the machine: it ends only when cancelled below.
        body = {"agent_type": "hanging", "user_id": new_user()}
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{(a, b)[i % 2].url}/agents/run", json=body)
                                          for i in range(100)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert codes.count(202) == 1 and codes.count(409) == 99, sorted(codes)
    assert all(r.json() == {"detail": BUSY} for r in responses if r.status_code == 409)
    run_id = next(r for r in responses if r.status_code == 202).json()["run_id"]
    assert b.client.post(f"/agents/cancel/{run_id}").json()["state"] == "CANCELLED"


def test_status_list_and_wait_work_on_any_replica(replicas) -> None:
    a, b = replicas(2)
    run_id = a.start_run("sleeper", seconds=0.5)
    started = time.monotonic()
    run = b.client.get(f"/agents/status/{run_id}", params={"wait": 20}).json()
    assert run["state"] == "DONE" and time.monotonic() - started < 5
    assert b.client.get("/agents/runs").json()["runs"][0]["run_id"] == run_id
    # The lock is free for a run started through the other replica at once.
    assert b.wait_run(b.start_run("sleeper", seconds=0))["state"] == "DONE"


def test_cancel_on_another_replica_ends_cancelled_within_3_seconds(replicas) -> None:
    a, b = replicas(2)
    run_id = a.start_run("hanging")
    a.wait_state(run_id, "RUNNING")
    started = time.monotonic()
    response = b.client.post(f"/agents/cancel/{run_id}")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "CANCELLED"
    assert time.monotonic() - started < 3
    a.wait_for_event("run_cancelled", run_id=run_id)
    assert a.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()}).status_code == 202


def test_sigkilled_holder_frees_the_lock_after_its_ttl_and_its_run_becomes_error(replicas) -> None:
    a, b = replicas(2, LOCK_TTL_SECONDS="2")
    orphan = a.start_run("hanging")
    a.wait_state(orphan, "RUNNING")
    a.proc.kill()
    killed = time.monotonic()
    body = {"agent_type": "sleeper", "user_id": new_user(), "input": {"seconds": 0}}
    while (response := b.client.post("/agents/run", json=body)).status_code != 202:
        assert response.status_code == 409
        assert time.monotonic() - killed < 2 + 2.5, "the dead holder's lock did not expire in time"
        time.sleep(0.05)
    waited = time.monotonic() - killed
    assert waited <= 2 + 2.5
    lost = b.wait_run(orphan, timeout=5)
    assert lost["state"] == "ERROR" and "runner lost" in lost["error"].lower()
    assert b.wait_for_event("run_orphaned", run_id=orphan)["level"] == "error"
    print(f"SIGKILL to next 202: {waited:.2f} s")


def test_records_survive_a_replica_restart(replicas) -> None:
    (a,) = replicas(1, prefix="survivors")
    done = a.run_to_end("sleeper", seconds=0)
    a.stop()
    (again,) = replicas(1, prefix="survivors")
    assert again.client.get(f"/agents/status/{done['run_id']}").json() == done
    assert done["run_id"] in [run["run_id"] for run in again.client.get("/agents/runs").json()["runs"]]


def test_redis_down_answers_503_then_recovers_by_itself(replicas, persistent_redis: RedisServer) -> None:
    own_redis = persistent_redis  # back with its data: one without fences admission for a TTL (test_data_loss)
    (a,) = replicas(1, redis=own_redis)
    done = a.run_to_end("sleeper", seconds=0)
    own_redis.stop()
    unavailable = {"detail": "Run store unavailable"}
    for _ in range(3):
        post = a.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()})
        assert (post.status_code, post.json()) == (503, unavailable)
        status = a.client.get(f"/agents/status/{done['run_id']}")
        assert (status.status_code, status.json()) == (503, unavailable)
        listing = a.client.get("/agents/runs")
        assert (listing.status_code, listing.json()) == (503, unavailable)
    assert a.client.get("/readyz").status_code == 503
    assert a.client.get("/healthz").status_code == 200
    own_redis.start()
    deadline = time.monotonic() + 10
    while a.client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "did not recover after Redis came back"
        time.sleep(0.1)
    assert a.run_to_end("sleeper", seconds=0)["state"] == "DONE"
    a.wait_for_event("store_recovered")
    assert len(a.events("store_unavailable")) == 1
    assert len(a.events("store_recovered")) == 1


def test_lock_lost_during_a_run_cancels_it_as_error(replicas, redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    (a,) = replicas(1, prefix=prefix, LOCK_TTL_SECONDS="1.5")
    run_id = a.start_run("hanging")
    a.wait_state(run_id, "RUNNING")
    # Taken over by another token (a key that is merely gone is taken back: test_data_loss)
    assert redis_server.command("SET", f"{prefix}:lock", "another-token", "PX", "5000")
    run = a.wait_run(run_id, timeout=5)
    assert run["state"] == "ERROR" and run["error"] == "Run stopped: lock lost"
    assert a.wait_for_event("lock_lost", run_id=run_id)["level"] == "error"


def test_two_replicas_never_run_two_agents_at_once(replicas, redis_server: RedisServer) -> None:
    a, b = replicas(2)
    key = f"overlap-{uuid.uuid4().hex[:8]}"
    agent_input = {"redis_url": redis_server.url, "key": key, "seconds": 0.02}

    async def hammer(server: ServerProcess, client: httpx.AsyncClient, until: float) -> int:
        accepted = 0
        while time.monotonic() < until:
            body = {"agent_type": "overlap-counter", "user_id": new_user(), "input": agent_input}
            response = await client.post(f"{server.url}/agents/run", json=body)
            if response.status_code == 202:
                accepted += 1
                if random.random() < 0.2:  # sometimes cancel it from the other replica
                    other = b if server is a else a
                    await client.post(f"{other.url}/agents/cancel/{response.json()['run_id']}")
            else:
                assert response.status_code == 409, response.text
        return accepted

    async def main() -> int:
        async with httpx.AsyncClient(timeout=30) as client:
            until = time.monotonic() + 6
            counts = await asyncio.gather(*(hammer(server, client, until) for server in (a, b, a, b, a, b)))
            return sum(counts)

    accepted = asyncio.run(main())
    assert accepted >= 20, accepted
    deadline = time.monotonic() + 10  # the last runs may still be ending
    while int(redis_server.command("GET", f"{key}:current")) != 0:
        if time.monotonic() >= deadline:
            unfinished = [run for run in httpx.get(f"{a.url}/agents/runs?limit=100").json()["runs"]
                          if run["state"] in ("PENDING", "RUNNING")]
            pytest.fail(f"an agent never ended; runs not finished: {unfinished}")
        time.sleep(0.05)
    assert int(redis_server.command("GET", f"{key}:max")) == 1


def stop_redis_and_read_lock_expiry(redis: RedisServer, lock_key: str) -> float:
    """Shut Redis down, reading the lock's TTL last; returns when (wall clock) the lock would have expired.

    Writes are paused first, so no renewal can land between the reading and the shutdown.
    """
    def command(sock: socket.socket, text: str) -> bytes:
        sock.sendall(text.encode() + b"\r\n")
        return sock.recv(64)

    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
        assert command(sock, "CLIENT PAUSE 10000 WRITE") == b"+OK\r\n"
        reply = command(sock, f"PTTL {lock_key}")
        read_at = time.time()
        command(sock, "SHUTDOWN NOSAVE")
    assert redis.proc is not None and redis.proc.wait(10) == 0
    assert reply.startswith(b":") and int(reply[1:-2]) > 0, reply
    return read_at + int(reply[1:-2]) / 1000


def test_redis_unreachable_stops_the_agent_before_its_lock_can_expire(replicas, persistent_redis) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    (a,) = replicas(1, redis=persistent_redis, prefix=prefix, LOCK_TTL_SECONDS="3")
    run_id = a.start_run("probe", mode="hang")
    a.wait_state(run_id, "RUNNING")
    expires_at = stop_redis_and_read_lock_expiry(persistent_redis, f"{prefix}:lock")
    lost = a.wait_for_event("lock_lost", run_id=run_id)
    assert lost["level"] == "error" and lost["detail"]
    stopped = a.wait_for_event("probe_end", run_id=run_id)  # the agent's code has ended, Redis still away
    assert log_time(stopped) < expires_at, "the agent still ran when another replica could take the lock"
    persistent_redis.start()
    run = a.wait_run(run_id)
    assert run["state"] == "ERROR" and run["error"] == "Run stopped: lock lost"


def test_a_run_whose_terminal_state_was_never_stored_is_marked_runner_lost(replicas, persistent_redis) -> None:
    (a,) = replicas(1, redis=persistent_redis, LOCK_TTL_SECONDS="4")
    run_id = a.start_run("sleeper", seconds=1, announce=True)
    a.wait_state(run_id, "RUNNING")
    persistent_redis.stop()
    a.wait_for_event("sleeper_done", run_id=run_id)  # DONE, but the store is away for longer than the lock's TTL
    line = a.wait_for_event("terminal_state_not_stored", run_id=run_id, timeout=15)
    assert line["level"] == "error" and line["state"] == "DONE"
    persistent_redis.start()
    # Never DONE: RUNNING as last stored, or already ERROR if the once-a-second look for orphans, which may run
    # as soon as Redis is back, came before this read.
    first = a.client.get(f"/agents/status/{run_id}", timeout=10).json()
    assert first["state"] == "RUNNING" or first["error"].startswith("Runner lost"), first
    next_run = post_until_accepted(a, seconds=0)  # its holder finds the unfinished run of a lost runner
    assert a.wait_run(next_run)["state"] == "DONE"
    lost = a.client.get(f"/agents/status/{run_id}").json()
    assert lost["state"] == "ERROR" and lost["error"].startswith("Runner lost"), lost
    assert a.wait_for_event("run_orphaned", run_id=run_id)["level"] == "error"


def test_cancel_reaches_the_holder_through_the_flag_checked_at_renewal_without_pubsub(replicas, own_redis) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a, b = replicas(2, redis=own_redis, prefix=prefix, LOCK_TTL_SECONDS="1.5")
    run_id = a.start_run("hanging")
    a.wait_state(run_id, "RUNNING")
    # Pub/sub off: no client may subscribe any more, and the replicas' listeners are disconnected.
    own_redis.command("ACL", "SETUSER", "default", "-subscribe", "-psubscribe")
    own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert own_redis.command("PUBSUB", "NUMSUB", f"{prefix}:cancel")[1] == 0
    response = b.client.post(f"/agents/cancel/{run_id}")
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED", response.text
    assert a.wait_for_event("run_cancelled", run_id=run_id)
    assert own_redis.command("PUBSUB", "NUMSUB", f"{prefix}:cancel")[1] == 0  # it came through the flag
