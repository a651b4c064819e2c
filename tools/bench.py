"""Benchmark: agent-runner against a bare Starlette baseline, measured side by side in one run.

    python tools/bench.py            # full run (about 12 minutes)
    python tools/bench.py --quick    # a few seconds per figure (CI smoke)
    python tools/bench.py --only get_status --runs 3
    python tools/bench.py --only tracing      # tracing off against on (not in the full run)

Load comes from wrk (Debian package ``wrk``): one thread, 32 keep-alive
connections. Each figure is taken baseline, service, baseline, service, ...
and the ratio uses the medians, so machine noise hits both sides. Results are
printed as a table, each figure with its target and whether it holds, and
written to bench-results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import operator
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
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent  # the repository root: servers start there
TESTS = HERE / "tests"  # AGENT_MODULES=fixture_agents is imported from here
BASELINE = Path(__file__).resolve().parent / "bench_baseline.py"
BARE = Path(__file__).resolve().parent / "bench_bare.py"
RUN_BODY = json.dumps({"agent_type": "sleeper", "user_id": str(uuid.uuid4()), "input": {"seconds": 3600}})
FIGURES = ("get_status", "bare_status", "post_busy", "launch", "runs_per_second", "queued_throughput", "drain", "rss",
           "footprint", "redis_get_status", "postgres")
OPTIONAL = ("tracing",)  # measured with --only


# --- processes -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compile_service() -> None:
    """Byte-compile the service's modules, as the Dockerfile does (PYTHONDONTWRITEBYTECODE may be set here)."""
    modules = [*map(str, sorted(HERE.glob("*.py"))), str(HERE / "service")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *modules], check=True)


class Server:
    """A server process on a free port; ``ready`` is how long it took to answer /healthz."""

    def __init__(self, kind: str, **env: str) -> None:
        self.port = free_port()
        command = ([sys.executable, "agent_runner.py"] if kind == "service"
                   else [sys.executable, str(BARE if kind == "bare" else BASELINE), str(self.port)])
        full_env = {**os.environ, "PORT": str(self.port), "AGENT_MODULES": "fixture_agents", "PYTHONPATH": str(TESTS),
                    "AGENT_SLEEP_SECONDS": "0", "SHUTDOWN_GRACE_SECONDS": "0", **env}
        self._conn: http.client.HTTPConnection | None = None
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
        """One request on a kept-alive connection, as a client in a loop would; a connection the server
        closed while idle (after 5 s) is replaced once."""
        reused = self._conn is not None
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=70)
        try:
            self._conn.request(method, path, body=body,
                               headers={"content-type": "application/json"} if body else {})
            response = self._conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            self._conn = None
            idle_closed = isinstance(exc, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected))
            if reused and idle_closed:
                return self.request(method, path, body)
            raise

    def post_json(self, path: str, body: dict[str, Any], expect: int = 202) -> dict[str, Any]:
        status, answer = self.request("POST", path, json.dumps(body))
        assert status == expect, (status, answer)
        return json.loads(answer)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port; yields its URL once it answers PING."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def redis_env(url: str) -> dict[str, str]:
    return {"REDIS_URL": url, "REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}"}


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


def paired(rounds: int, measure_baseline: Callable[[], dict[str, float]],
           measure_service: Callable[[], dict[str, float]]) -> tuple[dict[str, float], ...]:
    """Rounds of one baseline and one service sample, side by side in time (baseline first, then service
    first, and so on, so a load that rises or falls favours neither). Returns, for each measured key, the
    medians of each side and the median of the rounds' ratios: a ratio compares samples under the same load."""
    base, serv = [], []
    for round_ in range(rounds):
        if round_ % 2 == 0:
            base.append(measure_baseline())
            serv.append(measure_service())
        else:
            serv.append(measure_service())
            base.append(measure_baseline())
    keys = base[0].keys()
    return ({key: statistics.median(b[key] for b in base) for key in keys},
            {key: statistics.median(s[key] for s in serv) for key in keys},
            {key: statistics.median(s[key] / b[key] for b, s in zip(base, serv)) for key in keys})


def interleave(rounds: int, measure_baseline: Callable[[], dict[str, float]],
               measure_service: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """A wrk figure: req/s and p99 of each side, and their ratios (see ``paired``)."""
    base, serv, ratio = paired(rounds, measure_baseline, measure_service)
    return {"baseline_rps": base["rps"], "service_rps": serv["rps"], "rps_ratio": ratio["rps"],
            "baseline_p99_ms": base["p99_ms"], "service_p99_ms": serv["p99_ms"], "p99_ratio": ratio["p99_ms"]}


# --- figures ---------------------------------------------------------------

def instant_run(on_busy: str | None = None) -> dict[str, Any]:
    body = {"agent_type": "sleeper", "user_id": str(uuid.uuid4()), "input": {"seconds": 0}}
    if on_busy is not None:
        body["on_busy"] = on_busy
    return body


def done_run(server: Server) -> str:
    run_id = server.post_json("/agents/run", instant_run())["run_id"]
    status, body = server.request("GET", f"/agents/status/{run_id}?wait=10")
    assert status == 200 and json.loads(body)["state"] == "DONE", body
    return run_id


def warm_up(opts: argparse.Namespace, *urls: str) -> None:
    for url in urls if opts.warmup else ():
        wrk(url, opts.warmup)


def fig_get_status(opts: argparse.Namespace) -> dict[str, Any]:
    baseline, service = Server("baseline"), Server("service")
    try:
        run_id = done_run(service)
        if opts.warmup:
            wrk(f"http://127.0.0.1:{baseline.port}/run", opts.warmup)
            wrk(f"http://127.0.0.1:{service.port}/agents/status/{run_id}", opts.warmup)
        return interleave(opts.runs, lambda: wrk(f"http://127.0.0.1:{baseline.port}/run", opts.seconds),
                          lambda: wrk(f"http://127.0.0.1:{service.port}/agents/status/{run_id}", opts.seconds))
    finally:
        baseline.stop()
        service.stop()


def fig_bare_status(opts: argparse.Namespace) -> dict[str, Any]:
    """GET status against a bare ASGI app (no framework) answering the same body: what the framework costs."""
    bare, service = Server("bare"), Server("service")
    try:
        bare_url = f"http://127.0.0.1:{bare.port}/run"
        service_url = f"http://127.0.0.1:{service.port}/agents/status/{done_run(service)}"
        warm_up(opts, bare_url, service_url)
        return interleave(opts.runs, lambda: wrk(bare_url, opts.seconds), lambda: wrk(service_url, opts.seconds))
    finally:
        bare.stop()
        service.stop()


def fig_post_busy(opts: argparse.Namespace) -> dict[str, Any]:
    baseline, service = Server("baseline"), Server("service")
    try:
        service.post_json("/agents/run", json.loads(RUN_BODY))  # an hour-long run keeps it busy
        base_url, serv_url = f"http://127.0.0.1:{baseline.port}/run", f"http://127.0.0.1:{service.port}/agents/run"
        if opts.warmup:
            wrk(base_url, opts.warmup, RUN_BODY)
            wrk(serv_url, opts.warmup, RUN_BODY)
        return interleave(opts.runs, lambda: wrk(base_url, opts.seconds, RUN_BODY),
                          lambda: wrk(serv_url, opts.seconds, RUN_BODY))
    finally:
        baseline.stop()
        service.stop()


def fig_launch(opts: argparse.Namespace) -> dict[str, Any]:
    """Start to the first 200 from /healthz, the service's modules byte-compiled as in the image."""
    compile_service()

    def launch(kind: str) -> dict[str, float]:
        server = Server(kind)
        server.stop()
        return {"ms": server.ready * 1000}

    base, serv, ratio = paired(3 if opts.quick else 20, lambda: launch("baseline"), lambda: launch("service"))
    return {"baseline_ms": base["ms"], "service_ms": serv["ms"], "ratio": ratio["ms"]}


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


def back_to_back(server: Server, count: int) -> float:
    """Runs/s a client gets without the queue: POST, wait for DONE (?wait), POST the next."""
    started = time.perf_counter()
    for _ in range(count):
        done_run(server)
    return count / (time.perf_counter() - started)


def through_queue(server: Server, count: int) -> float:
    """Runs/s the service drains from its queue: ``count`` runs wait behind a blocker, which is then cancelled;
    timed from the cancel to the last run DONE (runs start in order, so all are DONE then)."""
    blocker = server.post_json("/agents/run", json.loads(RUN_BODY))["run_id"]
    for position in range(1, count + 1):
        accepted = server.post_json("/agents/run", instant_run("enqueue"))
        assert accepted["queue_position"] == position, accepted
    last = accepted["run_id"]
    started = time.perf_counter()
    server.post_json(f"/agents/cancel/{blocker}", {}, expect=200)
    status, body = server.request("GET", f"/agents/status/{last}?wait=60")
    elapsed = time.perf_counter() - started
    assert status == 200 and json.loads(body)["state"] == "DONE", body
    return count / elapsed


def fig_queued_throughput(opts: argparse.Namespace) -> dict[str, Any]:
    """Runs/s through the queue (on_busy=enqueue, instant agents) against back to back, per mode."""
    count = 50 if opts.quick else 500
    with contextlib.ExitStack() as stack:
        modes = {"memory": {}}
        if shutil.which("redis-server") is not None:
            modes["redis"] = redis_env(stack.enter_context(redis_server()))
        result: dict[str, Any] = {"runs": count}
        for mode, env in modes.items():
            service = Server("service", QUEUE_MAX=str(count), **env)
            try:
                back_to_back(service, max(10, count // 10))  # warm-up
                base, serv, ratio = paired(opts.runs, lambda: {"rps": back_to_back(service, count)},
                                           lambda: {"rps": through_queue(service, count)})
            finally:
                service.stop()
            result[mode] = {"back_to_back_rps": base["rps"], "queued_rps": serv["rps"], "ratio": ratio["rps"]}
        if "redis" not in result:
            result["redis"] = {"skipped": "redis-server is not installed"}
        return result


def redis_commands(url: str) -> int:
    """The commands a Redis has run so far (INFO commandstats, INFO itself aside; scripts' own calls included)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(entry["calls"]) for name, entry in stats.items() if name != "cmdstat_info")


def stamped_run() -> dict[str, Any]:
    return {"agent_type": "stamped", "user_id": str(uuid.uuid4()), "input": {}, "on_busy": "enqueue"}


def all_runs(server: Server, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` runs, oldest first."""
    runs: list[dict[str, Any]] = []
    before = ""
    while len(runs) < count:
        page = json.loads(server.request("GET", f"/agents/runs?limit=1000{before}")[1])["runs"]
        if not page:
            break
        runs += page
        before = f"&before={page[-1]['run_id']}"
    return runs[:count][::-1]


def drain_once(servers: list[Server], count: int, url: str | None) -> dict[str, float]:
    """``count`` instant runs wait behind a blocker on ``servers[0]``; the blocker is cancelled and every server
    drains the queue, one run at a time. Runs/s and the handoff gaps (one run's agent returning to the next one's
    starting) come from the times each agent stamped; Redis commands per run from INFO commandstats."""
    client = servers[0]
    blocker = client.post_json("/agents/run", json.loads(RUN_BODY))["run_id"]
    for position in range(1, count + 1):
        accepted = client.post_json("/agents/run", stamped_run())
        assert accepted["queue_position"] == position, accepted
    last = accepted["run_id"]
    commands = redis_commands(url) if url else 0
    started = time.perf_counter()
    client.post_json(f"/agents/cancel/{blocker}", {}, expect=200)
    status, body = client.request("GET", f"/agents/status/{last}?wait=60")
    elapsed = time.perf_counter() - started
    assert status == 200 and json.loads(body)["state"] == "DONE", body
    commands = redis_commands(url) - commands if url else 0
    stamps = [run["result"] for run in all_runs(client, count)]
    assert len(stamps) == count and all(stamp and "started" in stamp for stamp in stamps), "not every run was stamped"
    stamps.sort(key=operator.itemgetter("started"))
    gaps = sorted((after["started"] - before["ended"]) * 1000 for before, after in zip(stamps, stamps[1:]))
    assert gaps[0] >= 0, "two runs overlapped"
    return {"rps": (count - 1) / (stamps[-1]["ended"] - stamps[0]["started"]), "client_rps": count / elapsed,
            "commands_per_run": commands / count, "gap_mean_ms": statistics.fmean(gaps),
            "gap_p50_ms": gaps[len(gaps) // 2], "gap_p99_ms": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]}


def drain_figure(replicas: int, count: int, rounds: int, url: str | None) -> dict[str, float]:
    """Medians over ``rounds`` drains of ``count`` runs, on fresh servers (memory mode: one, its own state).

    Each measured drain runs at full retention (RUN_RETENTION=count, filled by a first drain), as in a service that
    has run a while: every run's end drops the oldest finished run. Its own runs are the ones kept after it."""
    samples = []
    for _ in range(rounds):
        env = {"QUEUE_MAX": str(count), "RUN_RETENTION": str(count), **(redis_env(url) if url else {})}
        servers = [Server("service", **env) for _ in range(replicas)]
        try:
            done_run(servers[0])  # warm-up: the first run pays for imports
            drain_once(servers, count, url)  # fills retention
            samples.append(drain_once(servers, count, url))
        finally:
            for server in servers:
                server.stop()
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def fig_drain(opts: argparse.Namespace) -> dict[str, Any]:
    """The one-slot drain: runs/s, Redis commands per run and handoff gaps, with ``long`` and ``short`` queues."""
    short, long = (20, 100) if opts.quick else (50, 1000)
    rounds = 1 if opts.quick else 3
    result: dict[str, Any] = {"short": short, "long": long, "memory": drain_figure(1, long, rounds, None)}
    if shutil.which("redis-server") is None:
        result["redis"] = {"skipped": "redis-server is not installed"}
        return result
    with redis_server() as url:
        result["redis"] = drain_figure(1, long, rounds, url)
        result["redis_short"] = drain_figure(1, short, rounds, url)
        result["redis_2"] = drain_figure(2, long, rounds, url)
    result["flatness"] = result["redis"]["rps"] / result["redis_short"]["rps"]
    return result


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
        if importlib.util.find_spec("pip") is not None:  # this pip installs into a venv without one (saves seconds)
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
            pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        else:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "pip")]
        subprocess.run([*pip, "install", "-q", "-r", str(HERE / "requirements.txt")], check=True)
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
    with redis_server() as url:
        memory, in_redis = Server("service"), Server("service", **redis_env(url))
        try:
            memory_url = f"http://127.0.0.1:{memory.port}/agents/status/{done_run(memory)}"
            redis_url = f"http://127.0.0.1:{in_redis.port}/agents/status/{done_run(in_redis)}"
            warm_up(opts, memory_url, redis_url)
            result = interleave(opts.runs, lambda: wrk(memory_url, opts.seconds), lambda: wrk(redis_url, opts.seconds))
            return {"memory_rps": result["baseline_rps"], "redis_rps": result["service_rps"],
                    "ratio": result["rps_ratio"]}
        finally:
            memory.stop()
            in_redis.stop()


def fig_postgres(opts: argparse.Namespace) -> dict[str, Any]:
    """Postgres mode: its one-slot drain against pgqueuer draining no-op jobs one at a time, on one PostgreSQL
    in the same run; and its GET status against memory mode's."""
    from bench_postgres import peer_drain, postgres_server  # tools/, beside this script

    count = 50 if opts.quick else 300
    with postgres_server() as url:
        env = {"DATABASE_URL": url, "DATABASE_SCHEMA": f"bench_{uuid.uuid4().hex[:8]}"}
        memory, service = Server("service"), Server("service", QUEUE_MAX=str(count), **env)
        try:
            through_queue(service, max(10, count // 10))  # warm-up, both sides
            peer_drain(url, max(10, count // 10))
            peer, drain, ratio = paired(opts.runs, lambda: {"rps": peer_drain(url, count)},
                                        lambda: {"rps": through_queue(service, count)})
            memory_url = f"http://127.0.0.1:{memory.port}/agents/status/{done_run(memory)}"
            postgres_url = f"http://127.0.0.1:{service.port}/agents/status/{done_run(service)}"
            warm_up(opts, memory_url, postgres_url)
            status = interleave(opts.runs, lambda: wrk(memory_url, opts.seconds),
                                lambda: wrk(postgres_url, opts.seconds))
        finally:
            memory.stop()
            service.stop()
    return {"runs": count, "drain_rps": drain["rps"], "peer_drain_rps": peer["rps"], "drain_ratio": ratio["rps"],
            "memory_status_rps": status["baseline_rps"], "status_rps": status["service_rps"],
            "status_ratio": status["rps_ratio"]}


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """A collector that takes OTLP/HTTP exports and drops them; yields its endpoint."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_cpu(server: Server, url: str, seconds: float) -> dict[str, float]:
    """wrk's figures and the server's CPU time per request (µs): steadier than req/s on a shared machine."""
    before = cpu_seconds(server.proc.pid)
    result = wrk(url, seconds)
    requests = result["rps"] * max(1, round(seconds))
    return {**result, "cpu_us": (cpu_seconds(server.proc.pid) - before) / requests * 1e6}


def fig_tracing(opts: argparse.Namespace) -> dict[str, Any]:
    """The cost of tracing: GET status and runs back to back, tracing off against on (exporting every span over
    OTLP/HTTP to a sink in this process)."""
    with otlp_sink() as endpoint:
        off, on = Server("service"), Server("service", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
        try:
            off_url = f"http://127.0.0.1:{off.port}/agents/status/{done_run(off)}"
            on_url = f"http://127.0.0.1:{on.port}/agents/status/{done_run(on)}"
            warm_up(opts, off_url, on_url)
            status_off, status_on, status = paired(opts.runs, lambda: wrk_cpu(off, off_url, opts.seconds),
                                                   lambda: wrk_cpu(on, on_url, opts.seconds))
            count = 50 if opts.quick else 300
            runs_off, runs_on, runs_ratio = paired(opts.runs, lambda: {"rps": back_to_back(off, count)},
                                                   lambda: {"rps": back_to_back(on, count)})
        finally:
            off.stop()
            on.stop()
    return {"off_rps": status_off["rps"], "on_rps": status_on["rps"], "rps_ratio": status["rps"],
            "off_p99_ms": status_off["p99_ms"], "on_p99_ms": status_on["p99_ms"], "p99_ratio": status["p99_ms"],
            "off_cpu_us": status_off["cpu_us"], "on_cpu_us": status_on["cpu_us"], "cpu_ratio": status["cpu_us"],
            "runs_off_per_s": runs_off["rps"], "runs_on_per_s": runs_on["rps"],
            "runs_ratio": runs_ratio["rps"]}


# --- peers -----------------------------------------------------------------

PEERS = {"celery": "requirements-bench.txt", "arq": "requirements-bench-arq.txt"}
PEERS_HOME = HERE / ".bench-peers"


def peer_python(peer: str) -> Path:
    """The Python of the peer's own virtualenv (made from its pinned requirements on first use)."""
    venv = PEERS_HOME / peer
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"  installing {peer} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(HERE / "tools" / PEERS[peer])],
                       check=True)
    return python


def gaps_and_rate(stamps: list[tuple[float, float]]) -> dict[str, float]:
    """Runs/s and handoff gaps (ms) from the (started, ended) times of each job or run."""
    stamps = sorted(stamps)
    gaps = sorted((after[0] - before[1]) * 1000 for before, after in zip(stamps, stamps[1:]))
    return {"rps": (len(stamps) - 1) / (stamps[-1][1] - stamps[0][0]), "gap_mean_ms": statistics.fmean(gaps),
            "gap_p50_ms": gaps[len(gaps) // 2], "gap_p99_ms": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
            "overlaps": sum(gap < 0 for gap in gaps)}


def peer_drain(peer: str, count: int, url: str) -> dict[str, float]:
    """One drain of ``count`` jobs by the peer's one-slot worker, after a first drain of as many (tools/bench_peers.py),
    as drain_figure measures the service's."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stamps.json"
        subprocess.run([str(peer_python(peer)), str(HERE / "tools" / "bench_peers.py"), peer, url, str(count),
                        str(out)], check=True, timeout=300)
        commands = int(Path(f"{out}.commands").read_text())  # over the timed drain, as drain_once counts them
        stamps = [tuple(pair) for pair in json.loads(out.read_text())]
    assert len(stamps) == count, f"{peer}: {len(stamps)} of {count} jobs ran"
    return {**gaps_and_rate(stamps), "commands_per_run": commands / count}


def peers_figure(opts: argparse.Namespace) -> dict[str, Any]:
    """The same drain on agent-runner (1 and 2 replicas) and on each peer, in alternating rounds on one
    redis-server; medians of the rounds."""
    count = 100 if opts.quick else 1000
    rounds = 1 if opts.quick else 3
    systems = ["agent-runner", "agent-runner x2", *PEERS]
    samples: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
    with redis_server() as url:
        for round_ in range(rounds):
            for system in systems if round_ % 2 == 0 else systems[::-1]:
                if system.startswith("agent-runner"):
                    replicas = 2 if system.endswith("x2") else 1
                    samples[system].append(drain_figure(replicas, count, 1, url))
                else:
                    base = url.rsplit("/", 1)[0]
                    samples[system].append(peer_drain(system, count, f"{base}/{1 + list(PEERS).index(system)}"))
    result: dict[str, Any] = {"runs": count}
    for system, taken in samples.items():
        result[system] = {key: statistics.median(sample[key] for sample in taken) for key in taken[0]}
    return result


def peer_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    lines = [("system", "runs/s", "commands/run", "gap p50 ms", "gap p99 ms", "vs celery", "vs arq")]
    for system in ("agent-runner", "agent-runner x2", *PEERS):
        d = r[system]
        lines.append((system, f"{d['rps']:.0f}", f"{d['commands_per_run']:.1f}", f"{d['gap_p50_ms']:.2f}",
                      f"{d['gap_p99_ms']:.2f}", f"{d['rps'] / r['celery']['rps']:.2f}",
                      f"{d['rps'] / r['arq']['rps']:.2f}"))
    return lines


# --- table -----------------------------------------------------------------

COMPARE = {">=": operator.ge, "<=": operator.le}


def row(label: str, baseline: str, service: str, ratio: str, target: str, value: float | None = None,
        ) -> tuple[str, ...]:
    """A table row; with ``value``, the target (e.g. ">= 0.90") is checked against it: "yes" or "NO"."""
    holds = ""
    if value is not None:
        op, limit = target.split()[:2]  # ">= 0.90", "<= +10 %"
        holds = "yes" if COMPARE[op](value, float(limit)) else "NO"
    return label, baseline, service, ratio, target, holds


def load_rows(label: str, r: dict[str, Any], rps_target: str) -> list[tuple[str, ...]]:
    """The req/s and p99 rows of one interleaved wrk figure."""
    return [row(f"{label} req/s", f"{r['baseline_rps']:.0f}", f"{r['service_rps']:.0f}", f"{r['rps_ratio']:.2f}",
                rps_target, r["rps_ratio"]),
            row(f"{label} p99 ms", f"{r['baseline_p99_ms']:.2f}", f"{r['service_p99_ms']:.2f}",
                f"{r['p99_ratio']:.2f}", "<= 1.5", r["p99_ratio"])]


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every measured figure as table rows: figure, baseline, service, ratio, target, holds."""
    table = [("figure", "baseline", "service", "ratio", "target", "holds")]
    if "get_status" in results:
        table += load_rows("GET status", results["get_status"], ">= 0.90")
    if "bare_status" in results:
        table += load_rows("GET status vs bare ASGI", results["bare_status"], ">= 0.70")
    if "post_busy" in results:
        table += load_rows("POST busy (409)", results["post_busy"], ">= 0.80")
    if "launch" in results:
        r = results["launch"]
        table.append(row("launch to /healthz ms", f"{r['baseline_ms']:.0f}", f"{r['service_ms']:.0f}",
                         f"{r['ratio']:.2f}", "<= 1.25", r["ratio"]))
    if "runs_per_second" in results:
        r = results["runs_per_second"]
        table.append(row("runs/s back to back", "", f"{r['runs_per_second']:.0f}", "", "printed"))
    if "queued_throughput" in results:
        for mode, name in (("memory", "memory"), ("redis", "Redis")):
            r = results["queued_throughput"][mode]
            if "skipped" in r:
                table.append(row(f"queued runs/s, {name}", "", r["skipped"], "", ">= 1.0"))
            else:
                table.append(row(f"queued runs/s, {name} (vs back to back)", f"{r['back_to_back_rps']:.0f}",
                                 f"{r['queued_rps']:.0f}", f"{r['ratio']:.2f}", ">= 1.0", r["ratio"]))
    if "drain" in results:
        table += drain_rows(results["drain"])
    if "rss" in results:
        r = results["rss"]
        table.append(row(f"RSS MB after {r['runs_first']}/{r['runs_second']} runs", f"{r['rss_first_mb']:.1f}",
                         f"{r['rss_second_mb']:.1f}", f"{r['growth'] * 100:+.1f} %", "<= +10 %", r["growth"] * 100))
    if "footprint" in results:
        size = results["footprint"]["site_packages_mb"]
        table.append(row("site-packages MB", "", f"{size:.1f}", "", "<= 32", size))
    if "redis_get_status" in results:
        r = results["redis_get_status"]
        if "skipped" in r:
            table.append(row("Redis GET status", "", r["skipped"], "", ">= 0.50"))
        else:
            table.append(row("Redis GET status req/s (vs memory)", f"{r['memory_rps']:.0f}", f"{r['redis_rps']:.0f}",
                             f"{r['ratio']:.2f}", ">= 0.50", r["ratio"]))
    if "postgres" in results:
        r = results["postgres"]
        table += [row("Postgres queued runs/s (vs pgqueuer, one at a time)", f"{r['peer_drain_rps']:.0f}",
                      f"{r['drain_rps']:.0f}", f"{r['drain_ratio']:.2f}", "printed"),
                  row("Postgres GET status req/s (vs memory)", f"{r['memory_status_rps']:.0f}",
                      f"{r['status_rps']:.0f}", f"{r['status_ratio']:.2f}", ">= 0.50", r["status_ratio"])]
    if "tracing" in results:
        r = results["tracing"]
        table += [row("GET status req/s, tracing on (vs off)", f"{r['off_rps']:.0f}", f"{r['on_rps']:.0f}",
                      f"{r['rps_ratio']:.2f}", "printed"),
                  row("GET status p99 ms, tracing on (vs off)", f"{r['off_p99_ms']:.2f}", f"{r['on_p99_ms']:.2f}",
                      f"{r['p99_ratio']:.2f}", "printed"),
                  row("GET status CPU µs/request, tracing on (vs off)", f"{r['off_cpu_us']:.1f}",
                      f"{r['on_cpu_us']:.1f}", f"{r['cpu_ratio']:.2f}", "printed"),
                  row("runs/s back to back, tracing on (vs off)", f"{r['runs_off_per_s']:.0f}",
                      f"{r['runs_on_per_s']:.0f}", f"{r['runs_ratio']:.2f}", "printed")]
    return table


def drain_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """The one-slot drain: Redis mode's runs/s against memory mode's, commands per run, gaps and flatness."""
    memory, long = r["memory"], r["long"]
    lines = [row(f"drain runs/s, memory, {long} queued", "", f"{memory['rps']:.0f}", "", "printed"),
             row("drain handoff gap ms, memory (p50 / p99)", "", f"{memory['gap_p50_ms']:.2f} / "
                 f"{memory['gap_p99_ms']:.2f}", "", "printed")]
    if "skipped" in r["redis"]:
        return [*lines, row("drain, Redis", "", r["redis"]["skipped"], "", "printed")]
    for key, name in (("redis", "1 replica"), ("redis_2", "2 replicas")):
        d = r[key]
        lines += [row(f"drain runs/s, Redis {name} (vs memory)", f"{memory['rps']:.0f}", f"{d['rps']:.0f}",
                      f"{d['rps'] / memory['rps']:.2f}", "printed"),
                  row(f"drain Redis commands/run, {name}", "", f"{d['commands_per_run']:.1f}", "",
                      "<= 30" if key == "redis" else "printed", d["commands_per_run"] if key == "redis" else None),
                  row(f"drain handoff gap p50 ms, Redis {name}", "", f"{d['gap_p50_ms']:.2f}", "", "<= 0.5",
                      d["gap_p50_ms"]),
                  row(f"drain handoff gap p99 ms, Redis {name}", "", f"{d['gap_p99_ms']:.2f}", "", "<= 2",
                      d["gap_p99_ms"])]
    short = r["redis_short"]
    lines.append(row(f"drain runs/s, Redis {long} queued (vs {r['short']})", f"{short['rps']:.0f}",
                     f"{r['redis']['rps']:.0f}", f"{r['flatness']:.2f}", ">= 0.90", r["flatness"]))
    return lines


def table(results: dict[str, Any], lines: list[tuple[str, ...]] | None = None) -> str:
    lines = lines or rows(results)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds per figure")
    parser.add_argument("--runs", type=int, default=None, help="interleaved rounds per figure (default 6, quick 1)")
    parser.add_argument("--only", choices=FIGURES + OPTIONAL, action="append",
                        help="measure only this figure (repeatable)")
    parser.add_argument("--output", default=str(HERE / "bench-results.json"))
    parser.add_argument("--peers", action="store_true",
                        help="the one-slot drain against Celery and arq (installed from tools/requirements-bench*.txt)")
    opts = parser.parse_args()
    if opts.peers:
        peers_main(opts)
        return
    opts.runs = opts.runs or (1 if opts.quick else 6)
    opts.seconds, opts.warmup = (1, 0) if opts.quick else (5, 3)  # quick: a smoke run, one 1 s sample, no warm-up
    wanted = opts.only or list(FIGURES)
    needs_wrk = {"get_status", "bare_status", "post_busy", "redis_get_status", "postgres"} & set(wanted)
    if needs_wrk and shutil.which("wrk") is None:
        sys.exit("bench.py: wrk is not installed (apt-get install wrk); it is needed for: " + ", ".join(needs_wrk))
    results: dict[str, Any] = {}
    for name in wanted:
        print(f"[{len(results) + 1}/{len(wanted)}] {name} ...", flush=True)
        started = time.monotonic()
        results[name] = globals()[f"fig_{name}"](opts)
        print(f"      done in {time.monotonic() - started:.0f} s", flush=True)
    targets = {line[0]: {"target": line[4], "holds": line[5] == "yes"} for line in rows(results)[1:] if line[5]}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
              "cores": os.cpu_count(), "load_average": os.getloadavg(), "quick": opts.quick, "runs": opts.runs,
              "results": results, "targets": targets}
    Path(opts.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    missed = [name for name, target in targets.items() if not target["holds"]]
    print(f"targets: {len(targets) - len(missed)} of {len(targets)} hold" + (f"; missed: {', '.join(missed)}"
                                                                           if missed else ""))
    print(f"written to {opts.output}")


def peers_main(opts: argparse.Namespace) -> None:
    """``--peers``: the drain on agent-runner and its peers, printed with the ratios; written to --output."""
    if shutil.which("redis-server") is None:
        sys.exit("bench.py --peers: redis-server is not installed")
    results = peers_figure(opts)
    lines = peer_rows(results)
    vs_celery = {system: results[system]["rps"] / results["celery"]["rps"] for system in ("agent-runner",
                                                                                          "agent-runner x2")}
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
              "cores": os.cpu_count(), "load_average": os.getloadavg(), "quick": opts.quick,
              "results": {"peers": results}}
    Path(opts.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results, lines))
    for system, ratio in vs_celery.items():
        print(f"target: {system} drains at least at Celery's rate (>= 1.00): {ratio:.2f}, "
              + ("holds" if ratio >= 1.0 else "NO"))
    print(f"written to {opts.output}")


if __name__ == "__main__":
    main()
