"""Which generated groups reach the learner.

- DAPO's dynamic sampling (Yu et al., 2025): drop a group whose rewards are all equal; it has zero
  advantage, so it carries no gradient.
- Balanced online difficulty filtering (Bae et al., 2025, "Online Difficulty Filtering for
  Reasoning Oriented Reinforcement Learning"): keep a group only if its pass rate
  `p̂ ∈ [low, high]`. The lower bound on the KL between the initial and the optimal policy grows
  with the variance of sampled accuracy `p(1 − p)`, largest at intermediate difficulty.

The driver refills the batch from new rollouts; what was dropped is counted by reason.
"""

from __future__ import annotations

from orchard.records import Group

ZERO_ADVANTAGE = "zero_advantage"
TOO_EASY = "too_easy"
TOO_HARD = "too_hard"
#: Every completion of the group lost its score to a reward model that failed or did not answer.
REWARD_MODEL_ERROR = "reward_model_error"
REASONS = (ZERO_ADVANTAGE, TOO_EASY, TOO_HARD, REWARD_MODEL_ERROR)


def filter_reason(
    pass_rate: float,
    has_signal: bool,
    *,
    dynamic_sampling: bool,
    band: tuple[float, float] | None,
) -> str | None:
    """Why a group with this pass rate is dropped, or None when it is kept.

    `band = (low, high)` enables difficulty filtering; `dynamic_sampling` drops groups without signal
    (all rewards equal). Difficulty is judged first, so an all-correct group counts as too easy.
    """
    if band is not None:
        low, high = band
        if pass_rate > high:
            return TOO_EASY
        if pass_rate < low:
            return TOO_HARD
    if dynamic_sampling and not has_signal:
        return ZERO_ADVANTAGE
    return None


def group_filter_reason(group: Group, *, dynamic_sampling: bool, band: tuple[float, float] | None) -> str | None:
    return filter_reason(group.pass_rate, group.has_signal, dynamic_sampling=dynamic_sampling, band=band)
