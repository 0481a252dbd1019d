"""Killed mid-run under weight transport 'nccl' (gloo on CPUs): a rollout worker is restarted, given the
newest weights through the object store and put in a new broadcast group; a learner is replaced and
forms a new group."""

from __future__ import annotations

import os
import signal
import time

import ray

from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from tests.faults.test_worker_death import kill_worker_when, run_in_thread
from tests.integration.test_driver import conservation, small_config


def test_a_killed_worker_rejoins_a_new_broadcast_group(ray_local, tmp_path, warm_cache):
    config = small_config(
        tmp_path,
        warm_cache,
        "max_steps=6",
        "buffer.backend=memory",
        "weight_sync.transport=nccl",
        "weight_sync.timeout_seconds=30",
    )
    run_dir = RunDirectory(tmp_path, "broadcast-worker-dies")
    driver = Driver(config, run_dir, show_progress=False)
    thread, outcome = run_in_thread(driver)
    kill_worker_when(driver, 2)
    thread.join(400)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["steps"] == 6 and summary["state"] == "finished"
    conservation(summary)
    assert driver.pool.incarnations["worker-0"] >= 1
    events = (run_dir.path / "events.log").read_text()
    assert events.count("weight broadcast group formed") >= 2
    assert driver.weight_sync.worker_versions["worker-0"] >= 4  # versions after the restart arrived


def test_a_killed_learner_is_replaced_and_broadcasts_to_a_new_group(ray_local, tmp_path, warm_cache):
    """The learner's process killed under transport 'nccl': a new learner from the last checkpoint
    forms a new group with the workers and broadcasts its weights under a new version."""
    config = small_config(
        tmp_path,
        warm_cache,
        "max_steps=8",
        "buffer.backend=memory",
        "checkpoint.every_steps=3",
        "weight_sync.transport=nccl",
        "weight_sync.timeout_seconds=30",
    )
    run_dir = RunDirectory(tmp_path, "broadcast-learner-dies")
    driver = Driver(config, run_dir, show_progress=False)
    thread, outcome = run_in_thread(driver)
    deadline = time.monotonic() + 240
    while driver.step < 4:
        assert time.monotonic() < deadline, "the run did not reach step 4"
        time.sleep(0.005)
    os.kill(ray.get(driver.learners.actor.pid.remote()), signal.SIGKILL)
    thread.join(400)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["steps"] == 8 and summary["state"] == "finished"
    assert driver.learners.restarts == 1
    events = (run_dir.path / "events.log").read_text()
    assert "learner died" in events and events.count("weight broadcast group formed") >= 2
    assert min(driver.weight_sync.worker_versions.values()) > 4  # versions of the new learner arrived
