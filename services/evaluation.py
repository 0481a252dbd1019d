"""Held-out evaluation of a run: greedy accuracy, overall and per distribution.

The driver evaluates with an engine of its own (`RolloutWorkerCore`, CPU runs) or, where it holds none
(vLLM runs), on a rollout worker through `WorkerEvaluator`; both answer `evaluate(prompts)`.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import fmean
from typing import Any

import ray


def evaluate_by_distribution(evaluator: Any, prompts: list) -> tuple[float, dict[str, float]]:
    """Greedy held-out accuracy, overall and per distribution."""
    if not prompts:
        return 0.0, {}
    result = evaluator.evaluate(prompts)
    by_distribution: dict[str, list[bool]] = defaultdict(list)
    for prompt, correct in zip(prompts, result.correct, strict=True):
        by_distribution[prompt.distribution].append(correct)
    return fmean(result.correct), {d: fmean(v) for d, v in sorted(by_distribution.items())}


class WorkerEvaluator:
    """Held-out evaluation on a rollout worker (vLLM runs: the driver holds no engine of its own), with
    the weights that worker holds; the version that answered is the `EvalResult`'s."""

    def __init__(self, worker: Any) -> None:
        self._worker = worker  # a callable returning the current actor (it may have been replaced)
        self.policy_version = -1

    def load_weights(self, version: int, weights: Any) -> dict[str, Any]:
        return {"version": version, "seconds": 0.0, "skipped": True}  # the worker gets every version anyway

    def evaluate(self, prompts: list) -> Any:
        result = ray.get(self._worker().evaluate.remote(prompts))
        self.policy_version = result.policy_version
        return result
