"""A reward model served by Ray actors, as a rollout worker's verifier (`verifier: reward_model:<name>`).

`RewardModelVerifier` sends a call's completions to the model's actors in one batch per actor
(`verify_many`; `verify` is a batch of one), combines each score with the configured rule
verifier (`verifiers/reward_model.py: combined`), and turns a model that fails or does not answer
within `timeout_seconds` into a verifier error on every completion of the batch, naming the model:
the run's intake drops such groups (reason `reward_model_error`) instead of training on made-up
rewards, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from orchard.config import RewardModelConfig
from orchard.protocols import VerifierResult
from orchard.records import Prompt
from orchard.verifiers.registry import get_verifier, safe_verify
from orchard.verifiers.reward_model import REWARD_MODEL_PREFIX, combined

#: What every verifier error of a reward model begins with (the intake recognises it).
REWARD_MODEL_ERROR = "reward model "


class RewardModelVerifier:
    def __init__(self, name: str, settings: RewardModelConfig, actors: Sequence[Any]) -> None:
        if not actors:
            raise ValueError(f"reward model {name!r} has no actors")
        self.name = f"{REWARD_MODEL_PREFIX}{name}"
        self.model, self.settings, self.actors = name, settings, list(actors)
        self.rule = get_verifier(settings.rule) if settings.rule else None

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        return self.verify_many([(prompt, completion)])[0]

    def verify_many(self, items: Sequence[tuple[Prompt, str]]) -> list[VerifierResult]:
        """One result per (prompt, completion): the model's scores, split evenly over its actors."""
        if not items:
            return []
        pairs = [(prompt.text, completion) for prompt, completion in items]
        share = -(-len(pairs) // len(self.actors))
        chunks = [pairs[start : start + share] for start in range(0, len(pairs), share)]
        calls = [actor.score.remote(chunk) for actor, chunk in zip(self.actors, chunks, strict=False)]
        timeout = self.settings.timeout_seconds
        try:
            scores = [score for part in ray.get(calls, timeout=timeout) for score in part]
        except ray.exceptions.GetTimeoutError:
            for call in calls:
                ray.cancel(call)
            return self._failed(len(items), f"gave no scores within timeout_seconds={timeout:g}")
        except ray.exceptions.RayError as error:
            return self._failed(len(items), f"failed: {type(error).__name__}: {error}")
        if len(scores) != len(items):
            return self._failed(len(items), f"returned {len(scores)} scores for {len(items)} completions")
        rules = [safe_verify(self.rule, p, c) for p, c in items] if self.rule is not None else [None] * len(items)
        settings = self.settings
        return [
            combined(
                score, rule, mode=settings.combine, rule_weight=settings.rule_weight, model_weight=settings.model_weight
            )
            for score, rule in zip(scores, rules, strict=True)
        ]

    def _failed(self, count: int, why: str) -> list[VerifierResult]:
        message = f"{REWARD_MODEL_ERROR}{self.model!r} {why}"
        return [VerifierResult(reward=0.0, correct=False, error=message) for _ in range(count)]
