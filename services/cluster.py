"""Joining or starting the Ray cluster a run's actors live in."""

from __future__ import annotations

import os

from orchard.config import RunConfig


def connect_ray(config: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one.

    A local cluster gets at least as many logical CPUs as the run reserves for its actors with the
    most rollout workers it may have (`cluster.max_rollout_workers`, `rollout.autoscale.max`), so a
    laptop with fewer cores still schedules every actor, those added later included (they then share
    the cores).
    """
    import ray

    if ray.is_initialized():
        return
    show_actor_logs = os.environ.get("ORCHARD_ACTOR_LOGS", "0") == "1"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    most = max(
        config.rollout.num_workers,
        config.cluster.max_rollout_workers or 0,
        config.rollout.autoscale.max if config.rollout.autoscale is not None else 0,
    )
    needed = config.resources(most)["CPU"] + sum(
        model.num_cpus * model.num_actors for model in config.reward_models.values()
    )
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=False,
        log_to_driver=show_actor_logs,
        configure_logging=False,
    )
