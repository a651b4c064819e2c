"""A run's stream read by Chromium's own EventSource: it gets the terminal event once, then stops.

The server ends a run's stream after its terminal event; EventSource reconnects (after the stream's
``retry:``) with that event's id, gets 204, and closes for good (the SSE spec's way to stop a client).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ServerProcess
from test_dashboard import browser  # noqa: F401 - the module's Chromium, a fixture

WATCH = """runId => {
  const seen = {opens: 0, errors: 0, terminal: 0, states: [], ids: []};
  const source = new EventSource(`/agents/events/${runId}`);
  source.onopen = () => { seen.opens += 1; };
  source.onerror = () => { seen.errors += 1; };
  source.addEventListener("run", event => {
    const run = JSON.parse(event.data);
    seen.states.push(run.state);
    seen.ids.push(event.lastEventId);
    if (["DONE", "ERROR", "CANCELLED"].includes(run.state)) seen.terminal += 1;
  });
  window.seen = seen;
  window.source = source;
}"""


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:  # noqa: F811 - the fixture imported above
    context = browser.new_context()
    yield context.new_page()
    context.close()


def watch_until_closed(page: Any, server: ServerProcess, run_id: str, timeout: float = 15) -> dict[str, Any]:
    """What an EventSource on the run's stream saw by the time it closed for good (CLOSED, readyState 2: by the
    spec it never reconnects after that), failing if it is still open after ``timeout`` seconds."""
    page.goto(server.url + "/openapi.json")  # a page of the service's own origin, without the dashboard's streams
    page.evaluate(WATCH, run_id)
    page.wait_for_function("window.source.readyState === 2", timeout=timeout * 1000)
    return dict(page.evaluate("({...window.seen, readyState: window.source.readyState})"))


def requests_for(server: ServerProcess, run_id: str) -> list[int]:
    time.sleep(0.5)  # access lines are flushed within 0.2 s
    return [line["status"] for line in server.events("http_request") if line.get("path") == f"/agents/events/{run_id}"]


def test_eventsource_on_a_finished_run_gets_its_history_and_one_done_then_closes(page: Any,
                                                                                server: ServerProcess) -> None:
    run_id = server.run_to_end("sleeper", seconds=0.1)["run_id"]
    seen = watch_until_closed(page, server, run_id)
    assert seen["terminal"] == 1 and seen["states"][-1] == "DONE", seen
    assert seen["states"][0] in ("PENDING", "RUNNING"), seen  # the whole run, from its first event
    assert seen["opens"] == 1 and seen["readyState"] == 2, seen  # CLOSED: no reconnect after the 204
    assert requests_for(server, run_id) == [200, 204]


def test_eventsource_watching_a_run_to_its_end_gets_one_done_then_closes(page: Any, server: ServerProcess) -> None:
    run_id = server.start_run("sleeper", seconds=1.5)
    seen = watch_until_closed(page, server, run_id)
    assert seen["terminal"] == 1 and seen["states"].count("DONE") == 1, seen
    assert seen["opens"] == 1 and seen["readyState"] == 2, seen
    assert seen["ids"] == sorted(seen["ids"], key=lambda event_id: tuple(map(int, event_id.split("-"))))
    assert requests_for(server, run_id) == [200, 204]
