"""Every supported launcher reads the same settings, logs the same JSON lines and keeps the same guarantees.

``python agent_runner.py``, ``uvicorn agent_runner:app`` (also with ``--root-path`` and ``--workers``),
``gunicorn -k uvicorn.workers.UvicornWorker agent_runner:app`` and ``hypercorn agent_runner:app``: each
needs the API token on every /agents route whatever the path prefix, writes ``service_started`` as a JSON
line, admits exactly one run from a burst on new connections, and stops with exit 2 on a bad setting. In
memory mode a second process serving the same port refuses to start.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE, TESTS, RedisServer, ServerProcess, free_port, require_redis_server, wait_until

TOKEN = "launcher-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

LAUNCHERS: dict[str, list[str]] = {
    "python": [sys.executable, "agent_runner.py"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "agent_runner:app", "--host", "127.0.0.1", "--port", "{port}"],
    "gunicorn": [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "1",
                 "-b", "127.0.0.1:{port}", "agent_runner:app"],
    "hypercorn": [sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:{port}", "agent_runner:app"],
}
WORKERS = {  # the same launchers with two worker processes
    "uvicorn": LAUNCHERS["uvicorn"] + ["--workers", "2"],
    "gunicorn": [part if part != "1" else "2" for part in LAUNCHERS["gunicorn"]],
    "hypercorn": LAUNCHERS["hypercorn"] + ["--workers", "2"],
}


def launch(tmp_path: Path, name: str, command: list[str], port: int | None = None, **env: str) -> ServerProcess:
    return ServerProcess(tmp_path / f"{name}.log", port, command=command, stderr_path=tmp_path / f"{name}.err",
                         PYTHONPATH=str(TESTS), **env)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {**(headers or {}), **({"Content-Type": "application/json"} if payload else {})}
        conn.request(method, path, body=payload, headers=all_headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def burst(port: int, prefix: str, count: int = 30) -> list[int]:
    """``count`` POST /agents/run at once, each on a connection of its own; their statuses."""
    def post(_: int) -> int:
        return request(port, "POST", f"{prefix}/agents/run", AUTH,
                       {"agent_type": "sleeper", "user_id": str(uuid.uuid4()), "input": {"seconds": 3}})[0]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(post, range(count)))


def running(port: int, prefix: str) -> int:
    """How many runs are RUNNING once the admitted one has started (it holds its slot from the 202 on, and is
    RUNNING once its task records it); never more than one on the way."""
    deadline = time.monotonic() + 10
    while True:
        status, _, body = request(port, "GET", f"{prefix}/agents/runs?state=RUNNING", AUTH)
        assert status == 200, body
        count = len(json.loads(body)["runs"])
        assert count <= 1, body
        if count or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def stdout_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line the service wrote on stdout, each parsed as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]


def refusals_in(output: str) -> list[dict[str, Any]]:
    """The ``invalid_configuration`` lines among a launcher's output (its supervisor's own lines are not JSON)."""
    return [json.loads(line) for line in output.splitlines() if '"invalid_configuration"' in line]


def wait_started(server: ServerProcess, count: int, timeout: float) -> None:
    """Until ``count`` service_started lines were written (a worker each); fails at once if the launcher exits."""
    def started() -> bool:
        assert server.proc.poll() is None, (server.log_path.read_text(), server.stderr_text())
        return len([line for line in stdout_lines(server) if line["event"] == "service_started"]) >= count

    wait_until(started, timeout, f"{count} service_started line(s)")


def run_until_exit(argv: list[str], output: Path, timeout: float = 30, **env: str) -> int:
    """Start a launcher (in a session of its own), wait for it to exit, and return its status; one that does
    not exit in time is killed with its workers, and the test fails."""
    with open(output, "wb") as out:
        proc = subprocess.Popen(argv, cwd=HERE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(TESTS),
                                     "TMPDIR": tempfile.gettempdir(), **env})  # where the others' claims are
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{argv} did not exit within {timeout} s")


QUICK_REFUSAL = {"SHUTDOWN_GRACE_SECONDS": "0"}  # a claim held is waited for as long as its holder may drain


CASES = [(name, prefix, "") for name in LAUNCHERS for prefix in ("", "/runner")] + [("uvicorn", "", "/runner")]


@pytest.mark.parametrize(("launcher", "root_path", "server_root_path"), CASES,
                         ids=[f"{n}{'-ROOT_PATH' if p else ''}{'-root-path-flag' if f else ''}" for n, p, f in CASES])
def test_launcher_keeps_the_token_the_json_logs_and_one_agent(tmp_path: Path, launcher: str, root_path: str,
                                                              server_root_path: str) -> None:
    command = LAUNCHERS[launcher] + (["--root-path", server_root_path] if server_root_path else [])
    env = {"ROOT_PATH": root_path} if root_path else {}
    server = launch(tmp_path, launcher, command, API_TOKEN=TOKEN, **env)
    prefix = root_path  # uvicorn --root-path expects a proxy that strips the prefix: requests come without it
    link_prefix = root_path or server_root_path  # the prefix links carry
    try:
        for path in ("/agents", "/agents/runs", f"/agents/status/{uuid.uuid4()}", f"/agents/events/{uuid.uuid4()}"):
            # without the token, refused under the prefix and (for a proxy that passes the path on) without it
            assert request(server.port, "GET", path)[0] == 401, path
            if root_path:
                assert request(server.port, "GET", prefix + path)[0] == 401, prefix + path
        assert request(server.port, "POST", f"{prefix}/agents/run", body={"agent_type": "sleeper"})[0] == 401
        assert request(server.port, "GET", f"{prefix}/agents", AUTH)[0] == 200
        assert request(server.port, "GET", f"{prefix}/healthz")[0] == 200  # no token needed

        statuses = burst(server.port, prefix)
        assert sorted(statuses) == [202] + [409] * 29, statuses
        assert running(server.port, prefix) == 1

        status, headers, body = request(server.port, "POST", f"{prefix}/agents/run",
                                        {**AUTH, "Idempotency-Key": str(uuid.uuid4())},
                                        {"agent_type": "sleeper", "user_id": str(uuid.uuid4()),
                                         "on_busy": "enqueue"})
        assert status == 202, body
        assert headers["location"] == f"{link_prefix}/agents/status/{json.loads(body)['run_id']}"

        lines = stdout_lines(server)
        started = [line for line in lines if line["event"] == "service_started"]
        assert len(started) == 1 and started[0]["store"] == "memory"
        requests = [line for line in lines if line["event"] == "http_request"]
        assert requests and all(line["client"] == "127.0.0.1" for line in requests)
    finally:
        server.stop()


@pytest.mark.parametrize("launcher", ["python", "uvicorn", "gunicorn", "hypercorn"])
def test_a_bad_setting_stops_the_launcher_with_exit_2(tmp_path: Path, launcher: str) -> None:
    argv = [part.replace("{port}", str(free_port())) for part in LAUNCHERS[launcher]]
    # Supervisors pass on their own status, not the app's: gunicorn loads the app in the arbiter with --preload,
    # hypercorn serves from its own process with --workers 0 (its supervisor exits 0 whatever its worker did).
    argv[-1:-1] = {"gunicorn": ["--preload"], "hypercorn": ["--workers", "0"]}.get(launcher, [])
    done = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MAX_CONCURRENT_RUNS": "many", "PYTHONPATH": str(TESTS)})
    assert done.returncode == 2, (done.stdout, done.stderr)
    refusals = refusals_in(done.stdout)
    assert refusals and refusals[0]["variable"] == "MAX_CONCURRENT_RUNS"


@pytest.mark.parametrize("launcher", ["uvicorn", "gunicorn", "hypercorn"])
def test_a_bad_setting_stops_every_worker_of_a_supervisor(tmp_path: Path, launcher: str) -> None:
    argv = [part.replace("{port}", str(free_port())) for part in WORKERS[launcher]]
    run_until_exit(argv, tmp_path / "out", ON_BUSY="sometimes")
    output = (tmp_path / "out").read_text()
    refusals = refusals_in(output)
    assert refusals and refusals[0]["variable"] == "ON_BUSY", output


@pytest.mark.parametrize("launcher", ["uvicorn", "gunicorn", "hypercorn"])
def test_memory_mode_refuses_a_second_worker_process(tmp_path: Path, launcher: str) -> None:
    argv = [part.replace("{port}", str(free_port())) for part in WORKERS[launcher]]
    code = run_until_exit(argv, tmp_path / "out", AGENT_MODULES="fixture_agents", **QUICK_REFUSAL)
    output = (tmp_path / "out").read_text()
    refusals = refusals_in(output)
    assert refusals, output
    assert refusals[0]["variable"] == "REDIS_URL" and "one process" in refusals[0]["detail"]
    if launcher == "gunicorn":  # the refused worker exits 3, the status that makes gunicorn stop (with 3)
        assert "exited with code 3" in output and code == 3


def test_a_second_memory_mode_launcher_on_the_same_port_is_refused(tmp_path: Path) -> None:
    """Two single-worker launchers sharing one port (gunicorn --reuse-port twice): the second stops."""
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in LAUNCHERS["gunicorn"]] + ["--reuse-port"]
    first = launch(tmp_path, "first", argv, port, **QUICK_REFUSAL)
    try:
        assert run_until_exit(argv, tmp_path / "second", **QUICK_REFUSAL) == 3  # gunicorn's "Worker failed to boot"
        output = (tmp_path / "second").read_text()
        refusals = refusals_in(output)
        assert refusals and refusals[0]["variable"] == "REDIS_URL", output
        assert f"127.0.0.1:{port}" in refusals[0]["detail"]
        assert request(first.port, "GET", "/healthz")[0] == 200  # the first one serves on
    finally:
        first.stop()


def test_memory_mode_workers_on_a_unix_socket_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "runner.sock"
    run_until_exit(LAUNCHERS["uvicorn"][:4] + ["--uds", str(path), "--workers", "2"], tmp_path / "out",
                   **QUICK_REFUSAL)
    refusals = refusals_in((tmp_path / "out").read_text())
    assert refusals and f"unix:{path}" in refusals[0]["detail"]


def test_memory_mode_on_two_addresses_with_one_port_is_two_services(tmp_path: Path) -> None:
    port = free_port()
    servers = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            argv = [part.replace("127.0.0.1:{port}", f"{host}:{port}") for part in LAUNCHERS["gunicorn"]]
            servers.append(launch(tmp_path, host, argv, port))
            if host == "127.0.0.2":  # ServerProcess waited on 127.0.0.1: wait for this one's start line
                wait_started(servers[-1], 1, timeout=15)
        assert all(server.proc.poll() is None for server in servers)
    finally:
        for server in servers:
            server.stop()


def test_looking_for_server_sockets_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """The one-process check looks at every descriptor the process holds (files too): it keeps none of them."""
    from service.http.single_process import server_addresses

    with open(tmp_path / "a-file", "w"), socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        before = sorted(os.listdir("/proc/self/fd"))
        assert f"127.0.0.1:{server.getsockname()[1]}" in server_addresses()
        assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_graceful_reload_waits_for_the_old_worker_instead_of_stopping_the_service(tmp_path: Path) -> None:
    """gunicorn's SIGHUP (logrotate's postrotate sends it) starts the new worker while the old one drains."""
    server = launch(tmp_path, "gunicorn", LAUNCHERS["gunicorn"], SHUTDOWN_GRACE_SECONDS="1")
    try:
        server.proc.send_signal(signal.SIGHUP)
        wait_started(server, 2, timeout=20)
        assert request(server.port, "GET", "/healthz")[0] == 200
        assert not [line for line in stdout_lines(server) if line["event"] == "invalid_configuration"]
    finally:
        server.stop()


USER_PROGRAM = """
import multiprocessing, sys, uvicorn
def serve():
    uvicorn.run("agent_runner:app", port=int(sys.argv[1]))
if __name__ == "__main__":
    child = multiprocessing.Process(target=serve)
    child.start()
    child.join()
    print("child exit", child.exitcode, flush=True)
"""


def test_a_refused_child_of_a_users_own_program_leaves_its_parent_alone(tmp_path: Path) -> None:
    (tmp_path / "program.py").write_text(USER_PROGRAM)
    done = subprocess.run([sys.executable, str(tmp_path / "program.py"), str(free_port())], cwd=HERE,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{HERE}:{TESTS}", "ROOT_PATH": "no-slash"})
    assert done.returncode == 0, done.stderr
    assert "child exit 2" in done.stdout


@pytest.mark.parametrize("launcher", ["uvicorn", "gunicorn", "hypercorn"])
def test_redis_mode_with_two_workers_runs_one_agent(tmp_path: Path, redis_server: RedisServer, launcher: str) -> None:
    server = launch(tmp_path, launcher, WORKERS[launcher], API_TOKEN=TOKEN, REDIS_URL=redis_server.url,
                    REDIS_PREFIX=f"test-{uuid.uuid4().hex[:8]}")
    try:
        wait_started(server, 2, timeout=15)  # both workers up: each wrote service_started
        statuses = burst(server.port, "")
        assert sorted(statuses) == [202] + [409] * 29, statuses
        assert running(server.port, "") == 1
    finally:
        server.stop()


def test_idle_keep_alive_connections_close_after_keepalive_seconds(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server.log", KEEPALIVE_SECONDS="1")
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            opened = time.monotonic()
            assert sock.recv(4096) == b""  # the server closed the idle connection
            assert 0.8 < time.monotonic() - opened < 4
    finally:
        server.stop()


def test_forwarded_for_is_trusted_only_from_forwarded_allow_ips(tmp_path: Path) -> None:
    forged = {"X-Forwarded-For": "203.0.113.7"}
    untrusting = ServerProcess(tmp_path / "untrusting.log")
    trusting = ServerProcess(tmp_path / "trusting.log", FORWARDED_ALLOW_IPS="127.0.0.1")
    try:
        for server in (untrusting, trusting):
            assert request(server.port, "GET", "/healthz", forged)[0] == 200
    finally:
        untrusting.stop()
        trusting.stop()
    clients = {server: [line["client"] for line in server.events("http_request") if line["path"] == "/healthz"]
               for server in (untrusting, trusting)}
    assert clients[untrusting] == ["127.0.0.1"] * len(clients[untrusting]) and clients[untrusting]
    assert clients[trusting][-1] == "203.0.113.7"


def require_launcher_packages() -> None:
    for module in ("gunicorn", "hypercorn"):
        try:
            __import__(module)
        except ImportError:
            from conftest import missing_tool
            missing_tool(module, "pip install -r requirements-dev.txt")


@pytest.fixture(autouse=True)
def _launchers_installed(request: pytest.FixtureRequest) -> None:
    require_launcher_packages()
    if "redis_server" in request.fixturenames:
        require_redis_server()


def test_methods_the_service_does_not_know_share_one_metrics_label(tmp_path: Path) -> None:
    """hypercorn's parser (h11) lets any method token through: each must not become a series of its own."""
    server = launch(tmp_path, "hypercorn", LAUNCHERS["hypercorn"])
    try:
        for number in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(f"M{number:05d} /agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                sock.settimeout(5)
                assert sock.recv(4096).startswith(b"HTTP/1.1 ")
        metrics = request(server.port, "GET", "/metrics")[2].decode()
    finally:
        server.stop()
    assert 'method="M0' not in metrics
    assert 'method="other"' in metrics


def test_without_a_lifespan_nothing_is_served_unguarded(tmp_path: Path) -> None:
    """``--lifespan off`` never builds the runtime (nor makes the one-process check): the API answers 503."""
    server = launch(tmp_path, "uvicorn", LAUNCHERS["uvicorn"] + ["--lifespan", "off", "--workers", "2"])
    try:
        status, headers, body = request(server.port, "POST", "/agents/run",
                                        body={"agent_type": "sleeper", "user_id": str(uuid.uuid4())})
        assert status == 503 and headers["content-type"] == "application/json", body
        assert "lifespan" in json.loads(body)["detail"]
        assert request(server.port, "GET", "/readyz")[0] == 503
        assert request(server.port, "GET", f"/agents/status/{uuid.uuid4()}")[0] == 503
        assert request(server.port, "GET", "/healthz")[0] == 200  # the process is alive
    finally:
        server.stop()


def test_a_second_lifespan_in_the_same_process_keeps_the_sockets_it_claimed() -> None:
    """A process that claimed a server socket's address (memory mode's one-process check) and runs a lifespan again
    (an in-process app, a test harness) claims it again at once. Before, its own lock refused it: the process
    waited the grace and exited 2, as if another process served its socket (an xdist worker died of it)."""
    import asyncio
    import socket

    from service.http.single_process import claim_server_sockets

    with socket.create_server(("127.0.0.1", 0)) as server:
        first = asyncio.run(claim_server_sockets(0.0))
        again = asyncio.run(claim_server_sockets(0.0))
        assert (first, again) == (None, None), server.getsockname()
