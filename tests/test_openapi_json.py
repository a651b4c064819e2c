"""openapi.json: generated from openapi.yaml by tools/openapi_json.py and committed, never edited by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from conftest import HERE, load_script

SCRIPT = HERE / "tools" / "openapi_json.py"


def generator() -> Any:
    return load_script(SCRIPT)


def test_the_committed_openapi_json_is_what_the_script_generates_from_openapi_yaml() -> None:
    committed = (HERE / "openapi.json").read_bytes()
    assert committed == generator().generate(), "openapi.json is stale: run python tools/openapi_json.py"


def test_openapi_json_holds_the_document_pyyaml_reads_from_openapi_yaml() -> None:
    assert json.loads((HERE / "openapi.json").read_bytes()) == yaml.safe_load((HERE / "openapi.yaml").read_text())


def test_check_exits_1_on_a_stale_file_and_writing_makes_it_pass(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    script = Path(shutil.copy(SCRIPT, tmp_path / "tools" / "openapi_json.py"))
    spec = (HERE / "openapi.yaml").read_text()
    (tmp_path / "openapi.yaml").write_text(spec.replace("title: ", "title: Renamed ", 1))
    shutil.copy(HERE / "openapi.json", tmp_path / "openapi.json")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)

    stale = run("--check")
    assert (stale.returncode, stale.stdout) == (1, "")
    assert "openapi.json differs from openapi.yaml" in stale.stderr
    assert run().returncode == 0
    assert run("--check").returncode == 0
    assert b'"title": "Renamed ' in (tmp_path / "openapi.json").read_bytes()
