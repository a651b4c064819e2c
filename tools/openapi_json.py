"""Write openapi.json, the JSON form of openapi.yaml, which the service serves at /openapi.json.

openapi.yaml is the one source; openapi.json is generated from it and committed, so the runtime needs no YAML
library. Run this after editing the spec; tests/test_openapi_json.py fails while the two differ.

    python tools/openapi_json.py           # write openapi.json
    python tools/openapi_json.py --check   # exit 1 if openapi.json is not what openapi.yaml generates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml  # dev-only (requirements-dev.txt): the image ships the generated file, not this script

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "openapi.yaml"
TARGET = ROOT / "openapi.json"


def generate(spec: Path = SPEC) -> bytes:
    """The bytes openapi.json must hold for ``spec``: strict JSON, two-space indented, a newline at the end."""
    document = yaml.safe_load(spec.read_text(encoding="utf-8"))
    return (json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if openapi.json is stale")
    args = parser.parse_args(argv)
    expected = generate()
    if args.check:
        if not TARGET.exists() or TARGET.read_bytes() != expected:
            print("openapi.json differs from openapi.yaml: run python tools/openapi_json.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_bytes(expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
