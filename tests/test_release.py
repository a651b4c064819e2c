"""The release pipeline as a specification: release.yml's gates, tags, permissions and pins, the one version,
the changelog, and .ci/release.py, which the workflow runs to check the tag and to write the release notes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import load_script

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


def release_script(*args: str, stdin: str = "", script: Path = RELEASE_SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def release_module() -> Any:
    return load_script(RELEASE_SCRIPT)


def steps_of(job: dict[str, Any], matches: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    return [step for step in job.get("steps", []) if matches(step)]


def runs(step: dict[str, Any], text: str) -> bool:
    return text in step.get("run", "")


def test_release_runs_on_version_tags_and_by_hand_only() -> None:
    on = triggers(load("release.yml"))
    assert set(on) == {"push", "workflow_dispatch"}
    assert on["push"] == {"tags": ["v[0-9]+.[0-9]+.[0-9]+"]}


def test_gates_run_in_order_check_tests_build_scan_push_sign_release() -> None:
    jobs = load("release.yml")["jobs"]
    check, _, _ = find_step(jobs, lambda step: runs(step, ".ci/release.py check"))
    [tests] = [name for name, job in jobs.items() if job.get("uses") == "./.github/workflows/ci.yml"]
    ci_steps = [step for job in load("ci.yml")["jobs"].values() for step in job["steps"]]
    assert any(step.get("run") == "bash .ci/run" for step in ci_steps)
    assert any(action(step, "hadolint/hadolint-action") for step in ci_steps)
    build, _, _ = find_step(jobs, lambda step: action(step, "docker/build-push-action"))
    scans = {name for name, job in jobs.items()
             if steps_of(job, lambda step: action(step, "aquasecurity/trivy-action"))}
    push, _, _ = find_step(jobs, lambda step: runs(step, "skopeo copy --all"))
    sign, _, _ = find_step(jobs, lambda step: runs(step, "cosign sign"))
    release, _, _ = find_step(jobs, lambda step: runs(step, "gh release create"))

    assert len(scans) == 1
    [scan] = scans
    assert check in upstream(jobs, tests)
    assert tests in upstream(jobs, build)
    assert build in upstream(jobs, scan)
    assert {build, scan} <= upstream(jobs, push)
    assert push in upstream(jobs, sign)
    assert sign in upstream(jobs, release)
    assert len({check, tests, build, scan, push, sign, release}) == 7  # each gate a job of its own


def test_each_platform_is_scanned_for_fixable_high_and_critical_findings() -> None:
    jobs = load("release.yml")["jobs"]
    release = release_module()
    trivy = [step for job in jobs.values() for step in steps_of(job, lambda s: action(s, "aquasecurity/trivy-action"))]
    split_dir = "${{ runner.temp }}/platforms"
    assert sorted(step["with"]["input"] for step in trivy) == \
        sorted(f"{split_dir}/{platform.replace('/', '-')}" for platform in release.PLATFORMS)
    for step in trivy:
        assert "image-ref" not in step["with"]  # the archive's image, not a tag that could be another image
        assert step["with"]["severity"] == "CRITICAL,HIGH"
        assert (step["with"]["ignore-unfixed"], step["with"]["exit-code"]) == (True, "1")


def test_the_image_is_built_once_for_both_platforms_with_sbom_and_provenance_into_an_oci_archive() -> None:
    jobs = load("release.yml")["jobs"]
    release = release_module()
    build_job, _, build = find_step(jobs, lambda step: action(step, "docker/build-push-action"))
    assert build["with"]["platforms"].split(",") == list(release.PLATFORMS)
    assert build["with"]["outputs"] == "type=oci,dest=${{ runner.temp }}/image.tar"
    assert not build["with"].get("push") and not build["with"].get("load")
    assert build["with"]["sbom"] is True
    assert build["with"]["provenance"] == "mode=max"
    assert "strategy" not in jobs[build_job]  # one build, not one per platform
    workflow = (WORKFLOWS / "release.yml").read_text()
    assert "docker push" not in workflow and "buildx" not in workflow.replace("setup-buildx-action", "")


def test_the_pushed_and_signed_image_is_the_archive_that_was_built_and_scanned() -> None:
    jobs = load("release.yml")["jobs"]
    build_job, _, _ = find_step(jobs, lambda step: action(step, "docker/build-push-action"))
    scan_job, _, _ = find_step(jobs, lambda step: runs(step, ".ci/release.py split"))
    push_job, _, push = find_step(jobs, lambda step: runs(step, "skopeo copy --all"))
    sign_job, _, _ = find_step(jobs, lambda step: runs(step, "cosign sign"))
    digest = "${{ needs.build.outputs.digest }}"

    # The build job records the archive's index digest and uploads the archive itself.
    recorded, _, record = find_step(jobs, lambda step: step.get("id") == "archive")
    assert recorded == build_job and jobs[build_job]["outputs"]["digest"] == "${{ steps.archive.outputs.digest }}"
    assert 'python3 .ci/release.py image "$RUNNER_TEMP/layout" | tee -a "$GITHUB_OUTPUT"' in record["run"]
    [upload] = steps_of(jobs[build_job], lambda step: action(step, "actions/upload-artifact"))
    assert upload["with"]["path"] == "${{ runner.temp }}/image.tar"

    # The scan and push jobs download that archive and refuse it unless its digest is the one recorded.
    for job in (scan_job, push_job):
        [download] = steps_of(jobs[job], lambda step: action(step, "actions/download-artifact"))
        assert (download["with"]["name"], download["with"]["path"]) == (upload["with"]["name"], "${{ runner.temp }}")
        [verify] = steps_of(jobs[job], lambda step: runs(step, ".ci/release.py image"))
        assert verify["env"]["DIGEST"] == digest
        assert 'test "$(python3 .ci/release.py image "$RUNNER_TEMP/layout")" = "digest=$DIGEST"' in verify["run"]
        assert 'tar -xf "$RUNNER_TEMP/image.tar" -C "$RUNNER_TEMP/layout"' in verify["run"]
        assert "build" in needs(jobs[job])

    # The push copies that archive unchanged to every tag, then reads each tag back: it must be that digest.
    assert push["env"]["DIGEST"] == digest
    assert push["env"]["TAGS"] == "${{ needs.build.outputs.tags }}"
    assert 'skopeo copy --all --preserve-digests "oci-archive:$RUNNER_TEMP/image.tar" "docker://$tag"' in push["run"]
    assert 'skopeo inspect --raw "docker://$tag" | sha256sum' in push["run"]
    assert '[ "$pushed" != "$DIGEST" ]' in push["run"]

    # What is signed is that digest, not whatever a tag points at by then.
    assert jobs[sign_job]["env"]["IMAGE"] == "${{ needs.version.outputs.image }}@" + digest
    assert "build" in needs(jobs[sign_job])


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


def test_only_push_sign_release_and_pages_may_write_and_only_what_each_needs() -> None:
    writes = {name: {scope for scope, level in job.get("permissions", {}).items() if level == "write"}
              for name, job in load("release.yml")["jobs"].items()}
    assert {name: scopes for name, scopes in writes.items() if scopes} == {
        "push": {"packages"},
        "sign": {"packages", "id-token"},
        "release": {"contents"},
        "pages": {"pages", "id-token"},
    }
    assert not any("permissions" in job for job in load("ci.yml")["jobs"].values())


def test_the_docs_site_is_built_strictly_after_the_release_and_published_to_pages() -> None:
    jobs = load("release.yml")["jobs"]
    build_job, _, build = find_step(jobs, lambda step: runs(step, "mkdocs build"))
    assert "mkdocs build --strict" in build["run"]
    assert "grep '^mkdocs-material==' requirements-dev.txt" in build["run"]  # the version the tests build with
    [upload] = steps_of(jobs[build_job], lambda step: action(step, "actions/upload-pages-artifact"))
    site = build["run"].split("--site-dir ", 1)[1].split()[0].strip('"')
    assert upload["with"]["path"] == site.replace("$RUNNER_TEMP", "${{ runner.temp }}")
    deploy_job, _, _ = find_step(jobs, lambda step: action(step, "actions/deploy-pages"))
    assert needs(jobs[deploy_job]) == [build_job] and jobs[deploy_job]["environment"]["name"] == "github-pages"
    assert "release" in upstream(jobs, build_job)  # the docs of a release, published once it is
    assert jobs[build_job]["if"] == "github.event_name == 'push'"


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


def test_openapi_info_version_is_the_version() -> None:
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert spec["info"]["version"] == source_version()
    assert release_script("version").stdout == f"{source_version()}\n"


@pytest.mark.parametrize("command", [["version"], ["check", "v{version}"]])
def test_release_refuses_an_openapi_version_that_differs_from_the_source(tmp_path: Path, command: list[str]) -> None:
    version = source_version()
    (tmp_path / ".ci").mkdir()
    script = Path(shutil.copy(RELEASE_SCRIPT, tmp_path / ".ci" / "release.py"))
    for name in ("agent_runner.py", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    spec = (ROOT / "openapi.yaml").read_text()
    assert spec.count(f"\n  version: {version}\n") == 1
    (tmp_path / "openapi.yaml").write_text(spec.replace(f"\n  version: {version}\n", "\n  version: 9.9.9\n"))
    result = release_script(*[part.format(version=version) for part in command], script=script)
    assert (result.returncode, result.stdout) == (1, "")
    assert f"openapi.yaml info.version '9.9.9' differs from __version__ = '{version}'" in result.stderr


# ---------------------------------------------------------------------------
# .ci/release.py image / split, on an OCI layout shaped like the one buildx's oci exporter writes.

SPDX = "https://spdx.dev/Document"
PROVENANCE = "https://slsa.dev/provenance/v0.2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def write_blob(layout: Path, content: bytes | dict[str, Any]) -> dict[str, Any]:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, platforms: dict[str, tuple[str, ...]]) -> str:
    """A layout whose index holds an image per platform, each with attestations of the given predicate types."""
    entries = []
    for platform, predicates in platforms.items():
        os_name, architecture = platform.split("/")
        config = write_blob(layout, {"architecture": architecture, "os": os_name})
        layer = write_blob(layout, f"the {platform} root filesystem".encode())
        image = write_blob(layout, {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}]})
        entries.append({"mediaType": OCI_MANIFEST, **image, "platform": {"architecture": architecture, "os": os_name}})
        statements = [{"mediaType": "application/vnd.in-toto+json", **write_blob(layout, {"predicateType": kind}),
                       "annotations": {"in-toto.io/predicate-type": kind}} for kind in predicates]
        attestation = write_blob(layout, {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": statements,
                                          "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                                     **write_blob(layout, b"{}")}})
        entries.append({"mediaType": OCI_MANIFEST, **attestation,
                        "platform": {"architecture": "unknown", "os": "unknown"},
                        "annotations": {"vnd.docker.reference.digest": image["digest"],
                                        "vnd.docker.reference.type": "attestation-manifest"}})
    index = write_blob(layout, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                "manifests": entries})
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", **index}]}))
    return str(index["digest"])


BOTH_ATTESTED = {"linux/amd64": (SPDX, PROVENANCE), "linux/arm64": (SPDX, PROVENANCE)}


def test_release_image_accepts_both_platforms_with_sbom_and_provenance_and_prints_the_index_digest(
        tmp_path: Path) -> None:
    digest = write_layout(tmp_path, BOTH_ATTESTED)
    result = release_script("image", str(tmp_path))
    assert (result.returncode, result.stdout) == (0, f"digest={digest}\n"), result.stderr


@pytest.mark.parametrize(("platforms", "message"), [
    ({"linux/amd64": (SPDX, PROVENANCE)}, "the index holds images for ['linux/amd64'], expected"),
    ({**BOTH_ATTESTED, "linux/s390x": (SPDX, PROVENANCE)}, "expected ['linux/amd64', 'linux/arm64']"),
    ({"linux/amd64": (SPDX, PROVENANCE), "linux/arm64": (PROVENANCE,)}, "the linux/arm64 image has no SBOM"),
    ({"linux/amd64": (SPDX,), "linux/arm64": (SPDX, PROVENANCE)}, "the linux/amd64 image has no provenance"),
], ids=["one-platform", "extra-platform", "no-sbom", "no-provenance"])
def test_release_image_refuses_a_build_without_both_platforms_or_their_attestations(
        tmp_path: Path, platforms: dict[str, tuple[str, ...]], message: str) -> None:
    write_layout(tmp_path, platforms)
    result = release_script("image", str(tmp_path))
    assert (result.returncode, result.stdout) == (1, "")
    assert message in result.stderr


def test_release_image_refuses_a_blob_that_does_not_match_its_digest(tmp_path: Path) -> None:
    write_layout(tmp_path, BOTH_ATTESTED)
    layer = next(path for path in (tmp_path / "blobs" / "sha256").iterdir()
                 if path.read_bytes() == b"the linux/arm64 root filesystem")
    layer.write_bytes(b"the linux/arm64 root filesystem, changed after the build")
    result = release_script("image", str(tmp_path))
    assert (result.returncode, result.stdout) == (1, "")
    assert f"blob {layer.name} has sha256 " in result.stderr


def test_release_image_refuses_a_layout_that_names_more_than_the_one_index(tmp_path: Path) -> None:
    write_layout(tmp_path, BOTH_ATTESTED)
    top = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**top, "manifests": top["manifests"] * 2}))
    result = release_script("image", str(tmp_path))
    assert result.returncode == 1
    assert "expected one image index, found 2" in result.stderr


def test_release_split_writes_one_layout_per_platform_naming_that_image_alone(tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", BOTH_ATTESTED)
    index_digest = release_script("image", str(tmp_path / "layout")).stdout.strip().split("=", 1)[1]
    index = json.loads((tmp_path / "layout" / "blobs" / "sha256" / index_digest.split(":")[1]).read_text())
    images = {f"{entry['platform']['os']}/{entry['platform']['architecture']}": entry
              for entry in index["manifests"] if "annotations" not in entry}
    result = release_script("split", str(tmp_path / "layout"), str(tmp_path / "platforms"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{name} {images[name]['digest']}" for name in release_module().PLATFORMS]
    for name, entry in images.items():
        target = tmp_path / "platforms" / name.replace("/", "-")
        assert json.loads((target / "index.json").read_text())["manifests"] == [entry]
        assert json.loads((target / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
        blob = target / "blobs" / "sha256" / entry["digest"].split(":")[1]
        assert blob.samefile(tmp_path / "layout" / "blobs" / "sha256" / blob.name)  # linked, not copied


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_a_failing_command_in_a_pipe_fails_its_step(name: str) -> None:
    # With no shell given, GitHub runs `bash -e {0}` (no pipefail): `release.py check ... | tee` would pass
    # on a refused tag. `shell: bash` runs `bash --noprofile --norc -eo pipefail {0}`.
    workflow = load(name)
    default = workflow.get("defaults", {}).get("run", {}).get("shell")
    piped = [(job_name, step.get("name", step["run"][:40])) for job_name, job in workflow["jobs"].items()
             for step in job.get("steps", []) if re.search(r"[^|]\|[^|]", step.get("run", ""))
             and step.get("shell", job.get("defaults", {}).get("run", {}).get("shell", default)) != "bash"]
    assert piped == []
