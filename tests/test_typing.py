"""The launcher, agents.py and the service package pass ``mypy --strict`` (the types are part of the seam)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import HERE


def test_the_product_passes_mypy_strict(tmp_path: Path) -> None:
    checked = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                              "agent_runner.py", "agents.py", "service"],
                             cwd=HERE, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("Success: no issues found")
