"""The run queue and its slots when things go wrong: lost replies, shutdown mid-dispatch, dead takers, interrupts."""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RedisServer, ServerProcess, new_user
from redis_proxy import RedisProxy
from test_queue import most_at_once, spans


def post(srv: ServerProcess, agent_type: str, on_busy: str | None = None, **input: Any) -> httpx.Response:
    body: dict[str, Any] = {"agent_type": agent_type, "user_id": new_user(), "input": input}
    if on_busy is not None:
        body["on_busy"] = on_busy
    return srv.client.post("/agents/run", json=body)


def is_take(chunk: bytes) -> bool:
    """The script that takes the head of the queue with a slot (keys: queue, unfinished, slots; no runs index)."""
    return b":queue" in chunk and b":unfinished" in chunk and b":runs" not in chunk and b":seq" not in chunk


def is_handoff(chunk: bytes, run_id: str) -> bool:
    """The script that stores ``run_id``'s end and takes the head of the queue onto its slot, in one step (its
    keys: the run's, the queue and the fencing counter; Runner.finish_run)."""
    return f":run:{run_id}".encode() in chunk and b":queue" in chunk and b":fencing" in chunk


def take_after(srv: ServerProcess, run_id: str) -> Any:
    """A proxy matcher: the take that gives the slot ``run_id`` frees to the head of the queue, whether the step
    that ends the run makes it (its replica, while it takes runs) or a dispatcher after it."""
    freed = once_done(srv, run_id)
    return lambda chunk: is_handoff(chunk, run_id) or (is_take(chunk) and freed())


def once_done(srv: ServerProcess, run_id: str) -> Any:
    """A proxy matcher's extra condition: true once ``run_id`` is DONE (its slot was just freed)."""
    url = f"{srv.url}/agents/status/{run_id}"
    return lambda: httpx.get(url).json()["state"] == "DONE"


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[RedisProxy]:
    proxy = RedisProxy(redis_server.port)
    yield proxy
    proxy.close()


def test_a_lost_reply_to_cancelling_a_waiting_run_still_ends_it_cancelled(replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url)
    running = post(srv, "hanging").json()["run_id"]
    waiting = post(srv, "sleeper", on_busy="enqueue", seconds=0).json()["run_id"]
    behind = post(srv, "sleeper", on_busy="enqueue", seconds=0).json()["run_id"]
    # The step that takes the run out of the line reaches Redis; its answer is lost (redis-py sends it again).
    proxy.drop_reply(lambda chunk: b"LREM" in chunk or (b":queue" in chunk and waiting.encode() in chunk), 1)
    response = srv.client.post(f"/agents/cancel/{waiting}")
    assert proxy.dropped == 1
    assert (response.status_code, response.json()["state"]) == (200, "CANCELLED")
    assert srv.client.get(f"/agents/status/{waiting}").json()["state"] == "CANCELLED"
    assert srv.client.get(f"/agents/status/{behind}").json()["queue_position"] == 1
    srv.client.post(f"/agents/cancel/{running}")
    assert srv.wait_run(behind)["state"] == "DONE"
    assert srv.client.get(f"/agents/status/{waiting}").json()["state"] == "CANCELLED"


def test_a_lost_reply_to_taking_the_head_of_the_queue_still_runs_it(replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url, LOCK_TTL_SECONDS="30")
    first = post(srv, "sleeper", seconds=0.4).json()["run_id"]
    waiting = post(srv, "sleeper", on_busy="enqueue", seconds=0).json()["run_id"]
    # The take that follows the first run's end runs in Redis; its answer is lost, and redis-py sends it again.
    proxy.drop_reply(take_after(srv, first), 1)
    started = time.monotonic()
    run = srv.wait_run(waiting, timeout=15)
    assert proxy.dropped == 1
    assert (run["state"], run["error"]) == ("DONE", None)
    assert time.monotonic() - started < 5  # not after the 30 s TTL of a slot nobody renews
    assert post(srv, "sleeper", seconds=0).status_code == 202  # and no slot is left held by a lost take


def test_a_lost_reply_to_a_take_never_starts_a_later_run_before_the_head(replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url, MAX_CONCURRENT_RUNS="2", LOCK_TTL_SECONDS="30")
    first = post(srv, "sleeper", seconds=0.4).json()["run_id"]
    hold = post(srv, "hanging").json()["run_id"]
    head, second = (post(srv, "sleeper", on_busy="enqueue", seconds=0).json()["run_id"] for _ in range(2))
    proxy.drop_reply(take_after(srv, first), 1)
    runs = [srv.wait_run(run_id, timeout=15) for run_id in (head, second)]
    assert proxy.dropped == 1
    assert [(run["state"], run["error"]) for run in runs] == [("DONE", None)] * 2
    assert runs[0]["started_at"] <= runs[1]["started_at"]  # the head of the line first
    srv.client.post(f"/agents/cancel/{hold}")


def test_a_run_taken_from_the_queue_as_shutdown_starts_gets_the_grace(replicas, proxy: RedisProxy) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    (srv,) = replicas(1, url=proxy.url, prefix=prefix, SHUTDOWN_GRACE_SECONDS="10")
    first = post(srv, "sleeper", seconds=0.4).json()["run_id"]
    waiting = post(srv, "sleeper", on_busy="enqueue", seconds=0.3).json()["run_id"]
    # SIGTERM while the take that gives the waiting run its slot is on its way to Redis.
    proxy.hold(take_after(srv, first), 1.0, lambda: srv.proc.send_signal(signal.SIGTERM))
    assert srv.proc.wait(20) == 0
    (reader,) = replicas(1, prefix=prefix)
    run = reader.client.get(f"/agents/status/{waiting}").json()
    # It had its slot: it runs within the grace, as a run admitted as shutdown starts does (or it still waits).
    assert (run["state"], run["error"]) in (("DONE", None), ("PENDING", None)), run
    if run["state"] == "PENDING":
        assert run["queue_position"] == 1
        assert reader.wait_run(waiting)["state"] == "DONE"



@pytest.fixture(params=["memory", "redis"])
def mode(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "memory":
        return {}
    redis = request.getfixturevalue("redis_server")
    return {"REDIS_URL": redis.url, "REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}"}


def test_a_second_interrupt_stops_another_run_not_the_one_already_stopping(tmp_path: Path,
                                                                          mode: dict[str, str]) -> None:
    srv = ServerProcess(tmp_path / "server.log", MAX_CONCURRENT_RUNS="2", **mode)
    try:
        oldest = post(srv, "stubborn", hold=1.5).json()["run_id"]  # takes 1.5 s to stop
        younger = post(srv, "hanging").json()["run_id"]
        srv.wait_state(oldest, "RUNNING")
        srv.wait_state(younger, "RUNNING")
        first = post(srv, "sleeper", on_busy="interrupt", seconds=0).json()["run_id"]
        second = post(srv, "sleeper", on_busy="interrupt", seconds=0).json()["run_id"]
        stopped = srv.wait_run(younger, timeout=8)  # the oldest run not already stopping
        assert (stopped["state"], stopped["cancelled_by"]) == ("CANCELLED", second)
        assert srv.wait_run(oldest)["cancelled_by"] == first
        assert [srv.wait_run(run_id)["state"] for run_id in (first, second)] == ["DONE", "DONE"]
    finally:
        srv.stop(signal.SIGKILL)


def test_an_interrupting_run_never_interrupts_itself(replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url)
    old = post(srv, "sleeper", seconds=0.4).json()["run_id"]
    srv.wait_state(old, "RUNNING")
    # The old run ends by itself and the new one gets its slot while the interrupt looks for the oldest run.
    proxy.hold(lambda chunk: b"HKEYS" in chunk or (b"EVALSHA" in chunk and b":cancel:\r\n" in chunk), 1.5,
               lambda: None)
    new = post(srv, "sleeper", on_busy="interrupt", seconds=3).json()["run_id"]
    run = srv.wait_run(new)
    assert (run["state"], run["cancelled_by"], run["error"]) == ("DONE", None, None)
    assert srv.wait_run(old)["state"] == "DONE"


def is_admit(chunk: bytes) -> bool:
    """The script that admits a run (keys: queue, run, runs, seq, unfinished, slots)."""
    return b":queue" in chunk and b":runs" in chunk and b":seq" in chunk


def test_a_lost_reply_to_admitting_a_run_never_answers_409_for_an_accepted_run(replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url)
    first = post(srv, "sleeper", seconds=0.3).json()["run_id"]
    srv.wait_state(first, "RUNNING")
    admits = 0

    def second_admit(chunk: bytes) -> bool:
        nonlocal admits
        admits += is_admit(chunk)
        return is_admit(chunk) and admits == 2

    # The run is queued, the answer lost; the resent script reaches Redis after the run got its slot and ran.
    proxy.drop_reply(is_admit, 1)
    proxy.hold(second_admit, 1.5, lambda: None)
    response = post(srv, "sleeper", on_busy="enqueue", seconds=0)
    assert proxy.dropped == 1 and admits == 2
    assert response.status_code == 202, response.text  # it was accepted, and it runs: never 409
    assert srv.wait_run(response.json()["run_id"])["state"] == "DONE"


def test_a_run_left_by_a_replica_killed_as_it_took_it_ends_without_another_run(replicas, proxy: RedisProxy) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    (taker,) = replicas(1, url=proxy.url, prefix=prefix, LOCK_TTL_SECONDS="1.5")
    first = post(taker, "sleeper", seconds=0.4).json()["run_id"]
    waiting = post(taker, "sleeper", on_busy="enqueue", seconds=0).json()["run_id"]
    proxy.hold(take_after(taker, first), 0.3, lambda: taker.proc.send_signal(signal.SIGKILL))
    assert taker.proc.wait(20) == -signal.SIGKILL
    (other,) = replicas(1, prefix=prefix, LOCK_TTL_SECONDS="1.5")  # up and idle: nobody posts a run
    run = other.wait_run(waiting, timeout=10)  # within the TTL and a second or two, not at the next run
    assert (run["state"], run["queue_position"]) == ("ERROR", None)
    assert run["error"].startswith("Runner lost")


def test_an_interrupt_that_cannot_reach_redis_after_its_run_was_queued_still_answers_202(
        replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url)
    old = post(srv, "sleeper", seconds=1.0).json()["run_id"]
    srv.wait_state(old, "RUNNING")
    # The run is queued at the head of the line; then every try to find the run to interrupt is lost.
    proxy.drop(lambda chunk: b"HKEYS" in chunk or (b"EVALSHA" in chunk and b":cancel:\r\n" in chunk), 3)
    response = post(srv, "sleeper", on_busy="interrupt", seconds=0)
    assert proxy.dropped == 3
    assert response.status_code == 202, response.text  # accepted: a 503 would make the client send it again
    new = srv.wait_run(response.json()["run_id"])
    assert new["state"] == "DONE"
    assert srv.wait_run(old)["finished_at"] <= new["started_at"]


CHAOS_ENV = {"AGENT_MODULES": "fixture_agents,fixture_resource_agents", "MAX_CONCURRENT_RUNS": "2",
             "RUN_TIMEOUT_SECONDS": "1", "QUEUE_MAX": "8"}


def chaos(fleet: list[ServerProcess], rng: random.Random, ledger: Path) -> list[dict[str, Any]]:
    """36 POSTs (enqueue or interrupt; coroutines, stubborn ones, threads) and cancels, spread over ``fleet``;
    returns the accepted runs once they have ended."""
    accepted: list[str] = []
    for i in range(36):
        srv = fleet[i % len(fleet)]
        kind = rng.choice(["coroutine", "coroutine", "stubborn", "thread"])
        agent_input = {"ledger": str(ledger), "seconds": round(rng.uniform(0.05, 0.6), 2),
                       "stubborn": kind == "stubborn"}
        response = post(srv, "thread-worker" if kind == "thread" else "coroutine-worker",
                        on_busy=rng.choice(["enqueue", "enqueue", "enqueue", "interrupt"]), **agent_input)
        assert response.status_code in (202, 409), response.text
        if response.status_code == 202:
            accepted.append(response.json()["run_id"])
        if accepted and rng.random() < 0.3:
            cancel = rng.choice(fleet).client.post(f"/agents/cancel/{rng.choice(accepted)}")
            assert cancel.status_code in (200, 202, 409), cancel.text
        time.sleep(rng.uniform(0, 0.15))
    assert len(accepted) > 15
    return [fleet[-1].wait_run(run_id, timeout=60) for run_id in accepted]


def check_ledger(ledger: Path, runs: list[dict[str, Any]], slots: int) -> None:
    """Every run ended, none was started twice, and no more than ``slots`` used the resource at once."""
    assert all(run["state"] in ("DONE", "ERROR", "CANCELLED") for run in runs)
    assert not [run for run in runs if run["error"] and run["error"].startswith("Runner lost")]
    starts = [line.split()[1] for line in ledger.read_text().splitlines() if line.startswith("start ")]
    assert len(starts) == len(set(starts))
    assert set(starts) <= {run["run_id"] for run in runs}
    assert most_at_once(spans(ledger)) <= slots


def test_never_more_than_n_agents_nor_a_run_twice_under_interrupts_cancels_and_timeouts(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "server.log", **CHAOS_ENV)
    try:
        runs = chaos([srv], random.Random(11), tmp_path / "ledger")
        check_ledger(tmp_path / "ledger", runs, slots=2)
    finally:
        srv.stop(signal.SIGKILL)


def test_never_more_than_n_agents_nor_a_run_twice_under_lost_replies_interrupts_and_cancels(
        replicas, proxy: RedisProxy, tmp_path: Path) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    fleet = replicas(1, url=proxy.url, prefix=prefix, **CHAOS_ENV) + replicas(1, prefix=prefix, **CHAOS_ENV)
    # One reply in four of the queue's scripts (admit, take, cancel a waiting run, interrupt) is lost on one
    # replica; a resend (the same bytes) always gets through: three losses in a row would rightly be a 503.
    losses, lost = random.Random(14), set()

    def lose(chunk: bytes) -> bool:
        if not (b"EVALSHA" in chunk and (b":queue" in chunk or b":cancel:\r\n" in chunk)) or chunk in lost:
            lost.discard(chunk)
            return False
        if losses.random() < 0.25:
            lost.add(chunk)
            return True
        return False

    proxy.drop_reply(lose, 1000)
    runs = chaos(fleet, random.Random(13), tmp_path / "ledger")
    assert proxy.dropped > 3
    check_ledger(tmp_path / "ledger", runs, slots=2)


def test_a_replica_with_fewer_slots_never_takes_a_live_run_on_a_higher_slot_for_lost(replicas) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    (wide,) = replicas(1, prefix=prefix, MAX_CONCURRENT_RUNS="2")
    (narrow,) = replicas(1, prefix=prefix, MAX_CONCURRENT_RUNS="1")  # a rolling change from 2 slots to 1
    first, second = (post(wide, "hanging").json()["run_id"] for _ in range(2))  # slots 0 and 1
    wide.wait_state(second, "RUNNING")
    wide.client.post(f"/agents/cancel/{first}")
    assert narrow.run_to_end("sleeper", seconds=0)["state"] == "DONE"  # on slot 0, the one it knows
    time.sleep(1.5)  # every replica looks for runs whose replica died once a second
    assert narrow.client.get(f"/agents/status/{second}").json()["state"] == "RUNNING"
    cancelled = narrow.client.post(f"/agents/cancel/{second}").json()
    assert (cancelled["state"], cancelled["error"]) == ("CANCELLED", None)


def test_redis_refusing_writes_as_a_slot_frees_never_loses_reorders_or_doubles_the_queue(
        replicas, own_redis: RedisServer, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    env = {"AGENT_MODULES": "fixture_agents,fixture_resource_agents", "LOCK_TTL_SECONDS": "3"}
    first, second = replicas(2, redis=own_redis, **env)
    running = post(first, "coroutine-worker", ledger=str(ledger), seconds=0.5).json()["run_id"]
    waiting = [post((first, second)[i % 2], "coroutine-worker", on_busy="enqueue", ledger=str(ledger),
                    seconds=0.1).json()["run_id"] for i in range(4)]
    first.wait_state(running, "RUNNING")
    # Every write refused (NOREPLICAS) from before the running run ends until after: its terminal write, the takes
    # of the queue's head and orphan recovery all fail for 1.5 s, on both replicas.
    own_redis.command("CONFIG", "SET", "min-replicas-to-write", "1")
    try:
        time.sleep(1.5)
    finally:
        own_redis.command("CONFIG", "SET", "min-replicas-to-write", "0")
    runs = [second.wait_run(run_id, timeout=20) for run_id in [running, *waiting]]
    assert [(run["state"], run["error"]) for run in runs] == [("DONE", None)] * 5
    started = [run["started_at"] for run in runs[1:]]
    assert started == sorted(started)  # still in the order they were queued
    line_starts = [line.split()[1] for line in ledger.read_text().splitlines() if line.startswith("start ")]
    assert line_starts == [running, *waiting]  # each once, in order
    assert most_at_once(spans(ledger)) == 1


def test_a_run_taken_from_the_queue_whose_every_answer_is_lost_still_runs_next(replicas, proxy: RedisProxy) -> None:
    (srv,) = replicas(1, url=proxy.url, LOCK_TTL_SECONDS="30")
    first = post(srv, "sleeper", seconds=0.4).json()["run_id"]
    waiting = post(srv, "sleeper", on_busy="enqueue", seconds=0).json()["run_id"]
    # Taken with its slot, then every answer of the take (which carries the run's record) is lost, redis-py's two
    # resends included: the take fails, and its token is kept.
    proxy.drop_reply(take_after(srv, first), 3)
    deadline = time.monotonic() + 10
    while proxy.dropped < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run = srv.wait_run(waiting, timeout=10)  # the next try (of the run's end, or dispatch) asks again for it
    assert (run["state"], run["error"]) == ("DONE", None)
    assert post(srv, "sleeper", seconds=0).status_code == 202  # no slot left held by the failed take
