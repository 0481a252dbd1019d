"""Rollout–training mismatch and its corrections (learner.recompute_old_logprobs, learner.tis_cap),
against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.config import LearnerConfig
from orchard.learner.algorithms import MAX_LOG_RATIO, logprob_mismatch, truncated_importance_weights


def test_tis_weights_are_the_ratio_capped_and_detached():
    learner = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    behaviour = torch.tensor([[-1.0, -1.5, -1.9]])
    weights = truncated_importance_weights(learner, behaviour, cap=2.0)
    # exp(0) = 1, exp(1) = 2.718 capped at 2, exp(-0.1) = 0.905 (no lower bound)
    assert weights[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-0.1)])
    assert not weights.requires_grad


def test_tis_weights_stay_finite_for_extreme_log_ratios():
    weights = truncated_importance_weights(torch.tensor([[0.0, -1e4]]), torch.tensor([[-1e4, 0.0]]), cap=5.0)
    assert weights[0].tolist() == pytest.approx([5.0, math.exp(-MAX_LOG_RATIO)])


@pytest.mark.parametrize("cap", [0.0, -1.0, math.inf, math.nan])
def test_tis_cap_must_be_a_positive_number(cap):
    with pytest.raises(ValueError, match="TIS cap must be a positive number"):
        truncated_importance_weights(torch.zeros(1, 2), torch.zeros(1, 2), cap)


def test_tis_shapes_must_agree():
    with pytest.raises(ValueError, match="must equal behaviour_logprobs shape"):
        truncated_importance_weights(torch.zeros(1, 2), torch.zeros(2, 2), 2.0)


def test_mismatch_is_k3_and_absolute_differences_over_the_masked_tokens():
    learner = torch.tensor([[-1.0, -0.5, -3.0], [-2.0, 0.0, 0.0]])
    behaviour = torch.tensor([[-1.1, -0.5, -9.0], [-1.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the -9 (masked out) must not count
    result = logprob_mismatch(learner, behaviour, mask)
    deltas = [0.1, 0.0, -0.5]
    assert result["tokens"] == 3
    assert result["k3"] == pytest.approx(sum(math.exp(d) - d - 1 for d in deltas) / 3)
    assert result["abs_mean"] == pytest.approx(0.2)
    assert result["abs_max"] == pytest.approx(0.5)


def test_no_compared_tokens_give_zeros():
    result = logprob_mismatch(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert result == {"k3": 0.0, "abs_mean": 0.0, "abs_max": 0.0, "tokens": 0}


def test_identical_logprobs_have_no_mismatch():
    values = torch.randn(4, 5)
    result = logprob_mismatch(values, values.clone(), torch.ones(4, 5))
    assert result["k3"] == result["abs_mean"] == result["abs_max"] == 0.0 and result["tokens"] == 20


def test_tis_without_recomputed_old_logprobs_is_refused():
    problems = LearnerConfig(tis_cap=2.0).problems(16)
    assert problems and problems[0][0] == "tis_cap" and "recompute_old_logprobs" in problems[0][1]
    assert LearnerConfig(tis_cap=2.0, recompute_old_logprobs=True).problems(16) == []
