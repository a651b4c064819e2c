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
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


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


async def measure(args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "AGENT_SLEEP_SECONDS": "0", "ON_BUSY": "enqueue",
           "QUEUE_MAX": "1000", "AGENT_MODULES": ""}
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
        await drive(url, args.seconds, args.drivers)  # warm-up, and the RSS without clients
        rss_before = rss_mb(server.pid)
        clients = [StreamClient() for _ in range(args.clients)]
        for client in clients:
            client.task = asyncio.create_task(client.run(port))
        await asyncio.sleep(1.0)
        rss_idle_clients = rss_mb(server.pid)
        started = time.monotonic()
        frames_before = [client.frames for client in clients]
        accepted = await drive(url, args.seconds, args.drivers)
        rss_after = rss_mb(server.pid)
        elapsed = time.monotonic() - started
        settle = time.monotonic() + 10
        while time.monotonic() < settle and not all(set(accepted) <= client.terminal for client in clients):
            await asyncio.sleep(0.05)
        received = [client.frames - before for client, before in zip(clients, frames_before)]
        complete = sum(set(accepted) <= client.terminal for client in clients)
        for client in clients:
            assert client.task is not None
            client.task.cancel()
        return {
            "clients": args.clients, "seconds": round(elapsed, 1), "runs": len(accepted),
            "runs_per_second": round(len(accepted) / elapsed, 1),
            "events_per_second": round(min(received) / elapsed, 1),  # each one went to every client
            "deliveries_per_second": round(sum(received) / elapsed),
            "clients_with_every_run": complete,
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
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args)), indent=2))


if __name__ == "__main__":
    main()
