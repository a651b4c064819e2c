"""The dashboard screenshot in the docs (docs/dashboard.png), taken from the real page in Chromium.

    python tools/dashboard_screenshot.py                  # writes docs/dashboard.png
    python tools/dashboard_screenshot.py --out shot.png   # elsewhere

Starts a server on a free port with the test agents (tests/fixture_*.py) and API_TOKEN, gives it an hour's
worth of variety in a few seconds (runs done, failed, cancelled, one running with its log, one waiting),
signs in through the page's token form, opens the running run's detail and saves the whole page. Needs the
system ``chromium`` and the ``playwright`` pip package (it downloads no browser).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent.parent
TOKEN = "screenshot-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(client: httpx.Client, agent_type: str, on_busy: str = "enqueue", **input: Any) -> str:
    response = client.post("/agents/run", headers=AUTH, json={
        "agent_type": agent_type, "user_id": str(uuid.uuid4()), "input": input, "on_busy": on_busy})
    response.raise_for_status()
    return str(response.json()["run_id"])


def wait_state(client: httpx.Client, run_id: str, states: tuple[str, ...], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/agents/status/{run_id}", headers=AUTH).json()["state"] in states:
            return
        time.sleep(0.05)
    raise SystemExit(f"run {run_id} never reached {states}")


def fill(client: httpx.Client) -> str:
    """Runs in every state; returns the id of the one left running (with a log)."""
    finished = ("DONE", "ERROR", "CANCELLED")
    for seconds in (0.3, 0.8, 0.5, 1.2, 0.4, 0.6):
        wait_state(client, post(client, "sleeper", seconds=seconds), finished)
    wait_state(client, post(client, "failing", message="scanner offline"), finished)
    hanging = post(client, "hanging")
    wait_state(client, hanging, ("RUNNING",))
    client.post(f"/agents/cancel/{hanging}", headers=AUTH).raise_for_status()
    wait_state(client, post(client, "sleeper", seconds=0.9), finished)
    chatty = post(client, "chatty", steps=40, interval=0.5, note="reading page")
    wait_state(client, chatty, ("RUNNING",))
    post(client, "sleeper", seconds=0.5)  # waits behind it
    return chatty


def shoot(url: str, chatty: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=["--disable-gpu", "--no-first-run"])
        page = browser.new_context(viewport={"width": 1280, "height": 1000}, color_scheme="light").new_page()
        page.goto(url + "/")
        page.get_by_label("API token").fill(TOKEN)
        page.get_by_role("button", name="Connect").click()
        expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=10_000)
        page.locator(f'#running li[data-run-id="{chatty}"]').get_by_role("button", name=f"Show run {chatty}").click()
        # a locator, not wait_for_function: a string predicate is eval'd, which the page's CSP refuses
        expect(page.locator("#log li").nth(3)).to_be_attached(timeout=10_000)
        expect(page.locator("#chart rect").first).to_be_visible()
        page.get_by_label("Agent", exact=True).select_option("sleeper")
        page.get_by_label("Input (JSON)").fill('{"seconds": 2}')
        page.locator("#start-input").blur()  # no focus ring in the picture
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "docs" / "dashboard.png")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "API_TOKEN": TOKEN,
           "AGENT_MODULES": "fixture_agents,fixture_dashboard_agents", "PYTHONPATH": str(HERE / "tests")}
    with tempfile.TemporaryFile() as server_log:
        server = subprocess.Popen([sys.executable, "agent_runner.py"], cwd=HERE, env=env, stdout=server_log,
                                  stderr=subprocess.STDOUT)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    server_log.seek(0)
                    raise SystemExit("the server did not start:\n" + server_log.read().decode(errors="replace"))
                time.sleep(0.1)
            shoot(f"http://127.0.0.1:{port}", fill(client), args.out)
        finally:
            server.kill()  # the run left going would hold a graceful shutdown for its grace period
            server.wait(10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
