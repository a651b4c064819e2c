"""Release helpers for .github/workflows/release.yml; standard library only, runs before any install.

    python3 .ci/release.py version             print __version__ (read from the source text, never imported)
    git tag --list 'v*' | python3 .ci/release.py check vX.Y.Z
                                               fail unless the tag is vX.Y.Z, equals v + __version__ and
                                               CHANGELOG.md has a dated section for it; print version=,
                                               latest= (is it the newest release tag?) for $GITHUB_OUTPUT
    python3 .ci/release.py notes X.Y.Z         print that version's CHANGELOG.md section (the release notes)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION_FILE = ROOT / "agent_runner.py"  # the one place that holds the version
CHANGELOG = ROOT / "CHANGELOG.md"
VERSION_LINE = re.compile(r'^__version__ = "(.+)"$', re.M)
RELEASE_TAG = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


class ReleaseError(Exception):
    """A release precondition does not hold; the message says which."""


def source_version() -> str:
    found = VERSION_LINE.findall(VERSION_FILE.read_text())
    if len(found) != 1:
        raise ReleaseError(f"{VERSION_FILE.name}: expected one line __version__ = \"X.Y.Z\", found {len(found)}")
    return found[0]


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
    version = source_version()
    if tag != f"v{version}":
        raise ReleaseError(f"tag {tag} does not match __version__ = {version!r} in {VERSION_FILE.name}")
    changelog_section(version)
    releases = [tuple(map(int, m.groups())) for m in map(RELEASE_TAG.match, other_tags) if m]
    newest = all(tuple(map(int, match.groups())) >= release for release in releases)
    return {"version": version, "latest": "true" if newest else "false"}


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["version"] and len(argv) == 1:
            print(source_version())
        elif argv[:1] == ["check"] and len(argv) == 2:
            other_tags = [] if sys.stdin.isatty() else sys.stdin.read().split()
            for key, value in check_tag(argv[1], other_tags).items():
                print(f"{key}={value}")
        elif argv[:1] == ["notes"] and len(argv) == 2:
            sys.stdout.write(changelog_section(argv[1]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except ReleaseError as error:
        print(f"release: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
