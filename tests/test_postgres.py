"""Postgres mode: its configuration, its schema and migrations, replicas on one database, and its faults.

The backend matrix runs the black-box suite over PostgreSQL too; this file covers what only this mode has:
DATABASE_URL and DATABASE_SCHEMA, the migrations and the schema version, and the database failing under a
run (a restart, connections killed by pg_terminate_backend, statements timing out, a replica killed), each
keeping the same promises as Redis mode: one terminal state per accepted run, nothing accepted lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HERE, TERMINAL, TESTS, PostgresServer, ServerProcess, new_schema, wait_until

LOG = logging.getLogger("agent_runner.test_postgres")


TERMINAL_EVENTS = {"agent_complete", "agent_error", "run_cancelled", "run_timeout", "run_interrupted", "run_orphaned"}


def terminal_lines(server: ServerProcess, run_id: str) -> list[dict[str, Any]]:
    """The log lines that recorded ``run_id``'s terminal state (one per run, whatever happened), as written so far
    (info lines are flushed in batches)."""
    return [line for line in server.log_lines() if line.get("run_id") == run_id and line["event"] in TERMINAL_EVENTS]


def refusal(**env: str) -> dict[str, Any]:
    """Start the service with ``env``; it must exit 2 with one invalid_configuration line, returned."""
    inherited = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DATABASE_URL")}
    done = subprocess.run([sys.executable, "agent_runner.py"], cwd=HERE, capture_output=True, text=True, timeout=30,
                          env={**inherited, "PORT": "1", "AGENT_MODULES": "fixture_agents", "PYTHONPATH": str(TESTS),
                               **env})
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [json.loads(line) for line in done.stdout.splitlines() if '"invalid_configuration"' in line]
    return line


def test_redis_url_and_database_url_together_refuse_to_start() -> None:
    line = refusal(REDIS_URL="redis://127.0.0.1:1/0", DATABASE_URL="postgresql://127.0.0.1:1/db")
    assert line["variable"] == "DATABASE_URL" and "REDIS_URL" in line["detail"]


@pytest.mark.parametrize("schema", ["Agent", "1runs", "agent-runner", "a" * 41, "x;drop"])
def test_a_schema_that_is_not_a_plain_identifier_refuses_to_start(schema: str) -> None:
    line = refusal(DATABASE_URL="postgresql://127.0.0.1:1/db", DATABASE_SCHEMA=schema)
    assert line["variable"] == "DATABASE_SCHEMA"


def test_postgres_mode_without_psycopg_installed_refuses_to_start_saying_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "psycopg").mkdir()
    (tmp_path / "psycopg" / "__init__.py").write_text("raise ImportError('psycopg is not installed here')\n")
    line = refusal(DATABASE_URL="postgresql://127.0.0.1:1/db", PYTHONPATH=f"{tmp_path}:{TESTS}")
    assert line["variable"] == "DATABASE_URL" and "requirements-postgres.txt" in line["detail"]


def test_a_database_url_libpq_cannot_read_refuses_to_start() -> None:
    line = refusal(DATABASE_URL="postgresql://127.0.0.1:1/db?no_such_parameter=1")
    assert line["variable"] == "DATABASE_URL" and "no_such_parameter" in line["detail"]


@pytest.mark.parametrize("url", ["postgresql://runner:s3cr3t@[db/app", "postgresql://runner:s3%ZZcret@h/db",
                                 "host=[db password=s3cr3t bad_option=1"])
def test_a_database_url_libpq_cannot_read_is_refused_without_its_password(url: str) -> None:
    from service.backends.postgres import check_url
    from service.settings import ConfigError

    with pytest.raises(ConfigError) as refused:
        check_url(url)
    detail = str(refused.value)
    assert "s3cr3t" not in detail and "s3%ZZcret" not in detail and "ZZ" not in detail, detail


# --- the schema --------------------------------------------------------------------------------------------------

def open_backend(url: str, schema: str, **kwargs: Any) -> Any:
    from service.backends.postgres import open_postgres

    return open_postgres(url, schema, kwargs.pop("lock_ttl_seconds", 30.0), 100, 1 << 30, LOG, **kwargs)


def migrated_schema(postgres: PostgresServer) -> str:
    """A new schema brought to this version, as a replica that ran before leaves it."""
    schema = new_schema()

    async def start_once() -> None:
        backend = open_backend(postgres.url, schema)
        await backend.start()
        await backend.close()

    asyncio.run(start_once())
    return schema


def test_replicas_starting_together_apply_each_migration_once(postgres_server: PostgresServer) -> None:
    from service.backends.postgres.schema import migrations

    schema = new_schema()

    async def start_four() -> None:
        backends = [open_backend(postgres_server.url, schema) for _ in range(4)]
        await asyncio.gather(*(backend.start() for backend in backends))
        for backend in backends:
            await backend.close()

    asyncio.run(start_four())
    applied = postgres_server.sql(f"SELECT version FROM {schema}.schema_version ORDER BY version").split()
    assert applied == [str(version) for version, _, _ in migrations()] and applied
    tables = postgres_server.sql(f"SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'")
    assert int(tables) >= 10
    assert postgres_server.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == "0"


def test_a_schema_newer_than_this_version_refuses_to_start(postgres_server: PostgresServer) -> None:
    schema = migrated_schema(postgres_server)
    postgres_server.sql(f"INSERT INTO {schema}.schema_version (version, name) VALUES (9999, '9999_future.sql')")
    line = refusal(DATABASE_URL=postgres_server.url, DATABASE_SCHEMA=schema)
    assert line["variable"] == "DATABASE_SCHEMA" and "9999" in line["detail"] and "newer" in line["detail"]


def test_a_schema_newer_than_this_version_found_once_the_database_is_up_refuses_to_start(
        tmp_path: Path, own_postgres: PostgresServer) -> None:
    """The database down at start: the replica starts, answers 503 for work on it, and when the database comes up
    with a schema newer than it knows it refuses as it would at start (exit 2), having admitted nothing."""
    from service.backends.postgres.schema import migrations

    schema = migrated_schema(own_postgres)
    own_postgres.sql(f"INSERT INTO {schema}.schema_version (version, name) VALUES (9999, '9999_future.sql')")
    own_postgres.stop("fast")
    srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=own_postgres.url, DATABASE_SCHEMA=schema)
    try:
        refused = post(srv, "sleeper", seconds=0)
        assert refused.status_code == 503 and refused.json()["detail"], refused.text
        own_postgres.start()
        assert srv.proc.wait(15) == 2
        (line,) = srv.events("invalid_configuration")
        newest = str(migrations()[-1][0])
        assert line["variable"] == "DATABASE_SCHEMA" and "newer" in line["detail"], line
        assert "9999" in line["detail"] and f"({newest})" in line["detail"], line
        assert own_postgres.sql(f"SELECT count(*) FROM {schema}.runs") == "0"  # nothing was admitted
    finally:
        srv.stop(signal.SIGKILL)


def test_until_its_check_of_the_schema_passes_a_replica_answers_503_for_work_on_the_database(
        tmp_path: Path, own_postgres: PostgresServer) -> None:
    """The database reachable but the schema's check not done (another replica's migration holds its lock): no
    run is admitted, no run read, not ready, until the check passes; then the replica serves."""
    import psycopg

    from service.backends.postgres.schema import advisory_key

    schema = migrated_schema(own_postgres)
    runner_url = own_postgres.url.replace("postgres@", "runner@")  # a role that does not exist yet: unreachable
    srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=runner_url, DATABASE_SCHEMA=schema)
    try:
        with psycopg.connect(own_postgres.url, autocommit=True) as migrating:
            migrating.execute("SELECT pg_advisory_lock(%s)", (advisory_key(schema),))
            migrating.execute("CREATE ROLE runner LOGIN SUPERUSER")
            wait_until(lambda: own_postgres.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'runner' "
                                                "AND wait_event = 'advisory'") == "1", 10, "the check waiting")
            admitted = post(srv, "sleeper", seconds=0)
            assert admitted.status_code == 503 and admitted.json()["detail"], admitted.text
            status = srv.client.get(f"/agents/status/{uuid.uuid4()}")
            assert status.status_code == 503 and status.json()["detail"], status.text
            events = srv.client.get("/agents/events", timeout=5)  # a stream opened would hang here
            assert events.status_code == 503 and events.json()["detail"], events.text
            assert srv.client.get("/readyz").status_code == 503
            assert own_postgres.sql(f"SELECT count(*) FROM {schema}.runs") == "0"
        wait_until(lambda: srv.client.get("/readyz").status_code == 200, 10, "ready once checked")
        assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
    finally:
        srv.stop(signal.SIGKILL)


# --- replicas on one database ------------------------------------------------------------------------------------

@pytest.fixture
def two_replicas(tmp_path: Path, postgres_server: PostgresServer) -> Any:
    started: list[ServerProcess] = []

    def start(url: str = postgres_server.url, schema: str | None = None, count: int = 2,
              **env: str) -> list[ServerProcess]:
        schema = schema or new_schema()
        new = [ServerProcess(tmp_path / f"replica-{len(started) + i}.log", DATABASE_URL=url, DATABASE_SCHEMA=schema,
                             **env) for i in range(count)]
        started.extend(new)
        return new

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def post(server: ServerProcess, agent_type: str = "sleeper", **input: Any) -> httpx.Response:
    on_busy = input.pop("on_busy", "reject")
    return server.client.post("/agents/run", json={"agent_type": agent_type, "user_id": str(uuid.uuid4()),
                                                   "input": input, "on_busy": on_busy})


def test_a_cancel_and_a_wait_reach_the_replica_running_the_run(two_replicas: Any) -> None:
    first, second = two_replicas()
    running = post(first, "hanging").json()["run_id"]
    first.wait_state(running, "RUNNING")
    started = time.monotonic()
    waiting = threading.Thread(target=lambda: second.client.get(f"/agents/status/{running}", params={"wait": 10}))
    waiting.start()
    assert second.client.post(f"/agents/cancel/{running}").status_code in (200, 202)
    waiting.join(15)
    assert first.wait_run(running)["state"] == "CANCELLED"
    assert time.monotonic() - started < 3  # heard at once (NOTIFY), not at the next renewal or poll
    assert second.client.get(f"/agents/status/{running}").json()["state"] == "CANCELLED"


def test_a_replica_killed_mid_run_leaves_its_run_runner_lost_after_the_ttl(two_replicas: Any) -> None:
    holder, other = two_replicas(LOCK_TTL_SECONDS="1.5")
    run_id = post(holder, "hanging").json()["run_id"]
    holder.wait_state(run_id, "RUNNING")
    waiting = post(holder, "sleeper", seconds=0, on_busy="enqueue").json()["run_id"]
    holder.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    lost = other.wait_run(run_id, timeout=15)
    assert lost["state"] == "ERROR" and lost["error"].startswith("Runner lost")
    assert time.monotonic() - killed_at > 0.5  # not before its lease could have ended
    assert other.wait_run(waiting, timeout=15)["state"] == "DONE"  # accepted, so not lost with its replica


# --- faults ------------------------------------------------------------------------------------------------------

def terminate_connections(postgres: PostgresServer) -> int:
    """Kill every client connection but psql's own (pg_terminate_backend); how many were killed."""
    return int(postgres.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"))


def test_a_run_and_the_queue_survive_a_restart_of_the_database(tmp_path: Path, own_postgres: PostgresServer) -> None:
    srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=own_postgres.url, DATABASE_SCHEMA=new_schema(),
                        LOCK_TTL_SECONDS="4")
    try:
        running = post(srv, "sleeper", seconds=2).json()["run_id"]
        srv.wait_state(running, "RUNNING")
        queued = post(srv, "sleeper", seconds=0, on_busy="enqueue").json()["run_id"]
        own_postgres.stop("fast")
        time.sleep(0.3)
        assert srv.client.get(f"/agents/status/{running}").status_code == 503  # the store is gone: said so
        own_postgres.start()
        assert srv.wait_run(running)["state"] == "DONE"  # renewed within half its TTL: it kept its slot
        assert srv.wait_run(queued)["state"] == "DONE"
        assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
        events = {line["event"] for line in srv.log_lines()}
        assert {"store_unavailable", "store_recovered"} <= events
        assert len(wait_until(lambda: terminal_lines(srv, running), 5, "the terminal line")) == 1
    finally:
        srv.stop(signal.SIGKILL)


def test_connections_killed_by_pg_terminate_backend_cost_no_run_and_no_request(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=postgres_server.url, DATABASE_SCHEMA=new_schema(),
                        LOCK_TTL_SECONDS="3")
    try:
        running = post(srv, "sleeper", seconds=1.5).json()["run_id"]
        srv.wait_state(running, "RUNNING")
        for _ in range(3):
            assert terminate_connections(postgres_server) > 0
            # a pooled connection found killed is replaced and the request tried once more: no 503
            assert srv.client.get(f"/agents/status/{running}").status_code == 200
            time.sleep(0.3)
        assert srv.wait_run(running)["state"] == "DONE"
        replay = srv.client.get(f"/agents/events/{running}", timeout=10)  # from the run's first kept event
        assert replay.status_code == 200 and replay.text.count("event: run") >= 3, replay.text  # PENDING to DONE
        assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
    finally:
        srv.stop(signal.SIGKILL)


def test_a_statement_that_times_out_is_a_503_and_the_run_ends_once(tmp_path: Path,
                                                                  postgres_server: PostgresServer) -> None:
    """DATABASE_URL's libpq options reach the server (a 300 ms statement_timeout): a table locked by someone else
    for 2 s makes statements time out, answered 503 in JSON, not a hang; the run still ends in one state."""
    schema = new_schema()
    url = postgres_server.url + "?options=" + urllib.parse.quote("-c statement_timeout=300")
    srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=url, DATABASE_SCHEMA=schema, LOCK_TTL_SECONDS="6")
    try:
        running = post(srv, "sleeper", seconds=1).json()["run_id"]
        srv.wait_state(running, "RUNNING")
        locker = subprocess.Popen(["psql", "-X", "-q", postgres_server.url, "-c",
                                   f"BEGIN; LOCK TABLE {schema}.runs IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(2); "
                                   "COMMIT;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: postgres_server.sql(
                "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND granted "
                f"AND relation = '{schema}.runs'::regclass") == "1", 5, "the table locked")
            started = time.monotonic()
            response = srv.client.get(f"/agents/status/{running}")
            assert response.status_code == 503 and "detail" in response.json()
            assert time.monotonic() - started < 1.5
        finally:
            locker.wait(10)
        run = srv.wait_run(running)
        assert run["state"] in TERMINAL
        assert len(wait_until(lambda: terminal_lines(srv, running), 5, "the terminal line")) == 1
        assert "canceling statement due to statement timeout" in json.dumps(srv.events("store_unavailable"))
        assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
    finally:
        srv.stop(signal.SIGKILL)


def test_a_failover_to_a_promoted_standby_keeps_every_accepted_run(tmp_path: Path,
                                                                   own_postgres: PostgresServer) -> None:
    """DATABASE_URL names both servers (libpq tries them in turn, read-write only). The primary dies with a run
    going and one queued; the standby, caught up, is promoted: the run ends once, the queued one runs."""
    standby = PostgresServer(standby_of=own_postgres)
    try:
        url = (f"postgresql://postgres@127.0.0.1:{own_postgres.port},127.0.0.1:{standby.port}/postgres"
               "?target_session_attrs=read-write&connect_timeout=2")
        srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=url, DATABASE_SCHEMA=new_schema(),
                            LOCK_TTL_SECONDS="6")
        try:
            running = post(srv, "sleeper", seconds=2).json()["run_id"]
            srv.wait_state(running, "RUNNING")
            queued = post(srv, "sleeper", seconds=0, on_busy="enqueue").json()["run_id"]
            wait_until(lambda: own_postgres.sql(
                "SELECT count(*) FROM pg_stat_replication WHERE replay_lsn = pg_current_wal_lsn()") == "1",
                10, "the standby caught up")  # replication is asynchronous: what it has not replayed is lost
            own_postgres.stop("immediate")
            standby.promote()
            run = srv.wait_run(running, timeout=30)
            assert run["state"] in TERMINAL
            assert len(wait_until(lambda: terminal_lines(srv, running), 5, "the terminal line")) == 1
            assert srv.wait_run(queued, timeout=30)["state"] == "DONE"
            assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
        finally:
            srv.stop(signal.SIGKILL)
    finally:
        standby.close()


# --- leases that straddle their expiry -------------------------------------------------------------------------

def new_run() -> Any:
    from service.backends.records import Run

    return Run.new(str(uuid.uuid4()), "sleeper", str(uuid.uuid4()), {"n": 1}, holder=None)


async def renewal_committed_after_expiry(url: str, schema: str, contender: Any) -> tuple[Any, Any, Any]:
    """Replica one holds the only slot; its renewal matches a second before the lease lapses but commits only after
    ``contender`` (a step of replica two) has begun. What the contender answered, the run, and the slot's token."""
    from psycopg import AsyncConnection

    one, two = open_backend(url, schema), open_backend(url, schema)
    await one.start()
    await two.start()
    try:
        run = new_run()
        assert await one.admit(run, "enqueue", 10) == "started"
        renewal = await AsyncConnection.connect(url, autocommit=True)
        try:
            await renewal.execute(f"SET search_path TO {schema}")
            await renewal.execute("UPDATE slots SET expires_at = clock_timestamp() + interval '1 second' "
                                  "WHERE token = %s", (run.holder,))
            await renewal.execute("BEGIN")
            cursor = await renewal.execute(  # the renewal's statement (store.py), its commit delayed
                "UPDATE slots SET expires_at = clock_timestamp() + 30 * interval '1 second' "
                "WHERE token = %s AND expires_at > clock_timestamp() RETURNING slot", (run.holder,))
            assert await cursor.fetchone() is not None
            await asyncio.sleep(1.3)  # the committed lease has lapsed; the renewal has not committed yet
            step = asyncio.create_task(contender(two))
            await asyncio.sleep(0.5)
            await renewal.execute("COMMIT")
            answer = await asyncio.wait_for(step, 10)
            cursor = await renewal.execute("SELECT token FROM slots WHERE expires_at > clock_timestamp()")
            return answer, run, [row[0] for row in await cursor.fetchall()]
        finally:
            await renewal.close()
    finally:
        await one.close()
        await two.close()


def test_a_renewal_committed_while_an_admission_waits_keeps_its_slot(postgres_server: PostgresServer) -> None:
    answer, run, live = asyncio.run(renewal_committed_after_expiry(
        postgres_server.url, new_schema(), lambda two: two.admit(new_run(), "enqueue", 10)))
    assert answer == "queued" and live == [run.holder]


def test_a_renewal_committed_while_orphans_are_claimed_keeps_its_run(postgres_server: PostgresServer) -> None:
    answer, run, live = asyncio.run(renewal_committed_after_expiry(
        postgres_server.url, new_schema(), lambda two: two.claim_orphans()))
    assert answer == [] and live == [run.holder]


def test_a_take_whose_reply_is_lost_is_answered_by_the_next_take(postgres_server: PostgresServer) -> None:
    """The take commits but its reply is lost: the next take answers the same run (its token is kept), so the run
    runs instead of ending as an orphan ("Runner lost") after the TTL."""
    from service.backends.records import StoreUnavailable, utc_now

    async def scenario() -> tuple[Any, Any, list[Any]]:
        backend = open_backend(postgres_server.url, new_schema(), lock_ttl_seconds=1.0)
        await backend.start()
        try:
            running, waiting = new_run(), new_run()
            assert await backend.admit(running, "enqueue", 10) == "started"
            assert await backend.admit(waiting, "enqueue", 10) == "queued"
            running.update(state="DONE", finished_at=utc_now())
            await backend.save(running, release=True)
            run = backend.db.run

            async def reply_lost(work: Any, transaction: bool = True) -> Any:
                await run(work, transaction)  # committed
                raise StoreUnavailable("the connection was lost before the reply")

            backend.db.run = reply_lost
            with pytest.raises(StoreUnavailable):
                await backend.take()
            backend.db.run = run
            taken = await backend.take()
            await asyncio.sleep(1.5)  # the TTL of the first take's token has passed
            return taken, waiting, await backend.claim_orphans()
        finally:
            await backend.close()

    taken, waiting, orphans = asyncio.run(scenario())
    assert taken is not None and taken.run_id == waiting.run_id and taken.holder is not None
    assert orphans == []


def committed_then_retried(db: Any) -> Any:
    """``db.run`` as it goes when a unit of work commits and the reply is lost with the connection: Database.run
    runs the same work again on a fresh connection, and the caller gets the second attempt's answer."""
    run = db.run

    async def retried(work: Any, transaction: bool = True) -> Any:
        await run(work, transaction)
        return await run(work, transaction)

    return retried


async def rows(backend: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async def read(connection: Any) -> list[tuple[Any, ...]]:
        return await (await connection.execute(query, params)).fetchall()

    return await backend.db.run(read, transaction=False)


def test_an_events_batch_whose_commit_reply_is_lost_is_stored_once(postgres_server: PostgresServer) -> None:
    """The events writer's batch commits, the reply is lost, the batch is sent again: each event and log line is
    stored once (a client reading the run's events or logs sees no line twice)."""
    async def scenario() -> tuple[list[Any], list[Any]]:
        backend = open_backend(postgres_server.url, new_schema())
        await backend.start()
        events = backend.event_transport(type("Sink", (), {"deliver": lambda *a: None, "end_all": lambda *a: None,
                                                            "listening": lambda *a: False})())
        await events.start()
        try:
            run = new_run()
            assert await backend.admit(run, "enqueue", 10) == "started"
            backend.db.run = committed_then_retried(backend.db)
            for n in range(5):
                events.send("log", run.run_id, "", json.dumps({"n": n}).encode())
            await events.written(10)
            del backend.db.run
            return (await rows(backend, "SELECT data FROM events WHERE run_id = %s ORDER BY id", run.run_id),
                    await rows(backend, "SELECT line FROM run_logs WHERE run_id = %s ORDER BY id", run.run_id))
        finally:
            await events.stop()
            await backend.close()

    stored, logged = asyncio.run(scenario())
    assert [json.loads(bytes(row[0]))["n"] for row in stored] == [0, 1, 2, 3, 4]
    assert [json.loads(bytes(row[0]))["n"] for row in logged] == [0, 1, 2, 3, 4]


def test_a_webhook_claim_whose_commit_reply_is_lost_still_sends_that_delivery(postgres_server: PostgresServer) -> None:
    """The claim commits (the delivery leased, its attempt counted) and the reply is lost: the claim asked again
    answers that delivery, instead of leaving it unsent until its lease passes with an attempt burnt."""
    from service.backends.records import utc_now

    async def scenario() -> tuple[Any, list[Any]]:
        backend = open_backend(postgres_server.url, new_schema())
        await backend.start()
        try:
            run = new_run()
            run.webhook = "https://receiver.example/hook"
            assert await backend.admit(run, "enqueue", 10) == "started"
            run.update(state="DONE", finished_at=utc_now())
            await backend.save(run, release=True)
            deliveries = backend.webhook_deliveries(5.0)
            backend.db.run = committed_then_retried(backend.db)
            delivery, _ = await deliveries.claim()
            del backend.db.run
            return delivery, await rows(backend, "SELECT attempt, lease FROM webhooks WHERE run_id = %s", run.run_id)
        finally:
            await backend.close()

    delivery, stored = asyncio.run(scenario())
    assert delivery is not None and delivery.attempt == 1
    assert [tuple(row) for row in stored] == [(1, delivery.lease)]


def test_a_dequeue_whose_commit_reply_is_lost_answers_the_run_it_ended(postgres_server: PostgresServer) -> None:
    """A waiting run is cancelled (out of the queue, CANCELLED) and the reply is lost: the dequeue asked again
    answers that run, not "no longer waiting" (which would send the cancel on to a run that is over)."""
    from service.backends.records import utc_now

    async def scenario() -> Any:
        backend = open_backend(postgres_server.url, new_schema())
        await backend.start()
        try:
            running, waiting = new_run(), new_run()
            assert await backend.admit(running, "enqueue", 10) == "started"
            assert await backend.admit(waiting, "enqueue", 10) == "queued"
            backend.db.run = committed_then_retried(backend.db)
            ended = await backend.dequeue(waiting.run_id, state="CANCELLED", finished_at=utc_now())
            del backend.db.run
            return ended
        finally:
            await backend.close()

    ended = asyncio.run(scenario())
    assert ended is not None and ended.state == "CANCELLED"


def test_orphans_claimed_by_a_commit_whose_reply_is_lost_are_answered_by_the_retry(
        postgres_server: PostgresServer) -> None:
    """Orphans passed to a claim that commits with its reply lost are answered by the retry, not left claimed by
    nobody until the claim's TTL passes."""
    async def scenario() -> tuple[Any, list[Any]]:
        dead, backend = open_backend(postgres_server.url, new_schema(), lock_ttl_seconds=1.0), None
        await dead.start()
        try:
            run = new_run()
            assert await dead.admit(run, "enqueue", 10) == "started"
            backend = open_backend(postgres_server.url, dead.db.schema, lock_ttl_seconds=1.0)
            await backend.start()
            await asyncio.sleep(1.3)  # the dead replica's lease has lapsed: its run is an orphan
            backend.db.run = committed_then_retried(backend.db)
            orphans = await backend.claim_orphans()
            del backend.db.run
            return run, orphans
        finally:
            await dead.close()
            if backend is not None:
                await backend.close()

    run, orphans = asyncio.run(scenario())
    assert [orphan.run_id for orphan in orphans] == [run.run_id]


# --- a black-holed database ----------------------------------------------------------------------------------

def test_a_renewal_into_a_black_holed_database_answers_by_its_deadline(postgres_server: PostgresServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The network to the database drops everything and resets nothing: a renewal bounded by keep_lock's answer_by
    gives up at that bound (not after psycopg's cancel, ~10 s), a unit of work nobody bounds fails after the
    client's own bound (not after TCP's retransmissions, ~15 min), and a new connection after its connect timeout
    (once, not once more as if a pooled connection had been found dropped)."""
    from redis_proxy import RedisProxy
    from service.backends.postgres import database
    from service.backends.records import StoreUnavailable

    monkeypatch.setattr(database, "WORK_TIMEOUT_SECONDS", 1.5)
    proxy = RedisProxy(postgres_server.port)
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"

    async def scenario() -> list[float]:
        backend = open_backend(url, new_schema())
        await backend.start()
        try:
            run = new_run()
            assert await backend.admit(run, "enqueue", 10) == "started"
            await asyncio.gather(backend.check(), backend.check())  # two pooled connections, idle
            proxy.freeze()
            took = []
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(backend.renew(run), 1)
            took.append(time.monotonic() - began)
            for _ in range(2):  # on the other pooled connection, then on a new one
                began = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await backend.check()
                took.append(time.monotonic() - began)
            return took
        finally:
            proxy.thaw()
            await backend.close()

    try:
        renewal, pooled, new = asyncio.run(scenario())
    finally:
        proxy.close()
    assert renewal < 2 and pooled < 2.5 and new < 4  # connect_timeout: 3 s


def test_a_database_black_holed_after_a_renewal_stops_the_agent_before_its_lease_lapses(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    """The network freezes just as the renewal's cancel check goes out (no reply, no reset): the agent is stopped
    (lock_lost) before its lease could lapse, however long the frozen connection would wait."""
    from redis_proxy import RedisProxy

    proxy = RedisProxy(postgres_server.port)
    ledger = tmp_path / "ledger"
    srv = ServerProcess(tmp_path / "server.log", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres",
                        DATABASE_SCHEMA=new_schema(), LOCK_TTL_SECONDS="3",
                        AGENT_MODULES="fixture_agents,fixture_resource_agents")
    frozen_at: list[float] = []
    try:
        run_id = post(srv, "coroutine-worker", ledger=str(ledger), seconds=60).json()["run_id"]
        srv.wait_state(run_id, "RUNNING")
        proxy.hold(lambda chunk: b"FROM cancels WHERE run_id" in chunk, 0,
                   lambda: (frozen_at.append(time.time()), proxy.freeze()))
        wait_until(lambda: frozen_at, 10, "a renewal's cancel check")
        line = srv.wait_for_event("lock_lost", timeout=10, run_id=run_id)
        assert line["level"] == "error"
        end = wait_until(lambda: [float(fields[2]) for fields in map(str.split, ledger.read_text().splitlines())
                                  if fields[0] == "end"], 10, "the agent to stop")
        assert end[0] < frozen_at[0] + 3  # stopped before the lease (renewed at most just before) could lapse
    finally:
        proxy.thaw()
        srv.stop(signal.SIGKILL)
        proxy.close()


@pytest.mark.parametrize("setting", ["idle_session_timeout", "idle_in_transaction_session_timeout"])
def test_a_pooled_connection_the_server_closed_for_idling_costs_no_request(postgres_server: PostgresServer,
                                                                          setting: str) -> None:
    """The server ends a connection idle too long (57P05), or one left inside a transaction (25P03): the next unit
    of work on it is tried once more on a new connection, not answered 503 while the database is fine."""
    from service.backends.postgres.database import Database

    url = f"{postgres_server.url}?options=-c%20{setting}%3D300"

    async def scenario() -> list[Any]:
        db = Database(url, "public", LOG)
        db.schema_checked = True  # no schema of the service's: only the connections are under test
        try:
            async def select(connection: Any) -> Any:
                return await (await connection.execute("SELECT 1")).fetchone()

            first = await db.run(select, transaction=False)
            if setting == "idle_in_transaction_session_timeout":  # the pooled connection left inside one
                (connection,) = db.pool._idle
                await connection.execute("BEGIN")
            await asyncio.sleep(1)
            return [first, await db.run(select, transaction=False), db.healthy]
        finally:
            await db.close()

    assert asyncio.run(scenario()) == [(1,), (1,), True]


def test_a_renewal_answered_while_the_runs_end_is_out_finds_its_slot_let_go_not_lost(
        postgres_server: PostgresServer) -> None:
    """As in Redis mode (test_redis_handoff_messages.py): the lock keeper's renewal answered after the terminal
    write that frees the slot landed finds the slot gone by that write's doing, which is no loss."""
    from service.backends.records import LockLost, Run, utc_now

    async def scenario() -> None:
        backend = open_backend(postgres_server.url, new_schema())
        await backend.start()
        try:
            run = Run.new(str(uuid.uuid4()), "sleeper", "u", {}, holder=None)
            assert await backend.admit(run, "enqueue", 10) == "started"
            token = run.holder
            assert token is not None and backend.holds(token)
            held_while_out: list[bool] = []
            db_run, renewing = backend.db.run, []

            async def renewed_meanwhile(step: Any, **kwargs: Any) -> Any:
                answer = await db_run(step, **kwargs)
                if not renewing:  # the terminal write landed; its answer not read yet
                    renewing.append(True)
                    with pytest.raises(LockLost):
                        await backend.renew(run)
                    held_while_out.append(backend.holds(token))
                return answer

            backend.db.run = renewed_meanwhile
            run.update(state="DONE", finished_at=utc_now(), result_json=b'"done"')
            await backend.save(run, release=True)
            assert held_while_out == [False]
            assert not backend.holds(token)
        finally:
            await backend.close()

    asyncio.run(scenario())
