"""The run lifecycle's lines (run_accepted ... agent_complete) through lifecycle_log: the bytes logging writes.

With the service's own handler setup, lifecycle_log writes a line without a LogRecord; every test here holds
those bytes against the same line sent through logging (StdoutHandler and its formatter), in JSON and console
form, or checks that another setup (a test's handler, caplog, a level above info) gets the record instead.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pythonjsonlogger.json import JsonFormatter

from service import logs
from service.logs import ConsoleFormatter, LogFormatter, StdoutHandler, lifecycle_log, safe_fields

NOW = 1_796_000_000.25  # a fixed clock for both paths, so their timestamps agree
RUN = {"run_id": "0b9f3c1e-5d2a-4c7e-9a51-7f0e2d9b6a11", "agent_type": "sleeper", "user_id": "user-42"}
ODD_FIELDS: dict[Any, Any] = {
    "nan": float("nan"), "infinity": float("inf"), "minus_infinity": float("-inf"),
    "text": "héllo ✓ \U0001f600 \x1b[2J \"quoted\" back\\slash", "multi_line": "first\n  second\n",
    "spaces and=equals": "a value", "": "", "empty": "", "none": None, "flag": True, "zero": 0.0,
    "big": 10**30, "nested": {"list": [1, 2.5, "x", None, {"deep": float("nan")}], "é": "ü"},
    "when": datetime.datetime(2026, 12, 6, 22, 0, tzinfo=datetime.timezone.utc), "raw": b"\x00bytes",
    "error": ValueError("bad value"), 7: "an int key", "_private": "left out by the formatter",
    "message_like": "NaN Infinity in text", **safe_fields({"event": "renamed", "level": "x", "trace_id": "y"}),
}
MODES = {"json": LogFormatter(), "console": ConsoleFormatter(colour=True), "plain": ConsoleFormatter(colour=False)}


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The clock fixed, tracing off, no hot line left over, the service's logger at info."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    monkeypatch.setattr(logs, "trace_ids", None)
    logs.hot_lines.clear()
    level = logs.log.level
    logs.log.setLevel(logging.INFO)
    yield
    logs.log.setLevel(level)
    logs.hot_lines.clear()


@contextlib.contextmanager
def service_handler(mode: str = "json") -> Iterator[StdoutHandler]:
    """The root logger as logging_config leaves it (one StdoutHandler, at info), writing to a string (its stream).

    A context, not a fixture: pytest sets its own handlers and stdout anew for each test's call.
    """
    root = logging.getLogger()
    handlers, level, stdout = root.handlers[:], root.level, sys.stdout
    sys.stdout = io.StringIO()
    handler = StdoutHandler()
    handler.setFormatter(MODES[mode])
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.stdout = stdout


def written(handler: StdoutHandler) -> str:
    text: str = handler.stream.getvalue()
    return text


def through_logging(handler: StdoutHandler, event: str, fields: dict[str, Any]) -> str:
    """What StdoutHandler writes for ``log.info(event, extra=fields)``: the reference bytes."""
    record = logs.log.makeRecord(logs.log.name, logging.INFO, __file__, 1, event, (), None, extra=fields)
    assert record.created == NOW
    out = io.StringIO()
    reference = StdoutHandler()
    reference.setStream(out)
    reference.setFormatter(handler.formatter)
    reference.emit(record)
    return out.getvalue()


def through_lifecycle_log(handler: StdoutHandler, event: str, fields: dict[str, Any], fast: bool = True) -> str:
    """What lifecycle_log writes on the handler's stream at once, as emit writes (no flush or later write
    needed: a full stdout buffer reaches the file); ``fast``: without a LogRecord (emit is not called)."""
    emitted: list[logging.LogRecord] = []

    def emit(record: logging.LogRecord) -> None:
        emitted.append(record)
        StdoutHandler.emit(handler, record)

    handler.emit = emit  # type: ignore[method-assign]
    start = len(written(handler))
    try:
        lifecycle_log.info(event, fields)
    finally:
        del handler.emit
    assert (emitted == []) == fast, emitted
    return written(handler)[start:]


def strict_json(line: str) -> dict[str, Any]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in {line!r}")
    loaded: dict[str, Any] = json.loads(line, parse_constant=refuse)
    return loaded


LINES = [
    ("run_accepted", RUN),
    ("run_queued", {**RUN, "queue_position": 3}),
    ("run_dequeued", RUN),
    ("run_started", {**RUN, "fencing_token": 12}),
    ("run_cancelled", {**RUN, "state": "CANCELLED", "duration_ms": 0.0, "cancelled_by": RUN["run_id"]}),
    ("agent_complete", {**safe_fields({"decision": "yes", "state": "x"}, taken=frozenset({"state"})), **RUN,
                        "state": "DONE", "duration_ms": 1.5}),
    ("agent_complete", {**ODD_FIELDS, **RUN, "state": "DONE", "duration_ms": 2.0}),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
@pytest.mark.parametrize(("event", "fields"), LINES, ids=[f"{event}-{i}" for i, (event, _) in enumerate(LINES)])
def test_a_lifecycle_line_is_the_bytes_logging_writes(monkeypatch: pytest.MonkeyPatch, mode: str, traced: bool,
                                                      event: str, fields: dict[str, Any]) -> None:
    if traced:
        monkeypatch.setattr(logs, "trace_ids", lambda: ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"))
    with service_handler(mode) as handler:
        line = through_lifecycle_log(handler, event, fields)
        assert line == through_logging(handler, event, fields)
    assert line.endswith("\n")
    if mode == "json":
        data = strict_json(line)
        assert list(data)[:3] == ["timestamp", "level", "event"] and data["event"] == event
        assert ("trace_id" in data) == traced and "_private" not in data


def test_the_lines_bytes_are_pinned() -> None:
    """Literal lines, so a change to both paths at once (the encoder, the field order) shows too."""
    fields = {**RUN, "state": "DONE", "duration_ms": 1.5, "nan": float("nan"), "text": "é ✓", "_private": 1}
    with service_handler("json") as handler:
        json_line = through_lifecycle_log(handler, "agent_complete", fields)
        started_line = through_lifecycle_log(handler, "run_started", {**RUN, "fencing_token": 7, "text": "é ✓"})
    with service_handler("plain") as handler:
        console_line = through_lifecycle_log(handler, "agent_complete", fields)
    assert json_line == (
        '{"timestamp": "2026-11-30T00:53:20.250Z", "level": "info", "event": "agent_complete", '
        '"run_id": "0b9f3c1e-5d2a-4c7e-9a51-7f0e2d9b6a11", "agent_type": "sleeper", "user_id": "user-42", '
        '"state": "DONE", "duration_ms": 1.5, "nan": "NaN", "text": "\\u00e9 \\u2713"}\n')
    assert started_line == (
        '{"timestamp": "2026-11-30T00:53:20.250Z", "level": "info", "event": "run_started", '
        '"run_id": "0b9f3c1e-5d2a-4c7e-9a51-7f0e2d9b6a11", "agent_type": "sleeper", "user_id": "user-42", '
        '"fencing_token": 7, "text": "\\u00e9 \\u2713"}\n')
    assert console_line == ('00:53:20.250Z INFO  agent_complete         0b9f3c1e agent_type=sleeper user_id=user-42 '
                            'state=DONE duration_ms=1.5 nan=NaN text="\\u00e9 \\u2713"\n')


def test_lifecycle_lines_keep_their_place_among_hot_and_logged_lines() -> None:
    with service_handler() as handler:
        logs.log_hot("http_request", '"status": 202')
        lifecycle_log.info("run_accepted", RUN)
        logging.getLogger("agents.sleeper").info("agent_start")  # an agent's line, written by the root's handler
        lifecycle_log.info("run_started", {**RUN, "fencing_token": 1})
        logs.log_hot("http_request", '"status": 200')
        logging.getLogger("uvicorn.error").warning("Shutting down")
    assert [strict_json(line)["event"] for line in written(handler).splitlines()] == [
        "http_request", "run_accepted", "agent_start", "run_started", "http_request", "server_log"]


def test_a_lifecycle_line_is_flushed_when_a_logged_line_would_be(monkeypatch: pytest.MonkeyPatch) -> None:
    flushes: list[float] = []
    with service_handler() as handler:
        monkeypatch.setattr(handler.stream, "flush", lambda: flushes.append(time.monotonic()))
        lifecycle_log.info("run_accepted", RUN)  # the first line in a while: flushed at once, as emit flushes it
        assert len(flushes) == 1 and written(handler).count("\n") == 1
        lifecycle_log.info("run_started", RUN)  # within FLUSH_SECONDS: written, left to the next flush
        assert len(flushes) == 1 and written(handler).count("\n") == 2
        handler._flushed_at -= StdoutHandler.FLUSH_SECONDS
        lifecycle_log.info("agent_complete", RUN)
        assert len(flushes) == 2 and written(handler).count("\n") == 3


def test_a_line_below_the_level_is_not_written() -> None:
    logs.log.setLevel(logging.WARNING)
    with service_handler() as handler:
        lifecycle_log.info("run_started", RUN)
    assert written(handler) == ""


def test_an_error_line_goes_through_logging_and_is_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    flushes: list[float] = []
    emitted: list[str] = []

    def emit(record: logging.LogRecord) -> None:
        emitted.append(record.getMessage())
        StdoutHandler.emit(handler, record)

    with service_handler() as handler:
        monkeypatch.setattr(handler.stream, "flush", lambda: flushes.append(time.monotonic()))
        monkeypatch.setattr(handler, "emit", emit)
        handler._flushed_at = time.monotonic()  # an info line now would wait
        lifecycle_log.log(logging.ERROR, "agent_error", {**RUN, "state": "ERROR", "error": "boom"})
    assert emitted == ["agent_error"] and len(flushes) == 1
    assert strict_json(written(handler))["level"] == "error"


def test_caplog_gets_the_records_as_before(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent_runner"):
        lifecycle_log.info("run_started", {**RUN, "fencing_token": 5})
    assert [(record.getMessage(), getattr(record, "fencing_token")) for record in caplog.records] == [
        ("run_started", 5)]


def test_a_handler_beside_the_services_gets_the_record_and_stdout_the_line(caplog: pytest.LogCaptureFixture) -> None:
    with service_handler() as handler:
        logging.getLogger().addHandler(caplog.handler)
        lifecycle_log.info("run_dequeued", RUN)
    assert [record.getMessage() for record in caplog.records] == ["run_dequeued"]
    assert strict_json(written(handler))["event"] == "run_dequeued"


def test_a_reserved_field_name_takes_loggings_path() -> None:
    """logging refuses a LogRecord attribute as a field (KeyError), and the formatter moves human_message."""
    fields = {**RUN, "human_message": "hello"}
    with service_handler() as handler:
        with pytest.raises(KeyError):
            lifecycle_log.info("run_started", {**RUN, "msg": "x"})
        line = through_lifecycle_log(handler, "run_started", fields, fast=False)
        assert line == through_logging(handler, "run_started", fields)
    assert list(strict_json(line))[-1] == "message"


def test_a_line_the_formatter_cannot_encode_is_dropped_as_logging_drops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)  # handleError's report on stderr is not the point here
    with service_handler() as handler:
        lifecycle_log.info("agent_complete", {**RUN, "state": "DONE", (1, 2): "a tuple key"})
    assert written(handler) == ""  # and the caller goes on


def test_the_kept_encoder_writes_what_json_formatters_json_dumps_writes() -> None:
    data = {"timestamp": "t", "level": "info", "event": "agent_complete", **ODD_FIELDS, **RUN}
    for formatter in (LogFormatter(), LogFormatter(json_ensure_ascii=False)):
        assert formatter.encoder.encode(data) == JsonFormatter.jsonify_log_record(formatter, data)


def test_a_lifecycle_line_waits_for_the_handler_lock_as_emit_does() -> None:
    """An agent's thread inside emit (the lock held) and a lifecycle line: one line at a time on the stream."""
    with service_handler() as handler:
        handler.acquire()
        writer = threading.Thread(target=lifecycle_log.info, args=("run_started", RUN))
        try:
            writer.start()
            writer.join(0.05)
            assert writer.is_alive() and written(handler) == ""
        finally:
            handler.release()
        writer.join(5)
        assert strict_json(written(handler))["event"] == "run_started"


def test_a_failed_write_is_reported_as_emit_reports_it_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[str] = []

    def broken_pipe(text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    with service_handler() as handler:
        monkeypatch.setattr(handler.stream, "write", broken_pipe)
        monkeypatch.setattr(handler, "handleError", lambda record: reported.append(record.getMessage()))
        lifecycle_log.info("agent_complete", {**RUN, "state": "DONE"})
        logging.getLogger("agents.sleeper").info("agent_start")
    assert reported == ["agent_complete", "agent_start"]
