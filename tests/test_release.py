"""The release pipeline as a specification: release.yml's gates, tags, permissions and pins, the one version,
the changelog, and .ci/release.py, which the workflow runs to check the tag and to write the release notes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE_SCRIPT = ROOT / ".ci" / "release.py"
SHA_PIN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")
RELEASE_HEADING = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", re.M)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True


def needs(job: dict[str, Any]) -> list[str]:
    value = job.get("needs", [])
    return [value] if isinstance(value, str) else value


def upstream(jobs: dict[str, Any], name: str) -> set[str]:
    """Every job that must succeed before `name` starts."""
    seen: set[str] = set()
    pending = needs(jobs[name])
    while pending:
        job = pending.pop()
        if job not in seen:
            seen.add(job)
            pending.extend(needs(jobs[job]))
    return seen


def find_step(jobs: dict[str, Any], matches: Any) -> tuple[str, int, dict[str, Any]]:
    """The one (job, step index, step) that `matches`; fails when there is none or more than one."""
    found = [(name, index, step) for name, job in jobs.items()
             for index, step in enumerate(job.get("steps", [])) if matches(step)]
    assert len(found) == 1, f"expected one such step, found {[(name, index) for name, index, _ in found]}"
    return found[0]


def action(step: dict[str, Any], name: str) -> bool:
    return step.get("uses", "").split("@")[0] == name


def source_version() -> str:
    return re.findall(r'^__version__ = "(.+)"$', (ROOT / "agent_runner.py").read_text(), re.M)[0]


def release_script(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RELEASE_SCRIPT), *args], input=stdin,
                          capture_output=True, text=True, timeout=30)


def test_release_runs_on_version_tags_and_by_hand_only() -> None:
    on = triggers(load("release.yml"))
    assert set(on) == {"push", "workflow_dispatch"}
    assert on["push"] == {"tags": ["v[0-9]+.[0-9]+.[0-9]+"]}


def test_gates_run_in_order_check_tests_build_scan_push_sign_release() -> None:
    jobs = load("release.yml")["jobs"]
    check, _, _ = find_step(jobs, lambda step: ".ci/release.py check" in step.get("run", ""))
    [tests] = [name for name, job in jobs.items() if job.get("uses") == "./.github/workflows/ci.yml"]
    ci_steps = [step for job in load("ci.yml")["jobs"].values() for step in job["steps"]]
    assert any(step.get("run") == "bash .ci/run" for step in ci_steps)
    assert any(action(step, "hadolint/hadolint-action") for step in ci_steps)
    build, build_at, _ = find_step(jobs, lambda s: action(s, "docker/build-push-action") and not s["with"]["push"])
    scan, scan_at, trivy = find_step(jobs, lambda step: action(step, "aquasecurity/trivy-action"))
    push, _, _ = find_step(jobs, lambda s: action(s, "docker/build-push-action") and s["with"]["push"])
    sign, _, _ = find_step(jobs, lambda step: "cosign sign" in step.get("run", ""))
    release, _, _ = find_step(jobs, lambda step: "gh release create" in step.get("run", ""))

    assert check in upstream(jobs, tests)
    assert tests in upstream(jobs, build)
    assert (scan, scan_at > build_at) == (build, True)
    assert build in upstream(jobs, push)
    assert push in upstream(jobs, sign)
    assert sign in upstream(jobs, release)
    assert trivy["with"]["severity"] == "CRITICAL,HIGH"
    assert (trivy["with"]["ignore-unfixed"], trivy["with"]["exit-code"]) == (True, "1")


def test_both_platforms_are_scanned_and_pushed_from_the_same_build_cache() -> None:
    jobs = load("release.yml")["jobs"]
    build_job, _, build = find_step(jobs, lambda s: action(s, "docker/build-push-action") and not s["with"]["push"])
    _, _, push = find_step(jobs, lambda s: action(s, "docker/build-push-action") and s["with"]["push"])
    matrix = jobs[build_job]["strategy"]["matrix"]["include"]
    assert {entry["platform"] for entry in matrix} == {"linux/amd64", "linux/arm64"}
    assert set(push["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    written = {build["with"]["cache-to"].replace("${{ matrix.arch }}", entry["arch"]) for entry in matrix}
    assert {entry.replace("type=gha,mode=max,", "type=gha,") for entry in written} == \
        set(push["with"]["cache-from"].split())
    assert push["with"]["sbom"] is True
    assert push["with"]["provenance"] == "mode=max"


def test_tags_are_version_minor_and_sha_with_latest_only_beside_the_newest_release() -> None:
    jobs = load("release.yml")["jobs"]
    _, _, meta = find_step(jobs, lambda step: action(step, "docker/metadata-action"))
    on_tag = "enable=${{ github.event_name == 'push' }}"
    assert meta["with"]["flavor"] == "latest=false"
    assert meta["with"]["tags"].splitlines() == [
        f"type=semver,pattern={{{{version}}}},{on_tag}",
        f"type=semver,pattern={{{{major}}}}.{{{{minor}}}},{on_tag}",
        "type=sha,prefix=sha-,format=short",
        "type=raw,value=latest,enable=${{ github.event_name == 'push' && needs.version.outputs.latest == 'true' }}",
    ]
    assert jobs["release"]["if"] == "github.event_name == 'push'"


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_default_permissions_are_read_only(name: str) -> None:
    assert load(name)["permissions"] == {"contents": "read"}


def test_only_push_sign_and_release_may_write_and_only_what_each_needs() -> None:
    writes = {name: {scope for scope, level in job.get("permissions", {}).items() if level == "write"}
              for name, job in load("release.yml")["jobs"].items()}
    assert {name: scopes for name, scopes in writes.items() if scopes} == {
        "push": {"packages"},
        "sign": {"packages", "id-token"},
        "release": {"contents"},
    }
    assert not any("permissions" in job for job in load("ci.yml")["jobs"].values())


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_every_action_is_pinned_to_a_commit_sha_with_its_version_in_a_comment(name: str) -> None:
    jobs = load(name)["jobs"]
    uses = [step["uses"] for job in jobs.values() for step in job.get("steps", []) if "uses" in step]
    assert uses and all(SHA_PIN.match(ref) for ref in uses), [ref for ref in uses if not SHA_PIN.match(ref)]
    reusable = [job["uses"] for job in jobs.values() if "uses" in job]
    assert all(ref.startswith("./.github/workflows/") for ref in reusable)  # this repository, this commit
    commented = re.findall(r"^\s*(?:- )?uses: (\S+@[0-9a-f]{40}) # v\d+\.\d+\.\d+$",
                           (WORKFLOWS / name).read_text(), re.M)
    assert commented == uses


def test_version_is_the_newest_changelog_release() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, re.M)
    releases = RELEASE_HEADING.findall(changelog)
    assert headings[0] == "[Unreleased]"
    assert len(releases) == len(headings) - 1, "every heading but Unreleased is '[X.Y.Z] - YYYY-MM-DD'"
    assert releases == sorted(releases, key=lambda v: tuple(map(int, v.split("."))), reverse=True)
    assert releases[0] == source_version()


def test_release_check_accepts_the_version_tag_and_says_whether_it_is_the_newest() -> None:
    version = source_version()
    major, minor, patch = map(int, version.split("."))
    older, newer = f"v{major}.{minor}.{patch - 1}" if patch else "v0.0.0", f"v{major}.{minor + 10}.0"
    alone = release_script("check", f"v{version}", stdin=f"{older}\nv{version}\nnot-a-release\n")
    assert (alone.returncode, alone.stdout) == (0, f"version={version}\nlatest=true\n"), alone.stderr
    behind = release_script("check", f"v{version}", stdin=f"v{version}\n{newer}\n")
    assert (behind.returncode, behind.stdout) == (0, f"version={version}\nlatest=false\n"), behind.stderr


@pytest.mark.parametrize("tag", ["v99.0.0", "0.1.0", "v0.1", "v0.1.0-rc1"])
def test_release_check_refuses_a_tag_that_is_not_v_plus_version(tag: str) -> None:
    result = release_script("check", tag)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("release: tag ")


def test_release_notes_are_the_changelog_section_of_that_version() -> None:
    version = source_version()
    notes = release_script("notes", version)
    assert notes.returncode == 0, notes.stderr
    changelog = (ROOT / "CHANGELOG.md").read_text()
    section = changelog.split(f"## [{version}] - ", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]
    assert notes.stdout == section.strip() + "\n"
    assert "### Added" in notes.stdout and "## [" not in notes.stdout
    missing = release_script("notes", "99.0.0")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert "no dated section" in missing.stderr


def test_dependabot_watches_pip_actions_the_base_image_and_the_client_tools_lockfile() -> None:
    config = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())
    watched = {update["package-ecosystem"]: update["directory"] for update in config["updates"]}
    assert watched == {"pip": "/", "github-actions": "/", "docker": "/", "npm": "/.ci/clients"}
    assert (ROOT / ".ci" / "clients" / "package-lock.json").is_file()
