"""What client generators see: the spec as JSON, and the clients they generate from it."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml
from openapi_spec_validator import validate

from conftest import ServerProcess

TOKEN = "client-test-token"


def test_openapi_json_is_openapi_yaml_as_json_and_needs_no_token(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server.log", API_TOKEN=TOKEN)
    try:
        as_json = httpx.get(server.url + "/openapi.json")
        as_yaml = httpx.get(server.url + "/openapi.yaml")
    finally:
        server.stop()
    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.json() == yaml.safe_load(as_yaml.content)
    validate(as_json.json())
    assert as_json.json()["paths"]["/openapi.json"]["get"]["security"] == []
