"""Benchmark: agent-runner against a bare Starlette baseline, measured side by side in one run.

    python tools/bench.py            # full run (about 10 minutes)
    python tools/bench.py --quick    # a few seconds per figure (CI smoke)
    python tools/bench.py --only get_status --runs 3

Load comes from wrk (Debian package ``wrk``): one thread, 32 keep-alive
connections. Each figure is taken baseline, service, baseline, service, ...
and the ratio uses the medians, so machine noise hits both sides. Results are
printed as a table and written to bench-results.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent  # the repository root: servers start there
TESTS = HERE / "tests"  # AGENT_MODULES=fixture_agents is imported from here
RUN_BODY = json.dumps({"agent_type": "sleeper", "user_id": str(uuid.uuid4()), "input": {"seconds": 3600}})
FIGURES = ("get_status", "post_busy", "launch", "runs_per_second", "rss", "footprint", "redis_get_status")


# --- the baseline: bare Starlette, same uvicorn settings -------------------

def serve_baseline(port: int) -> None:
    """A bare Starlette app: GET answers a run-sized JSON object; POST parses JSON and answers 409."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    run = {"run_id": str(uuid.uuid4()), "agent_type": "sleeper", "user_id": str(uuid.uuid4()),
           "input": {"seconds": 0}, "state": "DONE", "result": {"slept": 0, "input": {"seconds": 0}},
           "error": None, "progress": 1.0, "created_at": "2026-11-24T20:30:36.342Z",
           "started_at": "2026-11-24T20:30:36.344Z", "finished_at": "2026-11-24T20:30:36.845Z"}

    async def get_run(request: Request) -> JSONResponse:
        return JSONResponse(run)

    async def post_run(request: Request) -> JSONResponse:
        await request.json()
        return JSONResponse({"detail": "busy"}, status_code=409)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/run", get_run), Route("/run", post_run, methods=["POST"]),
                            Route("/healthz", healthz)])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
                log_level="warning", server_header=False)


# --- processes -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a free port; ``ready`` is how long it took to answer /healthz."""

    def __init__(self, kind: str, **env: str) -> None:
        self.port = free_port()
        command = ([sys.executable, "agent_runner.py"] if kind == "service"
                   else [sys.executable, __file__, "--serve-baseline", str(self.port)])
        full_env = {**os.environ, "PORT": str(self.port), "AGENT_MODULES": "fixture_agents", "PYTHONPATH": str(TESTS),
                    "AGENT_SLEEP_SECONDS": "0", "SHUTDOWN_GRACE_SECONDS": "0", **env}
        started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=HERE, env=full_env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {self.proc.returncode}")
            time.sleep(0.005)
        self.ready = time.perf_counter() - started

    def _healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=70)
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- wrk -------------------------------------------------------------------

def wrk(url: str, seconds: float, body: str | None = None) -> dict[str, float]:
    """Requests per second and p99 latency (ms) from wrk -t1 -c32."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if body is not None:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
    try:
        out = subprocess.run(["wrk", "-t1", "-c32", f"-d{max(1, round(seconds))}s", "--latency", "-s", script.name,
                              url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale}


def interleave(rounds: int, measure_baseline: Callable[[], dict[str, float]],
               measure_service: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """baseline, service, baseline, service, ...; medians of each side."""
    base, serv = [], []
    for _ in range(rounds):
        base.append(measure_baseline())
        serv.append(measure_service())
    med = lambda samples, key: statistics.median(s[key] for s in samples)  # noqa: E731
    return {
        "baseline_rps": med(base, "rps"), "service_rps": med(serv, "rps"),
        "rps_ratio": med(serv, "rps") / med(base, "rps"),
        "baseline_p99_ms": med(base, "p99_ms"), "service_p99_ms": med(serv, "p99_ms"),
        "p99_ratio": med(serv, "p99_ms") / med(base, "p99_ms"),
    }


# --- figures ---------------------------------------------------------------

def done_run(server: Server) -> str:
    status, body = server.request("POST", "/agents/run", json.dumps(
        {"agent_type": "sleeper", "user_id": str(uuid.uuid4()), "input": {"seconds": 0}}))
    assert status == 202, body
    run_id = json.loads(body)["run_id"]
    server.request("GET", f"/agents/status/{run_id}?wait=10")
    return run_id


def fig_get_status(opts: argparse.Namespace, **env: str) -> dict[str, Any]:
    baseline, service = Server("baseline"), Server("service", **env)
    try:
        run_id = done_run(service)
        wrk(f"http://127.0.0.1:{baseline.port}/run", opts.warmup)
        wrk(f"http://127.0.0.1:{service.port}/agents/status/{run_id}", opts.warmup)
        return interleave(opts.runs, lambda: wrk(f"http://127.0.0.1:{baseline.port}/run", opts.seconds),
                          lambda: wrk(f"http://127.0.0.1:{service.port}/agents/status/{run_id}", opts.seconds))
    finally:
        baseline.stop()
        service.stop()


def fig_post_busy(opts: argparse.Namespace) -> dict[str, Any]:
    baseline, service = Server("baseline"), Server("service")
    try:
        status, body = service.request("POST", "/agents/run", RUN_BODY)  # an hour-long run keeps it busy
        assert status == 202, body
        base_url, serv_url = f"http://127.0.0.1:{baseline.port}/run", f"http://127.0.0.1:{service.port}/agents/run"
        wrk(base_url, opts.warmup, RUN_BODY)
        wrk(serv_url, opts.warmup, RUN_BODY)
        return interleave(opts.runs, lambda: wrk(base_url, opts.seconds, RUN_BODY),
                          lambda: wrk(serv_url, opts.seconds, RUN_BODY))
    finally:
        baseline.stop()
        service.stop()


def fig_launch(opts: argparse.Namespace) -> dict[str, Any]:
    base, serv = [], []
    for _ in range(3 if opts.quick else 10):
        for kind, samples in (("baseline", base), ("service", serv)):
            server = Server(kind)
            samples.append(server.ready * 1000)
            server.stop()
    return {"baseline_ms": statistics.median(base), "service_ms": statistics.median(serv),
            "ratio": statistics.median(serv) / statistics.median(base)}


def fig_runs_per_second(opts: argparse.Namespace) -> dict[str, Any]:
    service = Server("service")
    try:
        count = 200 if opts.quick else 2000
        started = time.perf_counter()
        for _ in range(count):
            done_run(service)
        return {"runs": count, "runs_per_second": count / (time.perf_counter() - started)}
    finally:
        service.stop()


def fig_rss(opts: argparse.Namespace) -> dict[str, Any]:
    first, second = (500, 2500) if opts.quick else (20000, 100000)
    retention = first // 2
    service = Server("service", RUN_RETENTION=str(retention))
    try:
        rss = {}
        for done in range(1, second + 1):
            done_run(service)
            if done in (first, second):
                rss[done] = service.rss_mb()
            if done % 5000 == 0:
                print(f"  rss: {done}/{second} runs", flush=True)
        return {"retention": retention, "runs_first": first, "runs_second": second,
                "rss_first_mb": rss[first], "rss_second_mb": rss[second],
                "growth": rss[second] / rss[first] - 1}
    finally:
        service.stop()


def fig_footprint(opts: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(HERE / "requirements.txt")], check=True)
        site = next(venv.glob("lib/python*/site-packages"))
        total = 0
        for path in site.rglob("*"):
            top = path.relative_to(site).parts[0].lower()
            if path.is_file() and not top.startswith(("pip", "setuptools", "_distutils_hack", "distutils-precedence")):
                total += path.stat().st_size
    return {"site_packages_mb": total / 1e6}


def fig_redis_get_status(opts: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed"}
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        redis_env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:6]}"}
        memory, in_redis = Server("service"), Server("service", **redis_env)
        try:
            memory_url = f"http://127.0.0.1:{memory.port}/agents/status/{done_run(memory)}"
            redis_url = f"http://127.0.0.1:{in_redis.port}/agents/status/{done_run(in_redis)}"
            wrk(memory_url, opts.warmup)
            wrk(redis_url, opts.warmup)
            result = interleave(opts.runs, lambda: wrk(memory_url, opts.seconds), lambda: wrk(redis_url, opts.seconds))
            return {"memory_rps": result["baseline_rps"], "redis_rps": result["service_rps"],
                    "ratio": result["rps_ratio"]}
        finally:
            memory.stop()
            in_redis.stop()
    finally:
        redis.terminate()


# --- table -----------------------------------------------------------------

def load_rows(label: str, r: dict[str, Any], rps_target: str) -> list[tuple[str, ...]]:
    """The req/s and p99 rows of one interleaved wrk figure."""
    return [(f"{label} req/s", f"{r['baseline_rps']:.0f}", f"{r['service_rps']:.0f}", f"{r['rps_ratio']:.2f}",
             rps_target),
            (f"{label} p99 ms", f"{r['baseline_p99_ms']:.2f}", f"{r['service_p99_ms']:.2f}", f"{r['p99_ratio']:.2f}",
             "<= 1.5")]


def table(results: dict[str, Any]) -> str:
    rows = [("figure", "baseline", "service", "ratio", "target")]
    if "get_status" in results:
        rows += load_rows("GET status", results["get_status"], ">= 0.90")
    if "post_busy" in results:
        rows += load_rows("POST busy (409)", results["post_busy"], ">= 0.80")
    if "launch" in results:
        r = results["launch"]
        rows.append(("launch to /healthz ms", f"{r['baseline_ms']:.0f}", f"{r['service_ms']:.0f}",
                     f"{r['ratio']:.2f}", "<= 350 ms"))
    if "runs_per_second" in results:
        r = results["runs_per_second"]
        rows.append(("runs/s back to back", "", f"{r['runs_per_second']:.0f}", "", "printed"))
    if "rss" in results:
        r = results["rss"]
        rows.append((f"RSS MB after {r['runs_first']}/{r['runs_second']} runs", f"{r['rss_first_mb']:.1f}",
                     f"{r['rss_second_mb']:.1f}", f"{r['growth'] * 100:+.1f} %", "<= +10 %"))
    if "footprint" in results:
        rows.append(("site-packages MB", "", f"{results['footprint']['site_packages_mb']:.1f}", "", "<= 30"))
    if "redis_get_status" in results:
        r = results["redis_get_status"]
        if "skipped" in r:
            rows.append(("Redis GET status", "", r["skipped"], "", ">= 0.5"))
        else:
            rows.append(("Redis GET status req/s (vs memory)", f"{r['memory_rps']:.0f}", f"{r['redis_rps']:.0f}",
                         f"{r['ratio']:.2f}", ">= 0.5"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds per figure")
    parser.add_argument("--runs", type=int, default=None, help="interleaved rounds per figure (default 3, quick 1)")
    parser.add_argument("--only", choices=FIGURES, action="append", help="measure only this figure (repeatable)")
    parser.add_argument("--output", default=str(HERE / "bench-results.json"))
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.serve_baseline:
        serve_baseline(opts.serve_baseline)
        return
    opts.runs = opts.runs or (1 if opts.quick else 3)
    opts.seconds, opts.warmup = (1, 1) if opts.quick else (10, 3)
    wanted = opts.only or list(FIGURES)
    needs_wrk = {"get_status", "post_busy", "redis_get_status"} & set(wanted)
    if needs_wrk and shutil.which("wrk") is None:
        sys.exit("bench.py: wrk is not installed (apt-get install wrk); it is needed for: " + ", ".join(needs_wrk))
    results: dict[str, Any] = {}
    for name in wanted:
        print(f"[{len(results) + 1}/{len(wanted)}] {name} ...", flush=True)
        started = time.monotonic()
        results[name] = globals()[f"fig_{name}"](opts)
        print(f"      done in {time.monotonic() - started:.0f} s", flush=True)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
              "cores": os.cpu_count(), "quick": opts.quick, "runs": opts.runs, "results": results}
    Path(opts.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"written to {opts.output}")


if __name__ == "__main__":
    main()
