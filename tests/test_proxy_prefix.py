"""Behind a real nginx that serves the service under /runner/ (stripping the prefix), with ROOT_PATH=/runner.

Links (Location), /docs, /openapi.json's servers and the dashboard's requests carry the prefix; the token is
needed on every /agents route; the client nginx forwards reaches the log only from a trusted proxy.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ServerProcess, free_port, missing_tool, new_user
from test_dashboard import AGENTS, WAIT_MS, Tab, browser, tab  # noqa: F401 (fixtures used below)

TOKEN = "prefix-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

NGINX_CONF = """
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /runner/ {{
            proxy_pass http://127.0.0.1:{upstream}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground on a free port, proxying /runner/ to ``upstream``."""

    def __init__(self, directory: Path, upstream: int) -> None:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if binary is None:
            missing_tool("nginx", "apt-get install nginx")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=self.port, upstream=upstream))
        self.proc = subprocess.Popen([str(binary), "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (directory / "error.log").read_text()
            try:
                if httpx.get(self.url + "/runner/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Nginx]]:
    directory = tmp_path_factory.mktemp("prefix")
    server = ServerProcess(directory / "server.log", API_TOKEN=TOKEN, ROOT_PATH="/runner",
                           FORWARDED_ALLOW_IPS="127.0.0.1", AGENT_MODULES=AGENTS)
    nginx = Nginx(directory, server.port)
    yield server, nginx
    nginx.stop()
    server.stop()


def test_every_agents_route_needs_the_token_through_the_prefix(behind_nginx: tuple[ServerProcess, Nginx]) -> None:
    _, nginx = behind_nginx
    for path in ("/agents", "/agents/runs", f"/agents/status/{new_user()}", "/agents/events"):
        assert httpx.get(nginx.url + "/runner" + path).status_code == 401, path
        with httpx.stream("GET", nginx.url + "/runner" + path, headers=AUTH) as answer:  # /agents/events never ends
            assert answer.status_code in (200, 404), path
    assert httpx.post(nginx.url + "/runner/agents/run", json={}).status_code == 401


def test_location_points_inside_the_prefix_and_leads_to_the_run(behind_nginx: tuple[ServerProcess, Nginx]) -> None:
    _, nginx = behind_nginx
    accepted = httpx.post(nginx.url + "/runner/agents/run", headers=AUTH,
                          json={"agent_type": "sleeper", "user_id": new_user(), "input": {"seconds": 0}})
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["location"]
    assert location == f"/runner/agents/status/{accepted.json()['run_id']}"
    followed = httpx.get(nginx.url + location, headers=AUTH, params={"wait": 5})
    assert followed.status_code == 200 and followed.json()["run_id"] == accepted.json()["run_id"]


def test_docs_and_the_json_spec_name_the_prefix(behind_nginx: tuple[ServerProcess, Nginx]) -> None:
    _, nginx = behind_nginx
    page = httpx.get(nginx.url + "/runner/docs").text
    assert 'data-spec="/runner/openapi.json"' in page
    spec = httpx.get(nginx.url + "/runner/openapi.json").json()
    assert spec["servers"] == [{"url": "/runner"}]
    assert httpx.get(nginx.url + "/runner/openapi.yaml").status_code == 200


def test_the_client_nginx_forwards_is_logged_from_a_trusted_proxy(behind_nginx: tuple[ServerProcess, Nginx]) -> None:
    server, nginx = behind_nginx
    assert httpx.get(nginx.url + "/runner/healthz", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    deadline = time.monotonic() + 5  # info lines reach the file within a second
    clients: list[Any] = []
    while time.monotonic() < deadline:
        clients = [line["client"] for line in server.events("http_request") if line["path"] == "/runner/healthz"]
        if "203.0.113.9" in clients and len(clients) >= 2:
            break
        time.sleep(0.1)
    assert "203.0.113.9" in clients, clients
    # nginx's own health checks came from 127.0.0.1 (its X-Forwarded-For holds 127.0.0.1 itself)
    assert set(clients) <= {"203.0.113.9", "127.0.0.1"}


def test_the_dashboard_works_under_the_prefix_in_a_real_browser(behind_nginx: tuple[ServerProcess, Nginx],
                                                                tab: Tab) -> None:
    from playwright.sync_api import expect
    _, nginx = behind_nginx
    tab.page.goto(nginx.url + "/runner/")
    tab.page.get_by_label("API token").fill(TOKEN)
    tab.page.get_by_role("button", name="Connect").click()
    tab.expect_status("live", "Live")
    accepted = httpx.post(nginx.url + "/runner/agents/run", headers=AUTH,
                          json={"agent_type": "sleeper", "user_id": new_user(), "input": {"seconds": 0.3}})
    assert accepted.status_code == 202
    expect(tab.row(accepted.json()["run_id"])).to_have_attribute("data-state", "DONE", timeout=WAIT_MS)
    # the one refusal is the page's first try without a token; nothing failed to load or run otherwise
    assert [error for error in tab.errors if "401" not in error] == []
