"""A real run driven over HTTP: `orchard serve` as a subprocess, the CLI clients, pause/resume/stop.

The run is the demo shrunk by `tiny_run.TINY` with a step limit it never reaches, so it ends only
when the test stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.tiny_run import TINY
from tests.processes import read_control_url

REPO = Path(__file__).resolve().parents[2]
ORCHARD = [sys.executable, "-m", "orchard"]
TOKEN = "e2e-token"
PAUSE_SECONDS = 5.0


def wait_for(condition: Callable[[], object], what: str, timeout: float = 240.0, every: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def serve(tmp_path) -> Iterator[tuple[str, Path]]:
    environment = {**os.environ, "ORCHARD_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [*ORCHARD, "serve", "--port", "0"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        yield read_control_url(process, lines), tmp_path
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "ORCHARD_TOKEN": TOKEN}
    return subprocess.run(
        [*ORCHARD, *args, "--url", url], capture_output=True, text=True, timeout=60, env=environment, cwd=REPO
    )


def conserved(buffer: dict[str, int]) -> bool:
    """Every group put is ready, taken and unacknowledged, acknowledged, or dropped as too stale."""
    return (
        buffer["put"] - buffer["duplicates"] == buffer["ready"] + buffer["pending"] + buffer["acked"] + buffer["stale"]
    )


def test_create_pause_resume_stop_over_http(serve):
    url, cwd = serve
    http = httpx.Client(base_url=url, timeout=30)
    overrides = [
        *TINY,
        "max_steps=1000000",
        "cluster.max_rollout_workers=2",  # the local cluster is sized for the most workers the run may have
        f"warmstart.cache_dir={cwd / 'cache'}",
        f"runs_dir={cwd / 'runs'}",
    ]
    unauthorized = http.post("/v1/runs", json={"overrides": overrides})
    assert unauthorized.status_code == 401

    created = http.post("/v1/runs", json={"overrides": overrides}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]

    def status() -> dict:
        return http.get(f"/v1/runs/{run_id}").json()

    wait_for(lambda: status()["step"] >= 3, "three learner steps")
    paused = cli(url, "pause", run_id)
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == f"run {run_id}: pausing"
    at_pause = wait_for(lambda: (s := status())["state"] == "paused" and s, "the pause to settle")
    time.sleep(PAUSE_SECONDS)
    after = status()
    assert after["state"] == "paused"
    assert after["step"] == at_pause["step"], "a learner step ran while paused"
    assert after["buffer"] == at_pause["buffer"], "the buffer changed while paused"
    assert conserved(after["buffer"])

    shown = cli(url, "status", run_id)
    assert shown.returncode == 0 and f"run {run_id}  paused  step {after['step']}/" in shown.stdout
    as_json = json.loads(cli(url, "status", run_id, "--json").stdout)
    assert as_json["worker_versions"] == {"worker-0": as_json["policy_version"]}

    assert cli(url, "resume").returncode == 0  # RUN omitted: the active run
    wait_for(lambda: status()["step"] >= after["step"] + 3, "steps to advance after resume")
    assert status()["state"] == "running"

    over = cli(url, "scale", run_id, "3")
    assert over.returncode == 1 and "exceed the run's quota cluster.max_rollout_workers=2" in over.stderr
    scaled = cli(url, "scale", run_id, "2")
    assert scaled.returncode == 0, scaled.stderr
    assert f"run {run_id}: running, 1 rollout workers, 2 requested" in scaled.stdout
    two = wait_for(lambda: (s := status())["rollout_workers"] == 2 and s, "the second rollout worker")
    assert set(two["worker_versions"]) == {"worker-0", "worker-1"}
    wait_for(lambda: status()["step"] >= two["step"] + 2, "steps on two workers")

    checkpointed = cli(url, "checkpoint", run_id)
    assert checkpointed.returncode == 0, checkpointed.stderr
    wait_for(lambda: status()["checkpoints"], "the requested checkpoint")

    assert cli(url, "stop", run_id).returncode == 0
    final = wait_for(lambda: (s := status())["state"] in ("stopped", "failed") and s, "the run to stop")
    assert final["state"] == "stopped", final
    assert conserved(final["buffer"])
    run_dir = Path(final["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "stopped" and summary["steps"] == final["step"]
    last = Path(summary["checkpoints"][-1])
    assert last.name == f"step-{final['step']}"
    assert (last / "model" / "model.safetensors").exists() and (last / "driver.json").exists()
    events = (run_dir / "events.log").read_text()
    assert "run paused at step" in events and "run stopped" in events
    assert TOKEN not in events and TOKEN not in (run_dir / "config.yaml").read_text()

    again = cli(url, "stop", run_id)
    assert again.returncode == 1 and "409" in again.stderr and "stopped" in again.stderr


def test_run_created_paused_waits_for_resume(tmp_path):
    run_path = tmp_path / "runs" / "paused"
    arguments = ["run", "--quiet", "--paused", "--run-dir", str(run_path)]
    for item in [*TINY, f"warmstart.cache_dir={tmp_path / 'cache'}", "max_steps=3"]:
        arguments += ["--set", item]
    process = subprocess.Popen(
        [*ORCHARD, *arguments], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        url = read_control_url(process, lines)
        http = httpx.Client(base_url=url, timeout=30)
        wait_for(lambda: http.get("/v1/runs").json()[0]["state"] == "paused", "the run to settle paused")
        time.sleep(2)
        assert http.get("/v1/runs").json()[0]["step"] == 0
        assert http.post("/v1/runs/paused/resume").json() == {"id": "paused", "state": "running"}
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(lines) + output
    assert json.loads((run_path / "summary.json").read_text())["steps"] == 3


def test_serving_beyond_loopback_without_a_token_is_refused(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "ORCHARD_TOKEN"}
    result = subprocess.run(
        [*ORCHARD, "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "without a token" in result.stderr and "ORCHARD_TOKEN" in result.stderr


def test_clients_name_an_unreachable_control_plane():
    result = cli("http://127.0.0.1:1", "status")
    assert result.returncode == 1
    assert "cannot reach the control plane at http://127.0.0.1:1" in result.stderr
