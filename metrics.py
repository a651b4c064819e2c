"""The Prometheus metrics the service exports at /metrics (process_* and python_* come with the client)."""

from __future__ import annotations

import prometheus_client

prometheus_client.disable_created_metrics()  # the *_created series only add noise to every scrape

RUNS_TOTAL = prometheus_client.Counter(
    "agent_runner_runs_total", "Runs that reached a terminal state.", ["agent_type", "state"])
REJECTED_TOTAL = prometheus_client.Counter(
    "agent_runner_rejected_total", "Runs refused with 409 because another run was active.")
RUN_DURATION = prometheus_client.Histogram(
    "agent_runner_run_duration_seconds", "Time from RUNNING to a terminal state.", ["agent_type"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
RUNNING = prometheus_client.Gauge("agent_runner_running", "Runs this process is executing (0 or 1 unless MAX_CONCURRENT_RUNS > 1).")
QUEUE_DEPTH = prometheus_client.Gauge("agent_runner_queue_depth", "Runs waiting in the queue for a slot.")
QUEUE_WAIT = prometheus_client.Histogram(
    "agent_runner_queue_wait_seconds", "Time a queued run waited, from created_at to started_at.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
EVENT_STREAMS = prometheus_client.Gauge("agent_runner_event_streams", "Event streams (SSE) open on this process.")
EVENT_STREAMS_DROPPED = prometheus_client.Counter(
    "agent_runner_event_streams_dropped_total", "Event streams closed because the client fell too far behind.")
HTTP_REQUESTS_TOTAL = prometheus_client.Counter(
    "agent_runner_http_requests_total", "HTTP requests answered.", ["method", "route", "status"])


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
