"""GAIN-RL: prompts ranked by the starting policy's angle concentration, drawn from a Gaussian over the
ranking whose mean moves with the policy's accuracy (Wang et al., 2025, "Angles Don't Lie: Unlocking
Training-Efficient RL Through the Model's Own Signals", arXiv:2506.02281; reference code
wangqinsi1/GAINRL: `data_processor.py`, `verl/trainer/ppo/gainrl_sampler.py`).

For a linear layer `a = xW` over token states `x_i`, `‖∇_W L‖²_F = Σ_i Σ_j ‖x_i‖‖x_j‖ cos θ_ij ⟨∂L/∂a_i,
∂L/∂a_j⟩`: a prompt whose token states point the same way (high angle concentration) gives large
updates, and models learn such prompts first. With `u_t = h_t / ‖h_t‖` the input of the last layer's MLP up-projection at token `t`
(`rollout.hidden_states`), `Q` the question's tokens and `K` the context before them:

    C_intra = mean_{i<j ∈ Q} u_i·u_j          C_inter = mean_{i∈Q, j∈K} u_i·u_j
    C = C_intra + w · C_inter                 (w = curriculum.gain.inter_weight, 1; C = C_intra without K)

Prompts are ranked by `C`, highest first, once. Rank `i` (0-based) of a pool of `N` is drawn with

    p_i ∝ exp(−½ ((i − μ) / σ)²)              without replacement within a call; μ starts at 0

and after every learner step, with `acc` the mean pass rate and `ang` the mean `C` of the prompts whose
groups were observed since the step before:

    μ ← clip(μ + clamp(n·tanh(α(acc − β)) + n·tanh(α·ang), adj_min, adj_max), 0, N − 1)

*Differs from the reference:* its preprocessing weights `C_inter` by 8 and masks the cosine matrix with
fixed template offsets, here the means are over the pairs named above and `w` is a config field; its
reward is 0/2, so it uses `acc/2`, a pass rate is already in [0, 1]; its `ang` is measured on each
training sequence (prompt and response) by the current policy, here it is the ranking's `C` of the
batch's prompts; μ is kept inside the ranking (the reference lets it run past the end, where the
Gaussian's truncated tail puts ever more weight on the last ranks). σ, n, adj_min, adj_max are given as
fractions of `N` (the reference's 1000, 500, 0, 1000 for GSM8K's 7473 prompts, divided by 7473).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from orchard.config import GainConfig
from orchard.records import Group, Prompt
from orchard.verifiers.sources import PromptPool


def angle_concentration(
    hidden: torch.Tensor,
    question_start: int,
    question_end: int | None = None,
    *,
    context_start: int = 0,
    inter_weight: float = 1.0,
) -> float:
    """`C = C_intra + w · C_inter` of one prompt's `[tokens, hidden]` states (module docstring).

    The question is tokens `[question_start, question_end)` (to the end when None), the context
    `[context_start, question_start)`; without context `C = C_intra`. A one-token question has
    `C_intra = 1` (its only pair is the token with itself). A zero vector has cosine 0 with everything.
    Computed in O(tokens · hidden): `Σ_{i<j} u_i·u_j = (‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / 2`."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden states must be [tokens, hidden], got shape {tuple(hidden.shape)}")
    tokens = hidden.shape[0]
    end = tokens if question_end is None else question_end
    if not 0 <= context_start <= question_start < end <= tokens:
        raise ValueError(
            f"need 0 <= context_start ({context_start}) <= question_start ({question_start}) < question_end ({end})"
            f" <= tokens ({tokens}): the question must hold at least one token"
        )
    units = torch.nn.functional.normalize(hidden.double(), dim=1)
    question = units[question_start:end]
    size = question.shape[0]
    if size == 1:
        intra = 1.0
    else:
        total = question.sum(dim=0)
        pairs = (total.dot(total) - question.pow(2).sum()) / 2
        intra = float(pairs) / (size * (size - 1) / 2)
    context = units[context_start:question_start]
    if context.shape[0] == 0:
        return intra
    inter = float(question.sum(dim=0).dot(context.sum(dim=0))) / (size * context.shape[0])
    return intra + inter_weight * inter


def gaussian_rank_probabilities(size: int, mean: float, std: float) -> np.ndarray:
    """`p_i ∝ exp(−½ ((i − μ) / σ)²)` for ranks `i = 0 … size − 1`, normalised over them (computed from the
    largest exponent down, so a mean far outside the ranks still gives a distribution)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    exponents = -0.5 * ((np.arange(size, dtype=np.float64) - mean) / std) ** 2
    weights = np.exp(exponents - exponents.max())
    return weights / weights.sum()


def draw_without_replacement(probabilities: np.ndarray, count: int, generator: np.random.Generator) -> list[int]:
    """`count` distinct indexes, each next one drawn by `probabilities` renormalised over those not yet drawn
    (Gumbel top-k: the `count` largest `log p_i + G_i`, `G_i` standard Gumbel; an index of probability 0 only
    once every other has been drawn). Most probable first is not implied: the order is the draw's."""
    if not 0 <= count <= len(probabilities):
        raise ValueError(f"cannot draw {count} distinct indexes out of {len(probabilities)}")
    with np.errstate(divide="ignore"):
        keys = np.log(probabilities) + generator.gumbel(size=len(probabilities))
    keys = np.where(np.isfinite(keys), keys, -np.inf)
    # ties among -inf keys (probability 0) are broken by a second key so the draw stays random
    order = np.lexsort((generator.random(len(keys)), -keys))
    return [int(index) for index in order[:count]]


def shift_mean(
    mean: float,
    accuracy: float,
    angle: float,
    *,
    step: float,
    alpha: float,
    beta: float,
    adj_min: float,
    adj_max: float,
) -> float:
    """`μ + clamp(n·tanh(α(acc − β)) + n·tanh(α·ang), adj_min, adj_max)`, all in rank units (`n` = `step`)."""
    adjustment = step * math.tanh(alpha * (accuracy - beta)) + step * math.tanh(alpha * angle)
    return mean + min(max(adjustment, adj_min), adj_max)


def gain_candidates(pool: PromptPool, size: int, seed: int) -> list[Prompt]:
    """The prompts GAIN-RL ranks: a finite pool whole up to `size` prompts (beyond, `size` of them chosen by
    `seed`, in the pool's order); otherwise `size` draws of the pool (`sample_train`, by source weight) with
    `random.Random(seed)`. A prompt id is kept once, at its first occurrence."""
    finite = pool.finite_train_prompts()
    rng = random.Random(seed)
    if finite is None:
        drawn = pool.sample_train(size, rng)
    elif len(finite) > size:
        drawn = [finite[index] for index in sorted(rng.sample(range(len(finite)), size))]
    else:
        drawn = finite
    unique: dict[str, Prompt] = {}
    for prompt in drawn:
        unique.setdefault(prompt.id, prompt)
    return list(unique.values())


def _fingerprint(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256("\n".join(prompt.id for prompt in prompts).encode()).hexdigest()[:16]


class GainSelector:
    """The ranked prompts, the Gaussian's mean μ (in ranks) and what was observed since the last step.

    Built over its candidates unranked; `rank` (the driver, once, from the starting policy) or
    `load_state_dict` (a restarted driver) orders them. Its state is JSON: the order as candidate
    indexes, the concentrations, μ and the pending sums, with a fingerprint of the candidates' ids."""

    def __init__(self, candidates: Sequence[Prompt], config: GainConfig) -> None:
        if not candidates:
            raise ValueError("GAIN-RL needs at least one training prompt to rank")
        self.candidates = list(candidates)
        self.config = config
        self.ranked: list[Prompt] = []
        self._order: list[int] = []  # candidate index of each rank
        self.concentrations: list[float] = []  # by rank, highest first
        self._concentration_of: dict[str, float] = {}
        self.mean = 0.0
        self._observed = 0
        self._accuracy_sum = 0.0
        self._angle_sum = 0.0
        self._angles = 0

    # ------------------------------------------------------------------------------ ranking
    @property
    def is_ranked(self) -> bool:
        return bool(self.ranked)

    def rank(self, concentrations: Sequence[float]) -> None:
        """Order the candidates by their concentrations (given in candidate order), highest first; ties
        keep the candidates' order."""
        if len(concentrations) != len(self.candidates):
            raise ValueError(f"{len(concentrations)} concentrations for {len(self.candidates)} candidates")
        if not all(math.isfinite(value) for value in concentrations):
            raise ValueError("angle concentrations must be finite")
        order = sorted(range(len(self.candidates)), key=lambda index: -concentrations[index])
        self._set_order(order, [float(concentrations[index]) for index in order])

    def _set_order(self, order: Sequence[int], concentrations: Sequence[float]) -> None:
        self.ranked = [self.candidates[index] for index in order]
        self._order = list(order)
        self.concentrations = list(concentrations)
        self._concentration_of = {p.id: c for p, c in zip(self.ranked, self.concentrations, strict=True)}

    def in_ranks(self, fraction: float) -> float:
        """A config fraction of the pool in rank units."""
        return fraction * len(self.candidates)

    def probabilities(self) -> np.ndarray:
        """The current probability of each rank."""
        return gaussian_rank_probabilities(len(self.ranked), self.mean, self.in_ranks(self.config.std))

    def distribution_probabilities(self) -> dict[str, float]:
        """The probability that the next prompt is of each distribution (the ranks' probabilities summed)."""
        totals: dict[str, float] = {}
        for prompt, probability in zip(self.ranked, self.probabilities().tolist(), strict=True):
            totals[prompt.distribution] = totals.get(prompt.distribution, 0.0) + probability
        return dict(sorted(totals.items()))

    # ------------------------------------------------------------------------------ choosing and learning
    def next_prompts(self, count: int, rng: random.Random) -> list[Prompt]:
        """`count` prompts drawn from the Gaussian, distinct while the ranking holds enough of them."""
        if not self.ranked:
            raise RuntimeError("GAIN-RL draws from its ranking, and the prompts have not been ranked yet")
        generator = np.random.default_rng(rng.getrandbits(64))
        probabilities = self.probabilities()
        chosen: list[int] = []
        while len(chosen) < count:
            chosen += draw_without_replacement(probabilities, min(count - len(chosen), len(self.ranked)), generator)
        return [self.ranked[index] for index in chosen]

    def observe(self, groups: Sequence[Group]) -> None:
        """Add the pass rates (and the concentrations, for ranked prompts) of one rollout's groups to the
        batch the next learner step moves μ by."""
        for group in groups:
            self._observed += 1
            self._accuracy_sum += group.pass_rate
            concentration = self._concentration_of.get(group.prompt.id)
            if concentration is not None:
                self._angle_sum += concentration
                self._angles += 1

    def on_learner_step(self) -> float:
        """Move μ by the groups observed since the last step (unchanged when there were none); returns it."""
        if self._observed:
            accuracy = self._accuracy_sum / self._observed
            angle = self._angle_sum / self._angles if self._angles else 0.0
            config = self.config
            moved = shift_mean(
                self.mean,
                accuracy,
                angle,
                step=self.in_ranks(config.step),
                alpha=config.alpha,
                beta=config.beta,
                adj_min=self.in_ranks(config.adj_min),
                adj_max=self.in_ranks(config.adj_max),
            )
            self.mean = min(max(moved, 0.0), float(len(self.candidates) - 1))
        self._observed, self._accuracy_sum, self._angle_sum, self._angles = 0, 0.0, 0.0, 0
        return self.mean

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": _fingerprint(self.candidates),
            "order": list(self._order) if self._order else None,
            "concentrations": self.concentrations,
            "mean": self.mean,
            "pending": [self._observed, self._accuracy_sum, self._angle_sum, self._angles],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["candidates"] != _fingerprint(self.candidates):
            raise ValueError(
                "the saved GAIN-RL ranking was made over other prompts (data sources, seed or"
                " curriculum.gain.pool_size changed); start a new run to rank these"
            )
        if state["order"] is not None:
            order = [int(index) for index in state["order"]]
            if sorted(order) != list(range(len(self.candidates))):
                raise ValueError("the saved GAIN-RL ranking is not an order of its candidates")
            self._set_order(order, [float(value) for value in state["concentrations"]])
        self.mean = float(state["mean"])
        observed, accuracy_sum, angle_sum, angles = state["pending"]
        self._observed, self._accuracy_sum, self._angle_sum, self._angles = (
            int(observed),
            float(accuracy_sum),
            float(angle_sum),
            int(angles),
        )
