"""Logs a person can read: LOG_FORMAT=console (or a terminal on stdout) prints one readable line per event."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import HERE, TESTS, ServerProcess, free_port, new_user

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# time LEVEL event [run] key=value...: a value is a JSON string, or anything without a space
CONSOLE_LINE = re.compile(r"(\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO |WARN |ERROR|CRIT ) (\S+) +([0-9a-f]{8} )?(\S.*)?")
FIELD = re.compile(r' ([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_console(text: str) -> list[dict[str, Any]]:
    """Console lines back into objects (values as text), skipping the indented lines of multi-line values."""
    events = []
    for line in ANSI.sub("", text).splitlines():
        if line.startswith("    ") or not line.strip():
            continue
        match = CONSOLE_LINE.fullmatch(line)
        assert match, f"not a console line: {line!r}"
        clock, level, event, run, rest = match.groups()
        rest = " " + (rest or "")
        run = run or ""
        fields = dict(FIELD.findall(rest))
        assert "".join(f" {key}={value}" for key, value in fields.items()) == rest.rstrip(" ") or fields == {}, line
        events.append({"clock": clock, "level": level.strip(), "event": event, "run": run.strip(), **fields})
    return events


def exercise(server: ServerProcess) -> str:
    """The same traffic for each format: a run that ends DONE, a 409, a failing run, a bad agent_type."""
    run_id = server.start_run("sleeper", seconds=0.3)
    assert server.client.post("/agents/run", json={"agent_type": "sleeper", "user_id": new_user()}).status_code == 409
    assert server.wait_run(run_id)["state"] == "DONE"
    assert server.wait_run(server.start_run("failing"))["state"] == "ERROR"
    refused = server.client.post("/agents/run", json={"agent_type": "\x1b[2Jevil one", "user_id": new_user()})
    assert refused.status_code == 400
    return run_id


def stop(server: ServerProcess) -> str:
    assert server.stop(signal.SIGTERM) == 0
    return server.log_path.read_text()


def test_console_lines_carry_the_same_events_and_fields_as_json(tmp_path: Path) -> None:
    json_server = ServerProcess(tmp_path / "json.log", LOG_FORMAT="json")
    exercise(json_server)
    json_lines = [json.loads(line) for line in stop(json_server).splitlines()]

    console_server = ServerProcess(tmp_path / "console.log", LOG_FORMAT="console")
    run_id = exercise(console_server)
    text = stop(console_server)
    assert "\x1b[" in text  # coloured: NO_COLOR is not set
    assert not any(line.startswith("{") for line in text.splitlines())
    console_lines = parse_console(text)

    def shape(lines: list[dict[str, Any]]) -> list[tuple[str, frozenset[str]]]:
        keys = ("timestamp", "level", "event", "run_id", "clock", "run")
        return [(line["event"], frozenset(key for key in line if key not in keys) - {"traceback"})
                for line in lines if line["event"] != "server_log"]

    assert shape(console_lines) == shape(json_lines)
    # the per-request fast path (http_request, run_rejected) is rendered too
    posts = [line["status"] for line in console_lines
             if line["event"] == "http_request" and line["path"] == "/agents/run"]
    assert posts[:2] == ["202", "409"]
    assert any(line["event"] == "run_rejected" for line in console_lines)
    accepted = next(line for line in console_lines if line["event"] == "run_accepted")
    assert accepted["run"] == run_id[:8] and accepted["agent_type"] == "sleeper" and accepted["level"] == "INFO"
    failed = next(line for line in console_lines if line["event"] == "agent_error")
    assert failed["level"] == "ERROR" and failed["state"] == "ERROR"
    # the traceback follows its line, indented; a client's string cannot put a terminal escape on the screen
    assert re.search(r"agent_error.*\n    (\x1b\[2m)?traceback:", text)
    assert "\x1b[2J" not in text
    assert next(line for line in console_lines if line["event"] == "unsupported_agent_type")["agent_type"] == \
        json.dumps("\x1b[2Jevil one")


def test_no_color_turns_the_colours_off(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "plain.log", LOG_FORMAT="console", NO_COLOR="1")
    server.run_to_end("sleeper", seconds=0.05)
    text = stop(server)
    assert "\x1b" not in text
    assert {line["event"] for line in parse_console(text)} >= {"service_started", "run_accepted", "agent_complete"}


def start_on_a_terminal(**env: str) -> tuple[subprocess.Popen[bytes], int, str]:
    """``python agent_runner.py`` with stdout on a pseudo-terminal; returns the process, the pty's fd, its URL."""
    port = free_port()
    primary, secondary = pty.openpty()
    full_env = {**{key: value for key, value in os.environ.items() if key not in ("LOG_FORMAT", "NO_COLOR")},
                "PORT": str(port), "AGENT_MODULES": "fixture_agents", "PYTHONPATH": str(TESTS),
                "AGENT_SLEEP_SECONDS": "0.1", **env}
    proc = subprocess.Popen([sys.executable, "agent_runner.py"], cwd=HERE, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=secondary, stderr=secondary)
    os.close(secondary)
    return proc, primary, f"http://127.0.0.1:{port}"


def read_terminal_until(fd: int, needle: str, timeout: float = 15) -> str:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the process is gone
                break
    assert needle.encode() in seen, seen.decode(errors="replace")
    return seen.decode()


def stop_terminal_server(proc: subprocess.Popen[bytes], fd: int) -> None:
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:  # keep the pty drained so the process never blocks
        if select.select([fd], [], [], 0.1)[0]:
            try:
                os.read(fd, 65536)
            except OSError:
                break
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    os.close(fd)


def test_a_terminal_on_stdout_gets_console_lines_by_default(tmp_path: Path) -> None:
    proc, fd, url = start_on_a_terminal()
    try:
        read_terminal_until(fd, "service_started")
        run_id = httpx.post(url + "/agents/run", json={"agent_type": "sleeper", "user_id": new_user()},
                            timeout=10).json()["run_id"]
        text = read_terminal_until(fd, "agent_complete")
        assert "\x1b[" in text and '"event"' not in text
        lines = [line for line in parse_console(text.replace("\r\n", "\n")) if line["event"] == "agent_complete"]
        assert lines and lines[0]["run"] == run_id[:8]
    finally:
        stop_terminal_server(proc, fd)


def test_log_format_json_forces_json_on_a_terminal(tmp_path: Path) -> None:
    proc, fd, url = start_on_a_terminal(LOG_FORMAT="json")
    try:
        text = read_terminal_until(fd, "service_started")
        started = [json.loads(line) for line in text.replace("\r\n", "\n").splitlines() if "service_started" in line]
        assert started and started[0]["event"] == "service_started" and "\x1b" not in text
    finally:
        stop_terminal_server(proc, fd)
