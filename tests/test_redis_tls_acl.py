"""Redis over TLS (a CA and a server certificate made by openssl here) and the least-privilege ACL line that
docs/redis-tls-acl.md gives, read from the page: a service under it runs end to end; a user without a needed
permission makes /readyz answer 503 (issue 26).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HERE, ServerProcess, free_port, missing_tool, require_redis_server, wait_until
from redis_deployments import acl_words


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1 it signs."""
    if shutil.which("openssl") is None:
        missing_tool("openssl", "apt-get install openssl")
    files = {name: directory / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")}
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
         "-keyout", files["ca.key"], "-out", files["ca.crt"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", files["server.key"],
         "-out", files["server.csr"]],
        ["x509", "-req", "-in", files["server.csr"], "-CA", files["ca.crt"], "-CAkey", files["ca.key"],
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", files["server.crt"]],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True, timeout=60)
    return files


class TlsRedis:
    """redis-server listening only on TLS (``--port 0``), its users set with ACL SETUSER."""

    def __init__(self, directory: Path) -> None:
        require_redis_server()
        self.files = make_certificates(directory)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(directory), "--tls-cert-file", str(self.files["server.crt"]),
             "--tls-key-file", str(self.files["server.key"]), "--tls-ca-cert-file", str(self.files["ca.crt"]),
             "--tls-auth-clients", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.cli("PING") == "PONG", 10, "redis over TLS")

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "--tls", "--cacert", str(self.files["ca.crt"]), "-p", str(self.port),
                               "--raw", *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    def url(self, user: str, password: str) -> str:
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.files['ca.crt']}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    if shutil.which("redis-cli") is None:
        missing_tool("redis-cli", "apt-get install redis-tools")
    server = TlsRedis(tmp_path_factory.mktemp("tls"))
    yield server
    server.stop()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for srv in started:
        srv.stop(signal.SIGKILL)


def add_user(tls_redis: TlsRedis, name: str, prefix: str) -> str:
    """The documented user ``name`` on ``prefix`` (with a fresh password), set on the server; its password."""
    password = uuid.uuid4().hex
    assert tls_redis.cli(*acl_words(name, password, prefix)) == "OK"
    return password


def test_a_service_over_tls_under_the_documented_acl_user_runs_end_to_end(tmp_path: Path, tls_redis: TlsRedis,
                                                                          service: list[ServerProcess]) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    password = add_user(tls_redis, "runner", prefix)
    service.append(srv := ServerProcess(tmp_path / "service.log", REDIS_URL=tls_redis.url("runner", password),
                                        REDIS_PREFIX=prefix, MAX_CONCURRENT_RUNS="2"))
    assert srv.client.get("/readyz").status_code == 200
    first = srv.start_run("sleeper", seconds=0.3)
    assert srv.wait_run(first)["state"] == "DONE"
    with srv.client.stream("GET", f"/agents/events/{first}") as events:  # the stream reader's XREAD and XRANGE
        assert events.status_code == 200
    cancelled = srv.start_run("sleeper", seconds=30)
    srv.wait_state(cancelled, "RUNNING")
    assert srv.client.post(f"/agents/cancel/{cancelled}").status_code in (200, 202)
    assert srv.wait_run(cancelled)["state"] == "CANCELLED"
    assert {run["run_id"] for run in srv.client.get("/agents/runs").json()["runs"]} == {first, cancelled}
    assert srv.client.get("/readyz").status_code == 200
    assert "NoPermissionError" not in srv.log_path.read_text()  # no command refused, in any task
    assert not srv.events("store_unavailable") and not srv.events("events_unavailable")
    keys = tls_redis.cli("KEYS", "*").split()
    assert keys and all(key.startswith(f"{prefix}:") for key in keys)


def test_a_user_without_a_permission_the_service_needs_gets_readyz_503(tmp_path: Path, tls_redis: TlsRedis,
                                                                       service: list[ServerProcess]) -> None:
    password = add_user(tls_redis, "elsewhere", "some-other-prefix")  # keys of another prefix only
    service.append(srv := ServerProcess(tmp_path / "service.log", REDIS_URL=tls_redis.url("elsewhere", password),
                                        REDIS_PREFIX=f"test-{uuid.uuid4().hex[:8]}"))
    response = srv.client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"detail": "Run store unavailable"})
    assert "NoPermissionError" in srv.wait_for_event("store_not_ready")["error"]


def test_the_documented_acl_line_allows_every_command_the_lua_scripts_call() -> None:
    """Redis checks a script's commands against the caller's ACL one by one, and a script refused part-way keeps
    what it wrote before: a command of the scripts missing from the line would take slots and answer 503."""
    allowed = {word[1:].lower() for word in acl_words("agent-runner", "x", "agent-runner") if word.startswith("+")}
    sources = "".join(path.read_text() for path in (HERE / "service" / "backends" / "redis").glob("*.py"))
    called = {name.lower() for name in re.findall(r"redis\.call\('(\w+)'", sources)}
    assert called, "no redis.call found: the scripts moved"
    assert called - allowed == set(), f"the ACL line in docs/redis-tls-acl.md lacks {sorted(called - allowed)}"
