"""Held-out evaluation of a run: greedy accuracy, overall and per distribution.

The driver evaluates with an engine of its own (`RolloutWorkerCore`, CPU runs) or, where it holds none
(vLLM runs), on a rollout worker through `WorkerEvaluator`; both answer `evaluate(prompts)`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from statistics import fmean
from typing import Any

import ray

from orchard.config import RunConfig
from orchard.records import Prompt
from orchard.rollout.prompts import PromptFormat
from orchard.rollout.worker import RolloutWorkerCore, WeightsLoaded


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

    def load_weights(self, version: int, weights: Any) -> WeightsLoaded:
        return WeightsLoaded(version, skipped=True)  # the worker gets every version anyway

    def evaluate(self, prompts: list) -> Any:
        result = ray.get(self._worker().evaluate.remote(prompts))
        self.policy_version = result.policy_version
        return result


class HeldOut:
    """A run's held-out evaluation: the first `eval.num_prompts` held-out prompts, answered greedily by
    the newest weights, by an engine of the driver's own (torch engine) or by worker-0 (vLLM)."""

    def __init__(
        self,
        config: RunConfig,
        prompts: Sequence[Prompt],
        prompt_format: PromptFormat,
        *,
        worker: Callable[[], Any],
        readable: Callable[[Any], Any],
        log: Callable[[str], None],
        reward_models: dict[str, tuple[Any, list[Any]]] | None = None,
    ) -> None:
        """`worker()`: the current actor of worker-0; `readable(weights)`: a published version as weights
        one reader can fetch (`LearnerGroup.readable`); `reward_models`: the run's, for prompts they judge."""
        self.prompts = list(prompts[: config.eval.num_prompts])
        self.readable, self.log = readable, log
        if config.rollout.engine == "vllm":  # no engine in the driver: a rollout worker answers
            self.evaluator: Any = WorkerEvaluator(worker)
        else:
            self.evaluator = RolloutWorkerCore(
                "evaluator",
                config.model,
                config.rollout,
                seed=config.seed,
                prompt_format=prompt_format,
                reward_models=reward_models,
            )

    def load(self, version: int, weights: Any) -> None:
        """The weights to evaluate (a state dict, numpy arrays or a weight handle) as policy `version`."""
        self.evaluator.load_weights(version, weights)

    def prompt_states(self, prompts: list) -> Any:
        """The hidden states of `prompts` under the version loaded last (`RolloutWorkerCore.prompt_states`),
        as a numpy array; a vLLM run's evaluator is a rollout worker and has none."""
        if isinstance(self.evaluator, WorkerEvaluator):
            raise NotImplementedError("a vLLM run's evaluator exposes no hidden states")
        return self.evaluator.prompt_states(prompts).numpy()

    def refresh(self, version: int, weights: Any, *, purpose: str) -> None:
        """Load published `weights` as `version` if they are newer than what is held. When they can no
        longer be read (their learner died before exporting them; its restart publishes new ones), the
        version loaded last stays, logged as what `purpose` used."""
        if version > self.evaluator.policy_version and not isinstance(self.evaluator, WorkerEvaluator):
            try:
                self.load(version, ray.get(self.readable(weights)))
            except ray.exceptions.RayActorError as error:
                self.log(f"{purpose} of version {version} used version {self.evaluator.policy_version}: {error}")

    def evaluate(self, version: int, weights: Any | None = None) -> tuple[float, dict[str, float]]:
        """Accuracy, overall and by distribution, of policy `version` (published as `weights`; None: the
        version loaded last). When those weights can no longer be read (their learner died before
        exporting them; its restart publishes new ones), the version loaded last answers, logged."""
        if weights is not None:
            self.refresh(version, weights, purpose="evaluation")
        return evaluate_by_distribution(self.evaluator, self.prompts)
