"""Fuzzing the control plane from its own OpenAPI schema (schemathesis): no request gives a 500.

Runs are registered but not launched (the launcher records them), so fuzzed configs that happen to
be valid create a run directory in the test's folder and nothing else.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from orchard.services.control.app import create_app
from orchard.services.control.service import ControlService

TOKEN = "fuzz-token"

schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(ControlService(launcher=lambda handle: None), token=TOKEN, max_body_bytes=64 * 1024)
)


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_is_a_server_error(case):
    for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
        response = case.call(headers=headers)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
