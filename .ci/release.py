"""Release helpers for .github/workflows/release.yml; standard library only, runs before any install.

    python3 .ci/release.py version             print __version__ (read from the source text, never imported);
                                               fail unless openapi.yaml's info.version is the same
    git tag --list 'v*' | python3 .ci/release.py check vX.Y.Z
                                               fail unless the tag is vX.Y.Z, equals v + __version__ (and
                                               info.version) and CHANGELOG.md has a dated section for it;
                                               print version=, latest= (is it the newest release tag?)
    python3 .ci/release.py notes X.Y.Z         print that version's CHANGELOG.md section (the release notes)
    python3 .ci/release.py image LAYOUT        check the OCI layout buildx wrote (every blob matches its
                                               digest; one image index with an image, an SBOM and a
                                               provenance per platform of PLATFORMS); print digest= (the
                                               index's digest: what is scanned, pushed and signed)
    python3 .ci/release.py split LAYOUT DEST   write DEST/<os>-<arch>/, an OCI layout of that platform's
                                               image alone (Trivy's --input scans the first image of a layout)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VERSION_FILE = ROOT / "agent_runner.py"  # holds the version; openapi.yaml's info.version must repeat it
SPEC = ROOT / "openapi.yaml"
CHANGELOG = ROOT / "CHANGELOG.md"
VERSION_LINE = re.compile(r'^__version__ = "(.+)"$', re.M)
SPEC_VERSION_LINE = re.compile(r"^info:\n(?:  .*\n)*?  version: (\S+)$", re.M)  # info.version, the only one
RELEASE_TAG = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
PLATFORMS = ("linux/amd64", "linux/arm64")  # what release.yml builds, scans and pushes
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
ATTESTATION = "attestation-manifest"  # BuildKit's vnd.docker.reference.type for a platform's attestations
SBOM_PREDICATE = "https://spdx.dev/Document"
PROVENANCE_PREDICATE = "https://slsa.dev/provenance/"  # v0.2 or v1


class ReleaseError(Exception):
    """A release precondition does not hold; the message says which."""


def source_version() -> str:
    found = VERSION_LINE.findall(VERSION_FILE.read_text())
    if len(found) != 1:
        raise ReleaseError(f"{VERSION_FILE.name}: expected one line __version__ = \"X.Y.Z\", found {len(found)}")
    return found[0]


def spec_version() -> str:
    found = SPEC_VERSION_LINE.findall(SPEC.read_text())
    if len(found) != 1:
        raise ReleaseError(f"{SPEC.name}: expected one info.version, found {len(found)}")
    return found[0]


def checked_version() -> str:
    """__version__, once openapi.yaml's info.version is known to say the same."""
    version, in_spec = source_version(), spec_version()
    if in_spec != version:
        raise ReleaseError(f"{SPEC.name} info.version {in_spec!r} differs from __version__ = {version!r} "
                           f"in {VERSION_FILE.name}")
    return version


def changelog_section(version: str) -> str:
    """The body of `## [version] - YYYY-MM-DD`, up to the next `## ` heading or link references."""
    text = CHANGELOG.read_text()
    heading = re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M)
    if heading is None:
        raise ReleaseError(f"CHANGELOG.md has no dated section '## [{version}] - YYYY-MM-DD'")
    end = re.compile(r"^(## |\[[^\]]+\]: )", re.M).search(text, heading.end())
    body = text[heading.end():end.start() if end else len(text)].strip()
    if not body:
        raise ReleaseError(f"CHANGELOG.md: the section for {version} is empty")
    return body + "\n"


def check_tag(tag: str, other_tags: list[str]) -> dict[str, str]:
    match = RELEASE_TAG.match(tag)
    if match is None:
        raise ReleaseError(f"tag {tag!r} is not vX.Y.Z")
    version = checked_version()
    if tag != f"v{version}":
        raise ReleaseError(f"tag {tag} does not match __version__ = {version!r} in {VERSION_FILE.name}")
    changelog_section(version)
    releases = [tuple(map(int, m.groups())) for m in map(RELEASE_TAG.match, other_tags) if m]
    newest = all(tuple(map(int, match.groups())) >= release for release in releases)
    return {"version": version, "latest": "true" if newest else "false"}


def read_blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
        raise ReleaseError(f"{layout}: unsupported digest {digest!r}")
    path = layout / "blobs" / "sha256" / hex_digest
    if not path.is_file():
        raise ReleaseError(f"{layout}: blob {digest} is missing")
    return path.read_bytes()


def verify_blobs(layout: Path) -> None:
    """Every blob's content hashes to its name, so a digest commits to everything below it."""
    for path in sorted((layout / "blobs" / "sha256").iterdir()):
        digest = hashlib.sha256()
        with path.open("rb") as blob:
            for chunk in iter(lambda: blob.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != path.name:
            raise ReleaseError(f"{layout}: blob {path.name} has sha256 {digest.hexdigest()}")


def image_index(layout: Path) -> tuple[str, dict[str, Any]]:
    """The digest and content of the one image index that layout/index.json names."""
    top = json.loads((layout / "index.json").read_text())
    if len(top.get("manifests", [])) != 1:
        raise ReleaseError(f"{layout}/index.json: expected one image index, found {len(top.get('manifests', []))} "
                           "entries")
    entry = top["manifests"][0]
    if entry.get("mediaType") not in INDEX_TYPES:
        raise ReleaseError(f"{layout}: {entry.get('digest')} is {entry.get('mediaType')}, not a multi-platform index")
    return entry["digest"], json.loads(read_blob(layout, entry["digest"]))


def platform_images(layout: Path) -> dict[str, dict[str, Any]]:
    """PLATFORMS -> the descriptor of each platform's image, once each is known to carry an SBOM and provenance."""
    _, index = image_index(layout)
    images: dict[str, dict[str, Any]] = {}
    attested: dict[str, set[str]] = {}
    for entry in index.get("manifests", []):
        annotations = entry.get("annotations", {})
        if annotations.get("vnd.docker.reference.type") == ATTESTATION:
            manifest = json.loads(read_blob(layout, entry["digest"]))
            attested[annotations.get("vnd.docker.reference.digest", "")] = {
                layer.get("annotations", {}).get("in-toto.io/predicate-type", "") for layer in manifest["layers"]}
        else:
            platform = entry.get("platform", {})
            name = f"{platform.get('os')}/{platform.get('architecture')}"
            if name in images:
                raise ReleaseError(f"{layout}: two images for {name}")
            images[name] = entry
    if sorted(images) != sorted(PLATFORMS):
        raise ReleaseError(f"{layout}: the index holds images for {sorted(images)}, expected {sorted(PLATFORMS)}")
    for name, entry in images.items():
        predicates = attested.get(entry["digest"], set())
        if SBOM_PREDICATE not in predicates:
            raise ReleaseError(f"{layout}: the {name} image has no SBOM attestation")
        if not any(predicate.startswith(PROVENANCE_PREDICATE) for predicate in predicates):
            raise ReleaseError(f"{layout}: the {name} image has no provenance attestation")
    return images


def check_image(layout: Path) -> dict[str, str]:
    verify_blobs(layout)
    platform_images(layout)
    digest, _ = image_index(layout)
    return {"digest": digest}


def split_platforms(layout: Path, dest: Path) -> dict[str, str]:
    """One OCI layout per platform under dest (blobs hard-linked), each naming that platform's image alone."""
    written = {}
    for name, entry in platform_images(layout).items():
        target = dest / name.replace("/", "-")
        (target / "blobs" / "sha256").mkdir(parents=True)
        for blob in (layout / "blobs" / "sha256").iterdir():
            os.link(blob, target / "blobs" / "sha256" / blob.name)
        (target / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        descriptor = {key: entry[key] for key in ("mediaType", "digest", "size", "platform")}
        (target / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [descriptor]}))
        written[name] = entry["digest"]
    return written


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["version"] and len(argv) == 1:
            print(checked_version())
        elif argv[:1] == ["check"] and len(argv) == 2:
            other_tags = [] if sys.stdin.isatty() else sys.stdin.read().split()
            for key, value in check_tag(argv[1], other_tags).items():
                print(f"{key}={value}")
        elif argv[:1] == ["notes"] and len(argv) == 2:
            sys.stdout.write(changelog_section(argv[1]))
        elif argv[:1] == ["image"] and len(argv) == 2:
            for key, value in check_image(Path(argv[1])).items():
                print(f"{key}={value}")
        elif argv[:1] == ["split"] and len(argv) == 3:
            for name, digest in split_platforms(Path(argv[1]), Path(argv[2])).items():
                print(f"{name} {digest}")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except ReleaseError as error:
        print(f"release: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as error:  # a layout that is not what buildx writes
        print(f"release: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
