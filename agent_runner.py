"""agent-runner: an HTTP service that runs at most N agents at once (one by default).

The launcher: ``python agent_runner.py`` serves the app with uvicorn, and
``agent_runner:app`` is the app for any other ASGI launcher (uvicorn,
gunicorn, hypercorn). Both read the same settings from the environment. The
service itself is the ``service`` package: ``service/http/`` speaks HTTP,
``service/backends/`` keeps the state (memory or Redis).
"""

from __future__ import annotations

from service.http.app import build_app
from service.http.server import main
from service.http.startup import configure

__version__ = "0.1.0"

app = build_app(__version__)

if __name__ == "__main__":
    main(app, __version__)
else:  # uvicorn, gunicorn, hypercorn (and tests) import the app: the same settings, logs and checks
    configure()
