"""Webhook signatures as receivers' own libraries verify them: Standard Webhooks (``standardwebhooks``) and Stripe's
scheme (``stripe``), with whsec_ and plain secrets, several at once (rotation), one webhook-id per delivery."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest
import stripe
from standardwebhooks import Webhook, WebhookVerificationError

from conftest import DOCS, HERE, TESTS, RedisServer, free_port
from test_webhooks import HOOKS, receiver_factory, start_hooked_run  # noqa: F401 (a fixture)

STANDARD_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
PLAIN_SECRET = "plain-secret-" + uuid.uuid4().hex
ROTATED = {**HOOKS, "WEBHOOK_SECRET": f"{STANDARD_SECRET}, {PLAIN_SECRET}"}


def documented_receivers() -> dict[str, Any]:
    """The webhooks page's Python snippets, run as written: every function they define, by name."""
    scope: dict[str, Any] = {}
    for code in re.findall(r"```python\n(.*?)```", (DOCS / "webhooks.md").read_text(), re.S):
        exec(code, scope)
    return scope


def test_a_delivery_verifies_with_standardwebhooks_and_stripe_under_each_rotated_secret(start_server,
                                                                                       receiver_factory) -> None:
    receiver = receiver_factory()
    server = start_server(**ROTATED)
    run = server.wait_run(start_hooked_run(server, receiver.url))
    request = receiver.wait_requests(1)[0]
    headers, body = request["headers"], request["body"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", headers["webhook-id"])
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}= v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64},v1=[0-9a-f]{64}", headers["Agent-Runner-Signature"])
    assert Webhook(STANDARD_SECRET).verify(body, headers) == run
    assert Webhook(PLAIN_SECRET.encode()).verify(body, headers) == run  # a plain secret's key: its UTF-8 bytes
    for secret in (STANDARD_SECRET, PLAIN_SECRET):  # Stripe's scheme keys with the secret as written
        stripe.WebhookSignature.verify_header(body, headers["Agent-Runner-Signature"], secret, tolerance=300)
    receivers = documented_receivers()
    for secret in (STANDARD_SECRET, PLAIN_SECRET):
        assert receivers["verify_standard"](secret, headers, body) == run
        assert receivers["verify_stripe"](secret, headers, body)
        assert receivers["verify"](secret, headers["Agent-Runner-Signature"], body)
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    assert receivers["verify_standard"](other, headers, body) is None
    assert not receivers["verify_stripe"](other, headers, body)
    with pytest.raises(WebhookVerificationError):
        Webhook(STANDARD_SECRET).verify(body + b" ", headers)


def test_every_attempt_of_a_delivery_has_its_id_and_a_signature_of_its_own_time(start_server,
                                                                                receiver_factory) -> None:
    receiver = receiver_factory(500, 503)
    server = start_server(**ROTATED)
    run_id = start_hooked_run(server, receiver.url)
    requests = receiver.wait_requests(3)
    ids = {request["headers"]["webhook-id"] for request in requests}
    assert len(ids) == 1 and [request["answer"] for request in requests] == [500, 503, 200]
    for request in requests:
        assert Webhook(STANDARD_SECRET).verify(request["body"], request["headers"])["run_id"] == run_id
        assert request["headers"]["Agent-Runner-Signature"].startswith(f"t={request['headers']['webhook-timestamp']},")
    other_receiver = receiver_factory()
    start_hooked_run(server, other_receiver.url)
    assert other_receiver.wait_requests(1)[0]["headers"]["webhook-id"] not in ids  # one id per delivery


def test_a_delivery_taken_over_by_another_replica_keeps_its_webhook_id(replicas, receiver_factory,
                                                                       redis_server: RedisServer) -> None:
    receiver = receiver_factory(500)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a = replicas(1, prefix=prefix, **{**ROTATED, "WEBHOOK_BACKOFF_SECONDS": "3"})[0]
    run_id = start_hooked_run(a, receiver.url)
    a.wait_for_event("webhook_failed", run_id=run_id, attempt=1)
    stored = redis_server.command("HGET", f"{prefix}:webhook:{run_id}", "id")
    a.stop(signal.SIGKILL)  # it owed attempt 2 in 3 s
    b = replicas(1, prefix=prefix, **{**ROTATED, "WEBHOOK_BACKOFF_SECONDS": "3"})[0]
    b.wait_for_event("webhook_delivered", run_id=run_id, timeout=15)
    first, second = receiver.requests
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == stored.decode()
    Webhook(STANDARD_SECRET).verify(second["body"], second["headers"])


@pytest.mark.parametrize("secret", ["whsec_not*base64!", "whsec_" + base64.b64encode(b"too short").decode(),
                                    f"{STANDARD_SECRET},short"],
                         ids=["not base64", "a key under 16 bytes", "the second of two too short"])
def test_a_bad_webhook_secret_stops_start_with_exit_2(secret: str) -> None:
    result = subprocess.run([sys.executable, "agent_runner.py"], cwd=HERE, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PORT": str(free_port()), "PYTHONPATH": str(TESTS), **HOOKS,
                                 "WEBHOOK_SECRET": secret})
    assert result.returncode == 2, result.stdout + result.stderr
    line = json.loads(result.stdout.splitlines()[0])
    assert line["event"] == "invalid_configuration" and line["variable"] == "WEBHOOK_SECRET"
    assert STANDARD_SECRET not in result.stdout and "not*base64" not in result.stdout  # a secret is never logged
