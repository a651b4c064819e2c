"""What bench.py's Postgres figure needs besides the service: a throwaway PostgreSQL, and the peer's drain.

The peer is pgqueuer (tools/requirements-bench-pgqueuer.txt), a PostgreSQL job queue, draining no-op jobs one at a
time (concurrency_limit=1, batch_size=1): the same work as the service's one-slot drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path


def postgres_bin() -> Path | None:
    """Debian's newest server programs (initdb, pg_ctl), else those on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: path.parts[-3])
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL on a free port of 127.0.0.1 (as nobody when run as root); yields its URL."""
    programs = postgres_bin()
    if programs is None:
        raise RuntimeError("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(directory, 65534, 65534)
        as_user = ["runuser", "-u", "nobody", "--"]
    data = directory / "data"

    def program(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd=directory)

    try:
        program(str(programs / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        # durable commits (fsync on) as in production: the figure includes what a commit costs
        program(str(programs / "pg_ctl"), "-D", str(data), "-l", str(directory / "log"), "-w", "-o",
                f"-p {port} -k {directory} -c listen_addresses=127.0.0.1", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(programs / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(directory, ignore_errors=True)


def peer_drain(url: str, count: int) -> float:
    """Jobs/s pgqueuer drains: ``count`` no-op jobs queued, then worked one at a time until all are done."""
    return asyncio.run(_peer_drain(url, count))


async def _peer_drain(url: str, count: int) -> float:
    import asyncpg
    from pgqueuer import AsyncpgDriver, QueueManager, Queries

    connection = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(connection))
        if not await queries.has_table("pgqueuer"):
            await queries.install()
        manager = QueueManager(queries)
        done = 0

        @manager.entrypoint("noop", concurrency_limit=1)
        async def noop(job: object) -> None:
            nonlocal done
            done += 1
            if done == count:
                manager.shutdown.set()

        await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
        started = time.perf_counter()
        worker = asyncio.create_task(manager.run(dequeue_timeout=timedelta(seconds=1), batch_size=1))
        await asyncio.wait_for(asyncio.shield(worker), 120)
        return count / (time.perf_counter() - started)
    finally:
        await connection.close()
