"""Webhooks: a run with a ``webhook`` URL is POSTed there, signed, at least once, when it ends."""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import DOCS, ServerProcess, missing_tool, new_user, own_namespace

SECRET = "test-secret-" + uuid.uuid4().hex
HOOKS = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost", "WEBHOOK_BACKOFF_SECONDS": "0.2"}


def documented_verifier() -> Any:
    """The webhooks page's verification snippet, run as written: a receiver's check of the signature."""
    section = (DOCS / "webhooks.md").read_text()
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "docs/webhooks.md has no Python snippet"
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    return scope["verify"]


class Receiver:
    """An HTTP server on 127.0.0.1 that answers POSTs with the statuses it is given, in order (then 200).

    "hang" holds the request unanswered until ``release`` is set (or 30 s pass).
    """

    def __init__(self, *answers: int | str, location: str = "", tls: tuple[Path, Path] | None = None) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    answer = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.requests.append({"headers": dict(self.headers), "body": body, "answer": answer,
                                              "path": self.path, "at": time.monotonic()})
                if answer == "hang":
                    receiver.release.wait(30)
                    return
                self.send_response(int(answer))
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?source=test"
        if tls is not None:  # https on https://localhost:<port>, with the given certificate and key
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.server.server_address[1]}/hook?source=test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_requests(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.requests)} requests, expected {count}")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Any:
    made: list[Receiver] = []

    def make(*answers: int | str, location: str = "", tls: tuple[Path, Path] | None = None) -> Receiver:
        made.append(Receiver(*answers, location=location, tls=tls))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def post_run(server: ServerProcess, webhook: Any, **fields: Any) -> Any:
    return server.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user(),
                                                   "input": {"seconds": 0.05}, "webhook": webhook, **fields})


def start_hooked_run(server: ServerProcess, webhook: str, **fields: Any) -> str:
    response = post_run(server, webhook, **fields)
    assert response.status_code == 202, response.text
    return response.json()["run_id"]


@pytest.fixture(scope="module")
def delivering_server(tmp_path_factory: pytest.TempPathFactory, backend: dict[str, str]) -> Any:
    """One server with webhooks on, shared by tests that read only their own receiver and their run's log lines,
    and wait until their delivery is over (delivered or given up)."""
    fresh = own_namespace(backend)
    server = ServerProcess(tmp_path_factory.mktemp("delivering") / "server.log", **{**backend, **fresh}, **HOOKS)
    yield server
    server.stop(signal.SIGKILL)


def test_a_finished_run_is_posted_signed_to_its_webhook(start_server, receiver_factory) -> None:
    receiver = receiver_factory()
    server = start_server(**HOOKS)
    run_id = start_hooked_run(server, receiver.url)
    run = server.wait_run(run_id)
    assert run["state"] == "DONE" and run["webhook"] == receiver.url
    request = receiver.wait_requests(1)[0]
    assert request["path"] == "/hook?source=test"
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == run  # the run object at its terminal state
    verify = documented_verifier()
    header = request["headers"]["Agent-Runner-Signature"]
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert verify(SECRET, header, request["body"])
    assert not verify(SECRET, header, request["body"] + b" ")  # a changed body fails
    assert not verify("another-secret-of-some-length", header, request["body"])
    old = int(time.time()) - 301
    import hashlib
    import hmac
    replayed = f"t={old},v1=" + hmac.new(SECRET.encode(), f"{old}.".encode() + request["body"],
                                         hashlib.sha256).hexdigest()
    assert not verify(SECRET, replayed, request["body"])  # a correct signature older than 5 minutes fails
    line = server.wait_for_event("webhook_delivered", run_id=run_id)
    assert line["attempt"] == 1 and line["status"] == 200
    assert SECRET not in server.log_path.read_text()
    assert 'agent_runner_webhook_attempts_total{outcome="delivered"} 1.0' in server.client.get("/metrics").text


def test_a_receiver_failing_twice_then_succeeding_gets_exactly_one_success(delivering_server: ServerProcess,
                                                                           receiver_factory) -> None:
    receiver = receiver_factory(500, 503)
    server = delivering_server
    run_id = start_hooked_run(server, receiver.url)
    requests = receiver.wait_requests(3)
    assert [request["answer"] for request in requests] == [500, 503, 200]
    assert requests[2]["at"] - requests[1]["at"] >= 0.35  # backoff doubles: 0.2 s, then 0.4 s
    assert requests[1]["at"] - requests[0]["at"] < 0.9  # and is kept to, not rounded up to a poll
    delivered = server.wait_for_event("webhook_delivered", run_id=run_id)
    assert delivered["attempt"] == 3 and delivered["status"] == 200
    failed = [line for line in server.events("webhook_failed") if line["run_id"] == run_id]
    assert [(line["attempt"], line["status"], line["final"]) for line in failed] == [(1, 500, False), (2, 503, False)]
    time.sleep(1.0)  # longer than the next backoff would be: nothing more is sent
    assert len(receiver.requests) == 3
    assert len({request["body"] for request in requests}) == 1  # the same body, signed afresh each time


@pytest.mark.parametrize("status", [400, 404, 410])
def test_a_4xx_ends_the_delivery_after_one_attempt(start_server, receiver_factory, status: int) -> None:
    receiver = receiver_factory(status)
    server = start_server(**HOOKS)
    run_id = start_hooked_run(server, receiver.url)
    failed = server.wait_for_event("webhook_failed", run_id=run_id)
    assert failed["attempt"] == 1 and failed["status"] == status and failed["final"] is True
    assert failed["level"] == "error"
    time.sleep(0.6)  # three times the 0.2 s backoff: a retry would have been sent by now
    assert len(receiver.requests) == 1
    assert "agent_runner_webhooks_undelivered_total 1.0" in server.client.get("/metrics").text


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retried(delivering_server: ServerProcess, receiver_factory, status: int) -> None:
    receiver = receiver_factory(status)
    server = delivering_server
    run_id = start_hooked_run(server, receiver.url)
    assert server.wait_for_event("webhook_delivered", run_id=run_id)["attempt"] == 2
    assert [request["answer"] for request in receiver.requests] == [status, 200]


def test_a_redirect_is_not_followed(delivering_server: ServerProcess, receiver_factory) -> None:
    target = receiver_factory()
    receiver = receiver_factory(302, location=target.url)
    server = delivering_server
    run_id = start_hooked_run(server, receiver.url)
    failed = server.wait_for_event("webhook_failed", run_id=run_id)
    assert failed["status"] == 302 and failed["final"] is True and "redirect" in failed["detail"]
    time.sleep(0.5)
    assert len(receiver.requests) == 1 and target.requests == []


def test_an_unreachable_receiver_is_retried_then_given_up(start_server, receiver_factory) -> None:
    receiver = receiver_factory()
    dead_url = receiver.url
    receiver.close()  # nothing listens there now: connection refused, every attempt
    server = start_server(**{**HOOKS, "WEBHOOK_BACKOFF_SECONDS": "0.05"})
    run_id = start_hooked_run(server, dead_url)
    last = server.wait_for_event("webhook_failed", run_id=run_id, attempt=6)
    assert last["final"] is True and last["status"] is None and "Error" in last["detail"]
    failed = [line for line in server.events("webhook_failed") if line["run_id"] == run_id]
    assert [line["attempt"] for line in failed] == [1, 2, 3, 4, 5, 6]
    assert [line.get("retry_in_s") for line in failed] == [0.05, 0.1, 0.2, 0.4, 0.8, None]


REFUSED = [
    ("http://hooks.example.com/x", "not in WEBHOOK_ALLOWED_HOSTS"),
    ("ftp://127.0.0.1/x", "http:// or https://"),
    ("127.0.0.1/x", "http:// or https://"),
    ("http://user:pw@127.0.0.1/x", "credentials"),
    ("http://127.0.0.1/a b", "without spaces"),
    ("http://127.0.0.1/\r\nX-Injected: 1", "without spaces"),
    ("http://127.0.0.1:99999/x", "not a valid URL"),
    ("http://127.0.0.1:0/x", "port 0"),  # not port 80, where it was sent
    ("http:///x", "has no host"),
    (42, "must be a string"),
]


@pytest.fixture(scope="module")
def hooked_server(tmp_path_factory: pytest.TempPathFactory, backend: dict[str, str]) -> Any:
    """One server with webhooks on, shared by the tests that only POST refused webhooks (no run starts)."""
    server = ServerProcess(tmp_path_factory.mktemp("hooks") / "server.log", **backend, **HOOKS)
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def any_host_server(tmp_path_factory: pytest.TempPathFactory, backend: dict[str, str]) -> Any:
    """One server whose WEBHOOK_ALLOWED_HOSTS is * (any host, but no private address unless listed by name)."""
    server = ServerProcess(tmp_path_factory.mktemp("any-host") / "server.log", **backend,
                           WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS="*")
    yield server
    server.stop(signal.SIGKILL)


@pytest.mark.parametrize(("webhook", "detail"), REFUSED, ids=[str(url)[:30] for url, _ in REFUSED])
def test_a_refused_webhook_is_a_400_and_starts_nothing(hooked_server: ServerProcess, webhook: Any,
                                                       detail: str) -> None:
    server = hooked_server
    response = post_run(server, webhook)
    assert response.status_code == 400 and detail in response.json()["detail"], response.text
    assert server.client.get("/agents/runs").json()["runs"] == []


def test_webhooks_are_refused_without_a_secret(start_server) -> None:
    server = start_server(WEBHOOK_ALLOWED_HOSTS="127.0.0.1")
    response = post_run(server, "http://127.0.0.1:9/hook")
    assert response.status_code == 400 and "WEBHOOK_SECRET" in response.json()["detail"]
    assert post_run(server, None).status_code == 202  # null is no webhook


@pytest.mark.parametrize("webhook", [
    "http://10.1.2.3/hook", "http://192.168.0.1/hook", "http://169.254.169.254/latest/meta-data",
    "http://100.100.100.200/", "http://[::1]:8080/hook", "http://[::ffff:127.0.0.1]/hook", "http://0.0.0.0/",
    "http://localhost:9/hook",  # a name that resolves to loopback: refused after the DNS lookup
])
def test_a_private_address_without_the_host_listed_by_name_is_a_400(any_host_server: ServerProcess,
                                                                    webhook: str) -> None:
    response = post_run(any_host_server, webhook)
    assert response.status_code == 400, response.text
    assert "loopback, private, link-local or metadata" in response.json()["detail"]
    assert any_host_server.client.get("/agents/runs").json()["runs"] == []


def test_a_host_that_does_not_resolve_is_a_400(start_server) -> None:
    server = start_server(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOWED_HOSTS="*.invalid")
    response = post_run(server, "http://no-such-host.invalid/hook")
    assert response.status_code == 400 and "does not resolve" in response.json()["detail"]


def test_the_run_never_waits_on_its_delivery(start_server, receiver_factory) -> None:
    receiver = receiver_factory("hang")
    server = start_server(**{**HOOKS, "WEBHOOK_TIMEOUT_SECONDS": "2"})
    run_id = start_hooked_run(server, receiver.url)
    receiver.wait_requests(1)  # the receiver holds the delivery unanswered...
    started = time.monotonic()
    assert server.wait_run(run_id)["state"] == "DONE"  # ...and the run is DONE regardless
    assert time.monotonic() - started < 1
    assert server.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()}).status_code == 202
    failed = server.wait_for_event("webhook_failed", run_id=run_id)
    assert "timed out after 2 s" in failed["detail"] and failed["final"] is False


def test_memory_mode_shutdown_makes_one_last_attempt(tmp_path: Path, receiver_factory) -> None:
    receiver = receiver_factory(500)
    server = ServerProcess(tmp_path / "server.log", **{**HOOKS, "WEBHOOK_BACKOFF_SECONDS": "60"})
    run_id = start_hooked_run(server, receiver.url)
    server.wait_for_event("webhook_failed", run_id=run_id, attempt=1)
    assert server.stop(signal.SIGTERM) == 0
    assert [request["answer"] for request in receiver.requests] == [500, 200]
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    delivered = [line for line in lines if line["event"] == "webhook_delivered"]
    assert delivered and delivered[0]["attempt"] == 2


@pytest.fixture
def localhost_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key (openssl), trusted by no system store."""
    if shutil.which("openssl") is None:
        missing_tool("openssl", "apt-get install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_checks_the_certificate_and_the_host_name(start_server, receiver_factory,
                                                        localhost_certificate: tuple[Path, Path]) -> None:
    receiver = receiver_factory(tls=localhost_certificate)
    untrusting = start_server(**HOOKS)
    run_id = start_hooked_run(untrusting, receiver.url)
    failed = untrusting.wait_for_event("webhook_failed", run_id=run_id)
    assert "CERTIFICATE_VERIFY_FAILED" in failed["detail"] and failed["final"] is False
    assert receiver.requests == []  # nothing sent to a server whose certificate is not trusted
    trusting = start_server(**HOOKS, SSL_CERT_FILE=str(localhost_certificate[0]))  # OpenSSL's own variable
    run_id = start_hooked_run(trusting, receiver.url)
    assert trusting.wait_for_event("webhook_delivered", run_id=run_id)["attempt"] == 1
    request = receiver.wait_requests(1)[0]
    assert documented_verifier()(SECRET, request["headers"]["Agent-Runner-Signature"], request["body"])
    assert request["headers"]["Host"] == f"localhost:{receiver.server.server_address[1]}"


def test_nothing_is_sent_once_the_claim_on_a_delivery_ran_out(receiver_factory) -> None:
    import asyncio

    from service.webhook_http import check_url, post

    receiver = receiver_factory()
    target = check_url(receiver.url, ("127.0.0.1",))
    with pytest.raises(OSError, match="ran out"):  # an event loop stalled past the lease: another replica sends it
        asyncio.run(post(target, ["127.0.0.1"], b"{}", {}, send_by=time.monotonic() - 1))
    assert asyncio.run(post(target, ["127.0.0.1"], b"{}", {}, send_by=time.monotonic() + 5)) == 200
    assert len(receiver.requests) == 1


def test_a_run_record_keeps_its_webhook_and_an_older_record_reads_as_none() -> None:
    from service.backends.records import Run

    run = Run.new(str(uuid.uuid4()), "sleeper", new_user(), {"a": 1}, holder=None, webhook="https://h.example/x")
    again = Run.from_json(run.json())
    assert again.webhook == "https://h.example/x" and again.json() == run.json()
    older = json.loads(run.json())
    del older["webhook"]  # written by a version without webhooks
    read = Run.from_json(json.dumps(older).encode())
    assert read.webhook is None and json.loads(read.json())["webhook"] is None
    older["webhook"] = 42  # garbage in a field: read as none rather than refused
    assert Run.from_json(json.dumps(older).encode()).webhook is None


def test_memory_mode_owes_a_bounded_number_of_deliveries(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from service.backends import memory
    from service.backends.records import Run

    monkeypatch.setattr(memory, "MAX_OWED", 2)
    queue = memory.MemoryDeliveries()
    runs = [Run.new(str(uuid.uuid4()), "sleeper", new_user(), {}, holder=None, webhook="http://h/") for _ in range(3)]
    for run in runs:
        queue.owe(run)
    first, _ = asyncio.run(queue.claim())
    second, _ = asyncio.run(queue.claim())
    nothing, wait = asyncio.run(queue.claim())
    assert first is not None and second is not None and nothing is None and wait > 0
    assert [first.run_id, second.run_id] == [runs[0].run_id, runs[1].run_id]  # the third was dropped
    assert first.attempt == 1 and first.body == runs[0].json()
    asyncio.run(queue.report(first, 0.0))  # a retry takes its place again
    assert asyncio.run(queue.claim())[0] is first and first.attempt == 2


@pytest.mark.parametrize("webhook", ["http://a..example.com/hook", "http://.example.com/hook",
                                     "http://" + "a" * 64 + ".example.com/hook"])
def test_a_host_name_dns_cannot_encode_is_a_400_not_a_500(any_host_server: ServerProcess, webhook: str) -> None:
    response = post_run(any_host_server, webhook)  # empty or over-long labels: the lookup cannot even be made
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith("webhook ")
    assert any_host_server.client.get("/agents/runs").json()["runs"] == []


def test_a_lookup_that_fails_for_a_moment_at_delivery_is_retried_not_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """At least once: a DNS blip (EAI_AGAIN) at delivery is a network error like any other."""
    import asyncio
    import socket

    from service import settings
    from service import webhooks
    from service.backends.memory import MemoryDeliveries
    from service.backends.records import Run
    from service.settings import Settings

    monkeypatch.setattr(settings, "current", Settings.from_env({
        "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_HOSTS": "hooks.example.com", "WEBHOOK_TIMEOUT_SECONDS": "2"}))

    def lookup_fails(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", lookup_fails)
    queue = MemoryDeliveries()
    queue.owe(Run.new(str(uuid.uuid4()), "sleeper", new_user(), {}, holder=None,
                      webhook="https://hooks.example.com/hook"))

    async def one_attempt() -> None:
        delivery, _ = await queue.claim()
        assert delivery is not None and delivery.attempt == 1
        await webhooks.Deliverer(queue).attempt(delivery)

    asyncio.run(one_attempt())
    owed = queue.take_all()
    assert [delivery.attempt for delivery in owed] == [1], "the delivery was given up after one lookup failed"


@pytest.mark.parametrize("webhook", [
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",  # NAT64: 169.254.169.254 through a NAT64 gateway
    "http://[64:ff9b::a00:5]/hook",  # NAT64: 10.0.0.5
    "http://[2002:a9fe:a9fe::1]/hook",  # 6to4 of 169.254.169.254
    "http://[::7f00:1]/hook",  # IPv4-compatible ::127.0.0.1
    "http://[fec0::1]/hook",  # site-local (deprecated, still private)
])
def test_an_ipv6_address_embedding_a_private_ipv4_one_is_a_400(any_host_server: ServerProcess,
                                                               webhook: str) -> None:
    response = post_run(any_host_server, webhook)
    assert response.status_code == 400, response.text
    assert "loopback, private, link-local or metadata" in response.json()["detail"]
    assert any_host_server.client.get("/agents/runs").json()["runs"] == []


def test_a_host_that_resolves_to_a_private_address_at_delivery_is_refused_and_nothing_is_sent(
        start_server, receiver_factory) -> None:
    """Checked at POST (public then) and again at delivery (loopback now, where the receiver listens): the
    delivery is given up at once, logged and counted, and the receiver gets nothing."""
    receiver = receiver_factory()
    server = start_server(AGENT_MODULES="fixture_agents,fixture_rebinding_dns", WEBHOOK_SECRET=SECRET,
                          WEBHOOK_ALLOWED_HOSTS="*.example.com", WEBHOOK_BACKOFF_SECONDS="0.2")
    port = receiver.url.split(":")[2].split("/")[0]
    run_id = start_hooked_run(server, f"http://rebind.example.com:{port}/hook")
    assert server.wait_run(run_id)["state"] == "DONE"
    failed = server.wait_for_event("webhook_failed", run_id=run_id)
    assert (failed["level"], failed["attempt"], failed["status"], failed["final"]) == ("error", 1, None, True)
    assert failed["detail"] == ("refused: host 'rebind.example.com' resolves to 127.0.0.1, a loopback, private, "
                                "link-local or metadata address; list the host by name in WEBHOOK_ALLOWED_HOSTS "
                                "to allow it")
    text = server.client.get("/metrics").text
    assert 'agent_runner_webhook_attempts_total{outcome="failed"} 1.0' in text
    assert "agent_runner_webhooks_undelivered_total 1.0" in text
    time.sleep(0.6)  # three backoffs: a retry that should not exist would have reached the receiver by now
    assert receiver.requests == [] and len(server.events("webhook_failed")) == 1
    assert server.events("webhook_delivered") == []
