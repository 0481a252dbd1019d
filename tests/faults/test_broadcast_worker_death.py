"""A rollout worker killed mid-run under weight transport 'nccl' (gloo on CPUs): the driver restarts
it, gives it the newest weights through the object store and forms a new broadcast group with it."""

from __future__ import annotations

from services.driver import Driver
from services.run_dir import RunDirectory
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
    assert driver.worker_restarts["worker-0"] >= 1
    events = (run_dir.path / "events.log").read_text()
    assert events.count("weight broadcast group formed") >= 2
    assert driver.weight_sync.worker_versions["worker-0"] >= 4  # versions after the restart arrived
