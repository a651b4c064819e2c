"""bench.py --peers: the one-slot drain on Celery and arq, run with a peer's own Python (tools/requirements-bench.txt).

    python tools/bench_peers.py celery|arq REDIS_URL COUNT OUT_JSON

One worker with one slot drains COUNT instant jobs twice, as the service's drain does: first to warm up, then,
timed, the COUNT jobs queued behind a job that blocks the worker until they are all in (the service's blocker).
Each job stamps the wall-clock times it started and ended; the last of a drain writes its drain's stamps to its
file (OUT_JSON for the timed one), which bench.py reads (runs/s and handoff gaps as for the service), with the
Redis commands run from the blocker's release to the end in OUT_JSON.commands (as bench.py counts the service's).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import redis_commands  # tools/bench.py (standard library at import): run with the peer's redis-py

STAMPS: dict[str, list[tuple[float, float]]] = {}  # by the file each drain's stamps go to


def stamp(index: int, count: int, out: str) -> None:
    """The job: two clock readings; the job that ends the drain writes them all (arq does not keep the order)."""
    started = time.time()
    stamps = STAMPS.setdefault(out, [])
    stamps.append((started, time.time()))
    if len(stamps) == count:
        Path(out).write_text(json.dumps(stamps))


def release(url: str, go: str) -> int:
    """Let the blocker go; the commands Redis has run so far."""
    commands = redis_commands(url)
    Path(go).touch()
    return commands


def count_commands(url: str, out: str, since: int) -> None:
    Path(out + ".commands").write_text(str(redis_commands(url) - since))


def block(go: str) -> None:
    """The blocker: says it runs (``<go>.blocking``), then holds the worker's one slot until the timed drain's jobs
    are all queued (``go`` exists)."""
    Path(go + ".blocking").touch()
    deadline = time.monotonic() + 120
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.001)


def drain_celery(url: str, count: int, out: str) -> None:
    os.environ["BENCH_REDIS_URL"] = url
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_peers_celery import app, celery_block, celery_stamp

    warm, go = out + ".warm", out + ".go"
    for index in range(count):
        celery_stamp.delay(index, count, warm)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_peers_celery", "worker", "--pool=solo",
                               "--concurrency=1", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                               "--without-heartbeat"], cwd=Path(__file__).parent, env=os.environ,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(Path(warm), worker)
        celery_block.delay(go)
        wait_for(Path(go + ".blocking"), worker)
        for index in range(count):
            celery_stamp.delay(index, count, out)
        since = release(url, go)
        app.close()
        wait_for(Path(out), worker)
        count_commands(url, out, since)
    finally:
        worker.terminate()
        worker.wait(10)


def wait_for(path: Path, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker ended (or took two minutes) before the last job")
        time.sleep(0.01)


async def arq_stamp(ctx: dict[str, object], index: int, count: int, out: str) -> None:
    stamp(index, count, out)


async def arq_block(ctx: dict[str, object], go: str) -> None:
    """block(), without blocking the loop the worker and the queueing share."""
    Path(go + ".blocking").touch()
    deadline = time.monotonic() + 120
    while not Path(go).exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


async def drain_arq(url: str, count: int, out: str) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker

    settings = RedisSettings.from_dsn(url)
    pool = await create_pool(settings)
    warm, go = out + ".warm", out + ".go"
    for index in range(count):
        await pool.enqueue_job("arq_stamp", index, count, warm)
    worker = Worker(functions=[arq_stamp, arq_block], redis_settings=settings, max_jobs=1, poll_delay=0.01,
                    handle_signals=False)
    running = asyncio.create_task(worker.main())
    try:
        await arq_wait_for(Path(warm), running)
        await pool.enqueue_job("arq_block", go)
        await arq_wait_for(Path(go + ".blocking"), running)
        for index in range(count):
            await pool.enqueue_job("arq_stamp", index, count, out)
        since = release(url, go)
        await arq_wait_for(Path(out), running)
        count_commands(url, out, since)
    finally:
        deadline = time.monotonic() + 5
        while worker.tasks and time.monotonic() < deadline:  # the last job's own bookkeeping, once it stamped
            await asyncio.sleep(0.001)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.gather(worker.close(), return_exceptions=True)  # a job cut short raises CancelledError here
        await pool.aclose()


async def arq_wait_for(path: Path, worker: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        if worker.done() or time.monotonic() > deadline:
            raise RuntimeError("the worker ended (or took two minutes) before the last job")
        await asyncio.sleep(0.01)


def main() -> None:
    system, url, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if system == "celery":
        drain_celery(url, count, out)
    else:
        asyncio.run(drain_arq(url, count, out))


if __name__ == "__main__":
    main()
