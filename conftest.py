"""Test harness: real server processes on free ports, driven over HTTP."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest


def pytest_configure(config: Any) -> None:
    """Each xdist worker gets a temporary directory of its own (TMPDIR, inherited by the servers it starts).
    Memory mode's one-process claims (service/http/single_process.py) live there and are held until their process
    ends: a worker whose in-process app claimed the address of a proxy it held would otherwise refuse, for good,
    that port to the other worker, whose proxy the OS may hand it later (its app would exit 2 on it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        path = os.path.join(tempfile.gettempdir(), f"agent-runner-tests-{worker}")
        os.makedirs(path, exist_ok=True)
        os.environ["TMPDIR"] = path
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again


HERE = Path(__file__).resolve().parent
TESTS = HERE / "tests"  # the fixture agents (AGENT_MODULES=fixture_agents) live here
DOCS = HERE / "docs"  # the documentation pages; drift tests read their tables and snippets
TERMINAL = {"DONE", "ERROR", "CANCELLED"}
# One TLS context for every test client: httpx loads the CA bundle anew for each client it makes without one,
# about 50 ms of CPU each time (the servers here speak plain HTTP, so it is never used).
TLS = httpx.create_ssl_context()


def product_modules() -> list[Path]:
    """The service's own modules: every .py at the root but the tests, and every one of the service package."""
    root = [path for path in HERE.glob("*.py") if not path.name.startswith("test_") and path.name != "conftest.py"]
    return sorted([*root, *(HERE / "service").rglob("*.py")])


def module_name(path: Path) -> str:
    """A product module as the Dockerfile and the README name it: its path from the root."""
    return path.relative_to(HERE).as_posix()


def load_script(path: Path) -> Any:
    """A script that is not on the import path (.ci/, tools/), loaded as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_user() -> str:
    return str(uuid.uuid4())


def wait_until(check: Any, timeout: float, what: str) -> Any:
    """``check()``'s first truthy value, asked every 20 ms; fails after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def log_time(line: dict[str, Any]) -> float:
    """A log line's timestamp as seconds since the epoch (comparable with time.time())."""
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


class ServerProcess:
    """``python agent_runner.py`` on a free port, with its stdout kept in a file.

    ``command`` starts it another way (``{port}`` in it is replaced); ``stderr_path`` keeps stderr apart (a
    launcher's supervisor writes its own lines there).
    """

    def __init__(self, log_path: Path, port: int | None = None, *, command: list[str] | None = None,
                 stderr_path: Path | None = None, host: str = "127.0.0.1", **env: str) -> None:
        self.port = port or free_port()  # a given port: a server that comes back where clients knew it
        self.host = host  # another address: a server in a network namespace of its own
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        # stdout buffered as in production (PYTHONUNBUFFERED would hide how info lines are batched)
        inherited = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
        full_env = {**inherited, "PORT": str(self.port), "HOST": host,
                    "AGENT_MODULES": "fixture_agents", "AGENT_SLEEP_SECONDS": "0.2", "PYTHONPATH": str(TESTS),
                    **env}
        self._log_file = open(log_path, "wb")
        self._stderr_file = open(stderr_path, "wb") if stderr_path is not None else None
        argv = [part.replace("{port}", str(self.port)) for part in command or [sys.executable, "agent_runner.py"]]
        # a launcher in a session of its own: stop() ends its workers too, even when it is killed
        self.proc = subprocess.Popen(argv, cwd=HERE, env=full_env, stdout=self._log_file,
                                     stderr=self._stderr_file or subprocess.STDOUT, start_new_session=bool(command))
        self.client = httpx.Client(base_url=self.url, timeout=30, verify=TLS)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        """Until /healthz answers 200, polled every 5 ms (plain http.client: no client to build per try)."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.005)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")

    def stderr_text(self) -> str:
        """What the process wrote on stderr, when it was kept apart (``stderr_path``)."""
        return Path(self._stderr_file.name).read_text() if self._stderr_file is not None else ""

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == name]

    def wait_for_event(self, name: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.events(name):
                if all(line.get(key) == value for key, value in fields.items()):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no {name} log line with {fields}")

    def start_run(self, agent_type: str = "sleeper", user_id: str | None = None, **input: Any) -> str:
        response = self.client.post("/agents/run", json={
            "agent_type": agent_type, "user_id": user_id or new_user(), "input": input})
        assert response.status_code == 202, response.text
        return response.json()["run_id"]

    def wait_run(self, run_id: str, timeout: float = 20) -> dict[str, Any]:
        """The run once terminal, by long-polling its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.client.get(f"/agents/status/{run_id}", params={"wait": 5}).json()
            if run["state"] in TERMINAL:
                return run
        raise AssertionError(f"run {run_id} did not finish in {timeout} s")

    def wait_state(self, run_id: str, state: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.client.get(f"/agents/status/{run_id}").json()
            if run["state"] == state:
                return run
            time.sleep(0.01)
        raise AssertionError(f"run {run_id} never reached {state}")

    def run_to_end(self, agent_type: str = "sleeper", **input: Any) -> dict[str, Any]:
        return self.wait_run(self.start_run(agent_type, **input))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.args[:2] != [sys.executable, "agent_runner.py"]:  # a launcher: its workers too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.client.close()
        self._log_file.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
        return code


class RedisServer:
    """A throwaway ``redis-server`` on a free port, in its own directory (persistent only if asked)."""

    def __init__(self, directory: Path, port: int | None = None, persist: bool = False,
                 bind: str = "127.0.0.1") -> None:
        self.directory = directory
        self.bind = bind  # addresses it listens on, space-separated
        self.persist = persist  # an append-only file, so data survives a restart
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.bind.split(), "--save", "",
             "--protected-mode", "yes" if self.bind == "127.0.0.1" else "no",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def command(self, *args: str) -> Any:
        import redis
        client = redis.Redis.from_url(self.url)
        try:
            return client.execute_command(*args)
        finally:
            client.close()


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl): Debian's newest, else whichever is on PATH."""
    for directory in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                            if p.parent.name.isdigit() else 0, reverse=True):
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb is not None and shutil.which("pg_ctl") else None


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port of 127.0.0.1, in a temporary directory.

    PostgreSQL refuses to run as root: as root the cluster belongs to ``nobody`` (its directory made and
    owned by that user under /tmp, where the user can reach it), and every program runs through ``runuser``.
    """

    def __init__(self, port: int | None = None, standby_of: PostgresServer | None = None) -> None:
        found = postgres_bin()
        assert found is not None
        self.bin = found
        self.port = port or free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="agent-runner-pg-"))
        self.data = self.directory / "data"
        self.socket_dir = self.directory
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.directory, 65534, 65534)  # nobody
            self.as_user = ["runuser", "-u", "nobody", "--"]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if standby_of is None:
            self._program("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                          "--no-instructions", "-E", "UTF8")
        else:  # a streaming replica of that server, which ``promote`` makes a primary
            self._program("pg_basebackup", "-h", "127.0.0.1", "-p", str(standby_of.port), "-U", "postgres",
                          "-D", str(self.data), "-R", "-X", "stream", "--no-sync")
        self.start()

    def _program(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.as_user, str(self.bin / name), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, check=check, cwd=self.directory, timeout=60)

    def start(self) -> None:
        # fsync off: a test cluster needs no durability across a crash of the machine, only across its own restarts
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=400 -c shared_buffers=32MB")
        result = self._program("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "postgres.log"), "-w",
                               "-t", "30", "-o", options, "start", check=False)
        if result.returncode != 0:
            log = (self.directory / "postgres.log")
            raise RuntimeError(f"postgres did not start: {result.stdout.decode()}\n"
                               f"{log.read_text() if log.exists() else ''}")

    def promote(self) -> None:
        self._program("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop(self, mode: str = "fast") -> None:
        self._program("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def sql(self, statement: str) -> str:
        """``statement`` run by psql; its output, unaligned and without headers."""
        result = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.url, "-c", statement],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stdout.decode()}")
        return result.stdout.decode().strip()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def require_postgres() -> None:
    if postgres_bin() is None or shutil.which("psql") is None:
        missing_tool("PostgreSQL (initdb, pg_ctl, psql)", "apt-get install postgresql")


def missing_tool(what: str, install: str) -> NoReturn:
    """Fail in CI (nothing the suite needs may be skipped there); elsewhere skip, saying what to install."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: .ci/run must provide it ({install})")
    pytest.skip(f"{what} is missing; to run these tests: {install}")


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        missing_tool("redis-server", "apt-get install redis-server")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """After the run, one line per group of skipped tests and what to install to run it."""
    groups: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        groups[reason.removeprefix("Skipped: ")] += 1
    if groups:
        terminalreporter.section("SKIPPED GROUPS (CI fails instead of skipping)", sep="!", yellow=True, bold=True)
        for reason, count in groups.most_common():
            terminalreporter.write_line(f"{count:4d} skipped: {reason}", yellow=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session; each server process gets its own key prefix in it."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop and restart it."""
    require_redis_server()
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own whose data survives a stop and start (append-only file, fsync always)."""
    require_redis_server()
    server = RedisServer(tmp_path, persist=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the session; each server process gets its own schema (DATABASE_SCHEMA) in it."""
    require_postgres()
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, for tests that stop and restart it."""
    require_postgres()
    server = PostgresServer()
    yield server
    server.close()


def new_schema() -> str:
    return f"test_{uuid.uuid4().hex[:8]}"


def own_namespace(backend: dict[str, str]) -> dict[str, str]:
    """A place of its own in the backend's store (a Redis key prefix, a PostgreSQL schema); nothing in memory mode.
    Servers started with the same one share their state, as replicas."""
    if "DATABASE_URL" in backend:
        return {"DATABASE_SCHEMA": new_schema()}
    return {"REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}"} if backend else {}


@pytest.fixture(scope="module", params=["memory", "redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that selects a store backend: every server test runs against each."""
    if request.param == "memory":
        return {}
    if request.param == "postgres":
        postgres = request.getfixturevalue("postgres_server")
        return {"DATABASE_URL": postgres.url, "DATABASE_SCHEMA": new_schema()}
    redis = request.getfixturevalue("redis_server")
    return {"REDIS_URL": redis.url, "REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}"}


@pytest.fixture
def start_server(tmp_path: Path, backend: dict[str, str]) -> Iterator[Any]:
    """Factory: start_server(**env) -> a fresh ServerProcess on the module's backend, stopped after the test."""
    servers: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server-{len(servers)}.log", **{**backend, **own_namespace(backend), **env})
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer):
    """Factory: replicas(n, **env) -> n server processes sharing one Redis prefix (``url``: through a proxy)."""
    started: list[ServerProcess] = []

    def start(count: int = 2, redis: RedisServer = redis_server, prefix: str | None = None, url: str | None = None,
              **env: str) -> list[ServerProcess]:
        prefix = prefix or f"test-{uuid.uuid4().hex[:8]}"
        new = [ServerProcess(tmp_path / f"replica-{len(started) + i}.log", REDIS_URL=url or redis.url,
                             REDIS_PREFIX=prefix, **env) for i in range(count)]
        started.extend(new)
        return new

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: dict[str, str]) -> Iterator[ServerProcess]:
    """One server shared by a module's tests; each test leaves it idle."""
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "server.log", **backend)
    yield srv
    srv.stop(signal.SIGKILL)
