"""Render deploy/kubernetes's overlays as `kubectl kustomize` does, for the subset of kustomize they use.

CI's machines reach PyPI and Debian only: neither ships a current kubectl or kustomize (Debian's
kubernetes-client is 1.20, whose kustomize predates ``patches:``). This renderer knows ``resources`` (files
and directories) and ``patches`` with a ``target`` (kind, name) and an inline JSON 6902 ``patch`` (add,
replace, remove), and refuses anything else, so a manifest that needs more fails here instead of rendering
wrong. tests/test_kubernetes.py compares it with ``kubectl kustomize`` wherever kubectl is installed.

    python tools/kustomize_subset.py deploy/kubernetes/overlays/redis
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches"}


def _parent(document: Any, pointer: str) -> tuple[Any, str]:
    """The container a JSON pointer's last token is in, and that token (~1 and ~0 unescaped)."""
    tokens = [token.replace("~1", "/").replace("~0", "~") for token in pointer.split("/")[1:]]
    for token in tokens[:-1]:
        document = document[int(token)] if isinstance(document, list) else document[token]
    return document, tokens[-1]


def apply_patch(resource: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """Apply JSON 6902 add, replace and remove operations to ``resource`` in place."""
    for operation in operations:
        container, token = _parent(resource, operation["path"])
        op = operation["op"]
        if op == "add" and isinstance(container, list):
            container.insert(len(container) if token == "-" else int(token), operation["value"])
        elif op == "add" or (op == "replace" and isinstance(container, dict) and token in container):
            container[token] = operation["value"]
        elif op == "replace" and isinstance(container, list):
            container[int(token)] = operation["value"]
        elif op == "remove":
            del container[int(token) if isinstance(container, list) else token]
        else:
            raise ValueError(f"cannot {op} {operation['path']}")


def _matches(resource: dict[str, Any], target: dict[str, str]) -> bool:
    return all((resource["kind"] if key == "kind" else resource["metadata"]["name"]) == value
               for key, value in target.items())


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources of the kustomization in ``directory``, patched."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if unknown := set(kustomization) - KNOWN_FIELDS:
        raise ValueError(f"{directory}: kustomize fields this renderer does not know: {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    names = [(resource["kind"], resource["metadata"]["name"]) for resource in resources]
    if len(set(names)) != len(names):
        raise ValueError(f"{directory}: a resource is listed twice: {names}")
    for patch in kustomization.get("patches", []):
        if set(patch) != {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
            raise ValueError(f"{directory}: only inline patches with a kind/name target are supported")
        matched = [resource for resource in resources if _matches(resource, patch["target"])]
        if not matched:
            raise ValueError(f"{directory}: a patch matches no resource: {patch['target']}")
        for resource in matched:
            apply_patch(resource, yaml.safe_load(patch["patch"]))
    return resources


if __name__ == "__main__":
    print(yaml.safe_dump_all(render(Path(sys.argv[1])), sort_keys=True), end="")
