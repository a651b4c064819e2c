"""soak.py runs for 12 s per store backend in CI, fills a small retention early, and passes every check:
no 5xx, never two agents at once, nothing kept is lost, dropped runs answer 404, RSS flat once retention is full."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import HERE

RETENTION = 40  # filled within the first few seconds, so most RSS samples come after it
MIN_RUNS = 2 * RETENTION + 50  # enough to drop 50 runs past the retention boundary, however slow the machine


def test_short_soak_fills_retention_and_passes_every_check(tmp_path: Path, backend: dict[str, str]) -> None:
    summary_path = tmp_path / "soak.json"
    store = [word for name in ("REDIS_URL", "DATABASE_URL") if name in backend
             for word in (f"--{name.lower().replace('_', '-')}", backend[name])]
    result = subprocess.run([sys.executable, "tools/soak.py", "--minutes", "0.2", "--retention", str(RETENTION),
                             "--min-runs", str(MIN_RUNS),
                             "--json", str(summary_path), *store], cwd=HERE, capture_output=True, text=True,
                            timeout=115)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())
    assert all(summary["checks"].values()), summary["checks"]
    assert summary["runs_accepted"] >= MIN_RUNS and summary["requests"] >= 1000
    assert summary["dropped_runs_checked"] == 50 and summary["rss_samples_after_retention_full"] >= 3
    assert summary["server_errors"] == 0 and summary["max_concurrent_agents"] == 1
