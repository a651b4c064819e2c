"""The endpoints of runs, agents, health and metrics: small functions from a request to a response.

Each reaches the service's state through ``from_state(request.app.state)``;
what a run does once admitted is in service/runs.py and service/admission.py.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii as json_string
from typing import Any

from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

import agents
from service import metrics
from service.backends import Backend
from service.backends.records import STATES, Page, Run
from service.http.validation import (check_idempotency_key, check_uuid, check_webhook_resolves, header,
                                     json_response, parse_limit, parse_run_request, parse_wait, read_json, short)
from service.logs import log, log_hot
from service.supervision import run_fields
from service.runtime import Runtime, from_state

CANCEL_WAIT_SECONDS = 5.0  # how long POST /agents/cancel waits for the agent to stop
LIST_BODY_BYTES = 8 * 1024 * 1024  # GET /agents/runs returns fewer runs rather than a larger body
BUSY_BODY = b'{"detail":"An agent is already running, please retry later"}'
QUEUE_FULL_BODY = b'{"detail":"An agent is already running and the queue is full, please retry later"}'


async def post_run(request: Request) -> Response:
    agent_cls, user_id, agent_input, on_busy, webhook = parse_run_request(await read_json(request))
    if header(request, b"idempotency-key") is not None:  # without one, this lookup is all a key costs
        return await post_run_once(request, agent_cls, user_id, agent_input, on_busy, webhook)
    if webhook is not None:
        await check_webhook_resolves(webhook)
    runtime = from_state(request.app.state)
    if not runtime.admission.accepting_runs:
        raise HTTPException(503, "Shutting down")
    verdict, run = await runtime.admission.admit(agent_cls, user_id, agent_input, on_busy, webhook)
    if verdict in ("busy", "full"):
        return refuse_run(runtime, verdict, agent_cls, user_id)
    assert run is not None  # accepted: started or queued
    return accept_run(request, run.run_id, on_busy, run.queue_position)


async def post_run_once(request: Request, agent_cls: type[agents.BaseAgent], user_id: str,
                        agent_input: dict[str, Any], on_busy: str, webhook: str | None) -> Response:
    """POST /agents/run with an Idempotency-Key: a retry gets the first accepted request's answer, not a run."""
    key = check_idempotency_key(request.headers.getlist("idempotency-key"))
    check = (lambda: check_webhook_resolves(webhook)) if webhook is not None else None  # a replay is not checked
    runtime = from_state(request.app.state)
    verdict, run_id, queue_position = await runtime.admission.admit_once(key, agent_cls, user_id, agent_input,
                                                                           on_busy, webhook, check)
    if verdict == "mismatch":
        raise HTTPException(422, f"Idempotency-Key {short(key)} was used with a different request")
    if verdict == "pending":
        raise HTTPException(409, "The first request with this key is still being processed, please retry later",
                            headers={"Retry-After": "1"})
    if verdict == "closed":
        raise HTTPException(503, "Shutting down")
    if verdict in ("busy", "full"):
        return refuse_run(runtime, verdict, agent_cls, user_id)
    if verdict == "replayed":
        log.info("run_replayed", extra={"run_id": run_id, "agent_type": agent_cls.agent_type, "user_id": user_id,
                                        "key": key})
    return accept_run(request, run_id, on_busy, queue_position, replayed=verdict == "replayed")


def refuse_run(runtime: Runtime, verdict: str, agent_cls: type[agents.BaseAgent], user_id: str) -> Response:
    """409: every slot taken, or the queue full. The busy path is hot: answered here, not by the exception handler."""
    metrics.REJECTED_TOTAL.inc()
    log_hot("run_rejected", f'"agent_type": {json_string(agent_cls.agent_type)}, "user_id": "{user_id}"')
    refusal = json_response(BUSY_BODY if verdict == "busy" else QUEUE_FULL_BODY, 409)
    refusal.raw_headers.append((b"retry-after", b"%d" % runtime.admission.retry_after()))
    return refusal


def accept_run(request: Request, run_id: str, on_busy: str, queue_position: int | None,
               replayed: bool = False) -> Response:
    """202 with the run's id (and its place in the queue when the request may queue); a replay says so."""
    body: dict[str, Any] = {"run_id": run_id, "state": "PENDING"}
    if on_busy != "reject":
        body["queue_position"] = queue_position
    headers = {"Location": f"{request.scope.get('root_path', '')}/agents/status/{run_id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(body, 202, headers=headers)


async def find_run(backend: Backend, run_id: str) -> Run:
    run = await backend.get(check_uuid(run_id, "run_id"))
    if run is None:
        raise HTTPException(404, f"Run {run_id} not found")
    return run


async def get_status(request: Request) -> Response:
    return await status_answer(request.app.state, request.path_params, request.scope["query_string"])


async def status_answer(state: Any, path_params: dict[str, Any], query_string: bytes) -> Response:
    """GET /agents/status/{run_id} from the request's parts (the Shortcut middleware answers it without a Request)."""
    backend = from_state(state).backend
    run = await find_run(backend, path_params["run_id"])
    wait = parse_wait(QueryParams(query_string).get("wait")) if query_string else None
    if wait is not None and not run.finished:
        run = await backend.wait_finished(run.run_id, wait) or run
    return json_response(run.json())


async def cancel_run(request: Request) -> Response:
    runtime = from_state(request.app.state)
    run = await find_run(runtime.backend, request.path_params["run_id"])
    if run.finished:
        raise HTTPException(409, f"Run {run.run_id} already finished ({run.state})")
    log.info("cancel_requested", extra=run_fields(run))
    if run.queue_position is not None and \
            (waiting := await runtime.admission.cancel_waiting(run.run_id)) is not None:
        return json_response(waiting.json())
    if not runtime.runner.request_stop(run.run_id):  # another replica runs it (or it is just leaving the queue)
        await runtime.backend.request_cancel(run.run_id)
    run = await runtime.backend.wait_finished(run.run_id, CANCEL_WAIT_SECONDS) or run
    return json_response(run.json(), 200 if run.finished else 202)


async def list_runs(request: Request) -> Response:
    query = request.query_params
    state = query.get("state")
    if state is not None and state not in STATES:
        raise HTTPException(400, f"state must be one of {', '.join(STATES)}, got {short(state)}")
    user_id = query.get("user_id")
    before = query.get("before")
    runtime = from_state(request.app.state)
    backend = runtime.backend
    if before is not None and await backend.get(check_uuid(before, "before")) is None:
        raise HTTPException(400, f"before: run {before} not found (it may have been dropped by retention)")
    page = Page(parse_limit(query.get("limit")), state=state, agent_type=query.get("agent_type"),
                user_id=check_uuid(user_id, "user_id") if user_id is not None else None, max_bytes=LIST_BODY_BYTES)
    async with runtime.large_reads:
        runs = await backend.list(page, before=before.lower() if before else None)
        body = b'{"runs":[' + b",".join(run.json() for run in runs) + b"]}"
    return json_response(body)


async def list_agents(request: Request) -> Response:
    return json_response({"agents": [
        {"agent_type": agent_type, "description": cls.description}
        for agent_type, cls in sorted(agents.registry.items())
    ]})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime = from_state(request.app.state)
    if not runtime.admission.accepting_runs:
        raise HTTPException(503, "Shutting down")
    await runtime.backend.check()
    return json_response({"status": "ready"})


async def metrics_page(request: Request) -> Response:
    body, media_type = metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=media_type, headers={"Vary": "Accept"})
