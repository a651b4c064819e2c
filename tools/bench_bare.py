"""bench.py's bare ASGI app: no framework, the service's uvicorn settings, the same body as a status answer.

    python tools/bench_bare.py PORT

GET /run answers the run-sized JSON object of bench_baseline.py (encoded once), GET /healthz answers
{"status": "ok"}, anything else 404. What the service's GET status costs beyond this is its framework:
Starlette's routing and exception wrappers, its middlewares, its handler.
"""

import json
import sys

import uvicorn

from bench_baseline import RUN

BODY = json.dumps(RUN, separators=(",", ":")).encode()
HEALTHY = b'{"status":"ok"}'


async def app(scope, receive, send):  # noqa: ANN001, ANN201 - the bare ASGI signature
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, status = {"/run": (BODY, 200), "/healthz": (HEALTHY, 200)}.get(scope["path"], (b"", 404))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", access_log=False,
                log_level="warning", server_header=False)
