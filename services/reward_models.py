"""The run's reward models: `reward_models.<name>.num_actors` Ray actors each, serving a
`RewardModelScorer` (verifiers/reward_model.py) to the rollout workers' `RewardModelVerifier`s.

They are started before the rollout workers, which are handed their actors; a model that cannot be
loaded within `load_timeout_seconds` fails the run at set-up with the model's name and the error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from orchard.config import RewardModelConfig, RunConfig
from orchard.services.run.loop import DriverError
from orchard.verifiers.reward_model import RewardModelScorer

RewardModelActor = ray.remote(RewardModelScorer)


class RewardModelServers:
    def __init__(self, config: RunConfig, log: Callable[[str], None]) -> None:
        self.actors: dict[str, list[Any]] = {}
        self.settings: dict[str, RewardModelConfig] = dict(config.reward_models)
        for name, settings in self.settings.items():
            options = {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}
            self.actors[name] = [
                RewardModelActor.options(**options).remote(
                    settings.path,
                    batch_size=settings.batch_size,
                    max_length=settings.max_length,
                    transform=settings.transform,
                )
                for _ in range(settings.num_actors)
            ]
        for name, actors in self.actors.items():
            settings = self.settings[name]
            try:
                ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=settings.load_timeout_seconds)
            except ray.exceptions.GetTimeoutError:
                self.close()
                raise DriverError(
                    f"reward model {name!r} ({settings.path}) did not load within load_timeout_seconds="
                    f"{settings.load_timeout_seconds:g}: the cluster may lack {settings.num_cpus:g} CPUs and "
                    f"{settings.num_gpus:g} GPUs per actor for {settings.num_actors} actors"
                ) from None
            except ray.exceptions.RayError as error:
                self.close()
                raise DriverError(f"reward model {name!r} could not be loaded from {settings.path}: {error}") from None
            log(f"reward model {name!r}: {len(actors)} actor(s) serving {settings.path}")

    def for_workers(self) -> dict[str, tuple[RewardModelConfig, list[Any]]]:
        """What each rollout worker is handed: every model's settings and actors."""
        return {name: (self.settings[name], actors) for name, actors in self.actors.items()}

    def close(self) -> None:
        for actors in self.actors.values():
            for actor in actors:
                ray.kill(actor)
        self.actors = {}
