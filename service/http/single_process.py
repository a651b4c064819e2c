"""Memory mode is one process: a second process serving the same socket on this host refuses to start.

In memory mode each process has its own slots, so two processes behind one
server socket (``uvicorn --workers 2``, several gunicorn or hypercorn
workers, ``--reuse-port``, a Unix socket) would run two agents at once. A
worker that is handed server sockets by its launcher claims each one's
address (host and port, or the Unix socket's path) for memory mode with a
lock on a file in a directory only this user may write; the kernel drops the
lock when the process ends, however it ends. ``python agent_runner.py``
binds its own socket after start (``app.state.binds_own_socket``): nothing
can share it, so it claims nothing.

A claim held by a process that is stopping (a graceful reload starts the new
worker first) is waited for, for as long as a stopping process may take.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import stat
import sys
import tempfile
import time
from types import FrameType
from typing import IO, Any

_claims: dict[str, IO[str]] = {}  # the addresses this process claimed: their locked files, held until it ends


def server_addresses() -> set[str]:
    """The addresses of the unconnected stream sockets this process holds (server sockets from its launcher)."""
    addresses: set[str] = set()
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            descriptors = [int(name) for name in os.listdir(directory)]
        except (OSError, ValueError):
            continue
        for descriptor in descriptors:
            try:
                copy = os.dup(descriptor)
            except OSError:  # closed meanwhile
                continue
            try:
                sock = socket.socket(fileno=copy)
            except OSError:  # not a socket: the copy is closed here, as socket() leaves it open
                os.close(copy)
                continue
            with sock:
                address = server_address(sock)
            if address is not None:
                addresses.add(address)
        return addresses
    return addresses


def server_address(sock: socket.socket) -> str | None:
    """``host:port`` or ``unix:path`` of a bound, unconnected stream socket (uvicorn's supervisor binds it and
    each worker listens on it, so it may not listen yet); None for any other socket."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    try:
        sock.getpeername()
        return None  # connected: a client's socket
    except OSError:
        pass
    name: Any = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if not name:
            return None  # unbound
        return "unix:" + (name.decode("latin-1") if isinstance(name, bytes) else name)
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}" if port else None


def claim_directory() -> str:
    """A directory of this user's only (a claim another user could take would let them stop the service)."""
    directory = os.path.join(tempfile.gettempdir(), f"agent-runner-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{directory} must be a directory of this user's only (mode 700)")
    return directory


def claim(address: str) -> bool:
    """Hold ``address`` for this process until it ends; False when another process holds it (a second lifespan in
    this process, its claims held already, claims what it holds: a lock file opened again would refuse it)."""
    if address in _claims:
        return True
    name = hashlib.sha256(address.encode()).hexdigest()[:32]
    held = open(os.path.join(claim_directory(), f"memory-mode-{name}.lock"), "a")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        held.close()
        return False
    _claims[address] = held
    return True


async def claim_server_sockets(wait_seconds: float, poll_seconds: float = 0.2) -> str | None:
    """Claim every server socket's address, waiting up to ``wait_seconds`` for a holder to go away; the first
    address still held by another process after that, else None."""
    deadline = time.monotonic() + wait_seconds
    for address in sorted(server_addresses()):
        while not claim(address):
            if time.monotonic() >= deadline:
                return address
            await asyncio.sleep(poll_seconds)
    return None


def refusal_exit_status() -> int:
    """2; 3 under the supervisors that restart a worker exiting otherwise (3 makes them stop instead).

    gunicorn's arbiter halts with status 3 when a worker exits 3 ("Worker failed to boot"); uvicorn's
    multiprocess supervisor stops when a worker exits 3 (its STARTUP_FAILURE) before serving. hypercorn's
    stops every worker whatever their status.
    """
    return 3 if on_stack("gunicorn/workers/base.py", "init_process") or \
        on_stack("uvicorn/supervisors/multiprocess.py", "target") else 2


def on_stack(path_end: str, function: str) -> bool:
    """Whether ``function`` of the module whose file ends with ``path_end`` is on the call stack."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == function and code.co_filename.replace(os.sep, "/").endswith(path_end):
            return True
        frame = frame.f_back
    return False
