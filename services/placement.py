"""Ray placement groups for the rollout workers and the learner (`cluster` in the config).

With `cluster.placement_groups` the run reserves, before creating any actor,

- the rollout workers' bundles: one bundle each (`{"CPU": rollout.num_cpus_per_worker, "GPU": 1}`,
  or CPU only) in one group placed by `cluster.rollout_strategy`; a worker whose vLLM engine spans
  several GPUs (`rollout_gpus_per_worker` > 1, tensor parallel) gets a group of its own with one
  1-GPU bundle per tensor-parallel rank, STRICT_PACK (one node), and vLLM's own Ray workers are
  placed in it (the worker actor runs in bundle 0 and lets its child tasks inherit the group);
- the learner's bundles, one per rank (`{"CPU": learner.num_cpus, "GPU": cluster.learner_gpus}`), in
  a group placed by `cluster.learner_strategy`.

`rollout_options` and `learner_options` give the keyword arguments of `.options(...)` for each
actor, with or without placement groups, so the driver creates actors the same way either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchard.config import RunConfig


class PlacementError(RuntimeError):
    """The cluster could not hold the run's placement groups in time."""


def rollout_bundles(config: RunConfig) -> list[list[dict[str, float]]]:
    """The bundles of each rollout placement group: one group of all workers' single bundles, or one
    group per worker (tensor parallel) of one bundle per GPU."""
    cpus = config.rollout.num_cpus_per_worker
    gpus = config.cluster.rollout_gpus_per_worker
    workers = config.rollout.num_workers
    if gpus <= 1:
        bundle = {"CPU": cpus, **({"GPU": 1.0} if gpus == 1 else {})}
        return [[dict(bundle) for _ in range(workers)]]
    return [[{"CPU": cpus / gpus, "GPU": 1.0} for _ in range(gpus)] for _ in range(workers)]


def learner_bundles(config: RunConfig) -> list[dict[str, float]]:
    """One bundle per learner rank."""
    gpus = config.cluster.learner_gpus
    bundle = {"CPU": config.learner.num_cpus, **({"GPU": float(gpus)} if gpus else {})}
    return [dict(bundle) for _ in range(config.cluster.learner_ranks)]


@dataclass
class Placement:
    """The reserved placement groups; `release` gives them back."""

    rollout_groups: list[Any]
    learner_group: Any
    tensor_parallel: bool
    groups: list[Any] = field(default_factory=list)

    def release(self) -> None:
        from ray.util import remove_placement_group

        for group in self.groups:
            remove_placement_group(group)
        self.groups = []


def reserve(config: RunConfig) -> Placement:
    """Create the run's placement groups and wait until the cluster holds them all."""
    import ray
    from ray.util import placement_group

    settings = config.cluster
    tensor_parallel = settings.rollout_gpus_per_worker > 1
    rollout_groups = [
        placement_group(bundles, strategy="STRICT_PACK" if tensor_parallel else settings.rollout_strategy)
        for bundles in rollout_bundles(config)
    ]
    learner_group = placement_group(learner_bundles(config), strategy=settings.learner_strategy)
    placement = Placement(rollout_groups, learner_group, tensor_parallel, [*rollout_groups, learner_group])
    ready, waiting = ray.wait(
        [group.ready() for group in placement.groups],
        num_returns=len(placement.groups),
        timeout=settings.ready_timeout_seconds,
    )
    if waiting:
        placement.release()
        raise PlacementError(
            f"the cluster could not place the run's actors within cluster.ready_timeout_seconds="
            f"{settings.ready_timeout_seconds}: rollout bundles {rollout_bundles(config)}, learner bundles "
            f"{learner_bundles(config)} ({settings.rollout_strategy}/{settings.learner_strategy}); the cluster has "
            f"{ray.cluster_resources()}. Add nodes or lower rollout.num_workers, the GPUs or the CPUs per actor"
        )
    return placement


def rollout_options(config: RunConfig, placement: Placement | None, index: int) -> dict[str, Any]:
    """`.options(...)` of rollout worker `index`: its resources and, with placement groups, its bundle."""
    gpus = config.cluster.rollout_gpus_per_worker
    # A tensor-parallel vLLM engine's GPUs are taken by vLLM's own Ray workers, not by the actor.
    options: dict[str, Any] = {"num_cpus": config.rollout.num_cpus_per_worker, "num_gpus": 1 if gpus == 1 else 0}
    if placement is None:
        return options
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if placement.tensor_parallel:
        options["num_cpus"] = config.rollout.num_cpus_per_worker / gpus
        strategy = PlacementGroupSchedulingStrategy(
            placement.rollout_groups[index], placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
    else:
        strategy = PlacementGroupSchedulingStrategy(placement.rollout_groups[0], placement_group_bundle_index=index)
    options["scheduling_strategy"] = strategy
    return options


def learner_options(config: RunConfig, placement: Placement | None, rank: int = 0) -> dict[str, Any]:
    """`.options(...)` of learner rank `rank`: its resources and, with placement groups, its bundle."""
    options: dict[str, Any] = {"num_cpus": config.learner.num_cpus, "num_gpus": config.cluster.learner_gpus}
    if placement is None:
        return options
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        placement.learner_group, placement_group_bundle_index=rank
    )
    return options
