"""Log lines a person can read: one coloured line per event, for a terminal (LOG_FORMAT=console).

``render`` turns the same object a JSON line carries (timestamp, level,
event, then the event's fields) into ``time LEVEL event run key=value ...``;
multi-line values (a traceback) follow, indented. Nothing here decides
*what* is logged: logs.py builds the object for both formats.
"""

from __future__ import annotations

import json
from typing import Any

RESET = "\x1b[0m"
LEVEL_STYLE = {"debug": ("DEBUG", "\x1b[2m"), "info": ("INFO ", "\x1b[32m"), "warning": ("WARN ", "\x1b[33m"),
               "error": ("ERROR", "\x1b[31m"), "critical": ("CRIT ", "\x1b[1;31m")}
EVENT_STYLE, RUN_STYLE, KEY_STYLE = "\x1b[1m", "\x1b[36m", "\x1b[2m"
EVENT_WIDTH = 22
RUN_ID_CHARS = 8  # a run_id's first 8 hex digits tell runs apart on a screen
OWN_KEYS = ("timestamp", "level", "event", "run_id")  # shown in their columns, not as key=value


def value_text(value: Any) -> str:
    """A field's value: a plain word as is, anything else as JSON (quotes, and escapes for control chars)."""
    if isinstance(value, str):
        if value and value.isprintable() and not any(char in value for char in ' "=\\'):
            return value
        return json.dumps(value)  # ensure_ascii: no terminal escape sequence gets through
    try:
        return json.dumps(value, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # NaN and the like: still readable
        return repr(value)


def render(data: dict[str, Any], colour: bool) -> str:
    """One event as a readable line (plus indented lines for multi-line values), ending in a newline."""
    def paint(style: str, text: str) -> str:
        return f"{style}{text}{RESET}" if colour else text

    timestamp = str(data.get("timestamp", ""))
    clock = timestamp[11:23] + "Z" if len(timestamp) >= 23 else timestamp  # HH:MM:SS.mmm, UTC like the JSON
    level, style = LEVEL_STYLE.get(str(data.get("level", "")), (str(data.get("level", "")).upper()[:5], ""))
    event = str(data.get("event", ""))
    run_id = data.get("run_id")
    run = run_id[:RUN_ID_CHARS] if isinstance(run_id, str) else ""
    parts = [clock, paint(style, level), paint(EVENT_STYLE, value_text(event).ljust(EVENT_WIDTH)),
             paint(RUN_STYLE, run.ljust(RUN_ID_CHARS))]
    blocks: list[str] = []
    for key, value in data.items():
        if key in OWN_KEYS:
            continue
        if isinstance(value, str) and "\n" in value:  # a traceback: its own indented lines, below the event
            blocks.append(f"    {paint(KEY_STYLE, key + ':')}")
            blocks.extend("    " + (line if line.isprintable() else json.dumps(line))
                          for line in value.rstrip("\n").split("\n"))
            continue
        parts.append(f"{paint(KEY_STYLE, value_text(key) + '=')}{value_text(value)}")
    return " ".join(parts) + "\n" + "".join(line + "\n" for line in blocks)
