"""Property-based fuzzing of the served spec with schemathesis, in both store backends: no 500, every answer as
documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import HERE, ServerProcess

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")


def test_schemathesis_finds_nothing_against_the_served_spec(tmp_path: Path, backend: dict[str, str]) -> None:
    # The spec, the validation and the answers' shapes are the same code in every mode: memory mode gets the
    # long search, Redis and PostgreSQL (their reads and writes of what the fuzzer sends) a shorter one.
    max_time = "20" if not backend else "8"
    # Built-in agents only, short runs and a short timeout: nothing the fuzzer starts lasts long.
    server = ServerProcess(tmp_path / "server.log", AGENT_MODULES="", AGENT_SLEEP_SECONDS="0.02",
                           RUN_TIMEOUT_SECONDS="2", **backend)
    try:
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "--no-color", "run",
             f"{server.url}/openapi.yaml", "--url", server.url,
             "--phases", "examples,coverage,fuzzing,stateful", "--checks", CHECKS,
             # The stream of all runs never ends by itself: a fuzzer would wait on it until its timeout.
             # A run's stream ends with the run (short here); tests/test_events.py covers both streams.
             "--exclude-operation-id", "streamAllEvents",
             "--seed", "20261124", "--max-time", max_time, "--max-examples", "30", "--request-timeout", "65",
             "--report", "junit", "--report-dir", str(tmp_path / "reports")],
            cwd=HERE, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert phase in output, output
