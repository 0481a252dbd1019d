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

Rollout workers added while the run trains (`orchard scale`, autoscaling) get a group of their own,
reserved with `reserve_workers` whether or not the run uses placement groups: a group is placed whole
or not at all, so a scale-up the cluster cannot hold is never half-applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchard.config import RunConfig


class PlacementError(RuntimeError):
    """The cluster could not hold the run's placement groups in time."""


def rollout_bundles(config: RunConfig, workers: int | None = None) -> list[list[dict[str, float]]]:
    """The bundles of each rollout placement group for `workers` workers (default rollout.num_workers):
    one group of all workers' single bundles, or one group per worker (tensor parallel) of one bundle
    per GPU."""
    cpus = config.rollout.num_cpus_per_worker
    gpus = config.cluster.rollout_gpus_per_worker
    workers = config.rollout.num_workers if workers is None else workers
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


#: How often a run waiting for its placement groups looks again.
PLACEMENT_POLL_SECONDS = 1.0


def reserve(config: RunConfig, waiting: Callable[[str], None] | None = None) -> Placement:
    """Create the run's placement groups and wait until the cluster holds them all; `waiting(reason)` is
    called once if they are not placed at once (the run is pending, and says why)."""
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
    asked = f"rollout bundles {rollout_bundles(config)}, learner bundles {learner_bundles(config)}"
    deadline = time.monotonic() + settings.ready_timeout_seconds
    ready = [group.ready() for group in placement.groups]
    told = False
    while True:
        left = deadline - time.monotonic()
        _, unplaced = ray.wait(ready, num_returns=len(ready), timeout=max(0.0, min(PLACEMENT_POLL_SECONDS, left)))
        if not unplaced:
            return placement
        if left <= 0:
            break
        if not told and waiting is not None:
            waiting(f"waiting for the cluster to place {asked}; available now: {ray.available_resources()}")
            told = True
    placement.release()
    raise PlacementError(
        f"the cluster could not place the run's actors within cluster.ready_timeout_seconds="
        f"{settings.ready_timeout_seconds}: {asked} ({settings.rollout_strategy}/{settings.learner_strategy}); "
        f"the cluster has {ray.cluster_resources()}, of which {ray.available_resources()} are free. Add nodes, "
        "stop another run, or lower rollout.num_workers, the GPUs or the CPUs per actor"
    )


@dataclass(frozen=True)
class Slot:
    """Where a rollout worker is placed: bundle `bundle` of `group` (bundle 0 of its own group when tensor parallel)."""

    group: Any
    bundle: int


def initial_slot(placement: Placement | None, index: int) -> Slot | None:
    """Initial rollout worker `index`'s bundle in the run's placement groups (None without them)."""
    if placement is None:
        return None
    if placement.tensor_parallel:
        return Slot(placement.rollout_groups[index], 0)
    return Slot(placement.rollout_groups[0], index)


def rollout_options(config: RunConfig, placement: Placement | None, index: int) -> dict[str, Any]:
    """`.options(...)` of initial rollout worker `index`: its resources and, with placement groups, its bundle."""
    return slot_options(config, initial_slot(placement, index))


def slot_options(config: RunConfig, slot: Slot | None) -> dict[str, Any]:
    """`.options(...)` of a rollout worker placed in `slot` (None: wherever Ray has the resources)."""
    gpus = config.cluster.rollout_gpus_per_worker
    # A tensor-parallel vLLM engine's GPUs are taken by vLLM's own Ray workers, not by the actor.
    options: dict[str, Any] = {"num_cpus": config.rollout.num_cpus_per_worker, "num_gpus": 1 if gpus == 1 else 0}
    if slot is None:
        return options
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if gpus > 1:
        options["num_cpus"] = config.rollout.num_cpus_per_worker / gpus
    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        slot.group, placement_group_bundle_index=slot.bundle, placement_group_capture_child_tasks=gpus > 1
    )
    return options


@dataclass
class WorkerReservation:
    """Placement groups being reserved for rollout workers `names`, which are created once all are placed."""

    names: list[str]
    bundles: list[list[dict[str, float]]]
    groups: list[Any]
    deadline: float
    ready: list[Any] = field(default_factory=list)  # each group's `ready()`, asked once

    def __post_init__(self) -> None:
        self.ready = [group.ready() for group in self.groups]

    @property
    def slots(self) -> dict[str, Slot]:
        """Each name's slot: bundle i of the one group, or bundle 0 of group i (tensor parallel)."""
        if len(self.groups) == 1:
            return {name: Slot(self.groups[0], index) for index, name in enumerate(self.names)}
        return {name: Slot(group, 0) for name, group in zip(self.names, self.groups, strict=True)}

    def placed(self) -> bool:
        """Whether the cluster holds every group now (does not wait)."""
        import ray

        _, waiting = ray.wait(self.ready, num_returns=len(self.ready), timeout=0)
        return not waiting

    def release(self) -> None:
        from ray.util import remove_placement_group

        for group in self.groups:
            remove_placement_group(group)
        self.groups = []


def reserve_workers(config: RunConfig, names: list[str], now: float) -> WorkerReservation:
    """Ask the cluster for the bundles of new rollout workers `names`; returns at once (see `placed`)."""
    from ray.util import placement_group

    settings = config.cluster
    bundles = rollout_bundles(config, len(names))
    strategy = "STRICT_PACK" if settings.rollout_gpus_per_worker > 1 else settings.rollout_strategy
    groups = [placement_group(group, strategy=strategy) for group in bundles]
    return WorkerReservation(names, bundles, groups, deadline=now + settings.ready_timeout_seconds)


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
