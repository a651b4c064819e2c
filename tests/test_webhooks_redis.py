"""Webhooks across replicas (Redis mode): an owed delivery survives its replica, and is never sent by two."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from service.backends.redis.scripts import FINISH_SCRIPT, TRIM_SCRIPT
from service.backends.redis.side_scripts import CLAIM_WEBHOOK_SCRIPT, REPORT_WEBHOOK_SCRIPT

from conftest import RedisServer, ServerProcess, new_user
from redis_proxy import RedisProxy
from test_webhooks import HOOKS, SECRET, Receiver, documented_verifier


@pytest.fixture
def replica(replicas: Any) -> Any:
    """Factory: replica(prefix, **env) -> a server with webhooks on, on the shared Redis under ``prefix``."""
    return lambda prefix, **env: replicas(1, prefix=prefix, **{**HOOKS, **env})[0]


@pytest.fixture
def receiver_factory():
    made: list[Receiver] = []

    def make(*answers: int | str) -> Receiver:
        made.append(Receiver(*answers))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def hooked_run(server: ServerProcess, url: str, **fields: object) -> str:
    response = server.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user(),
                                                       "input": {"seconds": 0.05}, "webhook": url, **fields})
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


def test_a_replica_killed_during_the_backoff_leaves_the_delivery_to_another(replica, receiver_factory,
                                                                             redis_server: RedisServer) -> None:
    receiver = receiver_factory(500)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a = replica(prefix, WEBHOOK_BACKOFF_SECONDS="3")
    run_id = hooked_run(a, receiver.url)
    a.wait_for_event("webhook_failed", run_id=run_id, attempt=1)
    a.stop(signal.SIGKILL)  # it owed attempt 2 in 3 s
    assert redis_server.command("ZSCORE", f"{prefix}:webhooks", run_id) is not None
    b = replica(prefix, WEBHOOK_BACKOFF_SECONDS="3")
    delivered = b.wait_for_event("webhook_delivered", run_id=run_id, timeout=15)
    assert delivered["attempt"] == 2 and delivered["status"] == 200
    assert [request["answer"] for request in receiver.requests] == [500, 200]
    assert documented_verifier()(SECRET, receiver.requests[1]["headers"]["Agent-Runner-Signature"],
                             receiver.requests[1]["body"])
    time.sleep(0.5)
    assert redis_server.command("EXISTS", f"{prefix}:webhook:{run_id}") == 0  # done: nothing left owed
    assert redis_server.command("ZCARD", f"{prefix}:webhooks") == 0


def test_a_replica_killed_mid_attempt_leaves_it_to_another_once_the_lease_ends(replica, receiver_factory) -> None:
    receiver = receiver_factory("hang")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a = replica(prefix, WEBHOOK_TIMEOUT_SECONDS="1")  # lease: 2 x 1 + 5 = 7 s
    b = replica(prefix, WEBHOOK_TIMEOUT_SECONDS="1")
    run_id = hooked_run(a, receiver.url)
    first = receiver.wait_requests(1)[0]
    a.stop(signal.SIGKILL)
    b.stop(signal.SIGKILL)  # whichever of the two took it is gone mid-attempt
    c = replica(prefix, WEBHOOK_TIMEOUT_SECONDS="1")
    delivered = c.wait_for_event("webhook_delivered", run_id=run_id, timeout=20)
    assert delivered["attempt"] == 2
    second = receiver.requests[1]
    assert second["answer"] == 200 and second["body"] == first["body"]
    assert second["at"] - first["at"] >= 6.5  # not before the lease of the dead replica ended


def test_two_live_replicas_never_both_send_a_delivery(replica, receiver_factory) -> None:
    receiver = receiver_factory(*([500] * 6))  # some retries in the mix, taken by either replica
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a = replica(prefix, WEBHOOK_BACKOFF_SECONDS="0.1")
    b = replica(prefix, WEBHOOK_BACKOFF_SECONDS="0.1")
    run_ids = [hooked_run((a, b)[i % 2], receiver.url, on_busy="enqueue") for i in range(12)]
    for run_id in run_ids:
        a.wait_run(run_id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        delivered = [line for server in (a, b) for line in server.events("webhook_delivered")]
        if len(delivered) >= len(run_ids):
            break
        time.sleep(0.1)
    time.sleep(1.0)  # past any backoff: a second sender would have sent by now
    delivered = [line for server in (a, b) for line in server.events("webhook_delivered")]
    assert sorted(line["run_id"] for line in delivered) == sorted(run_ids)
    successes = Counter(json.loads(request["body"])["run_id"] for request in receiver.requests
                        if request["answer"] == 200)
    assert successes == Counter(run_ids)  # exactly one success per run
    attempts = Counter((json.loads(request["body"])["run_id"]) for request in receiver.requests)
    failed = [line for server in (a, b) for line in server.events("webhook_failed")]
    assert len(receiver.requests) == len(run_ids) + len(failed) == sum(attempts.values())
    assert {line["attempt"] for line in delivered} >= {1}


def test_the_claim_and_report_scripts_lease_count_and_give_up(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    zset, key = f"{prefix}:webhooks", f"{prefix}:webhook:"
    claim, report = client.register_script(CLAIM_WEBHOOK_SCRIPT), client.register_script(REPORT_WEBHOOK_SCRIPT)
    try:
        assert claim(keys=[zset], args=[5000, "t1", key, 6]) == [0, -1]  # nothing owed
        client.hset(key + "run-a", mapping={"url": "http://x/", "body": b"{}", "attempt": 0, "id": "msg_a"})
        client.zadd(zset, {"run-a": 0})
        assert claim(keys=[zset], args=[5000, "t1", key, 6]) == [1, b"run-a", 1, b"http://x/", b"{}", b"msg_a"]
        waiting = claim(keys=[zset], args=[5000, "t2", key, 6])  # leased: not due for another replica
        assert waiting[0] == 0 and 4000 < waiting[1] <= 5000
        assert report(keys=[zset, key + "run-a"], args=["t2", "done", "run-a"]) == 0  # not t2's lease
        assert client.exists(key + "run-a") == 1
        assert report(keys=[zset, key + "run-a"], args=["t1", 0, "run-a"]) == 1  # due again at once
        again = claim(keys=[zset], args=[5000, "t3", key, 6])
        assert again[:3] == [1, b"run-a", 2] and again[5] == b"msg_a"  # the second attempt keeps its webhook-id
        assert report(keys=[zset, key + "run-a"], args=["t3", "done", "run-a"]) == 1
        assert client.exists(key + "run-a") == 0 and client.zcard(zset) == 0
        # every attempt made (the last claimer died): given up, and forgotten
        client.hset(key + "run-b", mapping={"url": "http://x/", "body": b"{}", "attempt": 6})
        client.zadd(zset, {"run-b": 0})
        assert claim(keys=[zset], args=[5000, "t4", key, 6]) == [2, b"run-b", 6]
        assert client.exists(key + "run-b") == 0 and client.zcard(zset) == 0
        client.zadd(zset, {"run-c": 0})  # a due entry without its record: dropped
        assert claim(keys=[zset], args=[5000, "t5", key, 6]) == [0, 0] and client.zcard(zset) == 0
    finally:
        client.close()


def test_a_claim_sent_again_answers_the_same_delivery_and_counts_its_attempt_once(redis_server: RedisServer) -> None:
    """redis-py sends a script again when its reply was lost (a timeout, a dropped connection), possibly after the
    first copy ran. The copy with the same lease token answers what the first claimed, or gave up on, and changes
    nothing: no attempt counted twice, no second delivery leased for nobody."""
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    zset, key = f"{prefix}:webhooks", f"{prefix}:webhook:"
    claim = client.register_script(CLAIM_WEBHOOK_SCRIPT)
    try:
        for run_id, attempt in (("run-a", 0), ("run-b", 0)):
            client.hset(key + run_id, mapping={"url": "http://x/", "body": b"{}", "attempt": attempt})
            client.zadd(zset, {run_id: 0 if run_id == "run-a" else 1})
        first = claim(keys=[zset], args=[5000, "t1", key, 6])
        assert first == [1, b"run-a", 1, b"http://x/", b"{}", None]
        assert claim(keys=[zset], args=[5000, "t1", key, 6]) == first  # the copy: the same claim
        assert client.hget(key + "run-a", "attempt") == b"1"
        assert client.hget(key + "run-b", "attempt") == b"0" and client.zscore(zset, "run-b") == 1  # untouched
        # a delivery given up on (every attempt made): its copy answers the same, and claims nothing else
        client.hset(key + "run-c", mapping={"url": "http://x/", "body": b"{}", "attempt": 6})
        client.zadd(zset, {"run-c": -1})
        assert claim(keys=[zset], args=[5000, "t2", key, 6]) == [2, b"run-c", 6]
        assert claim(keys=[zset], args=[5000, "t2", key, 6]) == [2, b"run-c", 6]
        assert client.hget(key + "run-b", "attempt") == b"0" and client.zscore(zset, "run-b") == 1
        assert claim(keys=[zset], args=[5000, "t3", key, 6])[:3] == [1, b"run-b", 1]  # a new claim goes on
    finally:
        client.close()


def test_a_delivery_owed_across_a_redis_restart_is_still_delivered(tmp_path: Path, persistent_redis: RedisServer,
                                                                   receiver_factory) -> None:
    receiver = receiver_factory(500)
    server = ServerProcess(tmp_path / "server.log", REDIS_URL=persistent_redis.url, **{
        **HOOKS, "WEBHOOK_BACKOFF_SECONDS": "1.5"})
    try:
        run_id = hooked_run(server, receiver.url)
        server.wait_for_event("webhook_failed", run_id=run_id, attempt=1)
        failed_at = time.monotonic()
        persistent_redis.stop()  # down while attempt 2 falls due
        server.wait_for_event("store_unavailable")  # the deliverer found it gone...
        time.sleep(max(0.0, failed_at + 1.6 - time.monotonic()))  # ...and stays down past the due time
        persistent_redis.start()
        delivered = server.wait_for_event("webhook_delivered", run_id=run_id, timeout=20)
        assert delivered["attempt"] == 2
        assert [request["answer"] for request in receiver.requests] == [500, 200]
        assert server.client.get("/healthz").status_code == 200
    finally:
        server.stop(signal.SIGKILL)


def test_a_finish_retried_after_it_landed_never_recreates_a_dropped_run_nor_owes_a_second_delivery(
        redis_server: RedisServer) -> None:
    """redis-py sends the FINISH script again when its reply was lost: the first call may have landed, the run
    been delivered and dropped by retention meanwhile. The retry must find it done, not do it again."""
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    finish, trim = client.register_script(FINISH_SCRIPT), client.register_script(TRIM_SCRIPT)
    claim, report = client.register_script(CLAIM_WEBHOOK_SCRIPT), client.register_script(REPORT_WEBHOOK_SCRIPT)
    key = lambda *parts: ":".join((prefix, *parts))  # noqa: E731

    def finish_run(run_id: str) -> Any:
        return finish(keys=[key("run", run_id), key("finished"), key("unfinished"), key("cancel", run_id),
                            key("sizes"), key("bytes"), key("seq"), key("lock"), key("logbytes"), key("webhooks"),
                            key("webhook", run_id), key("events", "run", run_id, "bytes")],
                      args=[b'{"state":"DONE"}', run_id, key("finished"), "", 100, "http://x/", 10, 10000])

    def deliver() -> None:
        reply = claim(keys=[key("webhooks")], args=[5000, "lease", key("webhook", ""), 6])
        assert reply[0] == 1, reply
        assert report(keys=[key("webhooks"), key("webhook", reply[1].decode())],
                      args=["lease", "done", reply[1].decode()]) == 1

    try:
        client.set(key("run", "run-a"), b'{"state":"RUNNING"}')  # as admission stored it
        assert finish_run("run-a") == [1, 100, 1]
        deliver()
        assert finish_run("run-a") == [1, 100, 0]  # landed before: counted once, nothing owed again
        assert client.zcard(key("webhooks")) == 0 and not client.exists(key("webhook", "run-a"))
        assert trim(keys=[key("finished"), key("runs"), key("sizes"), key("bytes"), key("logbytes")],
                    args=[0, 0, key("run", ""), key("log", ""), key("events", "run", "")]) == 1
        assert not client.exists(key("run", "run-a"))
        assert finish_run("run-a") == [0, 0, 0]  # dropped meanwhile: not written again
        assert not client.exists(key("run", "run-a")) and client.zcard(key("finished")) == 0
        assert client.zcard(key("webhooks")) == 0 and not client.exists(key("webhook", "run-a"))
        assert int(client.get(key("bytes")) or 0) == 0 and client.hlen(key("sizes")) == 0
    finally:
        client.close()


def test_deliveries_owed_in_redis_are_bounded_by_count_and_bytes(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    finish, report = client.register_script(FINISH_SCRIPT), client.register_script(REPORT_WEBHOOK_SCRIPT)
    claim = client.register_script(CLAIM_WEBHOOK_SCRIPT)
    key = lambda *parts: ":".join((prefix, *parts))  # noqa: E731
    body = b'{"state":"DONE","result":"' + b"x" * 80 + b'"}'

    def finish_run(run_id: str, body: bytes = body, max_owed: int = 2, max_bytes: int = 250) -> int:
        client.set(key("run", run_id), b'{"state":"RUNNING"}')
        reply = finish(keys=[key("run", run_id), key("finished"), key("unfinished"), key("cancel", run_id),
                             key("sizes"), key("bytes"), key("seq"), key("lock"), key("logbytes"), key("webhooks"),
                             key("webhook", run_id), key("events", "run", run_id, "bytes")],
                       args=[body, run_id, key("finished"), "", 100, "http://x/", max_owed, max_bytes])
        return reply[2]

    try:
        assert [finish_run("a"), finish_run("b")] == [1, 1]
        assert int(client.get(key("webhooks", "bytes"))) == 2 * len(body)
        assert finish_run("c") == -1  # a third is past the count
        assert not client.exists(key("webhook", "c")) and client.zcard(key("webhooks")) == 2
        leased = claim(keys=[key("webhooks")], args=[5000, "lease", key("webhook", ""), 6])
        assert report(keys=[key("webhooks"), key("webhook", leased[1].decode())],
                      args=["lease", "done", leased[1].decode()]) == 1
        assert int(client.get(key("webhooks", "bytes"))) == len(body)  # a delivery that ends gives its bytes back
        assert finish_run("d", body=b"y" * 200) == -1  # room for one more, but not for 200 more bytes
        assert finish_run("e") == 1 and client.zcard(key("webhooks")) == 2
    finally:
        client.close()


def test_a_replica_without_the_secret_that_ends_a_hooked_run_says_the_delivery_waits(
        replicas: Any, receiver_factory: Any, redis_server: RedisServer) -> None:
    """A fleet where only some replicas (or none any more) have WEBHOOK_SECRET: never silent."""
    receiver = receiver_factory()
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    hooked, = replicas(1, prefix=prefix, LOCK_TTL_SECONDS="1", **HOOKS)
    plain, = replicas(1, prefix=prefix, LOCK_TTL_SECONDS="1")
    blocker = hooked.start_run("hanging")
    hooked.wait_state(blocker, "RUNNING")
    run_id = hooked_run(hooked, receiver.url, on_busy="enqueue")
    hooked.stop(signal.SIGKILL)  # its slot expires: the replica without the secret takes the queued run
    assert plain.wait_run(run_id)["state"] == "DONE"
    line = plain.wait_for_event("webhook_owed_without_secret", run_id=run_id)
    assert line["level"] == "warning" and "WEBHOOK_SECRET" in line["detail"]
    assert redis_server.command("EXISTS", f"{prefix}:webhook:{run_id}") == 1  # owed, for a replica with the secret
    assert receiver.requests == []


def test_a_terminal_write_whose_reply_was_lost_while_retention_dropped_the_run_is_not_written_back(
        tmp_path: Path, redis_server: RedisServer, receiver_factory: Any) -> None:
    """The FINISH script lands, its reply is lost, and before redis-py sends it again the run is delivered and
    dropped by retention (as another replica's trim would): the retry must leave it dropped and owe nothing."""
    receiver = receiver_factory()
    proxy = RedisProxy(redis_server.port)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(tmp_path / "server.log", REDIS_URL=proxy.url, REDIS_PREFIX=prefix, **HOOKS)
    dropped = threading.Event()

    def deliver_and_drop_everything() -> None:
        client = redis.Redis.from_url(redis_server.url)
        try:
            for key in client.scan_iter(f"{prefix}:webhook:*"):
                client.delete(key)
            client.delete(f"{prefix}:webhooks")
            client.register_script(TRIM_SCRIPT)(
                keys=[f"{prefix}:finished", f"{prefix}:runs", f"{prefix}:sizes", f"{prefix}:bytes",
                      f"{prefix}:logbytes"],
                args=[0, 0, f"{prefix}:run:", f"{prefix}:log:", f"{prefix}:events:run:"])
        finally:
            client.close()
        dropped.set()

    redis_server.command("SCRIPT", "LOAD", FINISH_SCRIPT)  # so the reply lost is the script's, not NOSCRIPT's
    try:
        proxy.lose_reply(lambda chunk: b'"state":"DONE"' in chunk and b":webhooks" in chunk,
                         deliver_and_drop_everything)
        run_id = hooked_run(server, receiver.url)
        server.wait_for_event("agent_complete", run_id=run_id)
        assert dropped.is_set()
        assert server.client.get(f"/agents/status/{run_id}").status_code == 404  # not written back
        assert redis_server.command("EXISTS", f"{prefix}:webhook:{run_id}") == 0  # nothing owed again
        assert redis_server.command("ZSCORE", f"{prefix}:webhooks", run_id) is None
        assert len(receiver.requests) <= 1
    finally:
        server.stop(signal.SIGKILL)
        proxy.close()
