"""Fault injection: misbehaving agents, clients and processes. Each test fails without its guarantee."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import time
from pathlib import Path

import httpx

from conftest import RedisServer, ServerProcess, new_user, require_redis_server

TERMINAL = {"DONE", "ERROR", "CANCELLED"}


def raw_post(port: int, body: bytes, *, headers: bytes = b"", send_all: bool = True) -> socket.socket:
    """A POST /agents/run on a raw socket (the caller reads, waits or closes it)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (b"POST /agents/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n" + headers + b"\r\n")
    sock.sendall(head + (body if send_all else body[: len(body) // 2]))
    return sock


def read_reply(sock: socket.socket, timeout: float = 10) -> tuple[bytes, bytes]:
    """The status line and headers, and the body (by Content-Length) of one HTTP/1.1 response."""
    sock.settimeout(timeout)  # a reply that never comes fails the test instead of hanging it

    def more() -> bytes:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection before its reply was complete"
        return chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += more()
    return head, body


def run_body(agent_type: str = "sleeper", **agent_input) -> bytes:
    return json.dumps({"agent_type": agent_type, "user_id": new_user(), "input": agent_input}).encode()


# --- never two at once -----------------------------------------------------

def test_never_two_agents_at_once_through_bursts_cancels_timeouts_and_errors(start_server) -> None:
    srv = start_server(RUN_TIMEOUT_SECONDS="0.15")  # the probe works 0.01 s: only hang and stubborn time out
    modes = ["ok", "ok", "raise", "hang", "stubborn", "garbage"]
    rng = random.Random(7)

    async def scenario() -> int:
        accepted = 0
        async with httpx.AsyncClient(base_url=srv.url, timeout=30,
                                     limits=httpx.Limits(max_connections=50)) as client:
            for _ in range(60):
                body = {"agent_type": "probe", "user_id": new_user(), "input": {"mode": rng.choice(modes)}}
                burst = rng.choice([1, 1, 5, 20])
                responses = await asyncio.gather(*(client.post("/agents/run", json=body) for _ in range(burst)))
                codes = [r.status_code for r in responses]
                assert set(codes) <= {202, 409}, codes  # several 202s only if runs ended within the burst
                for response in responses:
                    if response.status_code != 202:
                        continue
                    accepted += 1
                    run_id = response.json()["run_id"]
                    if rng.random() < 0.3:
                        await client.post(f"/agents/cancel/{run_id}")
                    deadline = time.monotonic() + 20
                    while (await client.get(f"/agents/status/{run_id}", params={"wait": 10})).json()["state"] \
                            not in TERMINAL:
                        assert time.monotonic() < deadline, f"run {run_id} did not end in 20 s"
        return accepted

    accepted = asyncio.run(scenario())
    assert accepted >= 40
    last = srv.start_run("probe", mode="ok")  # its probe_end line comes after every other one
    srv.wait_for_event("probe_end", run_id=last)
    ends = {line["run_id"]: line for line in srv.events("probe_end") if line["run_id"] != last}
    runs = [run for run in srv.client.get("/agents/runs", params={"limit": 1000}).json()["runs"]
            if run["run_id"] != last]
    # A run that returned, raised or returned garbage certainly executed its probe, which logged its end
    # (a run cancelled or timed out may have been stopped before its probe began).
    executed = {run["run_id"] for run in runs if run["state"] == "DONE" or (run["error"] or "").startswith(
        ("RuntimeError: probe failure", "Agent result is not JSON-serialisable"))}
    assert len(executed) >= 10 and executed <= set(ends)
    assert max(line["most"] for line in ends.values()) == 1
    assert {"DONE", "ERROR", "CANCELLED"} <= {run["state"] for run in runs}


# --- agent misbehaviour ----------------------------------------------------

def test_huge_result_ends_in_error_and_status_still_answers(start_server) -> None:
    srv = start_server()
    run = srv.run_to_end("huge", bytes=2 * 1024 * 1024)
    assert run["state"] == "ERROR" and "too large" in run["error"] and "1048576" in run["error"]
    assert run["result"] is None
    small = srv.run_to_end("huge", bytes=1000)
    assert small["state"] == "DONE" and len(small["result"]) == 1000


def test_agent_blocking_the_event_loop_is_logged(start_server) -> None:
    srv = start_server()
    run = srv.run_to_end("blocker", seconds=1.6)
    assert run["state"] == "DONE"
    line = srv.wait_for_event("event_loop_blocked")
    assert line["level"] == "warning" and line["lag_ms"] >= 1000
    assert line["run_id"] == run["run_id"]
    assert "to_thread" in line["hint"]


# --- client misbehaviour ---------------------------------------------------

def test_client_that_disconnects_right_after_post_still_gets_its_run(start_server) -> None:
    srv = start_server()
    before = {run["run_id"] for run in srv.client.get("/agents/runs").json()["runs"]}
    raw_post(srv.port, run_body("sleeper", seconds=0.2)).close()
    deadline = time.monotonic() + 10
    while not (new := [run for run in srv.client.get("/agents/runs").json()["runs"] if run["run_id"] not in before]):
        assert time.monotonic() < deadline, "the accepted run never appeared"
        time.sleep(0.05)
    assert srv.wait_run(new[0]["run_id"])["state"] == "DONE"
    assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"  # the lock did not leak


def test_slow_body_upload_does_not_take_the_lock(start_server) -> None:
    srv = start_server()
    body = run_body("sleeper", seconds=0)
    slow = raw_post(srv.port, body, send_all=False)
    try:
        time.sleep(0.3)
        # Half a body is on the wire: another client still gets the lock, and its run ends.
        assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
        slow.sendall(body[len(body) // 2:])
        head, reply = read_reply(slow)
        assert head.startswith(b"HTTP/1.1 202"), head + reply  # complete and valid now, and the lock is free
        run_id = json.loads(reply)["run_id"]
    finally:
        slow.close()
    assert srv.wait_run(run_id)["state"] == "DONE"


def test_ten_thousand_fields(start_server) -> None:
    srv = start_server(MAX_BODY_BYTES="1000000")
    user = new_user()
    wide_input = {f"f{i}": i for i in range(10000)}
    response = srv.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": user,
                                                   "input": {**wide_input, "seconds": 0}})
    assert response.status_code == 202
    assert len(srv.wait_run(response.json()["run_id"])["input"]) == 10001
    wide_body = {"agent_type": "sleeper", "user_id": user, **wide_input}
    response = srv.client.post("/agents/run", json=wide_body)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "Unknown field" in detail and "9995 more" in detail and len(detail) < 300


def test_headers_that_are_not_utf8_get_a_4xx_not_a_500(start_server) -> None:
    srv = start_server(API_TOKEN="token-\u00e9")
    sock = raw_post(srv.port, run_body(), headers=b"Authorization: Bearer \xff\xfe\r\nX-Odd: \xc3\x28\r\n")
    try:
        head, reply = read_reply(sock)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(reply)["detail"]
    odd_type = srv.client.post("/agents/run", content=run_body(),
                               headers={"authorization": "Bearer token-\u00e9".encode(),
                                        "content-type": b"application/json\xff"})
    assert odd_type.status_code == 415


def test_a_thousand_connections_mostly_polling(start_server) -> None:
    srv = start_server()
    run_id = srv.start_run("sleeper", seconds=1)
    host, port = srv.url.removeprefix("http://").split(":")
    poll = f"GET /agents/status/{run_id} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()

    def post() -> bytes:
        body = run_body("sleeper")
        return (f"POST /agents/run HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode() + body

    async def crowd() -> list[int]:
        # A thousand connections open at once, each asking once and reading its whole answer (raw sockets: an
        # HTTP client's pool of 1000 costs the test more than the server spends answering).
        async def ask(i: int) -> int:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(poll if i % 100 else post())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                assert length is not None, head
                json.loads(await reader.readexactly(int(length[1])))  # every answer is whole, and JSON
                return int(head.split(b" ", 2)[1])
            finally:
                writer.close()

        return await asyncio.gather(*(ask(i) for i in range(1000)))

    codes = asyncio.run(crowd())
    assert all(code < 500 for code in codes), sorted(set(codes))
    assert codes.count(200) == 990
    assert srv.wait_run(run_id)["state"] == "DONE"


# --- process faults --------------------------------------------------------

def test_sigkill_mid_run_in_memory_mode_loses_its_runs_and_restarts_clean(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "first.log")
    run_id = first.start_run("hanging")
    first.wait_state(run_id, "RUNNING")
    first.proc.kill()
    first.proc.wait(10)
    again = ServerProcess(tmp_path / "again.log")
    try:
        assert again.client.get(f"/agents/status/{run_id}").status_code == 404  # memory mode keeps nothing
        assert again.run_to_end("sleeper", seconds=0)["state"] == "DONE"
    finally:
        again.stop(signal.SIGKILL)


def test_redis_killed_mid_run_and_brought_back(tmp_path: Path) -> None:
    require_redis_server()
    redis = RedisServer(tmp_path, persist=True)
    srv = ServerProcess(tmp_path / "server.log", REDIS_URL=redis.url, LOCK_TTL_SECONDS="6")
    try:
        run_id = srv.start_run("sleeper", seconds=1.5, announce=True)
        srv.wait_state(run_id, "RUNNING")
        redis.stop()
        # The agent finishes while Redis is away; its terminal state waits for the store.
        srv.wait_for_event("sleeper_done", run_id=run_id)
        assert srv.client.get(f"/agents/status/{run_id}").status_code == 503
        redis.start()
        run = srv.wait_run(run_id, timeout=20)
        assert run["state"] == "DONE" and run["result"] == {"slept": 1.5, "input": {"seconds": 1.5, "announce": True}}
        assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
        srv.wait_for_event("store_recovered")
        assert len(srv.events("store_unavailable")) == 1 and len(srv.events("store_recovered")) == 1
    finally:
        srv.stop(signal.SIGKILL)
        redis.stop()


def test_client_that_disconnects_in_the_middle_of_the_body_is_not_a_server_error(start_server) -> None:
    srv = start_server()
    body = run_body("sleeper", seconds=0)
    raw_post(srv.port, body, send_all=False).close()  # half a body, then gone
    line = srv.wait_for_event("http_request", path="/agents/run")
    assert line["status"] == 400
    assert not srv.events("unhandled_error")
    assert srv.run_to_end("sleeper", seconds=0)["state"] == "DONE"
