"""Logging: one JSON object per line on stdout, uvicorn's lines included (or, for a terminal, readable lines).

``log`` is the service's logger. Per-request lines (http_request,
run_rejected) skip the logging machinery through ``log_hot``, and a run's
lifecycle lines (run_accepted ... agent_complete) through ``lifecycle_log``.
LOG_FORMAT picks JSON or console lines (console_logs.py); both carry the
same events and fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from service import console_logs

OWN_LOGGERS = ("agent_runner", "agents")
# Set by service/tracing.py while tracing is on: the current span's (trace_id, span_id), None outside any span.
trace_ids: Callable[[], tuple[str, str] | None] | None = None


class LogFormatter(JsonFormatter):
    """JSON lines with ``timestamp``, ``level`` and ``event`` first, then the record's fields.

    Our loggers log event names (``log.info("run_accepted", extra=...)``);
    lines from other libraries (uvicorn) get event ``server_log`` and their
    text as ``message``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("reserved_attrs", [*logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
                                             "message", "asctime", "color_message"])
        super().__init__(**kwargs)
        # JsonFormatter's json.dumps(cls=...) builds an encoder per line: this one serves them all
        self.encoder = (self.json_encoder or json.JSONEncoder)(
            default=self.json_default, indent=self.json_indent, ensure_ascii=self.json_ensure_ascii)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["timestamp"] = log_timestamp(record.created)
        log_data["level"] = record.levelname.lower()
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        log_data["event"] = record.message if own else "server_log"
        if not own:
            log_data["logger"] = record.name
        super().add_fields(log_data, record, message_dict)
        if own:
            log_data.pop("message", None)
        if "human_message" in log_data:
            log_data["message"] = log_data.pop("human_message")
        if "exc_info" in log_data:
            log_data["traceback"] = log_data.pop("exc_info")
        if trace_ids is not None and (ids := trace_ids()) is not None:
            log_data["trace_id"], log_data["span_id"] = ids

    def jsonify_log_record(self, log_data: Any) -> str:
        """Strict JSON: a NaN or Infinity a field carries (an agent logged float("nan")) is written as a string."""
        line: str = self.encoder.encode(log_data)  # what json.dumps(log_data, cls=..., ...) returns
        if "NaN" in line or "Infinity" in line:  # rare: only then is the line read back to check it
            line = json.dumps(json.loads(line, parse_constant=str), ensure_ascii=self.json_ensure_ascii)
        return line


class ConsoleFormatter(LogFormatter):
    """LogFormatter's object, the same fields, rendered as a readable line (console_logs.render)."""

    def __init__(self, colour: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.colour = colour

    def serialize_log_record(self, log_data: dict[str, Any]) -> str:
        return console_logs.render(log_data, self.colour).rstrip("\n")


# Keys ``extra=`` may not use: logging raises KeyError for a LogRecord attribute (the line is lost),
# and LogFormatter owns or drops the others.
RESERVED_FIELDS = frozenset({*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime",
                             "color_message", "human_message", "exc_info", "timestamp", "level", "event",
                             "logger", "traceback", "trace_id", "span_id"})


def safe_fields(fields: dict[str, Any], taken: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``fields`` for ``extra=``, with a reserved key, or one in ``taken``, renamed ``field_<key>``."""
    safe: dict[str, Any] = {}
    for key, value in fields.items():
        name = key
        while name in RESERVED_FIELDS or name in taken or name in safe or (name != key and name in fields):
            name = f"field_{name}"
        safe[name] = value
    return safe


hot_lines: list[str] = []  # per-request lines waiting to be written (see log_hot)


def write_hot_lines() -> None:
    if hot_lines:
        sys.stdout.write("".join(hot_lines))
        hot_lines.clear()


class StdoutHandler(logging.StreamHandler[TextIO]):
    """stdout: warnings and errors are flushed at once, info lines at most 0.2 s late.

    A write per info line would cost more than the request it logs; the
    lifespan flushes every 0.2 s and at exit. Per-request lines queued by
    log_hot are written first, so lines keep their order.
    """

    FLUSH_SECONDS = 0.2

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self._may_wait = False
        self._flushed_at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self._may_wait = record.levelno < logging.WARNING
        try:
            write_hot_lines()
            super().emit(record)
        finally:
            self._may_wait = False

    def flush(self) -> None:
        now = time.monotonic()
        if self._may_wait and now - self._flushed_at < self.FLUSH_SECONDS:
            return
        write_hot_lines()
        super().flush()
        self._flushed_at = now

    def write_info(self, formatter: LogFormatter, event: str, fields: dict[str, Any]) -> None:
        """The line ``emit`` writes for ``log.info(event, extra=fields)``, built without a LogRecord.

        The object LogFormatter.add_fields builds (fields with no reserved name: it moves or drops none but
        those starting with "_"), serialized by the same formatter, then written and flushed as ``emit``
        writes and flushes a line.
        """
        data = {"timestamp": log_timestamp(time.time()), "level": "info", "event": event}
        for key, value in fields.items():
            if not (isinstance(key, str) and key.startswith("_")):
                data[key] = value
        try:
            if trace_ids is not None and (ids := trace_ids()) is not None:
                data["trace_id"], data["span_id"] = ids
            line = formatter.serialize_log_record(data)
        except Exception:  # a line that cannot be formatted: logging reports it (handleError) and drops it
            log.info(event, extra=fields)
            return
        self.acquire()  # as Handler.handle holds the lock around emit
        try:
            write_hot_lines()
            self.stream.write(line + self.terminator)
            if time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS:
                self.flush()
        except Exception:  # stdout gone: reported on stderr as emit reports it, not raised at the run
            self.handleError(log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, event, (), None))
        finally:
            self.release()


console_colour: bool | None = None  # None: JSON lines; else console lines, coloured or not (see logging_config)


def console_wanted(log_format: str) -> bool:
    """LOG_FORMAT=console, or auto with stdout a terminal."""
    if log_format == "auto":
        isatty = getattr(sys.stdout, "isatty", None)
        return bool(isatty and isatty())
    return log_format == "console"


def logging_config(level: str, log_format: str = "auto", colour: bool = True) -> dict[str, Any]:
    """The dictConfig for the whole process, also handed to uvicorn; sets the format of log_hot's lines too.

    ``log_format`` is json, console or auto (console when stdout is a terminal).
    """
    global console_colour
    console_colour = colour if console_wanted(log_format) else None
    formatter = {"()": LogFormatter} if console_colour is None else {"()": ConsoleFormatter, "colour": colour}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": formatter},
        "handlers": {"stdout": {"()": StdoutHandler, "formatter": "line"}},
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            # the servers' own lines, under any launcher, as JSON lines of ours (event server_log)
            **{name: {"handlers": [], "propagate": True, "level": level.upper()}
               for name in ("uvicorn", "uvicorn.error", "gunicorn", "gunicorn.error", "hypercorn", "hypercorn.error")},
            # their access lines repeat http_request, which the app writes under every launcher
            **{name: {"handlers": [], "propagate": False, "level": "WARNING"}
               for name in ("uvicorn.access", "gunicorn.access", "hypercorn.access")},
        },
    }


log = logging.getLogger("agent_runner")

_second, _second_text = -1, ""
_milli, _milli_text = -1, ""


def log_timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds, ending in Z (formatted once per millisecond: lines come in bursts)."""
    global _second, _second_text, _milli, _milli_text
    second = int(now)
    milli = int((now - second) * 1000)
    if milli != _milli or second != _second:
        if second != _second:
            _second, _second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _milli, _milli_text = milli, f"{_second_text}.{milli:03d}Z"
    return _milli_text


def log_hot(event: str, fields: str) -> None:
    """An info line for the per-request events (http_request, run_rejected), without a LogRecord.

    ``fields`` is the rest of the JSON object, already encoded (`"status": 200`).
    Same shape as LogFormatter's lines; queued and written in batches, ahead of
    any other line, at most 0.2 s late.
    """
    if log.isEnabledFor(logging.INFO):
        if trace_ids is not None and (ids := trace_ids()) is not None:
            fields += f', "trace_id": "{ids[0]}", "span_id": "{ids[1]}"'
        line = (f'{{"timestamp": "{log_timestamp(time.time())}", "level": "info", "event": "{event}", '
                f'{fields}}}')
        if console_colour is not None:  # a person reads these: the same object, rendered (not the hot path then)
            line = console_logs.render(json.loads(line), console_colour).rstrip("\n")
        hot_lines.append(line + "\n")
        if len(hot_lines) >= 512:
            write_hot_lines()


def own_setup() -> tuple[StdoutHandler, LogFormatter] | None:
    """logging_config's handler and formatter, when nothing else gets ``log``'s records (no test's handler,
    no caplog, no filter); None otherwise."""
    root = logging.root
    if log.handlers or log.filters or not log.propagate or root.filters or len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    formatter = handler.formatter
    if type(handler) is not StdoutHandler or handler.filters or handler.level > logging.INFO:
        return None
    if type(formatter) is LogFormatter or type(formatter) is ConsoleFormatter:
        return handler, formatter
    return None


class LifecycleLog:
    """A run's lifecycle lines (run_accepted, run_queued, run_dequeued, run_started, its terminal line).

    ``info(event, fields)`` writes what ``log.info(event, extra=fields)`` writes, byte for byte, in a third
    (JSON) to a half (console) of the CPU: with logging_config's setup an info line skips the LogRecord and
    logging's dispatch (StdoutHandler.write_info). Other levels (flushed at once), other setups (a test's
    handler, caplog) and reserved field names take ``log``'s own path.
    """

    def info(self, event: str, fields: dict[str, Any]) -> None:
        self.log(logging.INFO, event, fields)

    def log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if level != logging.INFO or not fields.keys().isdisjoint(RESERVED_FIELDS) or (setup := own_setup()) is None:
            log.log(level, event, extra=fields)
        elif log.isEnabledFor(logging.INFO):
            handler, formatter = setup
            handler.write_info(formatter, event, fields)


lifecycle_log = LifecycleLog()


async def flush_stdout_regularly() -> None:
    """Flush the info lines left in stdout's buffer (see StdoutHandler)."""
    while True:
        await asyncio.sleep(StdoutHandler.FLUSH_SECONDS)
        write_hot_lines()
        sys.stdout.flush()
