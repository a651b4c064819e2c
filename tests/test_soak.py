"""soak.py runs for ~20 s in CI and all its checks pass (no 5xx, never two at once, nothing lost, RSS flat)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import HERE


def test_twenty_second_soak_passes_every_check(tmp_path: Path) -> None:
    summary_path = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, "tools/soak.py", "--minutes", "0.33", "--json", str(summary_path)],
                            cwd=HERE, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())
    assert all(summary["checks"].values()), summary
    assert summary["runs_accepted"] >= 50 and summary["requests"] >= 1000
    assert summary["server_errors"] == 0 and summary["max_concurrent_agents"] == 1
