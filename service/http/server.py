"""``python agent_runner.py``: uvicorn with the HTTP limits, uvloop, and a drain before it stops listening."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette

from service import settings
from service.http.limits import LimitedHttpToolsProtocol
from service.http.startup import configure, process_logging_config
from service.logs import log, write_hot_lines
from service.supervision import run_fields
from service.runtime import Runtime
from service.settings import SETTINGS_TABLE


class Server(uvicorn.Server):
    """uvicorn's server, with a drain on the first SIGTERM/SIGINT before it stops listening.

    While draining, /readyz answers 503 and POST /agents/run 503, so a load
    balancer moves traffic away; status and cancel keep working.
    """

    draining = False

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)
        runtime: Runtime | None = getattr(self.app.state, "runtime", None)  # None: the lifespan never started
        if runtime is not None and runtime.runner.agent_code_running():  # only exiting stops its code now
            for active in runtime.runner.active_runs.values():
                log.error("exit_with_agent_running", extra=run_fields(active.run))
            write_hot_lines()
            sys.stdout.flush()
            os._exit(0)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            try:
                runtime: Runtime | None = getattr(self.app.state, "runtime", None)
                if runtime is not None:
                    await runtime.admission.drain(settings.current.shutdown_grace_seconds)
                    await runtime.hub.close()  # the streams end (after the frames of runs that ended in the grace)
            finally:
                self.should_exit = True

        self.drain_task = asyncio.ensure_future(drain_then_exit())


def parse_args(argv: list[str], version: str) -> None:
    """--help prints the configuration table, --version the version; there are no other options."""
    import argparse

    width = max(len(name) for name, _, _ in SETTINGS_TABLE)
    table = "\n".join(f"  {name:<{width}}  {meaning}" + (f" (default: {default})" if default else "")
                      for name, default, meaning in SETTINGS_TABLE)
    parser = argparse.ArgumentParser(
        prog="agent_runner.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="agent-runner: an HTTP service that runs at most MAX_CONCURRENT_RUNS agents at once.",
        epilog=f"Configuration comes from the environment (also under uvicorn, gunicorn and hypercorn, which\n"
               f"import agent_runner:app; HOST, PORT and KEEPALIVE_SECONDS are this launcher's own):\n{table}")
    parser.add_argument("--version", action="version", version=f"agent-runner {version}")
    parser.parse_args(argv)


def dual_stack_socket(port: int) -> socket.socket | None:
    """A socket on ``::`` that takes IPv4 connections as well; None when this host has no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # whatever net.ipv6.bindv6only says
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
            return None
        raise
    sock.set_inheritable(True)
    return sock


def main(app: Starlette, version: str) -> None:
    if sys.argv[1:]:  # argparse only for --help or --version: most starts have no arguments
        parse_args(sys.argv[1:], version)
    configure(version=version)
    app.state.binds_own_socket = True  # nothing else can serve the socket uvicorn binds below: no claim
    host = settings.current.host
    sockets: list[socket.socket] | None = None
    if host == "::":  # the image's HOST: IPv6 and IPv4 on one socket, or IPv4 alone on a host without IPv6
        try:
            sock = dual_stack_socket(settings.current.port)
        except OSError:  # the port is taken: uvicorn's own bind below reports it and exits 3
            sock = None
        else:
            if sock is None:
                host = "0.0.0.0"
                log.info("dual_stack_unavailable", extra={"detail": "HOST=:: listens on IPv4 (0.0.0.0) only"})
            sockets = None if sock is None else [sock]
    config = uvicorn.Config(
        app,
        host=host,
        port=settings.current.port,
        log_config=process_logging_config(),
        access_log=False,
        proxy_headers=False,  # the app applies FORWARDED_ALLOW_IPS itself (ForwardedClient), under every launcher
        timeout_keep_alive=settings.current.keepalive_seconds,
        loop="uvloop",
        http=LimitedHttpToolsProtocol,  # httptools, with limits on connections, heads, bodies, unread answers
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    Server(config, app).run(sockets=sockets)
