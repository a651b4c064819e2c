"""Logging: one JSON object per line on stdout, uvicorn's lines included (or, for a terminal, readable lines).

``log`` is the service's logger. Per-request lines (http_request,
run_rejected) skip the logging machinery through ``log_hot``. LOG_FORMAT
picks JSON or console lines (console_logs.py); both carry the same events
and fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from service import console_logs

OWN_LOGGERS = ("agent_runner", "agents")


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

    def jsonify_log_record(self, log_data: Any) -> str:
        """Strict JSON: a NaN or Infinity a field carries (an agent logged float("nan")) is written as a string."""
        line = super().jsonify_log_record(log_data)
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
                             "logger", "traceback"})


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
        line = (f'{{"timestamp": "{log_timestamp(time.time())}", "level": "info", "event": "{event}", '
                f'{fields}}}')
        if console_colour is not None:  # a person reads these: the same object, rendered (not the hot path then)
            line = console_logs.render(json.loads(line), console_colour).rstrip("\n")
        hot_lines.append(line + "\n")
        if len(hot_lines) >= 512:
            write_hot_lines()


async def flush_stdout_regularly() -> None:
    """Flush the info lines left in stdout's buffer (see StdoutHandler)."""
    while True:
        await asyncio.sleep(StdoutHandler.FLUSH_SECONDS)
        write_hot_lines()
        sys.stdout.flush()
