"""Memory mode is one process: a second process serving the same port on this host refuses to start.

In memory mode each process has its own slots, so two processes behind one
listening port (``uvicorn --workers 2``, several gunicorn or hypercorn
workers, ``--reuse-port``) would run two agents at once. A process that is
handed a listening socket at start (a worker of such a launcher) claims the
socket's port for memory mode by binding an abstract Unix socket named after
it; the kernel releases the name when the process ends, however it ends.
Abstract names live in the network namespace, as ports do: one per host or
container (elsewhere than Linux, a locked file in the temporary directory
stands for the name). A process that binds its own port after start
(``python agent_runner.py``, plain ``uvicorn``) cannot share it, so it claims
nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from types import FrameType
from typing import Any

_claims: list[Any] = []  # sockets or locked files, held until the process ends


def listening_ports() -> set[int]:
    """The TCP ports of the server sockets this process holds already (inherited from its launcher)."""
    ports: set[int] = set()
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            descriptors = [int(name) for name in os.listdir(directory)]
        except (OSError, ValueError):
            continue
        for descriptor in descriptors:
            try:
                sock = socket.socket(fileno=os.dup(descriptor))
            except OSError:  # not a socket (or closed meanwhile)
                continue
            with sock:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                    # bound and not connected: a server socket (uvicorn's supervisor binds it, each worker listens)
                    port = sock.getsockname()[1]
                    try:
                        sock.getpeername()
                    except OSError:
                        if port:
                            ports.add(port)
        return ports
    return ports


def claim_ports(ports: set[int]) -> int | None:
    """Claim each port for this process; returns the first port another process claimed already, else None."""
    for port in sorted(ports):
        if not claim(f"agent-runner-memory-mode-{port}"):
            return port
    return None


def claim(name: str) -> bool:
    """Hold ``name`` on this host until the process ends; False when another process holds it."""
    if sys.platform == "linux":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)  # an abstract name: no file, gone with the process
        except OSError:
            sock.close()
            return False
        _claims.append(sock)
        return True
    import fcntl

    held = open(os.path.join(tempfile.gettempdir(), name + ".lock"), "a")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        held.close()
        return False
    _claims.append(held)
    return True


def stop_supervisor() -> None:
    """Ask the launcher's supervisor to stop instead of starting this refused worker again.

    uvicorn --workers and gunicorn restart a worker that exits; hypercorn stops
    every worker and exits with the failed worker's status by itself.
    """
    if "gunicorn.arbiter" in sys.modules:
        if in_gunicorn_worker():  # with --preload the arbiter imports the app too: it must not signal its parent
            os.kill(os.getppid(), signal.SIGTERM)
        return
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None and "hypercorn" not in sys.modules:
        os.kill(parent.pid, signal.SIGTERM)  # uvicorn's multiprocess supervisor


def in_gunicorn_worker() -> bool:
    """Whether this code runs inside a gunicorn worker (its ``init_process`` is on the stack)."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "init_process" and "gunicorn" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False
