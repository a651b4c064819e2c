"""Idempotency-Key as the IETF draft defines it, a Structured Field string (RFC 8941), written by ``http_sfv``
(a Structured Fields library), beside the bare form clients sent before: ``"abc"`` and ``abc`` are one key."""

from __future__ import annotations

import http_sfv
import pytest

from conftest import ServerProcess, new_user
from test_idempotency import new_key, post, runs_of


def sf_string(key: str) -> str:
    """``key`` as a Structured Field string, serialised by http_sfv."""
    return str(http_sfv.Item(key))


def test_the_quoted_key_and_the_bare_key_are_one_key(server: ServerProcess) -> None:
    user, key = new_user(), new_key()
    assert sf_string(key) == f'"{key}"'
    first = post(server, sf_string(key), user, seconds=0)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    for retried in (key, sf_string(key)):
        again = post(server, retried, user, seconds=0)
        assert again.status_code == 202 and again.json()["run_id"] == first.json()["run_id"], retried
        assert again.headers["idempotent-replayed"] == "true"
    assert len(runs_of(server, user)) == 1
    server.wait_run(first.json()["run_id"])  # the module's server is left idle


def test_a_quoted_key_with_escapes_is_the_key_it_escapes(server: ServerProcess) -> None:
    user, key = new_user(), f'say "hi" \\ {new_key()}'
    quoted = sf_string(key)
    assert '\\"' in quoted and "\\\\" in quoted  # http_sfv escaped both
    first = post(server, quoted, user, seconds=0)
    assert first.status_code == 202
    bare = post(server, key, user, seconds=0)  # not starting with a quote: taken as it is
    assert bare.status_code == 202 and bare.json()["run_id"] == first.json()["run_id"]
    server.wait_run(first.json()["run_id"])


def test_a_quoted_key_of_255_characters_is_accepted_and_one_of_256_is_400(server: ServerProcess) -> None:
    user = new_user()
    accepted = post(server, sf_string("\\" * 255), user, seconds=0)  # 512 characters on the wire
    assert accepted.status_code == 202, accepted.text
    server.wait_run(accepted.json()["run_id"])
    refused = post(server, sf_string("k" * 256), user, seconds=0)
    assert refused.status_code == 400
    assert refused.json()["detail"].startswith("Idempotency-Key must be 1 to 255 printable ASCII characters")


@pytest.mark.parametrize("value, detail", [
    ('""', 'Idempotency-Key "" is empty: a key has 1 character or more'),
    ('"abc', "Idempotency-Key '\"abc' is an unterminated quoted string"),
    ('"abc\\"', "Idempotency-Key '\"abc\\\\\"' is an unterminated quoted string"),
    ('"a\\nb"', "Idempotency-Key '\"a\\\\nb\"': \\n is not an escape a quoted string may hold (only \\\" and \\\\)"),
    ('"abc"def', "Idempotency-Key '\"abc\"def' has characters after its closing quote"),
])
def test_an_empty_unterminated_or_badly_escaped_quoted_key_is_400_and_starts_nothing(
        server: ServerProcess, value: str, detail: str) -> None:
    if value != '""':  # a Structured Fields parser refuses it too (the empty string is valid syntax, not a key)
        with pytest.raises(ValueError):
            http_sfv.Item().parse(value.encode())
    user = new_user()
    response = post(server, value, user, seconds=0)
    assert response.status_code == 400 and response.json() == {"detail": detail}
    assert runs_of(server, user) == []
