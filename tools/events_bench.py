"""Event stream benchmark: events per second one replica sends to N clients of GET /agents/events
during back-to-back runs, and the memory those clients cost.

    python tools/events_bench.py                       # 100 clients, 20 s of load, memory mode
    python tools/events_bench.py --redis-url redis://127.0.0.1:6379/0
    python tools/events_bench.py --clients 10 --seconds 5

It starts ``python agent_runner.py`` (built-in agents, AGENT_SLEEP_SECONDS=0,
ON_BUSY=enqueue), runs back-to-back runs for the given time with no stream
client (RSS before), then connects the clients and runs the same load again
(RSS after). Drivers keep the queue fed, so a run starts as soon as the
previous one ends. Every client must receive every run event; the figure is
the events the service published per second (each one sent to every client)
while the clients were connected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from soak import free_port, rss_mb  # tools/ is on the path when this file runs as a script

HERE = Path(__file__).resolve().parent.parent


class StreamClient:
    """A raw-socket SSE client that counts the frames of the run events it receives."""

    def __init__(self) -> None:
        self.frames = 0
        self.terminal: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    async def run(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /agents/events HTTP/1.1\r\nHost: bench\r\n\r\n")
        await writer.drain()
        buffer = b""
        try:
            while chunk := await reader.read(1 << 16):
                buffer += chunk
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    if b"\nevent: run\n" in frame:
                        self.frames += 1
                        if b'"finished_at":null' not in frame:
                            self.terminal.add(frame.split(b'"run_id":"', 1)[1][:36].decode())
        finally:
            writer.close()


async def drive(url: str, seconds: float, drivers: int) -> list[str]:
    """Back-to-back runs for ``seconds``: each driver queues a run and waits for it to end."""
    accepted: list[str] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one() -> None:
            while time.monotonic() < deadline:
                response = await client.post("/agents/run", json={
                    "agent_type": "document-extractor", "user_id": str(uuid.uuid4()),
                    "input": {"document_id": "bench"}, "on_busy": "enqueue"})
                if response.status_code != 202:
                    await asyncio.sleep(0.01)
                    continue
                run_id = response.json()["run_id"]
                accepted.append(run_id)
                while (await client.get(f"/agents/status/{run_id}", params={"wait": 5})).json()["state"] in (
                        "PENDING", "RUNNING"):
                    pass

        await asyncio.gather(*(one() for _ in range(drivers)))
    return accepted


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(port: int, count: int, ready: Any, stop: Any, results: Any) -> None:
    """In a process of their own (so reading frames does not slow the drivers): ``count`` stream clients."""
    async def main() -> None:
        clients = [StreamClient() for _ in range(count)]
        for client in clients:
            client.task = asyncio.create_task(client.run(port))
        await asyncio.sleep(1.0)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        results.put([(client.frames, sorted(client.terminal)) for client in clients])

    asyncio.run(main())


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "AGENT_SLEEP_SECONDS": "0", "ON_BUSY": "enqueue",
           "QUEUE_MAX": "1000", "AGENT_MODULES": "", "MAX_CONCURRENT_RUNS": str(args.slots)}
    if args.redis_url:
        env.update(REDIS_URL=args.redis_url, REDIS_PREFIX=f"bench-{uuid.uuid4().hex[:8]}")
    log = tempfile.NamedTemporaryFile(prefix="events-bench-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "agent_runner.py"], cwd=HERE, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"server did not start; see {log.name}")
            await asyncio.sleep(0.05)
        await drive(url, 2.0, args.drivers)  # warm-up
        started, cpu = time.monotonic(), cpu_seconds(server.pid)
        alone = await drive(url, args.seconds, args.drivers)  # the same load without clients
        alone_seconds, alone_cpu = time.monotonic() - started, cpu_seconds(server.pid) - cpu
        rss_before = rss_mb(server.pid)
        context = multiprocessing.get_context("spawn")
        ready, stop, results = context.Event(), context.Event(), context.Queue()
        readers = context.Process(target=run_clients, args=(port, args.clients, ready, stop, results))
        readers.start()
        if not ready.wait(30):
            raise RuntimeError("the stream clients did not connect")
        rss_idle_clients = rss_mb(server.pid)
        started, cpu = time.monotonic(), cpu_seconds(server.pid)
        accepted = await drive(url, args.seconds, args.drivers)
        elapsed, loaded_cpu = time.monotonic() - started, cpu_seconds(server.pid) - cpu
        rss_after = rss_mb(server.pid)
        await asyncio.sleep(2.0)  # the last frames reach the clients
        stop.set()
        counts = results.get(timeout=30)
        readers.join(10)
        received = [frames for frames, _ in counts]
        complete = sum(set(accepted) <= set(terminal) for _, terminal in counts)
        events = min(received)  # run events published while the clients were connected (each went to all)
        return {
            "clients": args.clients, "seconds": round(elapsed, 1), "load_average": os.getloadavg()[0],
            "runs": len(accepted), "runs_per_second": round(len(accepted) / elapsed, 1),
            "runs_per_second_without_clients": round(len(alone) / alone_seconds, 1),
            "events_per_second": round(events / elapsed, 1),
            "deliveries_per_second": round(sum(received) / elapsed),
            "clients_with_every_run": complete,
            "server_cpu_ms_per_run_without_clients": round(alone_cpu * 1000 / max(1, len(alone)), 2),
            "server_cpu_ms_per_run_with_clients": round(loaded_cpu * 1000 / max(1, len(accepted)), 2),
            "server_cpu_us_per_delivery": round((loaded_cpu - alone_cpu * len(accepted) / max(1, len(alone)))
                                                * 1e6 / max(1, sum(received)), 1),
            "rss_mb_no_clients": round(rss_before, 1), "rss_mb_clients_idle": round(rss_idle_clients, 1),
            "rss_mb_clients_under_load": round(rss_after, 1),
            "footprint_mb": round(rss_after - rss_before, 1),
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--drivers", type=int, default=4, help="concurrent clients keeping the queue fed")
    parser.add_argument("--slots", type=int, default=1, help="MAX_CONCURRENT_RUNS")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args)), indent=2))


if __name__ == "__main__":
    main()
