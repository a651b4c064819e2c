"""bench.py --peers: the one-slot drain on Celery and arq, run with a peer's own Python (tools/requirements-bench.txt).

    python tools/bench_peers.py celery|arq REDIS_URL COUNT OUT_JSON

COUNT instant jobs are queued while no worker runs (the service's drain queues them behind a blocker), then one
worker with one slot starts and drains them. Each job stamps the wall-clock times it started and ended; the last
writes every stamp to OUT_JSON, which bench.py reads (runs/s and handoff gaps as for the service).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAMPS: list[tuple[float, float]] = []


def stamp(index: int, count: int, out: str) -> None:
    """The job: two clock readings; the job that ends the drain writes them all (arq does not keep the order)."""
    started = time.time()
    STAMPS.append((started, time.time()))
    if len(STAMPS) == count:
        Path(out).write_text(json.dumps(STAMPS))


def drain_celery(url: str, count: int, out: str) -> None:
    os.environ["BENCH_REDIS_URL"] = url
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_peers_celery import app, celery_stamp

    for index in range(count):
        celery_stamp.delay(index, count, out)
    app.close()
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_peers_celery", "worker", "--pool=solo",
                               "--concurrency=1", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                               "--without-heartbeat"], cwd=Path(__file__).parent, env=os.environ,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(Path(out), worker)
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


async def drain_arq(url: str, count: int, out: str) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker

    settings = RedisSettings.from_dsn(url)
    pool = await create_pool(settings)
    for index in range(count):
        await pool.enqueue_job("arq_stamp", index, count, out)
    await pool.aclose()
    worker = Worker(functions=[arq_stamp], redis_settings=settings, max_jobs=1, poll_delay=0.01, burst=True,
                    handle_signals=False)
    await worker.main()
    await worker.close()


def main() -> None:
    system, url, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if system == "celery":
        drain_celery(url, count, out)
    else:
        asyncio.run(drain_arq(url, count, out))


if __name__ == "__main__":
    main()
