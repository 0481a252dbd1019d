"""The REST contract over a real FastAPI app: auth, status codes, bodies, metrics.

Runs are registered but not launched here (the launcher records them), so every route's contract
is checked in milliseconds; `tests/e2e/test_control_plane.py` drives a real run over HTTP.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from orchard.services.control.app import create_app
from orchard.services.control.run_control import RunState
from orchard.services.control.service import ControlService, RunHandle
from orchard.services.metrics import RUN_STATES

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_CONFIG = {"name": "api", "max_steps": 3, "buffer": {"backend": "memory"}}


@pytest.fixture
def launched() -> list[RunHandle]:
    return []


@pytest.fixture
def service(launched, tmp_path, monkeypatch) -> ControlService:
    monkeypatch.chdir(tmp_path)  # run directories land in the test's own folder
    return ControlService(launcher=launched.append)


@pytest.fixture
def client(service) -> TestClient:
    return TestClient(create_app(service, token=TOKEN, max_body_bytes=4096))


def create(client: TestClient, **body) -> dict:
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, **body}, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


def test_health_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/pause", "/v1/runs/{run_id}/weights"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_create_then_status(client, launched):
    created = create(client)
    assert created["state"] == "pending"
    assert [run.id for run in launched] == [created["id"]]
    status = client.get(f"/v1/runs/{created['id']}").json()
    assert status["state"] == "pending" and status["max_steps"] == 3 and status["step"] == 0
    assert [run["id"] for run in client.get("/v1/runs").json()] == [created["id"]]


def test_every_mutating_route_needs_the_token(client, service):
    run_id = create(client)["id"]
    calls = [
        ("/v1/runs", {"config": TINY_CONFIG}),
        (f"/v1/runs/{run_id}/pause", None),
        (f"/v1/runs/{run_id}/resume", None),
        (f"/v1/runs/{run_id}/stop", None),
        (f"/v1/runs/{run_id}/checkpoint", None),
        (f"/v1/runs/{run_id}/weights", {"version": 1, "location": "x"}),
        (f"/v1/runs/{run_id}/workers", {"count": 2}),
    ]
    for path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = client.post(path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text
    assert service.get(run_id).control.state is RunState.PENDING  # nothing happened
    assert client.get(f"/v1/runs/{run_id}").status_code == 200  # reading needs no token


def test_without_a_configured_token_mutations_are_open():
    client = TestClient(create_app(ControlService(launcher=lambda handle: None)))
    assert client.post("/v1/runs", json={"config": TINY_CONFIG}).status_code == 201


def test_bad_config_is_422_naming_each_field(client):
    response = client.post(
        "/v1/runs", json={"config": {"learner": {"lr": "fast"}, "rollout": {"bogus": 1}}}, headers=AUTH
    )
    assert response.status_code == 422
    fields = {item["field"] for item in response.json()["detail"]}
    assert fields == {"learner.lr", "rollout.bogus"}
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "overrides": ["max_steps=-1"]}, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "max_steps"


def test_malformed_bodies_are_422(client):
    run_id = create(client)["id"]
    assert client.post("/v1/runs", content=b"{not json", headers=AUTH).status_code == 422
    assert client.post("/v1/runs", json={"config": 5}, headers=AUTH).status_code == 422
    response = client.post(f"/v1/runs/{run_id}/weights", json={"version": -1, "location": ""}, headers=AUTH)
    assert response.status_code == 422
    assert {item["loc"][-1] for item in response.json()["detail"]} == {"version", "location"}


def test_oversized_body_is_413(client):
    response = client.post("/v1/runs", json={"config": {"name": "x" * 5000}}, headers=AUTH)
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]


def test_unknown_run_is_404(client):
    assert client.get("/v1/runs/nope").status_code == 404
    for action in ("pause", "resume", "stop", "checkpoint"):
        response = client.post(f"/v1/runs/nope/{action}", headers=AUTH)
        assert response.status_code == 404 and "nope" in response.json()["detail"]
    assert client.post("/v1/runs/nope/weights", json={"version": 1, "location": "x"}, headers=AUTH).status_code == 404


def test_conflicting_actions_are_409(client, service):
    run_id = create(client)["id"]
    assert client.post("/v1/runs", json={"config": TINY_CONFIG}, headers=AUTH).status_code == 409  # one at a time
    assert client.post(f"/v1/runs/{run_id}/resume", headers=AUTH).status_code == 409  # not paused
    assert client.post(f"/v1/runs/{run_id}/pause", headers=AUTH).json() == {"id": run_id, "state": "pausing"}
    assert client.post(f"/v1/runs/{run_id}/pause", headers=AUTH).status_code == 409
    assert client.post(f"/v1/runs/{run_id}/stop", headers=AUTH).status_code == 202
    response = client.post(f"/v1/runs/{run_id}/stop", headers=AUTH)
    assert response.status_code == 409 and "stopping" in response.json()["detail"]
    service.get(run_id).control.finish(RunState.STOPPED)
    assert create(client)["state"] == "pending"  # the first run ended: a new one may start


def test_weights_announcements(client, service):
    run_id = create(client)["id"]
    response = client.post(f"/v1/runs/{run_id}/weights", json={"version": 2, "location": "/ckpt/2"}, headers=AUTH)
    assert response.status_code == 202 and response.json()["version"] == 2
    stale = client.post(f"/v1/runs/{run_id}/weights", json={"version": 2, "location": "/ckpt/2"}, headers=AUTH)
    assert stale.status_code == 409
    weights = client.get(f"/v1/runs/{run_id}").json()["weights"]
    assert (weights["version"], weights["location"]) == (2, "/ckpt/2")


def test_created_paused(client, service):
    run_id = create(client, paused=True)["id"]
    assert service.get(run_id).control.state is RunState.PAUSING


def test_metrics_follow_the_run_state(client, service):
    run_id = create(client)["id"]
    client.post(f"/v1/runs/{run_id}/pause", headers=AUTH)
    text = client.get("/metrics").text
    assert f'orchard_run_state{{run="{run_id}",state="pausing"}} 1.0' in text
    assert all(f'orchard_run_state{{run="{run_id}",state="{state}"}}' in text for state in RUN_STATES)
    assert f'orchard_learner_step{{run="{run_id}"}} 0.0' in text


# ---------------------------------------------------------------------------------- rollout workers
def test_scaling_requests_are_checked_and_recorded(client, service):
    run_id = create(client, config={**TINY_CONFIG, "cluster": {"max_rollout_workers": 3, "max_cpus": 3.5}})["id"]
    accepted = client.post(f"/v1/runs/{run_id}/workers", json={"count": 2}, headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"id": run_id, "state": "pending", "requested": 2, "rollout_workers": 0}
    assert service.get(run_id).control.take_workers_request() == 2
    assert service.get(run_id).control.take_workers_request() is None  # taken once


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (-1, "greater than or equal to 1"),
        (0, "greater than or equal to 1"),
        (4, "exceed the run's quota cluster.max_rollout_workers=3"),
        (3, "reserve 4 CPUs, over the run's quota cluster.max_cpus=3.5"),  # learner 1 + 3 workers
    ],
)
def test_scaling_beyond_the_limits_is_422_naming_the_limit(client, service, count, message):
    run_id = create(client, config={**TINY_CONFIG, "cluster": {"max_rollout_workers": 3, "max_cpus": 3.5}})["id"]
    response = client.post(f"/v1/runs/{run_id}/workers", json={"count": count}, headers=AUTH)
    assert response.status_code == 422
    assert message in response.text and response.json()["detail"][0]["loc"] == ["body", "count"]
    assert service.get(run_id).control.take_workers_request() is None  # nothing recorded


def test_scaling_an_unknown_or_ended_run_is_refused(client, service):
    missing = client.post("/v1/runs/nope/workers", json={"count": 2}, headers=AUTH)
    assert missing.status_code == 404 and "no run with id 'nope'" in missing.text
    run_id = create(client)["id"]
    for body in ({"count": "2"}, {"count": 2.0}, {"count": 2, "force": True}, {}):
        assert client.post(f"/v1/runs/{run_id}/workers", json=body, headers=AUTH).status_code == 422, body
    service.get(run_id).control.request_stop()
    stopping = client.post(f"/v1/runs/{run_id}/workers", json={"count": 2}, headers=AUTH)
    assert stopping.status_code == 409 and "cannot scale a run that is stopping" in stopping.text


def test_a_quota_the_config_itself_breaks_is_refused_at_creation(client):
    response = client.post(
        "/v1/runs",
        json={"config": {**TINY_CONFIG, "rollout": {"num_workers": 3}, "cluster": {"max_rollout_workers": 2}}},
        headers=AUTH,
    )
    assert response.status_code == 422 and "cluster.max_rollout_workers=2" in response.text


# ---------------------------------------------------------------------------------- several runs
def test_several_active_runs_within_the_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launched: list[RunHandle] = []
    service = ControlService(launcher=launched.append, max_active_runs=2)
    client = TestClient(create_app(service, token=TOKEN))
    placed = {**TINY_CONFIG, "cluster": {"placement_groups": True}}
    unplaced = client.post("/v1/runs", json={"config": TINY_CONFIG}, headers=AUTH)
    assert unplaced.status_code == 422 and "set cluster.placement_groups: true" in unplaced.text
    first = create(client, config=placed)["id"]
    second = create(client, config={**placed, "name": "other"})["id"]
    third = client.post("/v1/runs", json={"config": placed}, headers=AUTH)
    assert third.status_code == 409 and "control.max_active_runs=2" in third.json()["detail"]
    assert first in third.json()["detail"] and second in third.json()["detail"]
    client.post(f"/v1/runs/{first}/pause", headers=AUTH)
    text = client.get("/metrics").text
    assert f'orchard_run_state{{run="{first}",state="pausing"}} 1.0' in text
    assert f'orchard_run_state{{run="{second}",state="pending"}} 1.0' in text
    assert text.count("# TYPE orchard_run_state gauge") == 1  # one family, a series per run
    service.get(second).control.finish(RunState.FAILED, "gone")
    assert create(client, config={**placed, "name": "third"})["state"] == "pending"  # a place is free again


# ---------------------------------------------------------------------------------- strict requests
def snapshot(service: ControlService, launched: list[RunHandle]) -> tuple:
    """Everything a request could change: the runs launched, and each run's status and pending requests."""
    return (
        [run.id for run in launched],
        [
            (run.status().model_dump(), list(run.control.history), run.control._checkpoint_requested)
            for run in service.runs()
        ],
    )


def locs(response) -> list[tuple]:
    return [tuple(item["loc"]) for item in response.json()["detail"]]


def test_unknown_fields_are_422_each_named_by_its_path(client, service, launched):
    before = snapshot(service, launched)
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "pasued": True, "dry_run": 1}, headers=AUTH)
    assert response.status_code == 422
    assert sorted(locs(response)) == [("body", "dry_run"), ("body", "pasued")]
    assert {item["type"] for item in response.json()["detail"]} == {"extra_forbidden"}
    assert snapshot(service, launched) == before == ([], [])
    run_id = create(client)["id"]
    before = snapshot(service, launched)
    response = client.post(
        f"/v1/runs/{run_id}/weights", json={"version": 1, "location": "/w/1", "force": True}, headers=AUTH
    )
    assert response.status_code == 422 and locs(response) == [("body", "force")]
    assert snapshot(service, launched) == before


def test_a_config_posted_bare_is_422_saying_to_put_it_under_config(client, service, launched):
    bare = {"name": "api", "max_steps": 3, "model": {"kind": "tiny"}, "rollout": {"group_size": 4}}
    response = client.post("/v1/runs", json={**bare, "colour": "red"}, headers=AUTH)
    assert response.status_code == 422
    detail = {tuple(item["loc"]): item for item in response.json()["detail"]}
    assert set(detail) == {("body", name) for name in (*bare, "colour")}
    for name in bare:
        assert detail[("body", name)]["type"] == "config_field_misplaced"
        assert f"'{name}' is a field of the run config" in detail[("body", name)]["msg"]
        assert "under 'config'" in detail[("body", name)]["msg"]
    assert detail[("body", "colour")]["type"] == "extra_forbidden"  # not a config field: just unknown
    # beside a config too: a field of it given at the top level is misplaced, not merged
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "max_steps": 5}, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "config_field_misplaced"
    assert snapshot(service, launched) == ([], [])


def test_overrides_must_be_a_list_of_strings(client, service, launched):
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "overrides": "max_steps=5"}, headers=AUTH)
    assert response.status_code == 422
    assert locs(response) == [("body", "overrides")] and response.json()["detail"][0]["type"] == "list_type"
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "overrides": ["max_steps=5", 5]}, headers=AUTH)
    assert response.status_code == 422 and locs(response) == [("body", "overrides", 1)]
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "overrides": {"max_steps": 5}}, headers=AUTH)
    assert response.status_code == 422 and locs(response) == [("body", "overrides")]
    assert snapshot(service, launched) == ([], [])


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"config": TINY_CONFIG, "paused": "true"}, ("body", "paused"), "bool_type"),
        ({"config": TINY_CONFIG, "paused": "false"}, ("body", "paused"), "bool_type"),
        ({"config": TINY_CONFIG, "paused": 1}, ("body", "paused"), "bool_type"),
        ({"config": "name: api"}, ("body", "config"), "dict_type"),
        ({"config": [TINY_CONFIG]}, ("body", "config"), "dict_type"),
    ],
)
def test_create_fields_are_not_coerced(client, service, launched, body, loc, kind):
    response = client.post("/v1/runs", json=body, headers=AUTH)
    assert response.status_code == 422
    assert [(tuple(item["loc"]), item["type"]) for item in response.json()["detail"]] == [(loc, kind)]
    assert snapshot(service, launched) == ([], [])


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        ({"version": "3", "location": "/w/3"}, ("body", "version"), "int_type"),
        ({"version": 3.0, "location": "/w/3"}, ("body", "version"), "int_type"),
        ({"version": True, "location": "/w/3"}, ("body", "version"), "int_type"),
        ({"version": 3, "location": 3}, ("body", "location"), "string_type"),
        ({"location": "/w/3"}, ("body", "version"), "missing"),
    ],
)
def test_weights_fields_are_not_coerced(client, service, launched, body, loc, kind):
    run_id = create(client)["id"]
    before = snapshot(service, launched)
    response = client.post(f"/v1/runs/{run_id}/weights", json=body, headers=AUTH)
    assert response.status_code == 422
    assert [(tuple(item["loc"]), item["type"]) for item in response.json()["detail"]] == [(loc, kind)]
    assert snapshot(service, launched) == before
    assert client.get(f"/v1/runs/{run_id}").json()["weights"] is None


def test_unknown_config_keys_are_422_at_their_path_under_config(client, service, launched):
    config = {**TINY_CONFIG, "rollout": {"bogus": 1}, "data": {"sources": [{"kind": "procedural", "colour": 1}]}}
    response = client.post("/v1/runs", json={"config": config}, headers=AUTH)
    assert response.status_code == 422
    assert sorted(locs(response)) == [
        ("body", "config", "data", "sources", "0", "colour"),
        ("body", "config", "rollout", "bogus"),
    ]
    response = client.post("/v1/runs", json={"config": TINY_CONFIG, "overrides": ["rollout.bogus=1"]}, headers=AUTH)
    assert response.status_code == 422 and locs(response) == [("body", "config", "rollout", "bogus")]
    assert snapshot(service, launched) == ([], [])


ACTIONS = ("pause", "resume", "stop", "checkpoint")


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize(
    ("request_options", "expected_locs"),
    [
        ({"json": {"force": True}}, [("body", "force")]),
        ({"json": {"run": "other", "reason": "x"}}, [("body", "run"), ("body", "reason")]),
        ({"json": [1]}, [("body",)]),
        ({"json": "now"}, [("body",)]),
        ({"content": b"force=true", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, [("body",)]),
        ({"params": {"force": "true"}}, [("query", "force")]),
        ({"params": [("run", "a"), ("run", "b")]}, [("query", "run"), ("query", "run")]),
    ],
)
def test_actions_refuse_a_body_or_query_parameters_and_change_nothing(
    client, service, launched, action, request_options, expected_locs
):
    run_id = create(client)["id"]
    before = snapshot(service, launched)
    headers = {**AUTH, **request_options.pop("headers", {})}
    response = client.post(f"/v1/runs/{run_id}/{action}", headers=headers, **request_options)
    assert response.status_code == 422, response.text
    assert locs(response) == expected_locs
    assert snapshot(service, launched) == before


@pytest.mark.parametrize("body", [None, {}])
def test_actions_accept_no_body_or_an_empty_one(client, service, body):
    run_id = create(client)["id"]
    response = client.post(f"/v1/runs/{run_id}/pause", json=body, headers=AUTH)
    assert response.status_code == 202 and response.json()["state"] == "pausing"
    assert client.post(f"/v1/runs/{run_id}/checkpoint", content=b"null", headers=AUTH).status_code == 202


def test_create_and_weights_refuse_query_parameters(client, service, launched):
    response = client.post("/v1/runs", params={"paused": "true"}, json={"config": TINY_CONFIG}, headers=AUTH)
    assert response.status_code == 422 and locs(response) == [("query", "paused")]
    assert snapshot(service, launched) == ([], [])
    run_id = create(client)["id"]
    before = snapshot(service, launched)
    response = client.post(
        f"/v1/runs/{run_id}/weights", params={"v": "2"}, json={"version": 2, "location": "/w/2"}, headers=AUTH
    )
    assert response.status_code == 422 and locs(response) == [("query", "v")]
    assert snapshot(service, launched) == before


def test_the_token_is_checked_before_the_request_shape(client, service, launched):
    run_id = create(client)["id"]
    before = snapshot(service, launched)
    assert client.post(f"/v1/runs/{run_id}/stop", params={"force": "1"}).status_code == 401
    assert client.post(f"/v1/runs/{run_id}/stop", json={"force": True}).status_code == 401
    assert client.post("/v1/runs", json={"model": {}}).status_code == 401
    assert snapshot(service, launched) == before


def test_well_formed_requests_still_act(client, service, launched):
    """The strict checks refuse only what is malformed: the documented shapes all work."""
    run_id = create(client, overrides=["max_steps=4"], paused=False)["id"]
    assert service.get(run_id).config.max_steps == 4
    response = client.post(f"/v1/runs/{run_id}/weights", json={"version": 0, "location": "/w/0"}, headers=AUTH)
    assert response.status_code == 202
    for action, state in (("pause", "pausing"), ("resume", "running"), ("checkpoint", "running"), ("stop", "stopping")):
        response = client.post(f"/v1/runs/{run_id}/{action}", headers=AUTH)
        assert response.status_code == 202 and response.json()["state"] == state, (action, response.text)
    service.get(run_id).control.finish(RunState.STOPPED)
    demo = client.post("/v1/runs", json={"overrides": ["max_steps=2"]}, headers=AUTH)  # the embedded demo config
    assert demo.status_code == 201, demo.text
