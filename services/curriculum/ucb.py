"""DUMP: a UCB scheduler over data distributions (Wang et al., 2025, "DUMP: Automated
Distribution-Level Curriculum Learning for RL-based LLM Post-training"; reference code
`verl/utils/curriculum_learning.py` of ZhentingWang/DUMP).

For each distribution `d` keep a sliding window of the absolute advantages of its most recent
samples. Learnability `L_d = mean |Â|` over the window; `n_d` = samples drawn from `d`,
`N = Σ_k n_k`:

    s_d = L_d + c · sqrt( 2 ln(N + 1) / (n_d + 1) )          (c = 1)
    p_d = softmax(s_d / T)                                   (T = 0.1)

A distribution whose groups all pass or all fail has |Â| = 0 and stops being drawn once its
exploration bonus has shrunk; one where the policy is in between is drawn most.

Not in DUMP: a floor `p_min` per distribution, `p_d = p_min + (1 − D·p_min) · softmax_d` over D
distributions (`curriculum.ucb.min_probability`, 0 by default, which is DUMP's rule). A distribution
the policy fails everywhere at first has |Â| = 0 and, at T = 0.1, is hardly drawn again; plain
sampling's rare successes are what start its learning (measured on the demo: `reversal/d2` stayed at
0.04 held-out under the floorless scheduler while uniform sampling took it to 0.80).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def ucb_scores(learnability: Sequence[float], counts: Sequence[int], *, exploration: float = 1.0) -> list[float]:
    """`s_d = L_d + c · sqrt(2 ln(N + 1) / (n_d + 1))` for every distribution `d`."""
    if len(learnability) != len(counts):
        raise ValueError(f"{len(learnability)} learnability values for {len(counts)} counts")
    total = sum(counts)
    return [
        value + exploration * math.sqrt(2.0 * math.log(total + 1) / (count + 1))
        for value, count in zip(learnability, counts, strict=True)
    ]


def with_floor(probabilities: Sequence[float], floor: float) -> list[float]:
    """`p_min + (1 − D·p_min) · p_d`: every one of the D probabilities at least `floor`, the sum kept 1."""
    if floor < 0 or floor * len(probabilities) > 1:
        raise ValueError(
            f"a floor of {floor} for each of {len(probabilities)} distributions must lie in [0, 1/{len(probabilities)}]"
        )
    scale = 1.0 - floor * len(probabilities)
    return [floor + scale * p for p in probabilities]


def softmax(scores: Sequence[float], *, temperature: float) -> list[float]:
    """`softmax(s / T)`, computed stably."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not scores:
        return []
    top = max(scores)
    weights = [math.exp((score - top) / temperature) for score in scores]
    total = sum(weights)
    return [weight / total for weight in weights]


class UCBScheduler:
    """Sampling probabilities over distributions from their recent learnability and sample counts."""

    def __init__(
        self,
        distributions: Iterable[str],
        *,
        window: int = 300,
        exploration: float = 1.0,
        temperature: float = 0.1,
        min_probability: float = 0.0,
    ) -> None:
        self.distributions = sorted(distributions)
        if not self.distributions:
            raise ValueError("the UCB scheduler needs at least one distribution")
        if min_probability * len(self.distributions) > 1:
            raise ValueError(
                f"curriculum.ucb.min_probability {min_probability} for each of {len(self.distributions)} distributions"
                f" exceeds 1 in all: at most {1 / len(self.distributions):.4g}"
            )
        self.min_probability = min_probability
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.exploration = exploration
        self.temperature = temperature
        self._advantages: dict[str, deque[float]] = {d: deque(maxlen=window) for d in self.distributions}
        self.counts: dict[str, int] = dict.fromkeys(self.distributions, 0)
        self._probabilities = [1.0 / len(self.distributions)] * len(self.distributions)

    def learnability(self) -> dict[str, float]:
        """Mean |advantage| of each distribution's recent samples (0 before any)."""
        return {d: (sum(window) / len(window) if window else 0.0) for d, window in self._advantages.items()}

    def observe(self, distribution: str, absolute_advantages: Iterable[float]) -> None:
        """Record the |Â| of samples of `distribution` (one value per completion)."""
        if distribution not in self._advantages:
            raise KeyError(f"unknown distribution {distribution!r}; the scheduler knows {self.distributions}")
        values = [abs(float(value)) for value in absolute_advantages]
        self._advantages[distribution].extend(values)
        self.counts[distribution] += len(values)

    def update(self) -> dict[str, float]:
        """Recompute the probabilities from the windows and counts (after each learner step)."""
        learnability = self.learnability()
        scores = ucb_scores(
            [learnability[d] for d in self.distributions],
            [self.counts[d] for d in self.distributions],
            exploration=self.exploration,
        )
        self._probabilities = with_floor(softmax(scores, temperature=self.temperature), self.min_probability)
        return self.probabilities()

    def probabilities(self) -> dict[str, float]:
        return dict(zip(self.distributions, self._probabilities, strict=True))

    def sample(self, rng: random.Random) -> str:
        return rng.choices(self.distributions, self._probabilities)[0]

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "distributions": self.distributions,
            "advantages": {d: list(window) for d, window in self._advantages.items()},
            "counts": dict(self.counts),
            "probabilities": list(self._probabilities),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["distributions"]) != self.distributions:
            raise ValueError(
                f"scheduler state is for distributions {list(state['distributions'])}, this run has {self.distributions}"
            )
        for distribution in self.distributions:
            self._advantages[distribution] = deque(state["advantages"][distribution], maxlen=self.window)
            self.counts[distribution] = int(state["counts"][distribution])
        self._probabilities = [float(p) for p in state["probabilities"]]
