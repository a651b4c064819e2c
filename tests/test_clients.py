"""What client generators see: the spec as JSON, and the clients they generate from openapi.yaml.

Each client is generated with its generator's default settings, its session script (tests/clients/)
is type-checked strictly against it, then run against live servers, with and without API_TOKEN.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_spec_validator import validate

from conftest import DOCS, HERE, ServerProcess, missing_tool

TOKEN = "client-test-token"
SPEC = HERE / "openapi.yaml"
SESSIONS = HERE / "tests" / "clients"  # the session scripts, one per client
CLIENTS_PAGE = DOCS / "clients.md"
NODE_MODULES = HERE / ".ci" / "cache" / "clients" / "node_modules"  # installed by .ci/run (npm ci)
CLIENT_TOOLS_LOCK = HERE / ".ci" / "clients" / "package-lock.json"
BIN = Path(sys.executable).parent


def run(command: list[Any], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # The venv's bin first: openapi-python-client formats what it generates with ruff from there.
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run([str(part) for part in command], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=180)


def documented_examples(language: str) -> list[str]:
    """The code blocks in `language` from the clients page (docs/clients.md): a session, then a stream reader."""
    section = CLIENTS_PAGE.read_text()
    return [code for name, code in re.findall(r"```(\w+)\n(.*?)```", section, re.S) if name == language]


def test_openapi_json_is_openapi_yaml_as_json_and_needs_no_token(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server.log", API_TOKEN=TOKEN)
    try:
        as_json = httpx.get(server.url + "/openapi.json")
        as_yaml = httpx.get(server.url + "/openapi.yaml")
    finally:
        server.stop()
    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.content == (HERE / "openapi.json").read_bytes()  # the committed file, as it was at start
    assert as_json.json() == yaml.safe_load(as_yaml.content)
    validate(as_json.json())
    assert as_json.json()["paths"]["/openapi.json"]["get"]["security"] == []


# ---------------------------------------------------------------------------
# Python: openapi-python-client, mypy --strict.


@pytest.fixture(scope="module")
def python_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the generated package agent_runner_client, tests/clients/flow.py and the clients page's example."""
    if not (BIN / "openapi-python-client").exists():
        missing_tool("openapi-python-client", ".venv/bin/pip install -r requirements-dev.txt")
    work = tmp_path_factory.mktemp("python-client")
    generated = run([BIN / "openapi-python-client", "generate", "--path", SPEC, "--output-path", "client"], work)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "warning" not in (generated.stdout + generated.stderr).lower(), generated.stdout + generated.stderr
    shutil.copy(SESSIONS / "flow.py", work / "client" / "flow.py")
    example, stream_reader = documented_examples("python")
    (work / "client" / "documented_example.py").write_text(example)
    (work / "client" / "documented_stream.py").write_text(stream_reader)  # flow.py reads streams with it
    return work / "client"


def test_python_client_its_session_and_the_documented_example_pass_mypy_strict(python_client: Path) -> None:
    checked = run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", python_client.parent / "mypy-cache",
                   "flow.py", "documented_example.py", "documented_stream.py", "agent_runner_client"], python_client)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("Success: no issues found"), checked.stdout


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "API_TOKEN"])
def test_python_client_drives_a_whole_session(python_client: Path, start_server: Any, token: str | None) -> None:
    server = start_server(**({"API_TOKEN": token} if token else {}))
    session = run([sys.executable, "flow.py"], python_client, AGENT_RUNNER_URL=server.url, API_TOKEN=token or "")
    assert session.returncode == 0, session.stdout + session.stderr
    check_session_on_the_server(server, json.loads(session.stdout), token)


# ---------------------------------------------------------------------------
# TypeScript: openapi-typescript and openapi-fetch, tsc --strict, node.


def test_typescript_tools_are_installed_exactly_as_the_lockfile_says() -> None:
    if not NODE_MODULES.is_dir():
        missing_tool("the TypeScript client tools", "bash .ci/run (it installs them into .ci/cache/clients with npm ci)")
    lock = json.loads(CLIENT_TOOLS_LOCK.read_text())
    manifest = json.loads((CLIENT_TOOLS_LOCK.parent / "package.json").read_text())
    assert lock["packages"][""]["dependencies"] == manifest["dependencies"]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", pin) for pin in manifest["dependencies"].values())
    locked = {path: entry["version"] for path, entry in lock["packages"].items() if path}
    assert all("integrity" in entry for path, entry in lock["packages"].items() if path)
    installed = {path: json.loads((NODE_MODULES.parent / path / "package.json").read_text())["version"]
                 for path in locked if (NODE_MODULES.parent / path / "package.json").is_file()}
    assert installed == locked


@pytest.fixture(scope="module")
def typescript_client(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A directory with the generated types, tests/clients/flow.mts and the clients page's example; tsc's outcome."""
    if shutil.which("node") is None:
        missing_tool("node", "apt-get install nodejs")
    if not (NODE_MODULES / "openapi-typescript").is_dir():
        missing_tool("the TypeScript client tools (openapi-typescript, openapi-fetch, typescript)",
                     "bash .ci/run (it installs .ci/clients/package-lock.json into .ci/cache/clients with npm ci)")
    work = tmp_path_factory.mktemp("typescript-client")
    (work / "node_modules").symlink_to(NODE_MODULES)
    for name in ("flow.mts", "tsconfig.json"):
        shutil.copy(SESSIONS / name, work / name)
    example, stream_reader, reading = documented_examples("ts")  # the reading goes on from the example's client
    (work / "documented_example.mts").write_text(
        f'{example}\nimport {{ readEvents }} from "./documented_stream.mjs";\n{reading}')
    (work / "documented_stream.mts").write_text(stream_reader)  # flow.mts reads streams with it
    generated = run(["node", NODE_MODULES / "openapi-typescript" / "bin" / "cli.js", SPEC, "-o", "agent-runner.d.ts"],
                    work)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    compiled = run(["node", NODE_MODULES / "typescript" / "bin" / "tsc", "-p", "tsconfig.json"], work)
    return work, compiled


def test_typescript_types_the_session_and_the_documented_example_pass_tsc_strict(
        typescript_client: tuple[Path, Any]) -> None:
    work, compiled = typescript_client
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert all((work / name).exists() for name in ("flow.mjs", "documented_example.mjs", "documented_stream.mjs"))
    assert json.loads((work / "tsconfig.json").read_text())["compilerOptions"]["strict"] is True


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "API_TOKEN"])
def test_typescript_client_drives_a_whole_session(typescript_client: tuple[Path, Any], start_server: Any,
                                                  token: str | None) -> None:
    work, compiled = typescript_client
    assert compiled.returncode == 0, "flow.mts does not compile: " + compiled.stdout
    server = start_server(**({"API_TOKEN": token} if token else {}))
    session = run(["node", "flow.mjs"], work, AGENT_RUNNER_URL=server.url, API_TOKEN=token or "")
    assert session.returncode == 0, session.stdout + session.stderr
    check_session_on_the_server(server, json.loads(session.stdout), token)


def check_session_on_the_server(server: ServerProcess, session: dict[str, Any], token: str | None) -> None:
    """What the server saw of a session script: its two runs done, one 409 and one unknown agent."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    runs = httpx.get(server.url + "/agents/runs", params={"user_id": session["user_id"]}, headers=headers).json()
    assert [run["run_id"] for run in runs["runs"]] == session["runs"][::-1]
    assert {run["state"] for run in runs["runs"]} == {"DONE"}
    assert session["streamed"][-1] == "DONE" and session["streamed"][0] in ("PENDING", "RUNNING")  # read live
    assert server.wait_for_event("run_rejected", user_id=session["user_id"])
    assert server.wait_for_event("unsupported_agent_type", agent_type="no-such-agent", user_id=session["user_id"])
    if token:
        assert server.wait_for_event("http_request", path="/agents", status=401)
