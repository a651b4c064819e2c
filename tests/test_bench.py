"""bench.py must keep working: a --quick run measures every figure and prints the JSON's figures as the table.

No speed is asserted; each figure only has to be a plausible measurement of its kind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import HERE, missing_tool

LOAD = {"baseline_rps", "service_rps", "rps_ratio", "baseline_p99_ms", "service_p99_ms", "p99_ratio"}
FIGURES = {
    "get_status": LOAD, "post_busy": LOAD, "launch": {"baseline_ms", "service_ms", "ratio"},
    "runs_per_second": {"runs", "runs_per_second"},
    "rss": {"retention", "runs_first", "runs_second", "rss_first_mb", "rss_second_mb", "growth"},
    "queued_throughput": {"runs", "memory", "redis"},
    "footprint": {"site_packages_mb"}, "redis_get_status": {"memory_rps", "redis_rps", "ratio"},
    "bare_status": LOAD, "drain": {"short", "long", "memory", "redis", "redis_short", "redis_2", "flatness"},
    "postgres": {"runs", "drain_rps", "peer_drain_rps", "drain_ratio", "memory_status_rps", "status_rps",
                 "status_ratio"},
}
DRAIN = {"rps", "client_rps", "commands_per_run", "gap_mean_ms", "gap_p50_ms", "gap_p99_ms"}
TARGETS = {  # every row whose target is checked, and the target it prints
    "GET status req/s": ">= 0.90", "GET status p99 ms": "<= 1.5", "POST busy (409) req/s": ">= 0.80",
    "POST busy (409) p99 ms": "<= 1.5", "launch to /healthz ms": "<= 1.25",
    "queued runs/s, memory (vs back to back)": ">= 1.0", "queued runs/s, Redis (vs back to back)": ">= 1.0",
    "RSS MB after 500/2500 runs": "<= +10 %", "site-packages MB": "<= 32",
    "Redis GET status req/s (vs memory)": ">= 0.50", "Postgres GET status req/s (vs memory)": ">= 0.50",
    "GET status vs bare ASGI req/s": ">= 0.70", "GET status vs bare ASGI p99 ms": "<= 1.5",
    "drain Redis commands/run, 1 replica": "<= 30",
    "drain handoff gap p50 ms, Redis 1 replica": "<= 0.5", "drain handoff gap p99 ms, Redis 1 replica": "<= 2",
    "drain handoff gap p50 ms, Redis 2 replicas": "<= 0.5", "drain handoff gap p99 ms, Redis 2 replicas": "<= 2",
    "drain runs/s, Redis 100 queued (vs 20)": ">= 0.90",
}


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table: first cell -> the other cells."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows}


def shows(cell: str, value: float) -> bool:
    """The cell is the value rounded to the cell's own number of decimals."""
    number = cell.split()[0]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) - value) <= 0.5 * 10 ** -decimals + 1e-9


def test_quick_bench_measures_every_figure_and_prints_them_as_the_table(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        missing_tool("wrk", "apt-get install wrk")
    output = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--output", str(output)], cwd=HERE,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in FIGURES:
        assert f"] {name} ..." in result.stdout  # one progress line per figure
    report = json.loads(output.read_text())
    assert report["quick"] is True and report["cores"] >= 1
    figures = report["results"]
    assert {name: set(values) for name, values in figures.items()} == FIGURES  # every one measured, none skipped

    # Plausible measurements: a wrong unit, an empty wrk run or a crashed server falls outside these.
    for name in ("get_status", "bare_status", "post_busy"):
        load = figures[name]
        assert 50 < load["baseline_rps"] < 1e6 and 50 < load["service_rps"] < 1e6, load
        assert 0.01 < load["baseline_p99_ms"] < 5000 and 0.01 < load["service_p99_ms"] < 5000, load
        assert abs(load["rps_ratio"] - load["service_rps"] / load["baseline_rps"]) < 1e-9
        assert abs(load["p99_ratio"] - load["service_p99_ms"] / load["baseline_p99_ms"]) < 1e-9
    launch = figures["launch"]
    assert 10 < launch["baseline_ms"] < 20000 and 10 < launch["service_ms"] < 20000, launch
    assert figures["runs_per_second"]["runs"] == 200 and 1 < figures["runs_per_second"]["runs_per_second"] < 1e5
    rss = figures["rss"]
    assert (rss["retention"], rss["runs_first"], rss["runs_second"]) == (250, 500, 2500)
    assert 10 < rss["rss_first_mb"] < 2000 and 10 < rss["rss_second_mb"] < 2000, rss
    assert abs(rss["growth"] - (rss["rss_second_mb"] / rss["rss_first_mb"] - 1)) < 1e-9
    assert 1 < figures["footprint"]["site_packages_mb"] < 500
    in_redis = figures["redis_get_status"]
    assert 50 < in_redis["memory_rps"] < 1e6 and 50 < in_redis["redis_rps"] < 1e6, in_redis
    queued = figures["queued_throughput"]
    assert queued["runs"] == 50
    for mode in ("memory", "redis"):
        assert set(queued[mode]) == {"back_to_back_rps", "queued_rps", "ratio"}, queued
        assert 1 < queued[mode]["back_to_back_rps"] < 1e5 and 1 < queued[mode]["queued_rps"] < 1e5, queued
        assert abs(queued[mode]["ratio"] - queued[mode]["queued_rps"] / queued[mode]["back_to_back_rps"]) < 1e-9
    postgres = figures["postgres"]
    assert postgres["runs"] == 50 and 1 < postgres["drain_rps"] < 1e5 and 1 < postgres["peer_drain_rps"] < 1e5
    assert 50 < postgres["memory_status_rps"] < 1e6 and 50 < postgres["status_rps"] < 1e6, postgres

    drain = figures["drain"]
    assert (drain["short"], drain["long"]) == (20, 100)
    for mode in ("memory", "redis", "redis_short", "redis_2"):
        assert set(drain[mode]) == DRAIN, drain
        assert 1 < drain[mode]["rps"] < 1e5 and 0 <= drain[mode]["gap_p50_ms"] <= drain[mode]["gap_p99_ms"] < 5000
    assert drain["memory"]["commands_per_run"] == 0 and 1 < drain["redis"]["commands_per_run"] < 10000, drain
    assert abs(drain["flatness"] - drain["redis"]["rps"] / drain["redis_short"]["rps"]) < 1e-9

    # The table shows exactly those figures.
    rows = table_rows(result.stdout)
    expected = {
        "GET status req/s": [figures["get_status"][key] for key in ("baseline_rps", "service_rps", "rps_ratio")],
        "GET status p99 ms": [figures["get_status"][key] for key in ("baseline_p99_ms", "service_p99_ms", "p99_ratio")],
        "POST busy (409) req/s": [figures["post_busy"][key] for key in ("baseline_rps", "service_rps", "rps_ratio")],
        "POST busy (409) p99 ms": [figures["post_busy"][key]
                                   for key in ("baseline_p99_ms", "service_p99_ms", "p99_ratio")],
        "launch to /healthz ms": [launch["baseline_ms"], launch["service_ms"], launch["ratio"]],
        "runs/s back to back": [None, figures["runs_per_second"]["runs_per_second"], None],
        **{f"queued runs/s, {name} (vs back to back)": [queued[mode][key] for key in
                                                        ("back_to_back_rps", "queued_rps", "ratio")]
           for mode, name in (("memory", "memory"), ("redis", "Redis"))},
        "RSS MB after 500/2500 runs": [rss["rss_first_mb"], rss["rss_second_mb"], rss["growth"] * 100],
        "site-packages MB": [None, figures["footprint"]["site_packages_mb"], None],
        "Redis GET status req/s (vs memory)": [in_redis["memory_rps"], in_redis["redis_rps"], in_redis["ratio"]],
        "GET status vs bare ASGI req/s": [figures["bare_status"][key] for key in ("baseline_rps", "service_rps",
                                                                                  "rps_ratio")],
        "GET status vs bare ASGI p99 ms": [figures["bare_status"][key] for key in ("baseline_p99_ms",
                                                                                   "service_p99_ms", "p99_ratio")],
        "drain runs/s, memory, 100 queued": [None, drain["memory"]["rps"], None],
        "drain handoff gap ms, memory (p50 / p99)": [None, drain["memory"]["gap_p50_ms"], None],
        **{f"drain runs/s, Redis {name} (vs memory)": [drain["memory"]["rps"], drain[mode]["rps"],
                                                        drain[mode]["rps"] / drain["memory"]["rps"]]
           for mode, name in (("redis", "1 replica"), ("redis_2", "2 replicas"))},
        **{f"drain Redis commands/run, {name}": [None, drain[mode]["commands_per_run"], None]
           for mode, name in (("redis", "1 replica"), ("redis_2", "2 replicas"))},
        **{f"drain handoff gap {p} ms, Redis {name}": [None, drain[mode][f"gap_{p}_ms"], None]
           for mode, name in (("redis", "1 replica"), ("redis_2", "2 replicas")) for p in ("p50", "p99")},
        "drain runs/s, Redis 100 queued (vs 20)": [drain["redis_short"]["rps"], drain["redis"]["rps"],
                                                   drain["flatness"]],
        "Postgres queued runs/s (vs pgqueuer, one at a time)": [postgres[key] for key in
                                                                ("peer_drain_rps", "drain_rps", "drain_ratio")],
        "Postgres GET status req/s (vs memory)": [postgres[key] for key in
                                                  ("memory_status_rps", "status_rps", "status_ratio")],
    }
    assert set(rows) == {"figure", *expected}
    for label, values in expected.items():
        for cell, value in zip(rows[label], values):
            assert cell == "" if value is None else shows(cell, value), (label, rows[label], values)

    # Each checked figure prints its target and whether it holds, computed from the figure itself.
    checked = {
        "GET status req/s": figures["get_status"]["rps_ratio"], "GET status p99 ms": figures["get_status"]["p99_ratio"],
        "POST busy (409) req/s": figures["post_busy"]["rps_ratio"],
        "POST busy (409) p99 ms": figures["post_busy"]["p99_ratio"], "launch to /healthz ms": launch["ratio"],
        "queued runs/s, memory (vs back to back)": queued["memory"]["ratio"],
        "queued runs/s, Redis (vs back to back)": queued["redis"]["ratio"],
        "RSS MB after 500/2500 runs": rss["growth"] * 100,
        "site-packages MB": figures["footprint"]["site_packages_mb"],
        "Redis GET status req/s (vs memory)": in_redis["ratio"],
        "GET status vs bare ASGI req/s": figures["bare_status"]["rps_ratio"],
        "GET status vs bare ASGI p99 ms": figures["bare_status"]["p99_ratio"],
        "drain Redis commands/run, 1 replica": drain["redis"]["commands_per_run"],
        **{f"drain handoff gap {p} ms, Redis {name}": drain[mode][f"gap_{p}_ms"]
           for mode, name in (("redis", "1 replica"), ("redis_2", "2 replicas")) for p in ("p50", "p99")},
        "drain runs/s, Redis 100 queued (vs 20)": drain["flatness"],
        "Postgres GET status req/s (vs memory)": postgres["status_ratio"],
    }
    for label, target in TARGETS.items():
        assert rows[label][3] == target, (label, rows[label])
        op, limit = target.split()[:2]
        holds = checked[label] >= float(limit) if op == ">=" else checked[label] <= float(limit)
        assert rows[label][4] == ("yes" if holds else "NO"), (label, rows[label])
        assert report["targets"][label] == {"target": target, "holds": rows[label][4] == "yes"}
    assert rows["runs/s back to back"][3:] == ["printed", ""]
    assert set(report["targets"]) == set(TARGETS)
    missed = [label for label in TARGETS if rows[label][4] == "NO"]
    assert f"targets: {len(TARGETS) - len(missed)} of {len(TARGETS)} hold" in result.stdout


def test_the_tracing_figure_measures_tracing_off_against_on(tmp_path: Path) -> None:
    """``--only tracing`` (not in the full run): GET status and runs back to back, tracing off and on."""
    if shutil.which("wrk") is None:
        missing_tool("wrk", "apt-get install wrk")
    output = tmp_path / "bench-results.json"
    result = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--only", "tracing", "--output", str(output)],
                            cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    figure = json.loads(output.read_text())["results"]["tracing"]
    assert 50 < figure["off_rps"] < 1e6 and 50 < figure["on_rps"] < 1e6, figure
    assert 1 < figure["off_cpu_us"] < 1e5 and 1 < figure["on_cpu_us"] < 1e5, figure
    assert 1 < figure["runs_off_per_s"] < 1e5 and 1 < figure["runs_on_per_s"] < 1e5, figure
    rows = table_rows(result.stdout)
    assert rows["GET status req/s, tracing on (vs off)"][3] == "printed"
    assert shows(rows["runs/s back to back, tracing on (vs off)"][2], figure["runs_ratio"])


def test_peer_drains_are_timed_from_the_stamps_of_their_jobs() -> None:
    """``--peers`` (not run here: it installs Celery and arq) times every system the same way."""
    sys.path.insert(0, str(HERE / "tools"))
    from bench import gaps_and_rate, peer_rows

    figure = gaps_and_rate([(2.0, 2.001), (1.0, 1.001), (1.002, 1.003)])
    assert figure["overlaps"] == 0 and abs(figure["rps"] - 2 / 1.001) < 1e-9
    assert abs(figure["gap_p50_ms"] - 997) < 1e-6 and abs(figure["gap_mean_ms"] - (1 + 997) / 2) < 1e-6
    assert gaps_and_rate([(1.0, 1.5), (1.2, 1.3)])["overlaps"] == 1  # two jobs at once: a broken slot
    same = {"rps": 100.0, "commands_per_run": 10.0, "gap_p50_ms": 1.0, "gap_p99_ms": 2.0}
    lines = peer_rows({"agent-runner": {**same, "rps": 200.0}, "agent-runner x2": same, "celery": same,
                       "arq": {**same, "rps": 400.0}})
    assert lines[1] == ("agent-runner", "200", "10.0", "1.00", "2.00", "2.00", "0.50")
