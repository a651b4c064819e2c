"""bench.py's baseline: a bare Starlette app served by uvicorn with the service's settings.

    python tools/bench_baseline.py PORT

GET /run answers a run-sized JSON object, POST /run parses a JSON body and
answers 409, GET /healthz answers {"status": "ok"}. It is its own small
script, importing only Starlette and uvicorn, so the launch ratio compares
the service with what a bare app costs to start, not with bench.py's imports.
"""

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

RUN = {"run_id": "0b7e1c7e-4f5e-4c59-9d1b-2a0b3c4d5e6f", "agent_type": "sleeper",
       "user_id": "3f2b8a8e-6c1d-4d8e-9a57-0f4c2b1d9e10", "input": {"seconds": 0}, "state": "DONE",
       "result": {"slept": 0, "input": {"seconds": 0}}, "error": None, "progress": 1.0,
       "created_at": "2026-11-24T20:30:36.342Z", "started_at": "2026-11-24T20:30:36.344Z",
       "finished_at": "2026-11-24T20:30:36.845Z", "queue_position": None, "cancelled_by": None}


async def get_run(request: Request) -> JSONResponse:
    return JSONResponse(RUN)


async def post_run(request: Request) -> JSONResponse:
    await request.json()
    return JSONResponse({"detail": "busy"}, status_code=409)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/run", get_run), Route("/run", post_run, methods=["POST"]),
                        Route("/healthz", healthz)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", access_log=False,
                log_level="warning", server_header=False)
