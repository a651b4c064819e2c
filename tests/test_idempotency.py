"""Idempotency-Key on POST /agents/run: a retried request gets its first run, never a second, in both modes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import HERE, RedisServer, ServerProcess, new_user
from redis_proxy import RedisProxy

BUSY = "An agent is already running, please retry later"
IN_PROGRESS = "The first request with this key is still being processed, please retry later"


def post(srv: ServerProcess, key: str | None, user_id: str, agent_type: str = "sleeper",
         on_busy: str | None = None, **input: Any) -> httpx.Response:
    body: dict[str, Any] = {"agent_type": agent_type, "user_id": user_id, "input": input}
    if on_busy is not None:
        body["on_busy"] = on_busy
    return srv.client.post("/agents/run", json=body, headers={"Idempotency-Key": key} if key is not None else {})


def runs_of(srv: ServerProcess, user_id: str) -> list[dict[str, Any]]:
    return srv.client.get("/agents/runs", params={"user_id": user_id}).json()["runs"]


def new_key() -> str:
    return f"retry-{uuid.uuid4()}"


def test_a_replay_while_running_answers_the_same_202_and_starts_nothing(server: ServerProcess) -> None:
    srv = server
    user, key = new_user(), new_key()
    first = post(srv, key, user, "hanging")
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    run_id = first.json()["run_id"]
    srv.wait_state(run_id, "RUNNING")
    again = post(srv, key, user, "hanging")
    assert again.status_code == 202, again.text  # not 409 busy: the running run is its own
    assert again.json() == first.json() == {"run_id": run_id, "state": "PENDING"}
    assert again.headers["location"] == first.headers["location"] == f"/agents/status/{run_id}"
    assert again.headers["idempotent-replayed"] == "true"
    assert [run["run_id"] for run in runs_of(srv, user)] == [run_id]
    line = srv.wait_for_event("run_replayed", run_id=run_id)
    assert line["key"] == key and line["user_id"] == user and line["agent_type"] == "hanging"
    srv.client.post(f"/agents/cancel/{run_id}")
    srv.wait_run(run_id)


def test_a_replay_after_done_answers_the_same_run_and_starts_nothing(server: ServerProcess) -> None:
    srv = server
    user, key = new_user(), new_key()
    run_id = post(srv, key, user, seconds=0).json()["run_id"]
    assert srv.wait_run(run_id)["state"] == "DONE"
    again = post(srv, key, user, seconds=0)
    assert again.status_code == 202 and again.json()["run_id"] == run_id
    assert again.headers["idempotent-replayed"] == "true"
    assert [run["run_id"] for run in runs_of(srv, user)] == [run_id]
    assert srv.client.get(f"/agents/status/{run_id}").json()["state"] == "DONE"


def test_the_key_with_a_different_request_is_422(server: ServerProcess) -> None:
    srv = server
    user, key = new_user(), new_key()
    run_id = post(srv, key, user, seconds=0).json()["run_id"]
    srv.wait_run(run_id)
    for different in (post(srv, key, user, seconds=1), post(srv, key, new_user(), seconds=0),
                      post(srv, key, user, on_busy="enqueue", seconds=0), post(srv, key, user, "failing")):
        assert different.status_code == 422, different.text
        assert different.json() == {"detail": f"Idempotency-Key '{key}' was used with a different request"}
    assert [run["run_id"] for run in runs_of(srv, user)] == [run_id]
    assert post(srv, key, user, seconds=0).json()["run_id"] == run_id  # the same request still replays


def test_the_same_request_written_differently_is_the_same_request(server: ServerProcess) -> None:
    srv = server
    user, key = new_user(), new_key()
    run_id = srv.client.post("/agents/run", headers={"Idempotency-Key": key, "content-type": "application/json"},
                             content=f'{{"agent_type":"sleeper","user_id":"{user}","input":{{"a":1,"b":0}}}}'
                             ).json()["run_id"]
    again = srv.client.post("/agents/run", headers={"Idempotency-Key": key, "content-type": "application/json"},
                            content=f'{{ "input": {{"b": 0, "a": 1}}, "user_id": "{user.upper()}", '
                                    f'"agent_type": "sleeper", "on_busy": "reject" }}')
    assert again.status_code == 202 and again.json()["run_id"] == run_id
    srv.wait_run(run_id)


def test_twenty_concurrent_requests_with_one_key_start_one_run(server: ServerProcess) -> None:
    srv = server
    user, key = new_user(), new_key()
    body = {"agent_type": "sleeper", "user_id": user, "input": {"seconds": 1}}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, limits=httpx.Limits(max_connections=20), timeout=30) as client:
            return await asyncio.gather(*(client.post("/agents/run", json=body, headers={"Idempotency-Key": key})
                                          for _ in range(20)))

    responses = asyncio.run(burst())
    accepted = [response for response in responses if response.status_code == 202]
    assert all(response.status_code == 202 or (response.status_code == 409
                                               and response.json() == {"detail": IN_PROGRESS})
               for response in responses), [(r.status_code, r.text) for r in responses]
    run_ids = {response.json()["run_id"] for response in accepted}
    assert len(run_ids) == 1 and accepted, [(r.status_code, r.text) for r in responses]
    assert sum("idempotent-replayed" not in response.headers for response in accepted) == 1  # the first
    assert [run["run_id"] for run in runs_of(srv, user)] == list(run_ids)
    retry = srv.client.post("/agents/run", json=body, headers={"Idempotency-Key": key})
    assert retry.status_code == 202 and retry.json()["run_id"] in run_ids
    assert srv.wait_run(retry.json()["run_id"])["state"] == "DONE"


def test_a_key_after_its_ttl_starts_a_new_run(start_server) -> None:
    srv = start_server(IDEMPOTENCY_TTL_SECONDS="1")
    user, key = new_user(), new_key()
    first = post(srv, key, user, seconds=0).json()["run_id"]
    accepted_at = time.monotonic()
    srv.wait_run(first)
    assert post(srv, key, user, seconds=0).json()["run_id"] == first  # remembered within the TTL
    deadline = time.monotonic() + 10
    while (response := post(srv, key, user, seconds=0)).json()["run_id"] == first:
        assert time.monotonic() < deadline, "the key was still remembered 10 s after a 1 s TTL"
        time.sleep(0.05)
    assert response.status_code == 202 and "idempotent-replayed" not in response.headers
    assert time.monotonic() - accepted_at >= 0.9
    second = response.json()["run_id"]
    assert srv.wait_run(second)["state"] == "DONE"
    assert {run["run_id"] for run in runs_of(srv, user)} == {first, second}
    assert post(srv, key, user, seconds=0).json()["run_id"] == second  # and the key now stands for the new run


def test_a_refused_request_is_not_remembered_a_retry_after_the_lock_frees_is_202(server: ServerProcess) -> None:
    srv = server
    holder = srv.start_run("hanging")
    srv.wait_state(holder, "RUNNING")
    user, key = new_user(), new_key()
    refused = post(srv, key, user, seconds=0)
    assert refused.status_code == 409 and refused.json() == {"detail": BUSY}
    assert "retry-after" in refused.headers
    srv.client.post(f"/agents/cancel/{holder}")
    srv.wait_run(holder)
    retried = post(srv, key, user, seconds=0)
    assert retried.status_code == 202, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert [run["run_id"] for run in runs_of(srv, user)] == [retried.json()["run_id"]]
    assert post(srv, key, user, seconds=0).headers["idempotent-replayed"] == "true"
    srv.wait_run(retried.json()["run_id"])


def test_a_refused_request_with_a_different_body_frees_the_key_for_another_request(server: ServerProcess) -> None:
    srv = server
    holder = srv.start_run("hanging")
    srv.wait_state(holder, "RUNNING")
    user, key = new_user(), new_key()
    assert post(srv, key, user, seconds=0).status_code == 409
    srv.client.post(f"/agents/cancel/{holder}")
    srv.wait_run(holder)
    retried = post(srv, key, user, seconds=0.1)
    assert retried.status_code == 202  # nothing was kept of the refused request
    srv.wait_run(retried.json()["run_id"])


def test_a_replay_of_an_enqueued_run_answers_its_current_queue_position(server: ServerProcess) -> None:
    srv = server
    holder = srv.start_run("hanging")
    srv.wait_state(holder, "RUNNING")
    ahead = post(srv, None, new_user(), on_busy="enqueue", seconds=0).json()["run_id"]
    user, key = new_user(), new_key()
    queued = post(srv, key, user, on_busy="enqueue", seconds=0)
    assert queued.json()["queue_position"] == 2
    run_id = queued.json()["run_id"]
    srv.client.post(f"/agents/cancel/{ahead}")
    moved = post(srv, key, user, on_busy="enqueue", seconds=0)
    assert moved.status_code == 202 and moved.headers["idempotent-replayed"] == "true"
    assert moved.json() == {"run_id": run_id, "state": "PENDING", "queue_position": 1}
    srv.client.post(f"/agents/cancel/{holder}")
    assert srv.wait_run(run_id)["state"] == "DONE"
    assert post(srv, key, user, on_busy="enqueue", seconds=0).json() == {
        "run_id": run_id, "state": "PENDING", "queue_position": None}
    assert [run["run_id"] for run in runs_of(srv, user)] == [run_id]


def test_while_shutting_down_a_replay_is_answered_and_a_new_key_is_503_and_not_remembered(start_server) -> None:
    srv = start_server(SHUTDOWN_GRACE_SECONDS="20")
    user, key = new_user(), new_key()
    run_id = post(srv, key, user, "hanging").json()["run_id"]
    srv.wait_state(run_id, "RUNNING")
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while srv.client.get("/readyz").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    replay = post(srv, key, user, "hanging")
    assert replay.status_code == 202 and replay.json()["run_id"] == run_id
    assert replay.headers["idempotent-replayed"] == "true"
    other, other_user = new_key(), new_user()
    for _ in range(2):  # the second answer is 503 again, not 409 "still being processed": nothing was kept
        refused = post(srv, other, other_user, seconds=0)
        assert refused.status_code == 503 and refused.json() == {"detail": "Shutting down"}


@pytest.mark.parametrize("value, why", [
    ("", "empty"), ("k" * 256, "256 characters"), ("caf\u00e9", "not ASCII"), ("a\tb", "a tab"),
])
def test_a_key_outside_the_rule_is_400_and_starts_nothing(server: ServerProcess, value: str, why: str) -> None:
    srv = server
    user = new_user()
    response = srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": user},
                               headers=[("Idempotency-Key", value.encode("latin-1"))])
    assert response.status_code == 400, why
    assert response.json()["detail"].startswith("Idempotency-Key must be 1 to 255 printable ASCII characters")
    assert runs_of(srv, user) == []


def test_the_longest_key_and_every_printable_character_are_accepted(server: ServerProcess) -> None:
    srv = server
    for key in ("k" * 255, "".join(chr(code) for code in range(0x21, 0x7f))):
        user = new_user()
        run_id = post(srv, key, user, seconds=0).json()["run_id"]
        srv.wait_run(run_id)
        assert post(srv, key, user, seconds=0).json()["run_id"] == run_id


def test_two_key_headers_are_400(server: ServerProcess) -> None:
    srv = server
    user = new_user()
    response = srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": user},
                               headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "a")])
    assert response.status_code == 400 and response.json() == {"detail": "Send one Idempotency-Key header, not 2"}
    assert runs_of(srv, user) == []


def keyed_request(key: str, user: str) -> bytes:
    body = f'{{"agent_type":"sleeper","user_id":"{user}","input":{{"seconds":0}}}}'.encode()
    return (b"POST /agents/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: "
            + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_a_client_that_disconnects_mid_body_leaves_its_key_free(start_server) -> None:
    srv = start_server()
    user, key = new_user(), new_key()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(keyed_request(key, user)[:-10])
    srv.wait_for_event("http_request", path="/agents/run", status=400)
    retried = post(srv, key, user, seconds=0)
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers


def test_a_client_that_vanished_gets_its_run_on_retry_and_a_refused_one_a_fresh_start(server: ServerProcess) -> None:
    srv = server
    user, key = new_user(), new_key()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:  # closed without reading the answer
        sock.sendall(keyed_request(key, user))
        accepted = srv.wait_for_event("run_accepted", user_id=user)
    again = post(srv, key, user, seconds=0)
    assert again.status_code == 202 and again.json()["run_id"] == accepted["run_id"]
    assert again.headers["idempotent-replayed"] == "true"
    srv.wait_run(accepted["run_id"])

    holder = srv.start_run("hanging")
    srv.wait_state(holder, "RUNNING")
    user, key = new_user(), new_key()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(keyed_request(key, user))
        srv.wait_for_event("run_rejected", user_id=user)
    srv.client.post(f"/agents/cancel/{holder}")
    srv.wait_run(holder)
    retried = post(srv, key, user, seconds=0)
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
    srv.wait_run(retried.json()["run_id"])


def test_keys_are_bounded_by_run_retention_in_memory_and_by_the_ttl_in_redis(
        start_server, backend: dict[str, str]) -> None:
    srv = start_server(RUN_RETENTION="2")
    user, keys = new_user(), [new_key() for _ in range(3)]
    first = [srv.wait_run(post(srv, key, user, seconds=0).json()["run_id"])["run_id"] for key in keys]
    assert post(srv, keys[2], user, seconds=0).json()["run_id"] == first[2]
    oldest = post(srv, keys[0], user, seconds=0)
    assert oldest.status_code == 202
    if backend:  # Redis keeps keys for their TTL
        assert oldest.json()["run_id"] == first[0]
    else:  # the oldest key was dropped to keep two: the request is new again
        assert oldest.json()["run_id"] not in first and "idempotent-replayed" not in oldest.headers
        srv.wait_run(oldest.json()["run_id"])


def test_openapi_documents_the_header_the_422_and_the_replay_header() -> None:
    operation = yaml.safe_load((HERE / "openapi.yaml").read_text())["paths"]["/agents/run"]["post"]
    (header,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert header["in"] == "header" and header["required"] is False
    # (512: a key of 255 characters, each escaped, in quotes)
    assert header["schema"] == {"type": "string", "minLength": 1, "maxLength": 512, "pattern": "^[ -~]+$"}
    assert "422" in operation["responses"]
    assert operation["responses"]["202"]["headers"]["Idempotent-Replayed"]["schema"]["enum"] == ["true"]


def test_idempotency_ttl_seconds_is_validated_at_start(tmp_path: Path) -> None:
    for value in ("0.5", "nan", "a day", str(31 * 86400)):
        with pytest.raises(RuntimeError, match="IDEMPOTENCY_TTL_SECONDS"):
            ServerProcess(tmp_path / f"bad-{value}.log", IDEMPOTENCY_TTL_SECONDS=value)


# --- Redis only: replicas (the replicas fixture is in conftest.py), and Redis failing around a keyed request --

def test_a_retry_through_the_other_replica_replays_the_same_run(replicas) -> None:
    first, second = replicas(2)
    user, key = new_user(), new_key()
    run_id = post(first, key, user, "hanging").json()["run_id"]
    first.wait_state(run_id, "RUNNING")
    again = post(second, key, user, "hanging")
    assert again.status_code == 202 and again.json()["run_id"] == run_id
    assert again.headers["idempotent-replayed"] == "true"
    second.wait_for_event("run_replayed", run_id=run_id, key=key)
    assert post(second, key, new_user(), "hanging").status_code == 422
    assert [run["run_id"] for run in runs_of(second, user)] == [run_id]
    second.client.post(f"/agents/cancel/{run_id}")
    first.wait_run(run_id)
    assert post(second, key, user, "hanging").json()["run_id"] == run_id  # after DONE too


def test_a_burst_with_one_key_across_two_replicas_starts_one_run(replicas) -> None:
    first, second = replicas(2)
    user, key = new_user(), new_key()
    body = {"agent_type": "sleeper", "user_id": user, "input": {"seconds": 0.5}}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20), timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{(first, second)[i % 2].url}/agents/run", json=body,
                                                      headers={"Idempotency-Key": key}) for i in range(20)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 202 or (r.status_code == 409 and r.json() == {"detail": IN_PROGRESS})
               for r in responses), [(r.status_code, r.text) for r in responses]
    run_ids = {r.json()["run_id"] for r in responses if r.status_code == 202}
    assert len(run_ids) == 1
    assert [run["run_id"] for run in runs_of(first, user)] == list(run_ids)


def test_redis_down_is_503_and_the_key_is_not_remembered(tmp_path: Path, redis_server: RedisServer) -> None:
    proxy = RedisProxy(redis_server.port)
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=proxy.url, REDIS_PREFIX=f"test-{uuid.uuid4().hex[:8]}")
    try:
        user, key = new_user(), new_key()
        # The admit script fails (its connection dropped, on every retry): the claimed key must be given back.
        proxy.drop(lambda chunk: b"EVAL" in chunk and b":queued" in chunk, times=3)
        failed = post(srv, key, user, seconds=0)
        assert failed.status_code == 503 and failed.json() == {"detail": "Run store unavailable"}
        assert proxy.dropped == 3
        retried = post(srv, key, user, seconds=0)
        assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers, retried.text
        assert [run["run_id"] for run in runs_of(srv, user)] == [retried.json()["run_id"]]
    finally:
        srv.stop(signal.SIGKILL)
        proxy.close()


def test_a_run_admitted_whose_key_was_not_stored_is_replayed_not_run_twice(
        tmp_path: Path, redis_server: RedisServer) -> None:
    proxy = RedisProxy(redis_server.port)
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=proxy.url, REDIS_PREFIX=f"test-{uuid.uuid4().hex[:8]}")
    try:
        user, key = new_user(), new_key()
        # After the run is admitted, marking its key accepted fails: the key stays pending with the run's id.
        proxy.drop(lambda chunk: b"EVAL" in chunk and b":idempotency:" in chunk and b":run:" not in chunk, times=3)
        first = post(srv, key, user, "hanging")
        assert first.status_code == 202 and proxy.dropped == 3  # the run is accepted all the same
        again = post(srv, key, user, "hanging")
        assert again.status_code == 202 and again.json()["run_id"] == first.json()["run_id"]
        assert again.headers["idempotent-replayed"] == "true"
        assert len(runs_of(srv, user)) == 1
        srv.client.post(f"/agents/cancel/{first.json()['run_id']}")
    finally:
        srv.stop(signal.SIGKILL)
        proxy.close()


def test_redis_stopped_is_503_for_a_keyed_request_and_a_retry_after_it_is_back_starts_the_run(
        tmp_path: Path, persistent_redis: RedisServer) -> None:
    own_redis = persistent_redis  # back with its data: one without fences admission for a TTL (test_data_loss)
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=own_redis.url, REDIS_PREFIX="test-idem")
    try:
        user, key = new_user(), new_key()
        own_redis.stop()
        down = post(srv, key, user, seconds=0)
        assert down.status_code == 503 and down.json() == {"detail": "Run store unavailable"}
        own_redis.start()
        deadline = time.monotonic() + 15
        while (retried := post(srv, key, user, seconds=0)).status_code == 503:
            assert time.monotonic() < deadline, retried.text
            time.sleep(0.1)
        assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers, retried.text
        assert srv.wait_run(retried.json()["run_id"])["state"] == "DONE"
    finally:
        srv.stop(signal.SIGKILL)


def test_a_replay_of_a_run_with_a_webhook_is_its_202_even_when_the_webhook_host_no_longer_resolves(
        start_server) -> None:
    """The retry's answer is the first one's: a look-up failing now must not tell the client its run was a 400."""
    srv = start_server(AGENT_MODULES="fixture_agents,fixture_flaky_dns", WEBHOOK_SECRET="s" * 16,
                       WEBHOOK_ALLOWED_HOSTS="localhost")
    user, key = new_user(), new_key()
    body = {"agent_type": "sleeper", "user_id": user, "input": {}, "webhook": "http://localhost:9/hook"}
    first = srv.client.post("/agents/run", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    again = srv.client.post("/agents/run", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202, again.text
    assert again.json()["run_id"] == first.json()["run_id"] and again.headers["idempotent-replayed"] == "true"
    fresh = srv.client.post("/agents/run", json=body, headers={"Idempotency-Key": new_key()})
    assert fresh.status_code == 400 and "does not resolve" in fresh.json()["detail"]  # a new request is checked
    assert [run["run_id"] for run in runs_of(srv, user)] == [first.json()["run_id"]]


# --- ways to a second run per key that a review found ------------------------------------------------------------

def test_a_key_is_kept_while_its_run_waits_or_runs_however_many_keys_follow(start_server) -> None:
    """Keys are bounded like runs: retention never drops a run that has not finished, nor may it drop its key."""
    srv = start_server(RUN_RETENTION="1", ON_BUSY="enqueue")
    user, keys = new_user(), [new_key() for _ in range(3)]
    run_ids = [post(srv, key, user, "hanging").json()["run_id"] for key in keys]  # one runs, two wait
    srv.wait_state(run_ids[0], "RUNNING")
    for key, run_id in zip(keys, run_ids):
        again = post(srv, key, user, "hanging")
        assert again.status_code == 202 and again.json()["run_id"] == run_id, again.text
        assert again.headers["idempotent-replayed"] == "true"
    assert sorted(run["run_id"] for run in runs_of(srv, user)) == sorted(run_ids)
    for run_id in reversed(run_ids):
        srv.client.post(f"/agents/cancel/{run_id}")


def test_a_run_whose_key_was_not_stored_is_replayed_after_retention_dropped_it(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """The key stayed pending (marking it accepted failed), its run ended and was dropped: a retry a minute later
    must not take the key over as if the first request had died before admitting anything."""
    proxy = RedisProxy(redis_server.port)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=proxy.url, REDIS_PREFIX=prefix, RUN_RETENTION="1")
    try:
        user, key = new_user(), new_key()
        proxy.drop(lambda chunk: b"EVAL" in chunk and b":idempotency:" in chunk and b":run:" not in chunk, times=3)
        first = post(srv, key, user, seconds=0)
        assert first.status_code == 202 and proxy.dropped == 3
        run_id = first.json()["run_id"]
        assert srv.wait_run(run_id)["state"] == "DONE"
        srv.run_to_end()  # retention keeps one finished run: this one
        assert srv.client.get(f"/agents/status/{run_id}").status_code == 404
        # A minute passes (the pending claim's age is what the claim script reads from its TTL).
        redis_server.command("PEXPIRE", f"{prefix}:idempotency:{key}", str(86400_000 - 61_000))
        again = post(srv, key, user, seconds=0)
        assert again.status_code == 202 and again.json()["run_id"] == run_id, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert runs_of(srv, user) == []  # nothing started
    finally:
        srv.stop(signal.SIGKILL)
        proxy.close()


def test_a_request_whose_claim_expired_while_it_was_decided_does_not_start_a_second_run(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """The first request stalls between claiming its key and admitting its run; meanwhile the claim expires and
    a retry claims the key afresh and is admitted. The first must then not be admitted too."""
    proxy = RedisProxy(redis_server.port)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=proxy.url, REDIS_PREFIX=prefix)
    user, key = new_user(), new_key()
    held = threading.Event()

    def expire_the_claim() -> None:
        redis_server.command("DEL", f"{prefix}:idempotency:{key}")
        held.set()

    try:
        proxy.hold(lambda chunk: b"EVAL" in chunk and b":queued" in chunk, 1.0, expire_the_claim)  # the admit script
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first_future = pool.submit(post, srv, key, user, "hanging", "enqueue")
            assert held.wait(10)
            with httpx.Client(base_url=srv.url, timeout=30) as other:
                retry = other.post("/agents/run", headers={"Idempotency-Key": key},
                                   json={"agent_type": "hanging", "user_id": user, "input": {}, "on_busy": "enqueue"})
            first = first_future.result(timeout=30)
        answers = [(first.status_code, first.text), (retry.status_code, retry.text)]
        accepted = {r.json()["run_id"] for r in (first, retry) if r.status_code == 202}
        assert len(accepted) == 1, answers
        assert all(r.status_code == 202 or r.json() == {"detail": IN_PROGRESS} for r in (first, retry)), answers
        assert [run["run_id"] for run in runs_of(srv, user)] == list(accepted)
        srv.client.post(f"/agents/cancel/{accepted.pop()}")
    finally:
        srv.stop(signal.SIGKILL)
        proxy.close()
