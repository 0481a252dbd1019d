"""The run loop with the GPU path's settings on CPUs: weights by broadcast (transport 'nccl', which is
gloo here) and the actors in placement groups."""

from __future__ import annotations

from services.driver import Driver
from services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config


def test_short_run_with_broadcast_weights_in_placement_groups(ray_local, tmp_path, warm_cache):
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        "rollout.num_workers=2",
        "rollout.num_cpus_per_worker=0.5",
        "learner.num_cpus=0.5",
        "weight_sync.transport=nccl",
        "weight_sync.bucket_mb=0.05",
        "weight_sync.timeout_seconds=120",
        "cluster.placement_groups=true",
    )
    run_dir = RunDirectory(tmp_path, "broadcast")
    driver = Driver(config, run_dir, show_progress=False)
    summary = driver.run()
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    events = (run_dir.path / "events.log").read_text()
    assert "weight broadcast group formed: 3 ranks over gloo" in events
    # versions after the first arrived by broadcast, and every worker confirmed some
    assert driver.weight_sync.latest.transport == "broadcast"
    assert summary["weight_sync_seconds_mean"] is not None
    assert min(driver.weight_sync.worker_versions.values()) >= 2
    metrics = run_dir.read_metrics()
    assert metrics[1]["eval_accuracy"] is not None  # the evaluator got the weights as a copy
    conservation(summary)
