"""The Prometheus metrics the service exports at /metrics.

The service counts in plain numbers (one event-loop thread updates them, so
no locks), and prometheus_client, which renders the page and adds the
standard ``process_*`` and ``python_*`` series, is imported at the first
scrape rather than at start: it is a fifth of the service's import time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from typing import Any

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
HTTP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metric:
    """One metric, labelled or not; ``labels(*values)`` returns the child for those values (made once)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._child()
        return child

    def _child(self) -> Any:
        return type(self)(self.name, self.documentation)

    def series(self) -> Iterator[tuple[tuple[str, ...], Any]]:
        """(label values, metric) of every series to show: each child, or the metric itself when unlabelled."""
        return iter(self._children.items()) if self.labelnames else iter([((), self)])


class Value(Metric):
    """A metric that is one number per series: a counter (``inc``) or a gauge (``set``)."""

    family_name = ""  # the prometheus_client family that shows it

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self.value = 0.0

    def family(self, core: Any) -> Any:
        family = getattr(core, self.family_name)(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.series():
            family.add_metric(values, child.value)
        return family


class Counter(Value):
    family_name = "CounterMetricFamily"

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Gauge(Value):
    family_name = "GaugeMetricFamily"

    def set(self, value: float) -> None:
        self.value = float(value)


class Histogram(Metric):
    """Counts per bucket (``value <= bound``, as prometheus_client does) and their sum."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = (*(float(bound) for bound in buckets), math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def _child(self) -> Histogram:
        return Histogram(self.name, self.documentation, buckets=self.bounds[:-1])

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, core: Any) -> Any:
        from prometheus_client.utils import floatToGoString

        family = core.HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.series():
            cumulative, buckets = 0, []
            for bound, count in zip(child.bounds, child.counts):
                cumulative += count
                buckets.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
            family.add_metric(values, buckets, child.sum)
        return family


RUNS_TOTAL = Counter("agent_runner_runs_total", "Runs that reached a terminal state.", ("agent_type", "state"))
REJECTED_TOTAL = Counter("agent_runner_rejected_total", "Runs refused with 409 because another run was active.")
RUN_DURATION = Histogram("agent_runner_run_duration_seconds", "Time from RUNNING to a terminal state.",
                         ("agent_type",), buckets=DURATION_BUCKETS)
RUNNING = Gauge("agent_runner_running", "Runs this process is executing (0 or 1 unless MAX_CONCURRENT_RUNS > 1).")
QUEUE_DEPTH = Gauge("agent_runner_queue_depth", "Runs waiting in the queue for a slot.")
QUEUE_WAIT = Histogram("agent_runner_queue_wait_seconds", "Time a queued run waited, from created_at to started_at.",
                       buckets=QUEUE_WAIT_BUCKETS)
WEBHOOK_ATTEMPTS = Counter("agent_runner_webhook_attempts_total",
                           "Webhook delivery attempts, by outcome (delivered or failed).", ("outcome",))
WEBHOOKS_UNDELIVERED = Counter(
    "agent_runner_webhooks_undelivered_total",
    "Webhook deliveries given up without a 2xx (attempts used up, refused, redirected, or lost at shutdown).")
EVENT_STREAMS = Gauge("agent_runner_event_streams", "Event streams (SSE) open on this process.")
EVENT_STREAMS_DROPPED = Counter("agent_runner_event_streams_dropped_total",
                                "Event streams closed because the client fell too far behind.")
HTTP_REQUESTS_TOTAL = Counter("agent_runner_http_requests_total", "HTTP requests answered.",
                              ("method", "route", "status"))
HTTP_REQUEST_DURATION = Histogram(
    "agent_runner_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer (a stream: its whole life), by route template.",
    ("method", "route", "status"), buckets=HTTP_DURATION_BUCKETS)
BUILD_INFO = Gauge("agent_runner_build_info", "The running version of agent-runner (always 1).", ("version",))
ALL = (RUNS_TOTAL, REJECTED_TOTAL, RUN_DURATION, RUNNING, QUEUE_DEPTH, QUEUE_WAIT, WEBHOOK_ATTEMPTS,
       WEBHOOKS_UNDELIVERED, EVENT_STREAMS, EVENT_STREAMS_DROPPED, HTTP_REQUESTS_TOTAL, HTTP_REQUEST_DURATION,
       BUILD_INFO)


def set_build_info(version: str) -> None:
    """agent_runner_build_info{version="..."} 1, the one series of this process's version."""
    BUILD_INFO.labels(version).set(1)


class ServiceCollector:
    """Hands the metrics above to prometheus_client's registry, after its process_* and python_* collectors."""

    def describe(self) -> list[Any]:
        return []  # no names to reserve: nothing else registers agent_runner_* series

    def collect(self) -> Iterator[Any]:
        from prometheus_client import core

        for metric in ALL:
            yield metric.family(core)


_collector: ServiceCollector | None = None


def render(accept: str = "") -> tuple[bytes, str]:
    """The exposition text and its content type for the request's ``Accept`` header, negotiated as
    prometheus_client negotiates it: OpenMetrics when asked for ``application/openmetrics-text``, else the
    classic text format (prometheus_client is imported on the first call)."""
    global _collector
    import prometheus_client
    from prometheus_client.exposition import choose_encoder

    if _collector is None:
        _collector = ServiceCollector()
        prometheus_client.REGISTRY.register(_collector)
    encoder, content_type = choose_encoder(accept)
    return encoder(prometheus_client.REGISTRY), content_type
