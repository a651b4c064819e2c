"""The Celery app of bench_peers.py: a broker on BENCH_REDIS_URL, one task that stamps, no result backend."""

import os

from celery import Celery

from bench_peers import block, stamp

app = Celery("bench_peers", broker=os.environ["BENCH_REDIS_URL"])
app.conf.worker_prefetch_multiplier = 1


@app.task(name="stamp", ignore_result=True)
def celery_stamp(index: int, count: int, out: str) -> None:
    stamp(index, count, out)


@app.task(name="block", ignore_result=True)
def celery_block(go: str) -> None:
    block(go)
