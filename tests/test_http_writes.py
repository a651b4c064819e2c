"""One send per response (service/http/writes.py): the transport wrapper on its own, then whole responses over a socket."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ServerProcess, new_user
from service.http.writes import SEND_AT_ONCE_BYTES, CoalescingTransport


class RecordingTransport:
    """What a CoalescingTransport hands on: each writelines call (one send), and close/abort, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.closing = False

    def writelines(self, pieces: list[bytes]) -> None:
        self.calls.append(list(pieces))  # one call: one send

    def close(self) -> None:
        self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1234) if name == "peername" else None


def in_loop(scenario: Any) -> Any:
    """Run ``scenario(wrapper, transport)`` in a fresh loop; returns what the transport received."""
    async def main() -> list[Any]:
        transport = RecordingTransport()
        await scenario(CoalescingTransport(transport, asyncio.get_running_loop()), transport)  # type: ignore[arg-type]
        return transport.calls
    return asyncio.run(main())


def test_writes_in_one_turn_leave_as_one_write_when_the_turn_ends() -> None:
    async def scenario(wrapper: CoalescingTransport, transport: RecordingTransport) -> None:
        wrapper.write(b"HTTP/1.1 200 OK\r\n\r\n")
        wrapper.write(b"body")
        assert transport.calls == []  # kept until the turn ends
        await asyncio.sleep(0)
        wrapper.write(b"next")
        await asyncio.sleep(0)
    assert in_loop(scenario) == [[b"HTTP/1.1 200 OK\r\n\r\n", b"body"], [b"next"]]


def test_close_sends_what_is_kept_first() -> None:
    async def scenario(wrapper: CoalescingTransport, transport: RecordingTransport) -> None:
        wrapper.write(b"head")
        wrapper.write(b"body")
        wrapper.close()
        await asyncio.sleep(0)  # the scheduled send finds nothing left
    assert in_loop(scenario) == [[b"head", b"body"], "close"]


def test_more_than_64_kib_in_one_turn_is_handed_on_at_once() -> None:
    async def scenario(wrapper: CoalescingTransport, transport: RecordingTransport) -> None:
        wrapper.write(b"head")
        wrapper.write(b"x" * SEND_AT_ONCE_BYTES)
        assert transport.calls == [[b"head", b"x" * SEND_AT_ONCE_BYTES]]  # the transport's flow control sees it now
        wrapper.write(b"tail")
        await asyncio.sleep(0)
    assert in_loop(scenario)[1:] == [[b"tail"]]


def test_abort_drops_what_is_kept() -> None:
    async def scenario(wrapper: CoalescingTransport, transport: RecordingTransport) -> None:
        wrapper.write(b"head")
        wrapper.abort()
        await asyncio.sleep(0)
    assert in_loop(scenario) == ["abort"]


def test_nothing_is_written_to_a_transport_that_closed_within_the_turn() -> None:
    async def scenario(wrapper: CoalescingTransport, transport: RecordingTransport) -> None:
        wrapper.write(b"head")
        transport.closing = True  # the client went away (connection_lost)
        await asyncio.sleep(0)
    assert in_loop(scenario) == []


def test_everything_else_is_the_transports_own() -> None:
    async def scenario(wrapper: CoalescingTransport, transport: RecordingTransport) -> None:
        assert wrapper.get_extra_info("peername") == ("127.0.0.1", 1234)
        assert not wrapper.is_closing()
        transport.closing = True
        assert wrapper.is_closing()
    assert in_loop(scenario) == []


# --- whole responses over a socket -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("writes") / "server.log")
    yield srv
    srv.stop()


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses (status, body) read off a socket, each framed by its Content-Length."""
    buffer, responses = b"", []
    while len(responses) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode("latin-1").split("\r\n")
            length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
            if len(buffer) >= head_end + 4 + length:
                responses.append((int(head[0].split()[1]), buffer[head_end + 4:head_end + 4 + length]))
                buffer = buffer[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {len(responses)} of {count} responses"
        buffer += chunk
    assert buffer == b"", buffer
    return responses


def test_pipelined_requests_are_answered_whole_and_in_order(plain_server: ServerProcess) -> None:
    requests = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /agents/status/not-a-uuid HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /openapi.yaml HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /agents HTTP/1.1\r\nHost: x\r\n\r\n")
    with socket.create_connection(("127.0.0.1", plain_server.port), timeout=10) as sock:
        sock.sendall(requests)
        responses = read_responses(sock, 4)
    assert [status for status, _ in responses] == [200, 400, 200, 200]
    assert json.loads(responses[0][1]) == {"status": "ok"}
    assert "run_id must be a UUID" in json.loads(responses[1][1])["detail"]
    assert responses[2][1] == plain_server.client.get("/openapi.yaml").content
    assert "agents" in json.loads(responses[3][1])


def test_a_response_before_the_server_closes_the_connection_arrives_whole(plain_server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", plain_server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b'\r\n\r\n{"status":"ok"}')


def test_expect_100_continue_is_answered_before_the_body_is_sent(plain_server: ServerProcess) -> None:
    body = json.dumps({"agent_type": "no-such-agent", "user_id": new_user()}).encode()
    with socket.create_connection(("127.0.0.1", plain_server.port), timeout=10) as sock:
        sock.sendall(b"POST /agents/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        [(status, answer)] = read_responses(sock, 1)
    assert status == 400 and "Unsupported agent_type" in json.loads(answer)["detail"]


def test_a_response_over_64_kib_arrives_whole_and_before_the_next(plain_server: ServerProcess) -> None:
    for _ in range(3):  # three runs of about 40 KB each: a list of them is past SEND_AT_ONCE_BYTES
        plain_server.run_to_end("sleeper", seconds=0, pad="x" * 40_000)
    with socket.create_connection(("127.0.0.1", plain_server.port), timeout=10) as sock:
        sock.sendall(b"GET /agents/runs?limit=3 HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        (status, runs), (health_status, health) = read_responses(sock, 2)
    assert status == 200 and len(runs) > SEND_AT_ONCE_BYTES
    assert [run["input"]["pad"] for run in json.loads(runs)["runs"]] == ["x" * 40_000] * 3
    assert (health_status, json.loads(health)) == (200, {"status": "ok"})


def test_a_client_that_half_closes_after_its_request_gets_the_whole_answer(plain_server: ServerProcess) -> None:
    """``printf ... | nc -q0``, HTTP/1.0 clients and probes end their side once the request is sent: the end of
    input arrives in the same loop turn as the answer is written, and the answer must still leave (for a POST,
    the run it accepted would otherwise start with its client never learning its id)."""
    body = json.dumps({"agent_type": "sleeper", "user_id": new_user(), "input": {"seconds": 0}}).encode()
    requests = {"GET": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                "POST": b"POST /agents/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)}
    for method, request in requests.items():
        for _ in range(10 if method == "GET" else 3):
            with socket.create_connection(("127.0.0.1", plain_server.port), timeout=10) as sock:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                [(status, answer)] = read_responses(sock, 1)
            if method == "GET":
                assert (status, json.loads(answer)) == (200, {"status": "ok"})
            else:
                assert status == 202, answer
                run_id = json.loads(answer)["run_id"]
                assert plain_server.client.get(f"/agents/status/{run_id}", params={"wait": 5}).json()["state"] == "DONE"
