"""One session through the client openapi-python-client generates from openapi.yaml.

tests/test_clients.py generates the package `agent_runner_client` beside a copy of this file, checks
both (and the example in docs/clients.md) with `mypy --strict`, then runs it against a live server:
AGENT_RUNNER_URL says where, API_TOKEN (optional) the token the server wants. It prints one JSON
line with what it did, or exits non-zero with the first thing that was not as the spec says.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any, NoReturn, TypeVar

from agent_runner_client import AuthenticatedClient, Client
from agent_runner_client.api.runs import cancel_run, get_run_status, list_agents, list_runs, start_run
from agent_runner_client.models import (AgentList, Error, GapEvent, LogEvent, Run, RunAccepted, RunEvent, RunList,
                                        RunRequest, RunRequestInput, State)
from agent_runner_client.types import Response
from documented_stream import run_events  # the reader on docs/clients.md

BUSY = "An agent is already running, please retry later"
TERMINAL = (State.DONE, State.ERROR, State.CANCELLED)
Body = TypeVar("Body")


def fail(what: str) -> NoReturn:
    sys.exit(f"flow.py: {what}")


def parsed(response: Response[Any], status: int, body_type: type[Body]) -> Body:
    """The response's body, after checking its status and that it parsed as the spec's type for it."""
    if response.status_code != status or not isinstance(response.parsed, body_type):
        fail(f"expected {status} with {body_type.__name__}, got {response.status_code}: {response.content!r}")
    return response.parsed


def start(client: Client | AuthenticatedClient, request: RunRequest) -> RunAccepted:
    response = start_run.sync_detailed(client=client, body=request)
    accepted = parsed(response, 202, RunAccepted)
    if accepted.state != "PENDING" or response.headers["location"] != f"/agents/status/{accepted.run_id}":
        fail(f"start: {accepted} with location {response.headers.get('location')}")
    return accepted


def wait_until_finished(client: Client | AuthenticatedClient, run_id: uuid.UUID) -> Run:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run = parsed(get_run_status.sync_detailed(run_id, client=client, wait=5), 200, Run)
        if run.state in TERMINAL:
            return run
    fail(f"run {run_id} did not finish in 30 s")


def main() -> None:
    base_url, token = os.environ["AGENT_RUNNER_URL"], os.environ.get("API_TOKEN")
    client: Client | AuthenticatedClient = Client(base_url=base_url)
    if token:
        parsed(list_agents.sync_detailed(client=client), 401, Error)  # the server does want the token
        client = AuthenticatedClient(base_url=base_url, token=token)
    user = uuid.uuid4()

    agents = parsed(list_agents.sync_detailed(client=client), 200, AgentList)
    if "sleeper" not in [agent.agent_type for agent in agents.agents]:
        fail(f"agents: {agents}")

    given = {"seconds": 0.5, "note": "python"}
    first = start(client, RunRequest(agent_type="sleeper", user_id=user, input_=RunRequestInput.from_dict(given)))
    busy = start_run.sync_detailed(client=client, body=RunRequest(agent_type="sleeper", user_id=user))
    if parsed(busy, 409, Error).detail != BUSY or int(busy.headers["retry-after"]) < 1:
        fail(f"busy: {busy.content!r} with retry-after {busy.headers.get('retry-after')}")

    run = wait_until_finished(client, first.run_id)
    if (run.state, run.error, run.input_.to_dict(), run.result) != (
            State.DONE, None, given, {"slept": 0.5, "input": given}):
        fail(f"first run: {run}")
    if run.started_at is None or run.finished_at is None or not run.created_at <= run.started_at <= run.finished_at:
        fail(f"first run times: {run.created_at} {run.started_at} {run.finished_at}")

    second = start(client, RunRequest(agent_type="sleeper", user_id=user))  # no input: the agent gets {}
    live = list(run_events(client, str(second.run_id)))  # read while it runs, to its terminal event
    runs = [event.data for event in live if isinstance(event, RunEvent)]
    states = [run.state for run in runs]
    if not isinstance(live[0], RunEvent) or states[-1] != State.DONE or any(isinstance(e, GapEvent) for e in live) \
            or [state in TERMINAL for state in states].count(True) != 1:
        fail(f"second run's stream: {live}")
    if runs[-1].input_.to_dict() != {}:
        fail("second run: input is not {}")
    history = list(run_events(client, str(first.run_id)))  # a finished run: its whole history, once
    if [event.data.state for event in history if isinstance(event, RunEvent)][-1:] != [State.DONE] or \
            not all(event.data.run_id == first.run_id for event in history if isinstance(event, LogEvent)):
        fail(f"first run's stream: {history}")
    if not isinstance(live[-1], RunEvent) or list(run_events(client, str(second.run_id), last_event_id=live[-1].id)):
        fail("a resume after the terminal event is not empty (204)")

    listed = parsed(list_runs.sync_detailed(client=client, state=State.DONE, user_id=user, limit=10), 200, RunList)
    if [item.run_id for item in listed.runs] != [second.run_id, first.run_id]:
        fail(f"list: {listed.runs}")

    cancel = parsed(cancel_run.sync_detailed(first.run_id, client=client), 409, Error)
    if cancel.detail != f"Run {first.run_id} already finished (DONE)":
        fail(f"cancel: {cancel.detail}")

    unknown = start_run.sync_detailed(client=client, body=RunRequest(agent_type="no-such-agent", user_id=user))
    if "no-such-agent" not in parsed(unknown, 400, Error).detail:
        fail(f"unknown agent: {unknown.content!r}")

    print(json.dumps({"user_id": str(user), "runs": [str(first.run_id), str(second.run_id)],
                      "streamed": [state.value for state in states]}))


if __name__ == "__main__":
    main()
