"""Redis losing its data under a running run (FLUSHALL, a restart without persistence, a failover that lost keys).

The slots are keys in Redis: once they are gone, nothing in Redis says a run is going. These tests check that
no second agent starts while the first one still runs, that the first one ends as it would have (DONE, readable
from any replica), and that admission opens again once it is safe (a fence of one lock TTL).
The overlap counter lives in the session's Redis, which is never wiped.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest

from conftest import RedisServer, ServerProcess, new_user

BUSY = "An agent is already running, please retry later"
TTL = 3.0  # LOCK_TTL_SECONDS: the fence after a detected loss lasts this long


def post(srv: ServerProcess, agent_type: str = "sleeper", on_busy: str | None = None, **input: Any) -> httpx.Response:
    body: dict[str, Any] = {"agent_type": agent_type, "user_id": new_user(), "input": input}
    if on_busy is not None:
        body["on_busy"] = on_busy
    return srv.client.post("/agents/run", json=body)


def wall(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def wait_terminal(srv: ServerProcess, run_id: str, timeout: float = 20) -> dict[str, Any]:
    """The run once terminal; a 404 (its record lost with the data, not written back yet) is waited through."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = srv.client.get(f"/agents/status/{run_id}", params={"wait": 2})
        if response.status_code == 200 and response.json()["state"] in ("DONE", "ERROR", "CANCELLED"):
            return response.json()
        assert response.status_code in (200, 404, 503), response.text
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s (last: {response.status_code} {response.text})")


def wipe(redis: RedisServer, how: str) -> None:
    if how == "flushall":
        assert redis.command("FLUSHALL") in (b"OK", "OK", True)
    else:  # a restart without persistence: the same address, nothing in it
        redis.stop()
        redis.start()


def data_lost_lines(*servers: ServerProcess) -> list[dict[str, Any]]:
    return [line for srv in servers for line in srv.events("store_data_lost")]


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_a_wipe_under_a_running_run_admits_no_second_run_until_it_ends(
        replicas, own_redis: RedisServer, redis_server: RedisServer, how: str) -> None:
    a, b = replicas(2, redis=own_redis, LOCK_TTL_SECONDS=str(TTL))
    counter = f"overlap-{uuid.uuid4().hex[:8]}"
    agent_input = {"redis_url": redis_server.url, "key": counter}
    run_id = a.start_run("overlap-counter", **agent_input, seconds=3 * TTL)  # outlasts the fence
    a.wait_state(run_id, "RUNNING")
    wipe(own_redis, how)
    wiped = time.monotonic()
    refused = 0
    while (response := post(b, "overlap-counter", **agent_input, seconds=0.2)).status_code != 202:
        assert response.status_code in (409, 503), response.text  # 503 while a restarted Redis comes up
        if response.status_code == 409:
            assert response.json() == {"detail": BUSY} and int(response.headers["retry-after"]) >= 1
            refused += 1
        assert time.monotonic() - wiped < 3 * TTL + 10, "nothing admitted long after the first run's end"
        time.sleep(0.05)
    admitted_at = time.time()
    second = wait_terminal(b, response.json()["run_id"])
    assert int(redis_server.command("GET", f"{counter}:max")) == 1, "two agents ran at once"
    assert second["state"] == "DONE" and second["result"] == {"concurrent": 1}, second
    first = wait_terminal(b, run_id)  # readable from the other replica
    assert (first["state"], first["error"], first["result"]) == ("DONE", None, {"concurrent": 1}), first
    assert admitted_at > wall(first["finished_at"]), "a second run was admitted while the first one still ran"
    assert refused > 0
    assert int(redis_server.command("GET", f"{counter}:runs")) == 2
    lost = data_lost_lines(a, b)
    assert len(lost) == 1 and lost[0]["level"] == "error", lost  # one replica saw it, once
    reasserted = a.wait_for_event("lock_reasserted", run_id=run_id)
    assert reasserted["level"] == "warning"
    assert not a.events("lock_lost")
    print(f"{how}: {refused} POSTs refused; the next run admitted {admitted_at - wall(first['finished_at']):.2f} s "
          f"after the first one ended, {time.monotonic() - wiped:.2f} s after the wipe")


def test_with_two_slots_both_holders_take_theirs_back_and_a_third_run_waits_for_one_to_end(
        replicas, own_redis: RedisServer, redis_server: RedisServer) -> None:
    a, b = replicas(2, redis=own_redis, LOCK_TTL_SECONDS=str(TTL), MAX_CONCURRENT_RUNS="2")
    counter = f"overlap-{uuid.uuid4().hex[:8]}"
    agent_input = {"redis_url": redis_server.url, "key": counter}
    first = a.start_run("overlap-counter", **agent_input, seconds=3 * TTL)
    second = b.start_run("overlap-counter", **agent_input, seconds=3 * TTL + 1)
    a.wait_state(first, "RUNNING")
    b.wait_state(second, "RUNNING")
    own_redis.command("FLUSHALL")
    wiped = time.monotonic()
    while (response := post((a, b)[int(time.monotonic() * 10) % 2], "overlap-counter", **agent_input,
                            seconds=0.2)).status_code != 202:
        assert response.status_code == 409, response.text
        assert time.monotonic() - wiped < 3 * TTL + 10
        time.sleep(0.05)
    admitted_at = time.time()
    third = wait_terminal(a, response.json()["run_id"])
    ended = [wait_terminal(b, run_id) for run_id in (first, second)]
    assert [run["state"] for run in ended] == ["DONE", "DONE"], ended
    assert admitted_at > min(wall(run["finished_at"]) for run in ended), "a third run while both others still ran"
    assert third["state"] == "DONE"
    assert int(redis_server.command("GET", f"{counter}:max")) == 2  # never more than the two slots
    assert a.wait_for_event("lock_reasserted", run_id=first) and b.wait_for_event("lock_reasserted", run_id=second)


def test_a_wipe_with_no_run_in_flight_fences_admission_for_one_ttl(replicas, own_redis: RedisServer) -> None:
    a, b = replicas(2, redis=own_redis, LOCK_TTL_SECONDS=str(TTL))
    assert post(a, seconds=0).status_code == 202  # a fresh Redis admits at once: the first deploy waits for nothing
    a.wait_for_event("agent_complete")
    own_redis.command("FLUSHALL")
    wiped = time.monotonic()
    refused = post(b, seconds=0)
    assert refused.status_code == 409 and refused.json() == {"detail": BUSY}, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    line = b.wait_for_event("store_data_lost")
    assert line["level"] == "error" and line["detected_by"] == "admit"
    while (response := post((a, b)[int(time.monotonic() * 10) % 2], seconds=0)).status_code != 202:
        assert response.status_code == 409, response.text
        assert time.monotonic() - wiped < TTL + 3, "admission stayed closed long after the fence"
        time.sleep(0.05)
    waited = time.monotonic() - wiped
    assert waited >= TTL - 0.3, f"admitted {waited:.2f} s after the wipe: before the fence ended"
    assert wait_terminal(b, response.json()["run_id"])["state"] == "DONE"
    assert len(data_lost_lines(a, b)) == 1
    print(f"wipe to the next 202: {waited:.2f} s (fence {TTL} s)")


def test_a_run_queued_during_the_fence_waits_for_its_end_then_runs(replicas, own_redis: RedisServer) -> None:
    a, b = replicas(2, redis=own_redis, LOCK_TTL_SECONDS=str(TTL))
    own_redis.command("FLUSHALL")
    wiped = time.time()
    response = post(b, on_busy="enqueue", seconds=0)
    assert response.status_code == 202, response.text
    assert (response.json()["state"], response.json()["queue_position"]) == ("PENDING", 1), response.json()
    run = wait_terminal(a, response.json()["run_id"])
    assert run["state"] == "DONE", run
    assert wall(run["started_at"]) >= wiped + TTL - 0.3, "taken from the queue before the fence ended"


def test_a_slot_key_lost_alone_is_reasserted_by_its_holder_and_the_run_goes_on(
        replicas, own_redis: RedisServer) -> None:
    """A failover to a replica that had the rest but not the slot key: the holder takes its key back."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    (a,) = replicas(1, redis=own_redis, prefix=prefix, LOCK_TTL_SECONDS="1.5")
    run_id = a.start_run("sleeper", seconds=3)
    a.wait_state(run_id, "RUNNING")
    assert own_redis.command("DEL", f"{prefix}:lock") == 1
    a.wait_for_event("lock_reasserted", run_id=run_id)
    assert own_redis.command("GET", f"{prefix}:lock") is not None
    run = a.wait_run(run_id)
    assert (run["state"], run["error"]) == ("DONE", None), run
    assert not a.events("lock_lost") and not a.events("store_data_lost")  # nothing else was lost
    assert own_redis.command("EXISTS", f"{prefix}:lock") == 0  # released with the terminal state


def test_a_run_that_ends_after_a_wipe_before_its_renewal_keeps_its_terminal_state(
        replicas, own_redis: RedisServer) -> None:
    """The default TTL renews every 10 s: the run ends long before its holder could write anything back."""
    a, b = replicas(2, redis=own_redis)
    run_id = a.start_run("sleeper", seconds=1)
    a.wait_state(run_id, "RUNNING")
    own_redis.command("FLUSHALL")
    run = wait_terminal(b, run_id)
    assert (run["state"], run["result"]["slept"]) == ("DONE", 1), run
    listed = [item["run_id"] for item in b.client.get("/agents/runs").json()["runs"]]
    assert run_id in listed


# --- the scripts themselves: what a renewal takes back, and what it must not ---------------------------------------

def test_a_renewal_takes_back_only_a_slot_whose_run_is_still_its_holders(redis_server: RedisServer) -> None:
    """A key merely gone is taken back; a key another token holds, or a run another replica claimed as an orphan
    (or finished) meanwhile, is lost: taking it back would resurrect a run recorded as ended."""
    import redis
    from service.backends.redis.scripts import RENEW_SCRIPT
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    key = lambda *parts: ":".join((prefix, *parts))  # noqa: E731
    renew = client.register_script(RENEW_SCRIPT)
    keys = [key("lock"), key("generation"), key("fence"), key("unfinished"), key("run", "r"), key("runs"), key("seq")]

    def renew_as(token: str, record: str = "-", known: str = "gen-1") -> list[Any]:
        return renew(keys=keys, args=[token, 3000, known, "gen-2", "r", record])

    try:
        client.set(key("generation"), "gen-1")
        client.hset(key("unfinished"), "r", "mine")
        client.set(key("lock"), "mine", px=3000)
        assert renew_as("mine") == [1, "gen-1", 0]
        client.set(key("lock"), "another", px=3000)
        assert renew_as("mine") == [0, "", 0]  # taken over
        client.delete(key("lock"))
        assert renew_as("mine") == [2, "gen-1", 0] and client.get(key("lock")) == "mine"  # only the key went
        assert not client.exists(key("fence")) and not client.exists(key("run", "r"))  # nothing else was lost
        client.delete(key("lock"))
        client.hset(key("unfinished"), "r", "claim-token")  # another replica claimed it as an orphan
        assert renew_as("mine") == [0, "", 0] and not client.exists(key("lock"))
        client.hdel(key("unfinished"), "r")  # ... and stored its end
        assert renew_as("mine") == [0, "", 0] and not client.exists(key("lock"))
        client.delete(*client.keys(f"{prefix}:*"))  # the data went: the record is asked for, then written back
        assert renew_as("mine") == [3, "gen-2", 1]
        assert client.get(key("fence")) == "gen-2" and 0 < client.pttl(key("fence")) <= 3000
        assert renew_as("mine", '{"state":"RUNNING"}') == [2, "gen-2", 0]
        assert client.get(key("run", "r")) == '{"state":"RUNNING"}' and client.hget(key("unfinished"), "r") == "mine"
        assert client.zrange(key("runs"), 0, -1) == ["r"] and client.get(key("lock")) == "mine"
    finally:
        client.close()


def test_a_terminal_write_is_written_back_only_when_the_generation_changed(redis_server: RedisServer) -> None:
    """A record missing under the generation its holder knows was dropped by retention: not written back."""
    import redis
    from service.backends.redis.scripts import FINISH_SCRIPT
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    key = lambda *parts: ":".join((prefix, *parts))  # noqa: E731
    finish = client.register_script(FINISH_SCRIPT)

    def finish_run(run_id: str, generation: str) -> list[int]:
        return finish(keys=[key("run", run_id), key("finished"), key("unfinished"), key("cancel", run_id),
                            key("sizes"), key("bytes"), key("seq"), key("lock"), key("logbytes"), key("webhooks"),
                            key("webhook", run_id), key("events", "run", run_id, "bytes"), key("generation"),
                            key("runs")],
                      args=['{"state":"DONE"}', run_id, key("finished"), "", 100, "", 10, 10000, generation])

    try:
        client.set(key("generation"), "gen-1")
        assert finish_run("dropped", "gen-1") == [0, 0, 0] and not client.exists(key("run", "dropped"))
        assert finish_run("lost", "gen-0") == [1, 100, 0]  # Redis lost it since its holder last wrote it
        assert client.get(key("run", "lost")) == '{"state":"DONE"}'
        assert client.zrange(key("runs"), 0, -1) == ["lost"] and client.zrange(key("finished"), 0, -1) == ["lost"]
    finally:
        client.close()


def test_a_renewal_retried_after_a_lost_reply_answers_the_generation_in_redis(redis_server: RedisServer) -> None:
    """redis-py runs a script again when its reply was lost. A take-back re-run finds its slot held and must still
    answer the generation Redis has now, not the one its caller knew: a holder left with the old generation would
    later write back a run retention dropped, or take back the slot of a run recorded as ended."""
    import redis
    from service.backends.redis.scripts import RENEW_SCRIPT
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    key = lambda *parts: ":".join((prefix, *parts))  # noqa: E731
    renew = client.register_script(RENEW_SCRIPT)
    keys = [key("lock"), key("generation"), key("fence"), key("unfinished"), key("run", "r"), key("runs"), key("seq")]
    try:
        assert renew(keys=keys, args=["mine", 3000, "gen-1", "gen-2", "r", "-"]) == [3, "gen-2", 1]
        take_back = ["mine", 3000, "gen-1", "gen-3", "r", '{"state":"RUNNING"}']
        assert renew(keys=keys, args=take_back) == [2, "gen-2", 0]
        assert renew(keys=keys, args=take_back) == [1, "gen-2", 0]  # the same call again: held, and gen-2
    finally:
        client.close()


def test_the_call_that_found_the_loss_knows_it_even_when_run_again(redis_server: RedisServer) -> None:
    """store_data_lost is logged by the call that found the loss. If its reply was lost, redis-py runs it again,
    and that run finds the generation made already: its reply must still say whose it is (the new generation it
    sent), or the loss is never logged while every POST meets the fence."""
    import redis
    from service.backends.redis.scripts import ADMIT_SCRIPT, TAKE_SCRIPT
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    key = lambda *parts: ":".join((prefix, *parts))  # noqa: E731
    admit, take = client.register_script(ADMIT_SCRIPT), client.register_script(TAKE_SCRIPT)
    admit_keys = [key("queue"), key("run", "r"), key("runs"), key("seq"), key("unfinished"), key("lock"),
                  key("generation"), key("fence"), key("fencing")]
    admit_args = ['{"state":"PENDING"}', '{"state":"PENDING"}', "r", "reject", 10, "token", 3000, 1, key("queued"),
                  "", "", 0, "gen-admit", 0]
    take_keys = [key("queue"), key("unfinished"), key("lock"), key("generation"), key("fence"), key("fencing")]
    try:
        first = admit(keys=admit_keys, args=admit_args)
        assert first[0] == 0 and first[2:] == ["gen-admit", 1]  # fenced: busy; this call found the loss
        again = admit(keys=admit_keys, args=admit_args)
        assert again[0] == 0 and again[2] == "gen-admit"  # the re-run: the generation this call made
        client.delete(key("generation"), key("fence"))
        take_args = ["token", 3000, 1, 0, "gen-take", 0, key("run", "")]
        first = take(keys=take_keys, args=take_args)
        assert first[2:4] == ["gen-take", 1]
        assert take(keys=take_keys, args=take_args)[2] == "gen-take"
    finally:
        client.close()


def test_a_run_recorded_at_shutdown_after_a_wipe_is_written_back(redis_server: RedisServer) -> None:
    """At shutdown an agent that did not stop is recorded without releasing its slot; if Redis lost the record
    since the holder last wrote it, that terminal state must still be stored (the generation tells)."""
    import asyncio
    import logging

    from service.backends.redis import open_redis
    from service.backends.records import Run

    async def scenario() -> Any:
        prefix = f"test-{uuid.uuid4().hex[:8]}"
        lock, store = open_redis(redis_server.url, prefix, 3.0, 100, 1 << 30, logging.getLogger("test"))
        try:
            run = Run.new(str(uuid.uuid4()), "sleeper", new_user(), {}, holder="token")
            lock.adopt("token", 0, "gen-1")  # the generation its run was written under
            await store.client.set(f"{prefix}:generation", "gen-2")  # Redis lost its data since
            run.update(state="ERROR", error="Run interrupted by shutdown; the agent did not stop")
            await store.save(run)  # no release: the agent's code still runs
            return await store.client.get(f"{prefix}:run:{run.run_id}")
        finally:
            await store.client.aclose()

    stored = asyncio.run(scenario())
    assert stored is not None and b'"state":"ERROR"' in stored
