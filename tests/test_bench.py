"""bench.py must keep working: a --quick run produces the table and the JSON file (no speed is asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import HERE, missing_tool


def test_quick_bench_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        missing_tool("wrk", "apt-get install wrk")
    output = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--output", str(output)], cwd=HERE,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| figure" in result.stdout and "GET status req/s" in result.stdout
    for name in ("get_status", "post_busy", "launch", "runs_per_second", "rss", "footprint", "redis_get_status"):
        assert f"] {name} ..." in result.stdout  # one progress line per figure
    report = json.loads(output.read_text())
    figures = report["results"]
    assert figures["get_status"]["service_rps"] > 0 and figures["get_status"]["baseline_rps"] > 0
    assert figures["post_busy"]["rps_ratio"] > 0
    assert figures["launch"]["service_ms"] > 0
    assert figures["rss"]["rss_second_mb"] > 0
    assert figures["footprint"]["site_packages_mb"] > 0
    assert report["quick"] is True and report["cores"] >= 1
