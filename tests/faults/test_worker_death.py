"""A rollout worker's process killed mid-run: the driver restarts it and re-issues its work.

Real faults: the worker actor's process gets SIGKILL while the run goes on (real local Ray).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from orchard.services.driver import Driver, DriverError
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config


def run_in_thread(driver: Driver) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["summary"] = driver.run()
        except BaseException as error:  # recorded for the test to assert on
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def kill_worker_when(driver: Driver, step: int, timeout: float = 240.0) -> int:
    """SIGKILL worker-0's process once the run has done `step` learner steps; returns its pid."""
    deadline = time.monotonic() + timeout
    while driver.step < step:
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.05)
    pid = ray.get(driver.pool.actors["worker-0"].pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_rollout_worker_is_restarted_and_the_run_loses_nothing(ray_local, tmp_path, warm_cache):
    config = small_config(tmp_path, warm_cache, "max_steps=8", "buffer.backend=memory")
    run_dir = RunDirectory(tmp_path, "worker-dies")
    driver = Driver(config, run_dir, show_progress=False)
    thread, outcome = run_in_thread(driver)
    kill_worker_when(driver, 2)
    thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["steps"] == 8 and summary["state"] == "finished"
    conservation(summary)
    assert driver.pool.incarnations["worker-0"] >= 1
    assert driver.weight_sync.worker_versions["worker-0"] == summary["policy_version"]
    assert "rollout worker worker-0 died" in (run_dir.path / "events.log").read_text()
    assert 'orchard_worker_restarts_total{worker="worker-0"} 1.0' in driver.metrics.render().decode()


def test_the_run_fails_with_the_reason_once_restarts_are_used_up(ray_local, tmp_path, warm_cache):
    config = small_config(
        tmp_path, warm_cache, "max_steps=1000", "buffer.backend=memory", "supervision.max_worker_restarts=0"
    )
    run_dir = RunDirectory(tmp_path, "gives-up")
    driver = Driver(config, run_dir, show_progress=False)
    thread, outcome = run_in_thread(driver)
    kill_worker_when(driver, 2)
    thread.join(300)
    error = outcome.get("error")
    assert isinstance(error, DriverError)
    assert "supervision.max_worker_restarts=0" in str(error) and "worker-0" in str(error)
    assert driver.control.state == "failed" and "giving up" in driver.control.reason
    assert "run failed: DriverError" in (run_dir.path / "events.log").read_text()


@pytest.mark.parametrize(
    "when",
    [
        lambda step: step >= 5 and step % 3 != 0,  # past a checkpoint, with steps it does not cover
        lambda step: step >= 3 and step % 3 == 0,  # while it checkpoints (every 3) or exports (evaluated every 2)
    ],
    ids=["between-checkpoints", "at-a-checkpoint"],
)
def test_a_killed_learner_restarts_from_its_checkpoint_and_trains_the_lost_steps_again(
    ray_local, tmp_path, warm_cache, when
):
    config = small_config(tmp_path, warm_cache, "max_steps=10", "buffer.backend=memory", "checkpoint.every_steps=3")
    run_dir = RunDirectory(tmp_path, "learner-dies")
    driver = Driver(config, run_dir, show_progress=False)
    thread, outcome = run_in_thread(driver)
    deadline = time.monotonic() + 240
    while not when(driver.step):
        assert time.monotonic() < deadline, "the run did not reach the step to kill at"
        time.sleep(0.005)
    os.kill(ray.get(driver.learners.actor.pid.remote()), signal.SIGKILL)
    thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["steps"] == 10 and summary["state"] == "finished"
    assert driver.learners.restarts == 1
    events = (run_dir.path / "events.log").read_text()
    assert "learner died" in events and "groups requeued" in events
    steps = [record["step"] for record in run_dir.read_metrics()]
    assert steps == list(range(1, 11)), "the curve repeats or skips steps"
    buffer = summary["buffer"]
    assert (
        buffer["put"] - buffer["duplicates"] == buffer["ready"] + buffer["pending"] + buffer["acked"] + buffer["stale"]
    )
    assert buffer["pending"] == 0 and buffer["acked"] == 4 * 10  # each trained step's groups acknowledged once
    versions = [record["policy_version"] for record in run_dir.read_metrics()]
    assert versions == sorted(versions), "policy versions went back"
