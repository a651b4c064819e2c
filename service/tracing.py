"""OpenTelemetry tracing: off unless the standard OTEL_ environment turns it on, and then the only code that
imports opentelemetry.

On when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``), or, with it unset, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true``
keeps it off. Off, ``tracer`` stays None: every caller checks that one name and does nothing more.

A run's trace context travels in its record (``Run.trace``, never in the public JSON):
``<traceparent of the run span> <span id of the POST's span> [<queue position at acceptance>]``. The run
span's id is chosen at acceptance, so whichever replica ends the run (the one that ran it, a canceller, the
one that recovers an orphan) emits the same span, and the webhook carries it.
"""

from __future__ import annotations

import contextvars
import random
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from service import logs
from service.settings import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

tracer: Tracer | None = None  # None: tracing is off
provider: TracerProvider | None = None
SPAN_ID_PRESET: contextvars.ContextVar[int | None] = contextvars.ContextVar("span_id_preset", default=None)
EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "")
INSTALL_HINT = "pip install -r requirements-otel.txt (the image: see docs/deployment.md)"


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment turns tracing on (see the module's docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        if exporter not in EXPORTERS:
            raise ConfigError("OTEL_TRACES_EXPORTER", f"must be otlp, console or none; got {exporter!r}")
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())


def configure(env: Mapping[str, str], version: str) -> None:
    """At start: turn tracing on if the environment asks for it (ConfigError when it cannot be)."""
    if not wanted(env):
        return
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if env.get(name, "").strip() not in PROTOCOLS:
            raise ConfigError(name, f"only http/protobuf is supported; got {env.get(name)!r}")
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        raise ConfigError("OTEL_TRACES_EXPORTER", f"tracing is on but OpenTelemetry is not installed: "
                                                  f"{INSTALL_HINT}") from None
    exporter: SpanExporter
    if exporter_name == "console":  # stdout carries the JSON log lines
        exporter = ConsoleSpanExporter(out=sys.stderr)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    start(BatchSpanProcessor(exporter), version, env)


def start(processor: SpanProcessor, version: str = "", env: Mapping[str, str] = {}) -> None:
    """Turn tracing on with ``processor`` (the tests pass one with the SDK's in-memory exporter)."""
    global tracer, provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetSpanIds(RandomIdGenerator):
        """A run span's id is chosen at acceptance (it travels in the run record); every other is random."""

        def generate_span_id(self) -> int:
            preset = SPAN_ID_PRESET.get()
            return preset if preset is not None else super().generate_span_id()

    if provider is None:  # else started already (tests): one more processor
        attributes: dict[str, str] = {"service.version": version} if version else {}
        if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            attributes["service.name"] = "agent-runner"
        provider = TracerProvider(resource=Resource.create(attributes), id_generator=PresetSpanIds())
        trace.set_tracer_provider(provider)  # the agents' own spans (trace.get_tracer) go to it too
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("agent-runner", version or None)
    logs.trace_ids = current_ids


def stop() -> None:
    """Tracing off again in this process (the tests); the provider stays, as OpenTelemetry allows one."""
    global tracer
    shutdown()
    tracer, logs.trace_ids = None, None


def shutdown() -> None:
    """At exit: export what is left."""
    if provider is not None:
        provider.force_flush(5000)


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id in hex, for log lines; None outside any span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# --- HTTP requests ---------------------------------------------------------------------------------------------

ATTRIBUTE_CHARS = 200  # what a client sends (path, method, forwarded address) is cut to this on a span
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def start_request(scope: Mapping[str, Any]) -> tuple[Span, contextvars.Token[Context]]:
    """A SERVER span for an HTTP request, continuing the trace its ``traceparent`` names, made current."""
    from opentelemetry import context as otel_context, propagate, trace

    assert tracer is not None
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
               if name in (b"traceparent", b"tracestate", b"baggage")}
    method = scope["method"]
    attributes: dict[str, Any] = {"http.request.method": method if method in KNOWN_METHODS else "_OTHER",
                                  "url.path": scope["path"][:ATTRIBUTE_CHARS],
                                  "url.scheme": scope.get("scheme", "http"),
                                  "network.protocol.version": scope.get("http_version", "1.1")}
    if method not in KNOWN_METHODS:
        attributes["http.request.method_original"] = method[:ATTRIBUTE_CHARS]
    client, server = scope.get("client"), scope.get("server")
    if client:
        attributes["client.address"] = client[0][:ATTRIBUTE_CHARS]
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    span = tracer.start_span(method if method in KNOWN_METHODS else "HTTP", propagate.extract(carrier),
                             kind=trace.SpanKind.SERVER, attributes=attributes)
    return span, otel_context.attach(trace.set_span_in_context(span))


def end_request(span: Span, token: contextvars.Token[Context], scope: Mapping[str, Any], status: int,
                error: BaseException | None) -> None:
    """Name the span after its route, record the status, end it and leave its context."""
    from opentelemetry import context as otel_context
    from opentelemetry.trace import Status, StatusCode

    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        method = scope["method"]
        span.set_attribute("http.route", path)
        span.update_name(f"{method if method in KNOWN_METHODS else 'HTTP'} {path}")
    span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    elif status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    otel_context.detach(token)


# --- runs ------------------------------------------------------------------------------------------------------

accepted_positions: dict[str, int] = {}  # run id -> queue position at acceptance, for runs this process queued
ACCEPTED_POSITIONS_MAX = 10000


def new_run_trace() -> str | None:
    """A run's trace field at acceptance: its own span id, chosen now, under the current (the POST's) span."""
    from opentelemetry import trace

    parent = trace.get_current_span().get_span_context()
    if not parent.is_valid:
        return None
    run_span_id = random.getrandbits(64) or 1
    return f"00-{parent.trace_id:032x}-{run_span_id:016x}-{int(parent.trace_flags):02x} {parent.span_id:016x}"


def note_accepted(run_id: str, queue_position: int | None) -> None:
    """Remember where a run this process queued stood at acceptance (its run span says so, if it runs here)."""
    if queue_position is not None:
        if len(accepted_positions) >= ACCEPTED_POSITIONS_MAX:
            del accepted_positions[next(iter(accepted_positions))]
        accepted_positions[run_id] = queue_position


def traceparent(trace: str | None) -> str | None:
    """The run span's W3C traceparent from a run's trace field (the webhook's header)."""
    return trace.split(" ", 1)[0] if trace else None


def epoch_ns(timestamp: str | None) -> int | None:
    try:
        return int(datetime.fromisoformat(timestamp or "").timestamp() * 1e9)
    except ValueError:
        return None


def start_run(run: Any, waited: bool, orphan: bool = False) -> Span:
    """The run's span, from its acceptance on (ended by ``end_run``), with its queue wait as a child when it
    waited. ``run`` is a backends.records.Run."""
    from opentelemetry import trace
    from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

    assert tracer is not None
    parent_context: Context | None = None
    links: list[Link] = []
    preset: int | None = None
    try:
        traceparent, post_span_id = (run.trace or "").split(" ")[:2]
        _, trace_id, span_id, flags = traceparent.split("-")
        post = SpanContext(int(trace_id, 16), int(post_span_id, 16), is_remote=True,
                           trace_flags=TraceFlags(int(flags, 16)))
        preset = int(span_id, 16)
    except ValueError:  # no trace field (accepted with tracing off), or one this version cannot read: a new trace
        pass
    else:
        parent_context = trace.set_span_in_context(NonRecordingSpan(post))
        links.append(Link(post, {"link.kind": "POST /agents/run"}))
    accepted = epoch_ns(run.created_at)
    position = accepted_positions.pop(run.run_id, None) if waited else None if orphan else 0
    attributes: dict[str, Any] = {"run_id": run.run_id, "agent_type": run.agent_type}
    if position is not None:
        attributes["queue_position"] = position
    fencing_token = getattr(run, "fencing_token", None)
    if fencing_token is not None:
        attributes["fencing_token"] = fencing_token
    token = SPAN_ID_PRESET.set(preset)
    try:
        span = tracer.start_span("run", parent_context, attributes=attributes, links=links, start_time=accepted)
    finally:
        SPAN_ID_PRESET.reset(token)
    if waited:
        tracer.start_span("run queue wait", trace.set_span_in_context(span), start_time=accepted,
                          attributes={"run_id": run.run_id}).end()
    return span


def run_context(span: Span | None) -> contextvars.Context | None:
    """A copy of the current context with ``span`` current: the context a run's task is created in."""
    if span is None:
        return None
    from opentelemetry import context as otel_context, trace

    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return contextvars.copy_context()
    finally:
        otel_context.detach(token)


@contextmanager
def current(span: Span | None) -> Iterator[None]:
    """``span`` current within the block (for a line logged about a run outside its task)."""
    if span is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


@contextmanager
def child_span(parent: Span | None, name: str, run: Any) -> Iterator[None]:
    """``name``, a child of the run's span lasting the block (the run's span stays the current one)."""
    if parent is None or tracer is None:
        yield
        return
    from opentelemetry import trace

    span = tracer.start_span(name, trace.set_span_in_context(parent),
                             attributes={"run_id": run.run_id, "agent_type": run.agent_type})
    try:
        yield
    finally:
        span.end()


def end_run(span: Span | None, run: Any) -> None:
    """The run reached its terminal state: its state (and error) on the span, which ends."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("state", run.state)
    if run.cancelled_by is not None:
        span.set_attribute("cancelled_by", run.cancelled_by)
    if run.state == "ERROR":
        span.set_status(Status(StatusCode.ERROR, run.error or ""))
    span.end()


def unexecuted_run(run: Any, write_started: int, orphan: bool = False) -> None:
    """A run that ended without running (cancelled in the queue, at shutdown, or an orphan): its span and
    queue wait from acceptance, and the terminal write that began at ``write_started`` (time.time_ns())."""
    if tracer is None:
        return
    from opentelemetry import trace

    span = start_run(run, waited=not orphan, orphan=orphan)
    tracer.start_span("run terminal write", trace.set_span_in_context(span), start_time=write_started,
                      attributes={"run_id": run.run_id, "agent_type": run.agent_type}).end()
    end_run(span, run)


def now_ns() -> int:
    return time.time_ns()
