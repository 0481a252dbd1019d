"""Fuzzing the control plane from its own OpenAPI schema (schemathesis): no request gives a 500,
and no request outside the schema is accepted or changes a run.

Runs are registered but not launched (the launcher records them), so fuzzed configs that happen to
be valid create a run directory in the test's folder and nothing else.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, not_a_server_error
from schemathesis.generation import GenerationMode

from orchard.services.control.app import create_app
from orchard.services.control.service import ControlService, RunHandle

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(ControlService(launcher=lambda handle: None), token=TOKEN, max_body_bytes=64 * 1024)
)

launched: list[RunHandle] = []
service = ControlService(launcher=launched.append)
# the reading routes take no input a request could get wrong (their one, a run id, admits any string)
malformed = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(service, token=TOKEN, max_body_bytes=64 * 1024)
).exclude(method="GET")
malformed.config.generation.update(modes=[GenerationMode.NEGATIVE])
rejection = malformed.config.checks.negative_data_rejection
rejection.expected_statuses = [*rejection.expected_statuses, "413"]  # a body over the limit is refused unread


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_is_a_server_error(case):
    for headers in (AUTH, {}):
        response = case.call(headers=headers)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"


def snapshot() -> tuple:
    """The runs launched, and each run's state, weights and pending checkpoint request."""
    return (
        [run.id for run in launched],
        [(run.id, run.control.state, run.control.weights, run.control._checkpoint_requested) for run in service.runs()],
    )


@malformed.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_malformed_request_is_accepted_or_changes_a_run(case):
    """Schema-violating requests are refused, and a refused request leaves every run as it was.

    (A case whose only violation is a header this test replaces with a valid token is a valid
    request, and may act: schemathesis' check knows to let those pass.)
    """
    before = snapshot()
    response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error, negative_data_rejection])
    if response.status_code >= 400:
        assert snapshot() == before, f"{case.method} {case.path} was refused ({response.status_code}) but acted"
