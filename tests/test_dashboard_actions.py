"""The dashboard's actions and chart in a real headless Chromium, with API_TOKEN: cancel a run (after a
confirmation), start a run from the form, and the last hour's chart with the counts the API gives."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HERE, ServerProcess, new_user, wait_until
from test_dashboard import AGENTS, TOKEN, WAIT_MS, Tab, browser, start  # noqa: F401 - browser is a fixture

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("actions") / "server.log", AGENT_MODULES=AGENTS, API_TOKEN=TOKEN)
    yield srv
    srv.stop(signal.SIGKILL)


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:  # noqa: F811 - the fixture imported above
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    yield Tab(context)
    context.close()


def signed_in(tab: Tab, srv: ServerProcess) -> Tab:
    tab.open(srv.url).expect_status("token", "API token needed")
    tab.page.get_by_label("API token").fill(TOKEN)
    tab.page.get_by_role("button", name="Connect").click()
    tab.expect_status("live", "Live")
    return tab


def finished(srv: ServerProcess, run_id: str) -> None:
    wait_until(lambda: state_of(srv, run_id) in ("DONE", "ERROR", "CANCELLED"), 20, f"run {run_id} to finish")


def state_of(srv: ServerProcess, run_id: str) -> str:
    return str(srv.client.get(f"/agents/status/{run_id}", headers=AUTH).json()["state"])


def test_cancel_a_running_and_a_waiting_run_only_after_confirming(token_server: ServerProcess, tab: Tab) -> None:
    from playwright.sync_api import expect
    srv = token_server
    page = signed_in(tab, srv).page
    running = start(srv, "hanging", token=TOKEN)
    waiting = start(srv, "sleeper", token=TOKEN, on_busy="enqueue", input={"seconds": 0.1})
    card = page.locator(f'#running li[data-run-id="{running}"]')
    expect(card).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(f'#waiting li[data-run-id="{waiting}"]')).to_be_visible(timeout=WAIT_MS)

    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    card.get_by_role("button", name=f"Cancel run {running}").click()
    page.wait_for_timeout(500)
    assert asked == [f"Cancel hanging run {running[:8]} (running)?"]
    assert state_of(srv, running) == "RUNNING"  # dismissed: nothing sent

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f'#waiting li[data-run-id="{waiting}"]').get_by_role("button", name=f"Cancel run {waiting}").click()
    expect(tab.row(waiting)).to_have_attribute("data-state", "CANCELLED", timeout=WAIT_MS)
    expect(page.locator("#notice")).to_have_text(f"Cancelled sleeper run {waiting[:8]}.")

    tab.row(running).get_by_role("button", name=f"Show run {running}").click()  # and from its detail
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#detail-cancel").click()
    expect(tab.row(running)).to_have_attribute("data-state", "CANCELLED", timeout=WAIT_MS)
    expect(page.locator("#detail-cancel")).to_be_hidden()
    assert state_of(srv, running) == state_of(srv, waiting) == "CANCELLED"
    tab.expect_no_reload_and_no_errors()


def test_start_a_run_from_the_form_with_agent_type_user_input_and_on_busy(token_server: ServerProcess,
                                                                         tab: Tab) -> None:
    from playwright.sync_api import expect
    srv = token_server
    page = signed_in(tab, srv).page
    registered = sorted(agent["agent_type"] for agent in srv.client.get("/agents", headers=AUTH).json()["agents"])
    expect(page.locator("#start-agent option")).to_have_count(len(registered), timeout=WAIT_MS)
    assert page.locator("#start-agent option").all_inner_texts() == registered
    assert uuid.UUID(page.locator("#start-user").input_value()).version == 4  # a fresh user id to start with

    page.get_by_label("Input (JSON)").fill("{not json")
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator("#notice")).to_contain_text("The input is not JSON")

    user = new_user()
    blocker = start(srv, "hanging", token=TOKEN)  # busy: the form's run has to wait (on_busy enqueue)
    page.get_by_label("Agent", exact=True).select_option("sleeper")
    page.get_by_label("User id").fill(user)
    page.get_by_label("Input (JSON)").fill('{"seconds": 0.2, "note": "from the dashboard"}')
    page.get_by_label("When busy").select_option("enqueue")
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator("#notice")).to_contain_text("Started sleeper run", timeout=WAIT_MS)
    expect(page.locator("#notice")).to_contain_text("waiting at #1")
    listed = srv.client.get("/agents/runs", params={"user_id": user}, headers=AUTH).json()["runs"]
    assert [(run["agent_type"], run["input"]) for run in listed] == [
        ("sleeper", {"seconds": 0.2, "note": "from the dashboard"})]
    expect(page.locator("#detail-title")).to_have_text(f"Run {listed[0]['run_id']}")  # opened at once
    assert srv.client.post(f"/agents/cancel/{blocker}", headers=AUTH).status_code in (200, 202)
    expect(page.locator("#detail-state")).to_have_text("DONE", timeout=WAIT_MS)

    page.get_by_label("Agent", exact=True).select_option("sleeper")  # refused: the service says why
    page.get_by_label("User id").fill("not-a-uuid")
    page.get_by_label("Input (JSON)").fill("{}")
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator("#notice")).to_have_attribute("data-kind", "error")
    expect(page.locator("#notice")).to_contain_text("user_id")
    tab.expect_no_reload_and_no_errors()


def nearest_rank(values: list[float], p: int) -> float:
    return sorted(values)[max(0, math.ceil(p / 100 * len(values)) - 1)]


def test_the_chart_counts_the_last_hours_runs_per_minute_by_state_with_duration_percentiles(
        tmp_path: Path, tab: Tab) -> None:
    from playwright.sync_api import expect
    srv = ServerProcess(tmp_path / "server.log", AGENT_MODULES=AGENTS, API_TOKEN=TOKEN)
    try:
        for seconds in (0.05, 0.2, 0.4):
            finished(srv, start(srv, "sleeper", token=TOKEN, input={"seconds": seconds}))
        finished(srv, start(srv, "failing", token=TOKEN))
        hanging = start(srv, "hanging", token=TOKEN)
        srv.client.post(f"/agents/cancel/{hanging}", headers=AUTH)
        finished(srv, hanging)
        page = signed_in(tab, srv).page
        bars = page.locator("#chart rect")

        def counts() -> Counter[str]:
            totals: Counter[str] = Counter()
            for bar in bars.all():
                totals[bar.get_attribute("data-state") or ""] += int(bar.get_attribute("data-count") or 0)
            return totals

        expect(bars.first).to_be_visible(timeout=WAIT_MS)
        assert counts() == {"DONE": 3, "ERROR": 1, "CANCELLED": 1}
        runs = srv.client.get("/agents/runs", headers=AUTH).json()["runs"]
        durations = [(datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"]))
                     .total_seconds() * 1000 for run in runs]
        text = page.locator("#durations")
        assert [float(text.get_attribute(f"data-p{p}-ms") or "nan") for p in (50, 90, 99)] == pytest.approx(
            [nearest_rank(durations, p) for p in (50, 90, 99)], abs=1)
        expect(text).to_contain_text("Duration of the 5 finished: p50")
        assert {int(bar.get_attribute("data-minute") or 0) for bar in bars.all()} <= {
            int(datetime.fromisoformat(run["created_at"]).timestamp() // 60) for run in runs}

        finished(srv, start(srv, "sleeper", token=TOKEN, input={"seconds": 0.05}))  # live, without a reload
        page.wait_for_function("[...document.querySelectorAll('#chart rect[data-state=DONE]')]"
                               ".reduce((sum, bar) => sum + Number(bar.dataset.count), 0) === 4", timeout=WAIT_MS)
        assert counts() == {"DONE": 4, "ERROR": 1, "CANCELLED": 1}
        assert httpx.get(srv.url + "/agents/runs").status_code == 401  # the page did all this with the token
        tab.expect_no_reload_and_no_errors()
    finally:
        srv.stop(signal.SIGKILL)


def test_the_docs_screenshot_tool_shoots_the_real_page(tmp_path: Path, browser: Any) -> None:  # noqa: F811
    """tools/dashboard_screenshot.py made docs/dashboard.png; it still runs against today's page."""
    out = tmp_path / "dashboard.png"
    shot = subprocess.run([sys.executable, HERE / "tools" / "dashboard_screenshot.py", "--out", out], cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stdout + shot.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    assert (HERE / "docs" / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
