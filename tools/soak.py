"""Soak: drive a server process for N minutes and check it kept every promise.

    python tools/soak.py --minutes 10
    python tools/soak.py --minutes 1 --redis-url redis://127.0.0.1:6379/0
    python tools/soak.py --minutes 1 --database-url postgresql://runner@127.0.0.1:5432/runner

Runs back to back (agents that succeed, raise, hang into the timeout, return
garbage), cancels, bursts of concurrent POSTs and status/list polling, all at
once. Then checks: no 5xx, every accepted run still within retention is
terminal and listed (older ones answer 404), the in-process concurrency probe
never saw two agents at once, and RSS stayed flat from the moment retention
was full. A soak that never fills retention cannot check the last two: pick a
--retention it exceeds early (the suite's 12 s soak uses 40). Exit status 1 if
any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent.parent  # the repository root: servers start there
TESTS = HERE / "tests"  # AGENT_MODULES=fixture_agents is imported from here
TERMINAL = {"DONE", "ERROR", "CANCELLED"}
MODES = ["ok", "ok", "ok", "raise", "hang", "garbage", "stubborn"]
# The burster records its 202 after the whole burst has answered, so the client's order of accepted runs can
# differ from the server's by a run or two: runs this close to the retention boundary are not judged.
BOUNDARY = 5


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, url: str, seconds: float, seed: int, min_runs: int = 0) -> None:
        self.url = url
        self.deadline = time.monotonic() + seconds
        self.min_runs = min_runs
        self.hard_deadline = self.deadline + 2 * seconds + 30  # a busy machine may need longer for min_runs
        self.rng = random.Random(seed)
        self.accepted: list[str] = []
        self.codes: Counter[int] = Counter()
        self.server_errors: list[str] = []

    def going(self) -> bool:
        """Until the time is up and at least min_runs were accepted (within a hard deadline)."""
        now = time.monotonic()
        return now < self.deadline or (len(self.accepted) < self.min_runs and now < self.hard_deadline)

    def record(self, response: httpx.Response) -> httpx.Response:
        self.codes[response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{response.request.method} {response.request.url}: "
                                      f"{response.status_code} {response.text[:200]}")
        return response

    def body(self) -> dict[str, Any]:
        return {"agent_type": "probe", "user_id": str(uuid.uuid4()),
                "input": {"mode": self.rng.choice(MODES), "seconds": self.rng.choice([0, 0.005, 0.02])}}

    async def runner(self, client: httpx.AsyncClient) -> None:
        while self.going():
            response = self.record(await client.post("/agents/run", json=self.body()))
            if response.status_code != 202:
                await asyncio.sleep(0.005)
                continue
            run_id = response.json()["run_id"]
            self.accepted.append(run_id)
            if self.rng.random() < 0.15:
                self.record(await client.post(f"/agents/cancel/{run_id}"))
            deadline = time.monotonic() + 60  # a run that never ends is left to the final checks
            while time.monotonic() < deadline:
                status = self.record(await client.get(f"/agents/status/{run_id}", params={"wait": 10}))
                if status.status_code != 200 or status.json()["state"] in TERMINAL:
                    break

    async def burster(self, client: httpx.AsyncClient) -> None:
        while self.going():
            await asyncio.sleep(self.rng.uniform(0.5, 2))
            responses = await asyncio.gather(*(client.post("/agents/run", json=self.body()) for _ in range(20)))
            for response in responses:
                self.record(response)
                if response.status_code == 202:
                    self.accepted.append(response.json()["run_id"])

    async def poller(self, client: httpx.AsyncClient) -> None:
        while self.going():
            if self.accepted and self.rng.random() < 0.8:
                self.record(await client.get(f"/agents/status/{self.rng.choice(self.accepted[-50:])}"))
            else:
                self.record(await client.get("/agents/runs", params={"limit": 20}))
            await asyncio.sleep(0.01)

    async def drive(self) -> None:
        # Idle connections expire on the client before uvicorn's 5 s keep-alive closes them on the server,
        # so a request is never sent down a connection the server is closing.
        limits = httpx.Limits(max_connections=64, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            await asyncio.gather(self.runner(client), self.burster(client), *(self.poller(client) for _ in range(6)))

    async def listed_runs(self) -> dict[str, dict[str, Any]]:
        """Every listed run, once the last accepted run has had time to end."""
        runs: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            for run_id in self.accepted[-25:]:  # the burster may append its runs after a newer one
                self.record(await client.get(f"/agents/status/{run_id}", params={"wait": 15}))
            before = None
            while True:
                params = {"limit": 1000, **({"before": before} if before else {})}
                page = self.record(await client.get("/agents/runs", params=params)).json()["runs"]
                if not page:
                    return runs
                runs.update((run["run_id"], run) for run in page)
                before = page[-1]["run_id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-runs", type=int, default=0,
                        help="go on past --minutes until this many runs were accepted (a slow machine)")
    parser.add_argument("--retention", type=int, default=2000, help="the server's RUN_RETENTION (default 2000)")
    parser.add_argument("--redis-url", default=None, help="run the server in Redis mode against this Redis")
    parser.add_argument("--database-url", default=None,
                        help="run the server in PostgreSQL mode against this database (a schema of its own)")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    opts = parser.parse_args()

    port = free_port()
    log_file = tempfile.NamedTemporaryFile("w+b", prefix="soak-", suffix=".log", delete=False)
    env = {**os.environ, "PORT": str(port), "AGENT_MODULES": "fixture_agents", "PYTHONPATH": str(TESTS), "AGENT_SLEEP_SECONDS": "0",
           "RUN_TIMEOUT_SECONDS": "0.2", "RUN_RETENTION": str(opts.retention), "SHUTDOWN_GRACE_SECONDS": "5"}
    if opts.redis_url:
        env.update(REDIS_URL=opts.redis_url, REDIS_PREFIX=f"soak-{uuid.uuid4().hex[:8]}")
    if opts.database_url:
        env.update(DATABASE_URL=opts.database_url, DATABASE_SCHEMA=f"soak_{uuid.uuid4().hex[:8]}")
    server = subprocess.Popen([sys.executable, "agent_runner.py"], cwd=HERE, env=env, stdout=log_file,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    checker = httpx.Client(base_url=url)  # one client: making one costs ~50 ms (it loads the CA bundle)
    try:
        for _ in range(300):
            try:
                if checker.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        seconds = opts.minutes * 60
        soak = Soak(url, seconds, opts.seed, opts.min_runs)
        started = time.monotonic()

        samples: list[dict[str, float]] = []

        async def run() -> None:
            drive = asyncio.create_task(soak.drive())
            while not drive.done():
                samples.append({"second": round(time.monotonic() - started), "runs": len(soak.accepted),
                                "rss_mb": round(rss_mb(server.pid), 1)})
                await asyncio.wait({drive}, timeout=max(2.0, seconds / 20))
            await drive
            samples.append({"second": round(time.monotonic() - started), "runs": len(soak.accepted),
                            "rss_mb": round(rss_mb(server.pid), 1)})

        asyncio.run(run())
        # RSS must be flat once retention is full: from then on, every new run replaces a dropped one.
        steady = [s for s in samples if s["runs"] > opts.retention]
        rss_start, rss_end = (steady or samples)[0]["rss_mb"], samples[-1]["rss_mb"]
        elapsed = time.monotonic() - started
        listed = asyncio.run(soak.listed_runs())
        kept = soak.accepted[-(opts.retention - BOUNDARY):]
        missing = [run_id for run_id in kept if run_id not in listed]
        not_terminal = [run_id for run_id in kept if run_id in listed and listed[run_id]["state"] not in TERMINAL]
        dropped = soak.accepted[:-(opts.retention + BOUNDARY)][-50:]  # the newest runs that must be gone
        dropped_ok = bool(dropped) and all(checker.get(f"/agents/status/{run_id}").status_code == 404
                                           for run_id in dropped)
    finally:
        checker.close()
        server.terminate()
        server.wait(30)
    lines = [json.loads(line) for line in Path(log_file.name).read_text().splitlines() if line.strip()]
    most = max((line["most"] for line in lines if line.get("event") == "probe_end"), default=0)
    states = Counter(run["state"] for run in listed.values())
    summary = {
        "minutes": round(elapsed / 60, 2), "runs_accepted": len(soak.accepted), "requests": sum(soak.codes.values()),
        "status_codes": dict(sorted(soak.codes.items())), "server_errors": len(soak.server_errors),
        "max_concurrent_agents": most, "listed_states": dict(states), "kept_runs_missing": len(missing),
        "kept_runs_not_terminal": len(not_terminal), "retention": opts.retention,
        "dropped_runs_checked": len(dropped), "dropped_runs_answer_404": dropped_ok,
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
        "rss_growth": round(rss_end / rss_start - 1, 3), "rss_from_second": steady[0]["second"] if steady else None,
        "rss_samples_after_retention_full": len(steady),
        "rss_samples": samples, "log": log_file.name,
    }
    checks = {
        "no 5xx": not soak.server_errors,
        "never two agents at once": most == 1,
        "every kept run listed and terminal": not missing and not not_terminal,
        "retention filled early enough to judge RSS (3+ samples after)": len(steady) >= 3,
        "runs beyond retention answer 404": dropped_ok,
        "RSS flat once retention was full (within 10 %)": bool(steady) and summary["rss_growth"] <= 0.10,
    }
    print(json.dumps({key: value for key, value in summary.items() if key != "rss_samples"}, indent=2))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for error in soak.server_errors[:5]:
        print("  5xx:", error)
    if opts.json:
        Path(opts.json).write_text(json.dumps({**summary, "checks": checks}, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
