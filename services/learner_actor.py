"""The learner as a Ray actor: a thin shell around `learner.trainer.GRPOTrainer`."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from orchard.config import RunConfig
from orchard.records import Group


class LearnerCore:
    """Builds the policy, loads the warm-start weights and trains with DeepSpeed."""

    def __init__(self, config: RunConfig, initial_weights: Mapping[str, Any], initial_version: int = 0) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(config.learner.torch_threads)
        from learner.trainer import GRPOTrainer
        from learner.weights import numpy_to_state_dict
        from rollout.model import build_model
        from rollout.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.model)
        model = build_model(config.model, tokenizer)
        model.load_state_dict(numpy_to_state_dict(initial_weights), strict=False)
        temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        self.trainer = GRPOTrainer(
            model,
            config.learner,
            pad_id=tokenizer.pad_id,
            seed=config.seed,
            temperature=temperature,
            max_length=config.rollout.max_new_tokens,
        )
        self.version = initial_version

    def train_step(self, groups: Sequence[Group]) -> dict[str, Any]:
        started = time.perf_counter()
        result = self.trainer.train_step(groups)
        if not result.skipped:
            self.version += 1
        record = dict(vars(result))
        record["policy_version"] = self.version
        record["actor_seconds"] = time.perf_counter() - started
        return record

    def export_weights(self) -> dict[str, Any]:
        from learner.weights import state_dict_to_numpy

        return state_dict_to_numpy(self.trainer.export_weights())

    def save_checkpoint(self, path: str) -> str:
        self.trainer.save_checkpoint(path)
        return path

    def ping(self) -> int:
        return self.version


LearnerActor = ray.remote(LearnerCore)
