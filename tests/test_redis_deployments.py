"""Redis as teams deploy it (issue 26): Sentinel and Cluster started by the tests, a failover during runs in
each, and /readyz saying 503 for a store that cannot run the service's scripts.

Agents: fixture_resource_agents' ``coroutine-worker`` notes each use of the resource in a ledger file of the
test's own, so "never more running than the slots" is measured outside Redis.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import RedisServer, ServerProcess, free_port, new_user, require_redis_server, wait_until
from redis_deployments import ClusterSet, Node, SentinelSet, acl_words, cli

AGENTS = "fixture_agents,fixture_resource_agents,fixture_event_agents"
TERMINAL = {"DONE", "ERROR", "CANCELLED", "TIMEOUT", "INTERRUPTED"}


def most_at_once(ledger: Path) -> int:
    """The most uses of the resource that overlapped, from the ledger's start and end lines."""
    busy = most = 0
    for line in ledger.read_text().splitlines():
        busy += 1 if line.split()[0] == "start" else -1
        most = max(most, busy)
    return most


def post(srv: ServerProcess, ledger: Path, seconds: float) -> str:
    response = srv.client.post("/agents/run", json={
        "agent_type": "coroutine-worker", "user_id": new_user(), "on_busy": "enqueue",
        "input": {"ledger": str(ledger), "seconds": seconds}})
    assert response.status_code == 202, response.text
    return str(response.json()["run_id"])


def final_state(servers: list[ServerProcess], run_id: str, timeout: float = 60) -> dict[str, Any]:
    """The run once terminal, asked of each replica in turn (a 503 while the store fails over is asked again)."""
    def terminal() -> dict[str, Any] | None:
        for srv in servers:
            response = srv.client.get(f"/agents/status/{run_id}")
            if response.status_code == 200 and response.json()["state"] in TERMINAL:
                return dict(response.json())
        return None
    return dict(wait_until(terminal, timeout, f"run {run_id} to end"))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    """Factory: service(url, **env) -> a server process on that REDIS_URL, killed after the test."""
    started: list[ServerProcess] = []

    def start(url: str, **env: str) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"service-{len(started)}.log", REDIS_URL=url, AGENT_MODULES=AGENTS, **env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(signal.SIGKILL)


def test_sentinel_failover_mid_run_keeps_runs_going_and_never_more_than_the_slots(tmp_path: Path, service) -> None:
    deployment = SentinelSet(tmp_path / "redis")
    try:
        prefix = f"test-{uuid.uuid4().hex[:8]}"
        servers = [service(deployment.url, REDIS_PREFIX=prefix, MAX_CONCURRENT_RUNS="2", LOCK_TTL_SECONDS="12")
                   for _ in range(2)]
        ledger = tmp_path / "ledger"
        before = [post(servers[i % 2], ledger, 2.5) for i in range(4)]
        wait_until(lambda: ledger.exists() and most_at_once(ledger) == 2, 10, "two runs using the resource")
        old = deployment.master_port()
        killed_at = time.monotonic()
        deployment.primary.kill()
        wait_until(lambda: deployment.master_port() != old, 20, "a sentinel to promote the replica")
        promoted_after = time.monotonic() - killed_at
        wait_until(lambda: servers[0].client.get("/readyz").status_code == 200, 20, "/readyz ready again")
        after = [post(servers[i % 2], ledger, 0.2) for i in range(2)]
        states = [final_state(servers, run_id)["state"] for run_id in before + after]
        assert states == ["DONE"] * 6, states
        assert most_at_once(ledger) == 2
        assert deployment.master_port() == deployment.replica.port
        assert promoted_after < 10, promoted_after
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    deployment = ClusterSet(tmp_path_factory.mktemp("cluster"))
    yield deployment
    deployment.stop()


def test_cluster_keeps_runs_through_a_resharding_and_a_failover_of_the_prefix_slot(tmp_path: Path, service,
                                                                                    cluster: ClusterSet) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    slot = cluster.slot_of(prefix)  # every key is {prefix}:...: they hash as the prefix alone
    servers = [service(cluster.url, REDIS_PREFIX=prefix, MAX_CONCURRENT_RUNS="2", LOCK_TTL_SECONDS="12")
               for _ in range(2)]
    ledger = tmp_path / "ledger"
    accepted = [post(servers[i % 2], ledger, 1.5) for i in range(6)]
    wait_until(lambda: ledger.exists() and most_at_once(ledger) == 2, 10, "two runs using the resource")
    owner = cluster.owner(slot)["port"]
    assert int(cli(owner, "CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 3  # the service's keys are there
    moved_to = cluster.move_slot(slot)
    assert moved_to != owner and int(cli(moved_to, "CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 3
    accepted += [post(servers[i % 2], ledger, 1.5) for i in range(2)]
    promoted = cluster.fail_over(slot)
    assert promoted not in (owner, moved_to)
    accepted += [post(servers[i % 2], ledger, 0.2) for i in range(2)]
    states = [final_state(servers, run_id)["state"] for run_id in accepted]
    assert states == ["DONE"] * len(accepted), states
    assert most_at_once(ledger) == 2
    listed = {run["run_id"] for run in servers[1].client.get("/agents/runs", params={"limit": 100}).json()["runs"]}
    assert listed == set(accepted)  # nothing accepted was lost on the way


def test_a_cluster_keeps_a_runs_log_lines_and_events_for_every_replica(service, cluster: ClusterSet) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a, b = (service(cluster.url, REDIS_PREFIX=prefix) for _ in range(2))
    with b.client.stream("GET", "/agents/events") as stream:  # B's reader follows the stream A's writer fills
        run_id = a.start_run("chatty", lines=3)
        assert a.wait_run(run_id)["state"] == "DONE"
        deadline, seen = time.monotonic() + 10, False
        for line in stream.iter_lines():  # keep-alive comments come every few seconds: the deadline is checked
            seen = run_id in line and '"state":"DONE"' in line
            if seen or time.monotonic() > deadline:
                break
    assert seen, "replica B's stream never carried the run's end"
    lines = b.client.get(f"/agents/logs/{run_id}").json()["lines"]
    assert [line["event"] for line in lines] == ["line_loop"] * 3 + ["line_thread"]
    assert not a.events("events_unavailable") and not b.events("events_unavailable")


def test_a_cluster_service_under_the_documented_acl_user_runs(service, cluster: ClusterSet) -> None:
    prefix, password = f"test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    for node in cluster.nodes:  # ACL users are per node: each gets the line
        assert cli(node.port, *acl_words("runner", password, f"{{{prefix}}}", cluster=True)) == "OK"
    url = cluster.url.replace("redis+cluster://", f"redis+cluster://runner:{password}@")
    srv = service(url, REDIS_PREFIX=prefix)
    assert srv.client.get("/readyz").status_code == 200
    assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
    assert "NoPermissionError" not in srv.log_path.read_text() and not srv.events("store_unavailable")


def not_ready(srv: ServerProcess, reason: str) -> None:
    response = srv.client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"detail": "Run store unavailable"})
    line = srv.wait_for_event("store_not_ready")
    assert reason in line["error"], line
    srv.client.get("/readyz")
    assert len(srv.events("store_not_ready")) == 1  # once, not once per probe


def test_readyz_503_on_a_cluster_node_that_does_not_own_the_prefix_slot(service, cluster: ClusterSet) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    owner = cluster.owner(cluster.slot_of(prefix))["port"]
    other = next(row["port"] for row in cluster.shards() if "master" in row["flags"] and row["port"] != owner)
    not_ready(service(f"redis://127.0.0.1:{other}/0", REDIS_PREFIX=f"{{{prefix}}}"), "MovedError")


def test_an_unreachable_cluster_answers_503_not_500_and_the_service_starts_anyway(service) -> None:
    srv = service(f"redis+cluster://127.0.0.1:{free_port()}")
    not_ready(srv, "Redis Cluster cannot be connected")
    response = srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()})
    assert (response.status_code, response.json()) == (503, {"detail": "Run store unavailable"})
    assert not srv.events("pubsub_listener_restarted") and not srv.events("unhandled_error")


def test_readyz_503_on_a_sentinel_given_as_redis(tmp_path: Path, service) -> None:
    require_redis_server()
    sentinel = Node(tmp_path, ["sentinel monitor nowhere 127.0.0.1 1 2"], sentinel=True)
    try:
        not_ready(service(f"redis://127.0.0.1:{sentinel.port}/0"), "unknown command")
    finally:
        sentinel.kill()


def test_readyz_503_on_a_read_only_replica(service, redis_server: RedisServer, own_redis: RedisServer) -> None:
    own_redis.command("REPLICAOF", "127.0.0.1", str(redis_server.port))
    not_ready(service(own_redis.url), "ReadOnlyError")


def test_readyz_answers_ready_on_a_working_store_and_checks_at_most_once_a_second(service,
                                                                                  own_redis: RedisServer) -> None:
    srv = service(own_redis.url)
    own_redis.command("CONFIG", "RESETSTAT")
    answers = [srv.client.get("/readyz").status_code for _ in range(5)]
    assert answers == [200] * 5
    calls = own_redis.command("INFO", "commandstats")["cmdstat_evalsha"]["calls"]
    assert 1 <= calls <= 2  # 5 probes, cached for 1 s


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://127.0.0.1:26379", "master's name"),
    ("redis+sentinel://127.0.0.1:x/mymaster", "port is not a number"),
    ("redis+cluster://127.0.0.1:7000/2", "no database number"),
    ("redis+cluster://", "at least one host"),
    ("redis+swarm://127.0.0.1", "must start with"),
])
def test_bad_sentinel_and_cluster_urls_are_refused_at_start(url: str, reason: str) -> None:
    from service.backends import check_settings
    from service.settings import ConfigError, Settings

    with pytest.raises(ConfigError, match=reason):
        check_settings(Settings.from_env({"REDIS_URL": url}))


def test_sentinel_and_cluster_urls_read_every_node_and_option() -> None:
    from service.backends.redis.connect import parse

    sentinel = parse("rediss+sentinel://app:s%40cret@10.0.0.1,[::1]:26380/mymaster/3?ssl_cert_reqs=none")
    assert (sentinel.kind, sentinel.tls, sentinel.master) == ("sentinel", True, "mymaster")
    assert sentinel.nodes == (("10.0.0.1", 26379), ("::1", 26380))
    assert {key: sentinel.options[key] for key in ("username", "password", "db", "ssl", "ssl_cert_reqs")} == {
        "username": "app", "password": "s@cret", "db": 3, "ssl": True, "ssl_cert_reqs": "none"}
    cluster = parse("redis+cluster://a:7000,b:7001")
    assert (cluster.kind, cluster.nodes, cluster.key_prefix("svc")) == ("cluster", (("a", 7000), ("b", 7001)),
                                                                       "{svc}")
    assert parse("redis://a:6379/0").key_prefix("svc") == "svc"



def test_rediss_sentinel_uses_tls_to_the_sentinels_and_to_the_primary() -> None:
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    from service.backends.redis.connect import open_client, parse

    client: Any = open_client(parse("rediss+sentinel://app:pw@127.0.0.1:26379/mymaster?ssl_ca_certs=/ca.pem"))
    pool = client.connection_pool
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    assert (pool.connection_kwargs["ssl_ca_certs"], pool.connection_kwargs["password"]) == ("/ca.pem", "pw")
    (sentinel,) = pool.sentinel_manager.sentinels
    assert sentinel.connection_pool.connection_class is SSLConnection
    assert sentinel.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    assert sentinel.connection_pool.connection_kwargs["password"] is None  # the sentinels: without credentials


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/0", "unix:///tmp/redis.sock",
                                 "redis+sentinel://127.0.0.1:26379/mymaster", "rediss+sentinel://127.0.0.1:26379/m",
                                 "redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "rediss+cluster://127.0.0.1:7000"])
def test_every_client_packs_commands_in_c_into_the_bytes_redis_py_would_send(url: str) -> None:
    """redis-py's asyncio connections pack each command in Python (40 µs for a handoff's arguments); the service's
    pack it with hiredis, whatever the kind of Redis, and send the same bytes."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from service.backends.redis.connect import open_client, parse

    client: Any = open_client(parse(url))
    if "cluster" in url:
        classes = [client.nodes_manager.connection_kwargs["connection_class"],
                   *(node.connection_class for node in client.nodes_manager.startup_nodes.values())]
    else:
        classes = [client.connection_pool.connection_class]
    commands = [("EVALSHA", "f" * 40, 2, "k:1", b"k:2", 7, -3, 0.5, "caf\u00e9", b"\x00\xff", memoryview(b"mv"), ""),
                ("SCRIPT LOAD", "return 1"), (b"CONFIG GET", "maxmemory"), ("SET", "k", "x" * 100_000)]
    python = Connection()
    for connection_class in classes:
        connection = object.__new__(connection_class)  # pack_command reads nothing of the connection's
        connection.__dict__.update(python.__dict__)
        assert type(connection).pack_command is not Connection.pack_command
        for command in commands:
            assert b"".join(connection.pack_command(*command)) == b"".join(python.pack_command(*command))
        for bad in (True, None, object()):
            with pytest.raises(DataError):
                connection.pack_command("SET", "k", bad)


def test_a_client_asked_for_another_encoding_packs_commands_as_redis_py_does() -> None:
    """hiredis sends strings as strict UTF-8 only: with ?encoding= in the URL the Python packer stays."""
    from redis.asyncio.connection import Connection

    from service.backends.redis.connect import open_client, parse

    for query in ("encoding=latin-1", "encoding_errors=replace"):
        client: Any = open_client(parse(f"redis://127.0.0.1:6379/0?{query}"))
        assert client.connection_pool.connection_class.pack_command is Connection.pack_command


def test_redis_clients_send_no_maintenance_notifications_handshake() -> None:
    """redis-py 8 sends CLIENT MAINT_NOTIFICATIONS on every new cluster connection (RESP3, "auto"): a round trip
    that open-source Redis refuses, and during a failover a race in it (the connection closed under the handshake)
    raised AttributeError out of a POST (a 500, seen in CI). The service's clients leave it out."""
    from service.backends.redis.connect import open_client, parse

    client: Any = open_client(parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"))
    assert client.maint_notifications_config is not None and not client.maint_notifications_config.enabled
    for pooled in (True, False):  # a single Redis: the same
        single = open_client(parse("redis://127.0.0.1:6379/0"), pooled=pooled)
        assert not single.connection_pool.maint_notifications_enabled()
