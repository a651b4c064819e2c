"""/metrics as Prometheus reads it: OpenMetrics when asked, the classic text format otherwise, both parsed by
prometheus_client's own parsers and linted by ``promtool check metrics``; the request-duration histogram by route
template; the build info."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_classic

import agent_runner
from conftest import ServerProcess, missing_tool

# What Prometheus's scraper sends (its default scrape protocols, OpenMetrics first).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
                     "q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that has answered a few requests: a run and its status, an unknown path, an unknown run."""
    server = ServerProcess(tmp_path_factory.mktemp("metrics") / "server.log")
    run_id = server.start_run("sleeper", seconds=0)
    server.wait_run(run_id)
    assert server.client.get("/no/such/page").status_code == 404
    assert server.client.get(f"/agents/status/{uuid.uuid4()}").status_code == 404
    yield server
    server.stop()


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        missing_tool("promtool", "apt-get install prometheus")
    return subprocess.run([binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def families(parsed: Any) -> dict[str, Any]:
    return {family.name: family for family in parsed}


def test_openmetrics_when_the_accept_header_asks_for_it(metrics_server: ServerProcess) -> None:
    bare = metrics_server.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert bare.headers["content-type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    response = metrics_server.client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert response.headers["content-type"] == \
        "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"  # as asked, a version
    assert response.headers["vary"] == "Accept"
    assert response.text.endswith("\n# EOF\n")
    found = families(parse_openmetrics(response.text))  # strict: it refuses a text without # EOF
    assert found["agent_runner_runs"].type == "counter"  # an OpenMetrics counter family has no _total
    assert found["agent_runner_http_request_duration_seconds"].type == "histogram"
    assert found["agent_runner_build_info"].type == "gauge"


def test_the_classic_text_format_otherwise(metrics_server: ServerProcess) -> None:
    for accept in (None, "text/plain", "*/*", "application/json"):
        response = metrics_server.client.get("/metrics", headers={"Accept": accept} if accept else {})
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", accept
        assert "# EOF" not in response.text
        found = families(parse_classic(response.text))
        assert found["agent_runner_runs"].type == "counter"


def test_promtool_finds_nothing_to_fix_in_the_classic_format(metrics_server: ServerProcess) -> None:
    linted = promtool(metrics_server.client.get("/metrics").text)
    assert linted.returncode == 0 and linted.stdout == "" and linted.stderr == "", linted


def test_promtool_reads_the_openmetrics_format_and_finds_only_its_counter_naming(
        metrics_server: ServerProcess) -> None:
    """promtool lints the classic format: it parses OpenMetrics (``# EOF`` is a comment to it), and its only
    findings there are the counters, whose OpenMetrics family name (its HELP) lacks the samples' ``_total``."""
    text = metrics_server.client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT}).text
    linted = promtool(text)
    counters = {family.name + "_total" for family in parse_openmetrics(text) if family.type == "counter"}
    findings = (linted.stdout + linted.stderr).splitlines()
    assert "error" not in linted.stdout + linted.stderr and linted.returncode in (0, 3), linted
    assert findings and all(re.fullmatch(r"(\S+) no help text", line) and line.split()[0] in counters
                            for line in findings), findings


def test_request_durations_are_a_histogram_by_route_template_method_and_status(
        metrics_server: ServerProcess) -> None:
    text = metrics_server.client.get("/metrics").text
    samples = [sample for family in parse_classic(text) for sample in family.samples]

    def value(name: str, **labels: str) -> float:
        return sum(sample.value for sample in samples
                   if sample.name == name and all(sample.labels.get(key) == want for key, want in labels.items()))

    status = {"method": "GET", "route": "/agents/status/{run_id}"}
    assert value("agent_runner_http_request_duration_seconds_count", **status, status="200") >= 1
    assert value("agent_runner_http_request_duration_seconds_count", **status, status="404") == 1
    assert value("agent_runner_http_request_duration_seconds_count", route="<unmatched>", status="404") == 1
    assert value("agent_runner_http_request_duration_seconds_bucket", **status, status="404", le="+Inf") == 1
    assert value("agent_runner_http_request_duration_seconds_sum", method="POST", route="/agents/run") > 0
    for labels in ({**status, "status": "404"}, {"route": "<unmatched>"}):  # one count per request counted
        assert value("agent_runner_http_request_duration_seconds_count", **labels) == \
            value("agent_runner_http_requests_total", **labels)
    assert "/no/such/page" not in text and not re.search(r"/agents/status/[0-9a-f]{8}-", text)  # no raw paths


def test_build_info_names_the_running_version(metrics_server: ServerProcess) -> None:
    for accept in ("text/plain", PROMETHEUS_ACCEPT):
        response = metrics_server.client.get("/metrics", headers={"Accept": accept})
        assert f'agent_runner_build_info{{version="{agent_runner.__version__}"}} 1.0' in response.text.splitlines()

