"""Holes in the single-run guarantee (issue 11), each closed and kept closed, black-box where it is about HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import ServerProcess, new_user


def strict_json(text: str) -> Any:
    """Parse as a strict client does (JavaScript's JSON.parse): no NaN, Infinity or -Infinity."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1E400", "-12.5e1000"])
def test_non_finite_number_in_input_is_refused(server: ServerProcess, number: str) -> None:
    body = f'{{"agent_type": "sleeper", "user_id": "{new_user()}", "input": {{"n": {number}}}}}'
    response = server.client.post("/agents/run", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "finite" in response.json()["detail"]
    strict_json(server.client.get("/agents/runs", params={"limit": 1000}).text)


def test_large_finite_numbers_are_still_accepted(server: ServerProcess) -> None:
    body = f'{{"agent_type": "sleeper", "user_id": "{new_user()}", "input": {{"seconds": 0.01, "n": 1.5e308}}}}'
    response = server.client.post("/agents/run", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    run = server.wait_run(response.json()["run_id"])
    assert run["input"]["n"] == 1.5e308



def test_completion_fields_named_like_log_record_attributes_keep_the_terminal_line(start_server) -> None:
    srv = start_server(AGENT_MODULES="fixture_agents,fixture_hardening_agents")
    run = srv.run_to_end("log-record-fields")
    line = srv.wait_for_event("agent_complete", run_id=run["run_id"], timeout=5)
    assert (line["state"], line["decision"]) == ("DONE", "ok")
    assert {key: line[f"field_{key}"] for key in ("name", "module", "msg", "message", "asctime")} == {
        "name": "n", "module": "m", "msg": "x", "message": "hello", "asctime": "t"}


def test_completion_fields_cannot_change_the_run_or_its_terminal_line(start_server) -> None:
    srv = start_server(AGENT_MODULES="fixture_agents,fixture_hardening_agents")
    run_id = srv.start_run("run-line-fields")
    run = srv.wait_run(run_id, timeout=5)
    assert (run["state"], run["result"], run["error"]) == ("DONE", "ok", None)
    line = srv.wait_for_event("agent_complete", run_id=run_id, timeout=5)
    assert (line["state"], line["field_state"], line["field_error"], line["field_event"]) == (
        "DONE", "BOGUS", "not an error", "e")
    assert "error" not in line
