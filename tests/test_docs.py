"""The documentation: README.md is a doorway to the pages in docs/, which mkdocs builds without a warning."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from conftest import DOCS, HERE, missing_tool

README = HERE / "README.md"


def mkdocs_config() -> dict[str, Any]:
    """mkdocs.yml, read with its python/name tags kept as plain strings."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)
    return yaml.load((HERE / "mkdocs.yml").read_text(), Loader=Loader)


def nav_pages(nav: list[Any]) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def readme_section(heading: str) -> str:
    return README.read_text().split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_mkdocs_builds_the_site_strictly_without_a_warning(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        missing_tool("mkdocs-material", ".venv/bin/pip install -r requirements-dev.txt")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=HERE, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "dashboard.png").is_file()


def test_the_nav_lists_every_page_once_and_the_site_is_built_from_docs() -> None:
    config = mkdocs_config()
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(path.name for path in DOCS.glob("*.md"))


def test_mkdocs_material_is_pinned_in_the_dev_requirements() -> None:
    requirements = (HERE / "requirements-dev.txt").read_text().splitlines()
    assert any(re.fullmatch(r"mkdocs-material==\d+\.\d+\.\d+", line) for line in requirements)


def test_the_readme_is_a_doorway_short_with_writing_an_agent_early() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert len(text.encode()) < 20 * 1024
    assert len(lines) <= 200
    assert "## Writing an agent" in lines[:100]


def test_the_readme_docs_index_links_every_page_and_each_link_exists() -> None:
    index = readme_section("## Documentation")
    linked = re.findall(r"\]\(docs/([\w-]+\.md)\)", index)
    assert sorted(set(linked)) == sorted(path.name for path in DOCS.glob("*.md") if path.name != "index.md")
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)", README.read_text()):
        assert (HERE / target).exists(), target


def test_the_quick_start_has_two_commands_and_ci_runs_the_test_command_word_for_word() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", readme_section("## Quick start"), re.S)
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python agent_runner.py",
        "python3 -m venv .venv && .venv/bin/pip install -q -r requirements-dev.txt && .venv/bin/python -m pytest -q",
    ]
    ci_lines = (HERE / ".ci" / "run").read_text().rstrip("\n").splitlines()
    assert ci_lines[-1] == commands[1]


def test_pages_describe_what_is_not_which_issue_changed_it() -> None:
    for page in [README, *DOCS.glob("*.md")]:
        assert not re.search(r"\bissues? \d+", page.read_text(), re.I), page.name
