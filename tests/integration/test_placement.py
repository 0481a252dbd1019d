"""Placement groups on the local Ray: actors land in the bundles reserved for them."""

from __future__ import annotations

import pytest
import ray

from orchard.config import RunConfig
from orchard.services.placement import (
    PlacementError,
    learner_bundles,
    learner_options,
    reserve,
    rollout_bundles,
    rollout_options,
)


@ray.remote
class Probe:
    def where(self) -> dict:
        group = ray.util.get_current_placement_group()
        return {"group": group.id.hex() if group is not None else None}


def config(**cluster) -> RunConfig:
    return RunConfig(
        rollout={"num_workers": 2, "num_cpus_per_worker": 1},
        learner={"num_cpus": 1},
        cluster={"placement_groups": True, "ready_timeout_seconds": 20, **cluster},
    )


def test_bundles_follow_the_config():
    assert rollout_bundles(config()) == [[{"CPU": 1.0}, {"CPU": 1.0}]]
    assert rollout_bundles(config(rollout_gpus_per_worker=1)) == [[{"CPU": 1.0, "GPU": 1.0}] * 2]
    # tensor parallel: a group per engine, one GPU bundle per rank
    assert rollout_bundles(config(rollout_gpus_per_worker=2)) == [[{"CPU": 0.5, "GPU": 1.0}] * 2] * 2
    assert learner_bundles(config(learner_gpus=1)) == [{"CPU": 1.0, "GPU": 1.0}]
    assert learner_options(config(learner_gpus=1), None) == {"num_cpus": 1.0, "num_gpus": 1}
    assert rollout_options(config(), None, 0) == {"num_cpus": 1.0, "num_gpus": 0}


def test_workers_and_learner_land_in_their_bundles(ray_local):
    run = config()
    placement = reserve(run)
    try:
        workers = [Probe.options(**rollout_options(run, placement, index)).remote() for index in range(2)]
        learner = Probe.options(**learner_options(run, placement)).remote()
        replies = ray.get([actor.where.remote() for actor in [*workers, learner]])
        rollout_id, learner_id = placement.rollout_groups[0].id.hex(), placement.learner_group.id.hex()
        assert [reply["group"] for reply in replies] == [rollout_id, rollout_id, learner_id]
        # each bundle holds one actor's CPU: both workers running means each has a bundle of its own,
        # and a third actor asking for worker 0's bundle waits
        extra = Probe.options(**rollout_options(run, placement, 0)).remote()
        ready, _ = ray.wait([extra.where.remote()], timeout=2)
        assert not ready
        ray.kill(extra)
        for actor in [*workers, learner]:
            ray.kill(actor)
    finally:
        placement.release()


def test_a_cluster_too_small_is_reported_with_what_it_has(ray_local):
    run = RunConfig(
        rollout={"num_workers": 9, "num_cpus_per_worker": 1},
        cluster={"placement_groups": True, "ready_timeout_seconds": 2},
    )
    with pytest.raises(PlacementError, match="could not place the run's actors"):
        reserve(run)
    assert ray.util.placement_group_table()  # groups were created ...
    live = [g for g in ray.util.placement_group_table().values() if g["state"] not in ("REMOVED",)]
    assert not live  # ... and all given back
