"""Queue positions as every client reads them (status, list, a run's stream, the stream of all runs) while waiting
runs are cancelled, a run interrupts its way to the head and the queue drains: in memory mode, and in Redis mode
across two replicas (a move made on one is seen by the other's clients)."""

from __future__ import annotations

import time
from typing import Any

from conftest import ServerProcess, new_user, own_namespace
from service.admission import QUEUE_FRAMES_INTERVAL
from test_events import SSEReader, run_frames

AGENTS = "fixture_agents,fixture_event_agents"


def enqueue(srv: ServerProcess, agent_type: str = "sleeper", on_busy: str = "enqueue", **input: Any) -> dict[str, Any]:
    response = srv.client.post("/agents/run", json={"agent_type": agent_type, "user_id": new_user(),
                                                    "input": input or {"seconds": 0}, "on_busy": on_busy})
    assert response.status_code == 202, response.text
    return response.json()


def positions_everywhere(servers: list[ServerProcess], run_ids: list[str]) -> list[dict[str, int | None]]:
    """Each replica's view of the runs' positions: by status, and by the list of runs."""
    views = []
    for srv in servers:
        views.append({run_id: srv.client.get(f"/agents/status/{run_id}").json()["queue_position"]
                      for run_id in run_ids})
        listed = {run["run_id"]: run["queue_position"]
                  for run in srv.client.get("/agents/runs", params={"limit": 100}).json()["runs"]}
        views.append({run_id: listed[run_id] for run_id in run_ids})
    return views


def last_position(reader: SSEReader, run_id: str) -> Any:
    frames = [frame for frame in run_frames(reader) if frame["run_id"] == run_id]
    return (frames[-1]["state"], frames[-1]["queue_position"]) if frames else None


def check(servers: list[ServerProcess], expected: dict[str, int], streams: dict[str, SSEReader],
          everything: list[SSEReader]) -> None:
    """Status and list on every replica show ``expected`` at once; the streams get there (a pass every 0.25 s)."""
    assert positions_everywhere(servers, list(expected)) == [expected] * (2 * len(servers))
    for run_id, reader in streams.items():
        if run_id in expected:
            reader.wait_for(lambda r, run_id=run_id: last_position(r, run_id) == ("PENDING", expected[run_id]))
    for reader in everything:
        reader.wait_for(lambda r: all(last_position(r, run_id) == ("PENDING", position)
                                      for run_id, position in expected.items()))


def test_positions_follow_cancels_an_interrupt_and_the_drain_for_every_reader(
        start_server: Any, backend: dict[str, str]) -> None:
    prefix = own_namespace(backend)  # one store place for both replicas (a Redis prefix, a PostgreSQL schema)
    servers = [start_server(AGENT_MODULES=AGENTS, **prefix) for _ in range(2 if backend else 1)]
    a, b = servers[0], servers[-1]
    blocker = a.start_run("hanging")
    a.wait_state(blocker, "RUNNING")
    waiting = [enqueue(servers[i % len(servers)])["run_id"] for i in range(5)]
    streams = {run_id: SSEReader(f"{servers[i % len(servers)].url}/agents/events/{run_id}")
               for i, run_id in enumerate(waiting) if i in (3, 4)}  # the last two, each on its own replica
    everything = [SSEReader(f"{srv.url}/agents/events") for srv in servers]
    for reader in everything:
        reader.wait_started()
    try:
        check(servers, {run_id: position for position, run_id in enumerate(waiting, 1)}, streams, [])
        first, second, third, fourth, fifth = waiting

        assert b.client.post(f"/agents/cancel/{second}").json()["state"] == "CANCELLED"  # from the middle
        check(servers, {first: 1, third: 2, fourth: 3, fifth: 4}, streams, everything)
        assert a.client.post(f"/agents/cancel/{first}").json()["state"] == "CANCELLED"  # the head
        check(servers, {third: 1, fourth: 2, fifth: 3}, streams, everything)

        # A run interrupting for the slot goes to the head, the blocker is asked to stop, and it starts.
        interrupting = enqueue(b, "hanging", on_busy="interrupt", seconds=60)
        assert interrupting["queue_position"] == 1
        b.wait_state(interrupting["run_id"], "RUNNING")
        assert a.wait_run(blocker)["state"] == "CANCELLED"
        check(servers, {third: 1, fourth: 2, fifth: 3}, streams, everything)

        assert a.client.post(f"/agents/cancel/{interrupting['run_id']}").status_code == 200  # the queue drains
        for run_id in (third, fourth, fifth):
            run = a.wait_run(run_id)
            assert (run["state"], run["queue_position"]) == ("DONE", None)
        for run_id, reader in streams.items():
            reader.wait_ended()
            shown = [frame["queue_position"] for frame in run_frames(reader) if frame["state"] == "PENDING"]
            assert all(before != after for before, after in zip(shown, shown[1:])), shown  # each move once
            assert sorted(shown, reverse=True) == shown and shown[-1] >= 1, shown  # only ever forward
            assert run_frames(reader)[-1]["state"] == "DONE"
        for reader in everything:
            reader.wait_for(lambda r: all(last_position(r, run_id) == ("DONE", None)
                                          for run_id in (third, fourth, fifth)))
            ids = [event_id for _, event_id, _ in reader.frames if event_id is not None]
            assert ids == sorted(ids, key=lambda event_id: tuple(map(int, event_id.split("-"))))
    finally:
        for reader in [*streams.values(), *everything]:
            reader.close()


def test_a_run_stream_opened_while_waiting_gets_no_repeat_of_the_position_it_started_with(
        start_server: Any, backend: dict[str, str]) -> None:
    srv = start_server(AGENT_MODULES=AGENTS)
    blocker = srv.start_run("hanging")
    srv.wait_state(blocker, "RUNNING")
    ahead, behind = enqueue(srv)["run_id"], enqueue(srv)["run_id"]
    reader = SSEReader(f"{srv.url}/agents/events/{behind}")
    try:
        reader.wait_for(lambda r: [frame["queue_position"] for frame in run_frames(r)] == [2])
        enqueue(srv)  # a run queued behind it moves nothing ahead: the pass it wakes sends nothing
        time.sleep(3 * QUEUE_FRAMES_INTERVAL)  # time for that pass (nothing to wait for: it must send nothing)
        srv.client.post(f"/agents/cancel/{ahead}")
        reader.wait_for(lambda r: [frame["queue_position"] for frame in run_frames(r)] == [2, 1])
        assert [frame["queue_position"] for frame in run_frames(reader)] == [2, 1]
    finally:
        srv.client.post(f"/agents/cancel/{blocker}")
        reader.close()
