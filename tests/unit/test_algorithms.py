"""learner.algorithms against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchard.learner.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    MAX_K3,
    MAX_LOG_RATIO,
    active_rows,
    aggregate,
    bounded_k3,
    disco_loss,
    disco_scores,
    group_advantages,
    gspo_loss_terms,
    kl_penalty,
    masked_mean,
    outcome_advantages,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    token_entropy,
)

# Two groups, interleaved on purpose: group 0 = rewards (1, 2, 3), group 1 = rewards (10, 14).
REWARDS = torch.tensor([1.0, 10.0, 2.0, 14.0, 3.0])
GROUPS = torch.tensor([0, 1, 0, 1, 0])


def close(actual: torch.Tensor, expected: list | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ masked_mean


def test_masked_mean_all_and_per_row():
    # (1 + 3) / 2 = 2
    assert masked_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 0, 1, 0])).item() == 2.0
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # row 0: (1 + 2) / 2 = 1.5; row 1 has an empty mask: 0, not NaN
    close(masked_mean(values, mask, dim=-1), [1.5, 0.0])
    assert masked_mean(values, torch.zeros_like(values)).item() == 0.0


def test_masked_mean_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"values shape \(2,\) != mask shape \(3,\)"):
        masked_mean(torch.ones(2), torch.ones(3))


# ------------------------------------------------------------------------------------------ advantages


def test_group_std_advantages():
    # group 0: mean 2, unbiased std sqrt(((−1)² + 0² + 1²) / 2) = 1       → (−1, 0, 1) / (1 + 1e-6)
    # group 1: mean 12, unbiased std sqrt((2² + 2²) / 1) = 2√2 = 2.828427 → ±2 / 2.828427 = ±0.7071068
    advantages = group_advantages(REWARDS, GROUPS, std="group")
    close(advantages, [-1 / (1 + 1e-6), -0.7071068, 0.0, 0.7071068, 1 / (1 + 1e-6)], tol=1e-6)


def test_batch_std_advantages_centre_on_the_group_and_scale_by_the_batch():
    # centred by group means (2 and 12): (−1, −2, 0, 2, 1)
    # batch: mean 30/5 = 6, deviations (−5, 4, −4, 8, −3), squares sum 25+16+16+64+9 = 130,
    #        unbiased variance 130/4 = 32.5, std 5.7008771 → 1/std = 0.1754116
    advantages = group_advantages(REWARDS, GROUPS, std="batch")
    close(advantages, [-0.1754116, -0.3508232, 0.0, 0.3508232, 0.1754116])


def test_no_std_advantages_are_the_centred_rewards():
    # Dr. GRPO: r − mean_group(r) = (1−2, 10−12, 2−2, 14−12, 3−2)
    close(group_advantages(REWARDS, GROUPS, std="none"), [-1.0, -2.0, 0.0, 2.0, 1.0])


@pytest.mark.parametrize("std", ["group", "batch", "none"])
def test_a_constant_group_gets_zero_advantages_without_nan(std):
    rewards = torch.tensor([5.0, 5.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    advantages = group_advantages(rewards, groups, std=std)
    assert torch.isfinite(advantages).all()
    assert advantages[:2].tolist() == [0.0, 0.0]
    # a batch made only of constant groups: std 0 everywhere, still exactly 0
    assert group_advantages(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), std=std).tolist() == [0.0, 0.0]


def test_a_group_of_one_has_zero_advantage():
    assert group_advantages(torch.tensor([3.0]), torch.tensor([0])).tolist() == [0.0]
    assert rloo_advantages(torch.tensor([3.0]), torch.tensor([0])).tolist() == [0.0]


def test_integer_rewards_give_float_advantages():
    # 0/1 accuracies as a long tensor: mean 0.5, std sqrt(0.5) = 0.7071068 → ±0.5 / 0.7071068 = ±0.7071068
    advantages = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert advantages.dtype == torch.float32
    close(advantages, [0.7071068, -0.7071068])


def test_rloo_subtracts_the_mean_of_the_others():
    # group 0: 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5; group 1: 10 − 14 = −4, 14 − 10 = 4
    close(rloo_advantages(REWARDS, GROUPS), [-1.5, -4.0, 0.0, 4.0, 1.5])


def test_estimator_registry_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "lite_ppo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    close(ADVANTAGE_ESTIMATORS["dr_grpo"](REWARDS, GROUPS), [-1.0, -2.0, 0.0, 2.0, 1.0])
    close(ADVANTAGE_ESTIMATORS["rloo"](REWARDS, GROUPS), [-1.5, -4.0, 0.0, 4.0, 1.5])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-10, 10)), min_size=1, max_size=20))
def test_advantage_properties(rows):
    groups = torch.tensor([g for g, _ in rows])
    rewards = torch.tensor([r for _, r in rows], dtype=torch.float64)
    centred = group_advantages(rewards, groups, std="none")
    rloo = rloo_advantages(rewards, groups)
    for group in groups.unique():
        members = groups == group
        size = int(members.sum())
        # centred advantages sum to 0 in every group
        assert abs(float(centred[members].sum())) < 1e-9 * max(1.0, float(rewards.abs().max()) * size)
        if size > 1:
            # RLOO is the centred advantage scaled by G / (G − 1)
            torch.testing.assert_close(rloo[members], centred[members] * size / (size - 1))
    assert torch.isfinite(group_advantages(rewards, groups, std="group")).all()


@pytest.mark.parametrize(
    ("rewards", "groups", "kwargs", "message"),
    [
        (torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), {}, r"rewards must be 1-D \[N\], got shape \(2, 2\)"),
        (
            torch.ones(3),
            torch.zeros(2, dtype=torch.long),
            {},
            r"group_index shape \(2,\) must equal rewards shape \(3,\)",
        ),
        (torch.ones(2), torch.zeros(2), {}, "group_index must be an integer tensor"),
        (torch.ones(2), torch.tensor([0, -1]), {}, "group_index must be non-negative"),
        (torch.ones(2), torch.zeros(2, dtype=torch.long), {"std": "global"}, "std must be 'group', 'batch' or 'none'"),
        (torch.ones(2), torch.zeros(2, dtype=torch.long), {"eps": 0.0}, "eps must be positive"),
    ],
)
def test_group_advantages_errors(rewards, groups, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, groups, **kwargs)


# ------------------------------------------------------------------------------------------ policy loss

# Two sequences of three positions, old logprobs 0, so ρ = exp(logprob). ε_low = 0.2, ε_high = 0.28.
# sequence 0, Â = +1, ratios (1.5, 1.0, 0.5), all tokens real:
#   ρ=1.5 > 1.28: unclipped −1.5, clipped −1.28 → ℓ = max = −1.28 (clipped term active)
#   ρ=1.0:        ℓ = −1.0
#   ρ=0.5 < 0.8 but Â > 0: unclipped −0.5, clipped −0.8 → ℓ = −0.5 (unclipped: the ratio may rise again)
# sequence 1, Â = −2, ratios (0.5, 1.5, pad):
#   ρ=0.5 < 0.8:  unclipped 1.0, clipped 0.8·2 = 1.6 → ℓ = 1.6 (clipped term active)
#   ρ=1.5, Â < 0: unclipped 3.0, clipped 1.28·2 = 2.56 → ℓ = 3.0 (unclipped)
# per-token ℓ: (−1.28, −1.0, −0.5 | 1.6, 3.0, —); sums −2.78 and 4.6; 5 real tokens, 2 of them clipped.
RATIOS = torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.5, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADVANTAGES = torch.tensor([1.0, -2.0])


def clip_loss(aggregation: str = "token-mean", **kwargs):
    logprobs = RATIOS.log().requires_grad_(True)
    loss, stats = policy_loss(
        logprobs, torch.zeros(2, 3), ADVANTAGES, MASK, clip_low=0.2, clip_high=0.28, aggregation=aggregation, **kwargs
    )
    return loss, stats, logprobs


@pytest.mark.parametrize(
    ("aggregation", "max_length", "expected"),
    [
        ("token-mean", None, 0.364),  # (−2.78 + 4.6) / 5
        ("seq-mean-token-mean", None, 0.6866667),  # (−2.78/3 + 4.6/2) / 2 = (−0.9266667 + 2.3) / 2
        ("seq-mean-token-sum", None, 0.91),  # (−2.78 + 4.6) / 2
        ("seq-mean-token-sum-norm", 4, 0.2275),  # 1.82 / (2 sequences · L_max 4)
        ("seq-mean-token-sum-norm", None, 0.3033333),  # L_max defaults to the padded width 3: 1.82 / 6
    ],
)
def test_policy_loss_aggregations(aggregation, max_length, expected):
    loss, stats, _ = clip_loss(aggregation, max_length=max_length)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 0.5 + 1.5) / 5)


def test_clipped_tokens_get_no_gradient():
    # token-mean: ∂ℓ/∂logprob = −ρÂ / 5 where the unclipped term is active, 0 where the clipped one is
    #   seq 0: clipped → 0; −1·1/5 = −0.2; −0.5·1/5 = −0.1
    #   seq 1: clipped → 0; −1.5·(−2)/5 = 0.6; padding → 0
    loss, _, logprobs = clip_loss()
    loss.backward()
    close(logprobs.grad, [[0.0, -0.2, -0.1], [0.0, 0.6, 0.0]])


def test_clip_higher_lets_a_positive_token_rise_further():
    # ρ = 1.25, Â = +1: with ε_high = 0.2 (GRPO) clipped at 1.2 → ℓ = −1.2; with ε_high = 0.28 it is not → −1.25
    logprobs = torch.tensor([[math.log(1.25)]])
    arguments = (logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    symmetric, stats = policy_loss(*arguments, clip_low=0.2, clip_high=0.2)
    assert symmetric.item() == pytest.approx(-1.2) and stats["clip_fraction"] == 1.0
    higher, stats = policy_loss(*arguments, clip_low=0.2, clip_high=0.28)
    assert higher.item() == pytest.approx(-1.25) and stats["clip_fraction"] == 0.0


def test_per_token_advantages_equal_broadcast_ones():
    broadcast, _, _ = clip_loss()
    logprobs = RATIOS.log()
    per_token, _ = policy_loss(
        logprobs, torch.zeros(2, 3), ADVANTAGES[:, None].expand(2, 3), MASK, clip_low=0.2, clip_high=0.28
    )
    assert per_token.item() == pytest.approx(broadcast.item())


def test_the_ratio_is_bounded_so_the_loss_stays_finite():
    # log-ratio 1000 is clamped to MAX_LOG_RATIO = 20; with Â < 0 the unclipped term −e^20·Â is active
    loss, _ = policy_loss(torch.tensor([[1000.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.exp(MAX_LOG_RATIO), rel=1e-5)


@pytest.mark.parametrize(
    ("logprobs", "old", "advantages", "mask", "kwargs", "message"),
    [
        (torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), {}, r"logprobs must be \[N, T\]"),
        (torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3), {}, "old_logprobs shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(3, 2), {}, "mask shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), {}, r"advantages must be \[N\] or"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), {"clip_low": 1.0}, "clip_low"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), {"aggregation": "sum"}, "unknown"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), {"max_length": 0}, "max_length"),
    ],
)
def test_policy_loss_errors(logprobs, old, advantages, mask, kwargs, message):
    with pytest.raises(ValueError, match=message):
        policy_loss(logprobs, old, advantages, mask, **kwargs)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_a_row_the_mask_removes_entirely_counts_in_no_denominator(aggregation):
    # rows: [1, 2, 3] all kept, [4, 5, _] two kept; a third row with no kept token (an empty
    # completion) must leave every aggregation exactly as the two rows alone give it:
    #   token-mean (1+2+3+4+5)/5 = 3; seq-mean-token-mean (2 + 4.5)/2 = 3.25;
    #   seq-mean-token-sum (6 + 9)/2 = 7.5; seq-mean-token-sum-norm 15 / (2 · 3) = 2.5
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    expected = {
        "token-mean": 3.0,
        "seq-mean-token-mean": 3.25,
        "seq-mean-token-sum": 7.5,
        "seq-mean-token-sum-norm": 2.5,
    }
    assert active_rows(mask) == 2
    assert aggregate(values, mask, aggregation).item() == pytest.approx(expected[aggregation])
    assert aggregate(values[:2], mask[:2], aggregation).item() == pytest.approx(expected[aggregation])
    assert aggregate(values, torch.zeros_like(mask), aggregation).item() == 0.0  # nothing kept: 0, not NaN


def test_aggregate_errors_and_registry():
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"}
    with pytest.raises(ValueError, match=r"must both be \[N, T\], got \(3,\) and \(3,\)"):
        aggregate(torch.ones(3), torch.ones(3))


# ------------------------------------------------------------------------------------------ KL


def test_kl_estimators():
    # δ = log π_ref − log π_θ. Column 0: π_θ = 0.5, π_ref = 0.25 → δ = −ln 2 = −0.6931472;
    # column 1: π_θ = 0.25, π_ref = 0.5 → δ = +ln 2; column 2: equal → δ = 0.
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), -1.0]])
    reference = torch.tensor([[math.log(0.25), math.log(0.5), -1.0]])
    ln2 = math.log(2)
    # k1 = −δ
    close(kl_penalty(logprobs, reference, "k1"), [[ln2, -ln2, 0.0]])
    # k2 = δ²/2 = 0.4804530/2 = 0.2402265 for both signs
    close(kl_penalty(logprobs, reference, "k2"), [[0.2402265, 0.2402265, 0.0]])
    # k3 = e^δ − δ − 1: 0.5 + 0.6931472 − 1 = 0.1931472; 2 − 0.6931472 − 1 = 0.3068528
    close(kl_penalty(logprobs, reference, "k3"), [[0.1931472, 0.3068528, 0.0]])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k3_is_bounded_for_extreme_log_ratios():
    # δ = 20: e^20 − 21 ≈ 4.85e8 unbounded; bounded to MAX_K3 = 10. δ = −1000 is clamped to −20 first:
    # e^−20 + 20 − 1 ≈ 19 > 10 → 10. δ = 1: e − 2 = 0.7182818, below the bound and unchanged.
    delta = torch.tensor([20.0, -1000.0, 1.0, 0.0], requires_grad=True)
    values = bounded_k3(delta)
    close(values.detach(), [MAX_K3, MAX_K3, math.e - 2, 0.0])
    values.sum().backward()
    # no gradient where the bound acts; e^δ − 1 = 1.7182818 at δ = 1
    close(delta.grad, [0.0, 0.0, math.e - 1, 0.0])
    far = kl_penalty(torch.tensor([[-50.0, -1.0]]), torch.tensor([[0.0, -1.0]]), "k3")
    close(far, [[MAX_K3, 0.0]])  # δ = 50: one far-off token adds at most 10


def test_kl_errors():
    with pytest.raises(ValueError, match="KL kind 'k4' is unknown"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    with pytest.raises(ValueError, match=r"ref_logprobs shape \(1, 3\)"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------ entropy


def test_entropy_of_a_uniform_distribution_is_log_v():
    # equal logits over V = 7 tokens (any constant): H = ln 7 = 1.9459101
    close(token_entropy(torch.full((2, 3, 7), 0.3)), [[1.9459101] * 3] * 2)


def test_entropy_of_a_two_point_distribution_and_of_impossible_tokens():
    # logits (0, ln 3) → p = (1/4, 3/4): H = 0.25·ln 4 + 0.75·ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    close(token_entropy(torch.tensor([0.0, math.log(3)])), 0.5623351)
    # a −inf logit has probability 0 and adds nothing (no NaN from 0 · −inf)
    close(token_entropy(torch.tensor([0.0, math.log(3), -math.inf])), 0.5623351)
    close(token_entropy(torch.tensor([0.0, math.log(3)], dtype=torch.bfloat16)), 0.5623351, tol=1e-2)


def test_entropy_needs_a_vocabulary():
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        token_entropy(torch.zeros(2, 0))


# ------------------------------------------------------------------------------------------ DisCO

# Group 0: row 0 correct, rows 1 and 2 incorrect; group 1: rows 3 and 4, both incorrect (no positive).
# Token log-likelihoods (0 on padding), lengths 2, 3, 2, 1, 3:
DISCO_LOGPROBS = torch.tensor(
    [[-1.0, -2.0, 0.0], [-2.0, -4.0, -3.0], [-1.0, -1.0, 0.0], [-0.5, 0.0, 0.0], [-1.0, -1.0, -1.0]]
)
DISCO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
DISCO_CORRECT = torch.tensor([True, False, False, False, False])
DISCO_GROUPS = torch.tensor([0, 0, 0, 1, 1])
# Token ratios π_θ/π_old for the L-ratio score: old = log π_θ − log ρ
DISCO_RATIOS = torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 4.0], [0.5, 0.5, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])


def disco(old: torch.Tensor | None = None, **options: object) -> tuple[torch.Tensor, dict[str, float]]:
    old = DISCO_LOGPROBS if old is None else old
    return disco_loss(DISCO_LOGPROBS, old, DISCO_MASK, DISCO_CORRECT, DISCO_GROUPS, **options)


def test_disco_scores_are_length_normalised():
    # log-L: (−1 − 2)/2 = −1.5, (−2 − 4 − 3)/3 = −3, (−1 − 1)/2 = −1, −0.5/1, −3/3 = −1
    close(disco_scores(DISCO_LOGPROBS, DISCO_LOGPROBS, DISCO_MASK, "log_l"), [-1.5, -3.0, -1.0, -0.5, -1.0])
    # L-ratio: (2 + 1)/2 = 1.5, (1 + 1 + 4)/3 = 2, (0.5 + 0.5)/2 = 0.5, 1, 1 — the mean of ratios, not of logs
    old = DISCO_LOGPROBS - DISCO_RATIOS.log()
    close(disco_scores(DISCO_LOGPROBS, old, DISCO_MASK, "l_ratio"), [1.5, 2.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="DisCO score 'ratio' is unknown"):
        disco_scores(DISCO_LOGPROBS, old, DISCO_MASK, "ratio")


def test_disco_b_with_the_log_likelihood_score():
    # group 0: J = s⁺ − mean(s⁻) = −1.5 − (−3 − 1)/2 = 0.5; group 1 has no positive: nothing, but counts in G = 2
    # KL = 0 (old = new): no penalty. loss = −0.5 / 2 = −0.25
    loss, stats = disco(robust=False, score="log_l")
    close(loss, -0.25)
    assert stats == {"disco_kl": 0.0, "disco_penalty": 0.0, "disco_groups": 1.0}


def test_disco_robust_with_the_log_likelihood_score():
    # τ = 1: τ·log mean exp(s⁻/τ) = log((e^−3 + e^−1)/2) = −1.5662192; J = −1.5 + 1.5662192 = 0.0662192
    loss, _ = disco(robust=True, tau=1.0)
    soft_max = math.log((math.exp(-3.0) + math.exp(-1.0)) / 2)
    close(loss, -(-1.5 - soft_max) / 2)
    close(loss, -0.0331096)
    # τ = 10 (the default): 10·log((e^−0.3 + e^−0.1)/2) = −1.9497…, nearer the mean −2 than the max −1
    loss, _ = disco(robust=True)
    soft_max = 10 * math.log((math.exp(-0.3) + math.exp(-0.1)) / 2)
    assert -2.0 < soft_max < -1.9
    close(loss, -(-1.5 - soft_max) / 2)


def test_disco_with_the_likelihood_ratio_score():
    old = DISCO_LOGPROBS - DISCO_RATIOS.log()
    # KL = Σ m·(old − new) / Σ m = Σ −log ρ over 11 tokens = (−log 2 − log 4 + 2·log 2) / 11 = −log 2 / 11 < δ: no penalty
    # DisCO-b: J = 1.5 − (2 + 0.5)/2 = 0.25 → loss −0.125
    loss, stats = disco(old, score="l_ratio", robust=False)
    close(loss, -0.125)
    assert stats["disco_kl"] == pytest.approx(-math.log(2) / 11) and stats["disco_penalty"] == 0.0
    # DisCO, τ = 1: log((e^2 + e^0.5)/2) = 1.6236…; J = 1.5 − 1.6236… → loss = −J / 2
    loss, _ = disco(old, score="l_ratio", robust=True, tau=1.0)
    close(loss, -(1.5 - math.log((math.exp(2.0) + math.exp(0.5)) / 2)) / 2)


def test_disco_kl_penalty_below_and_above_delta():
    # old = new + 0.1 on every token: KL = 0.1 (k1, token mean). The log-L scores do not depend on old.
    old = DISCO_LOGPROBS + 0.1
    below, stats = disco(old, robust=False, delta=0.2, beta=10.0)
    close(below, -0.25)
    assert stats["disco_kl"] == pytest.approx(0.1) and stats["disco_penalty"] == 0.0
    # δ = 0.04, β = 10: 10·(0.1 − 0.04)² = 0.036 → −0.25 + 0.036 = −0.214
    logprobs = DISCO_LOGPROBS.clone().requires_grad_(True)
    above, stats = disco_loss(
        logprobs, old, DISCO_MASK, DISCO_CORRECT, DISCO_GROUPS, robust=False, delta=0.04, beta=10.0
    )
    close(above, -0.214)
    assert stats["disco_penalty"] == pytest.approx(0.036)
    above.backward()
    # row 3 (group 1, no signal) gets only the penalty's gradient: ∂/∂log π = 2β(KL − δ)·(−1/11) = −1.2/11
    close(logprobs.grad[3, 0], -1.2 / 11)
    # row 0 (the positive, 2 tokens): −(1/G)·(1/2) = −0.25 per token from J, plus the penalty's −1.2/11
    close(logprobs.grad[0, :2], [-0.25 - 1.2 / 11] * 2)


def test_disco_groups_without_a_positive_or_a_negative_give_no_signal():
    # only group 1 (both incorrect): no group discriminates, loss 0, and a backward pass still works
    logprobs = DISCO_LOGPROBS[3:].clone().requires_grad_(True)
    loss, stats = disco_loss(logprobs, DISCO_LOGPROBS[3:], DISCO_MASK[3:], DISCO_CORRECT[3:], DISCO_GROUPS[3:])
    assert float(loss.detach()) == 0.0 and stats["disco_groups"] == 0.0
    loss.backward()
    assert float(logprobs.grad.abs().sum()) == 0.0
    # group 0 alone: G = 1, so its loss is twice the two-group batch's (group 1 counts in G, as in the reference)
    alone, _ = disco_loss(DISCO_LOGPROBS[:3], DISCO_LOGPROBS[:3], DISCO_MASK[:3], DISCO_CORRECT[:3], DISCO_GROUPS[:3])
    both, _ = disco()
    close(alone, 2 * float(both.detach()))


def test_disco_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"correct must be \[N\] = \[5\]"):
        disco_loss(DISCO_LOGPROBS, DISCO_LOGPROBS, DISCO_MASK, DISCO_CORRECT[:2], DISCO_GROUPS)
    with pytest.raises(ValueError, match="tau > 0"):
        disco(tau=0.0)


# ------------------------------------------------------------------------------------------ REINFORCE++


def test_reinforce_pp_normalises_rewards_over_the_batch():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    # mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = 0.57735: ±0.5 / 0.57735 = ±0.866025
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025])
    assert torch.allclose(reinforce_pp_advantages(rewards, groups), expected, atol=1e-5)
    assert torch.allclose(outcome_advantages(rewards, groups, "reinforce_pp"), expected, atol=1e-5)


def test_reinforce_pp_baseline_centres_each_group_then_normalises_over_the_batch():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    # group means 0.5 and 1: A = [0.5, -0.5, 0, 0]; batch mean 0, std sqrt(0.5 / 3) = 0.408248
    expected = torch.tensor([1.224745, -1.224745, 0.0, 0.0])
    assert torch.allclose(reinforce_pp_advantages(rewards, groups, baseline=True), expected, atol=1e-5)
    assert torch.allclose(outcome_advantages(rewards, groups, "reinforce_pp_baseline"), expected, atol=1e-5)
    # plain REINFORCE++ gives the all-correct group a positive advantage; the baseline variant none
    assert reinforce_pp_advantages(rewards, groups)[2] > 0
    one = reinforce_pp_advantages(torch.tensor([1.0]), torch.tensor([0]))
    assert one.tolist() == [0.0]  # a batch of one has no spread


# ------------------------------------------------------------------------------------------ GSPO


def gspo_batch():
    """Row 0: two tokens, log-ratios 0.1 and -0.2 (mean -0.05); row 1: one token and padding, log-ratio 0.2."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.8], [-0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return logprobs, old, mask


def test_gspo_clips_the_length_normalised_sequence_ratio():
    logprobs, old, mask = gspo_batch()
    per_token, ratio, clipped = gspo_loss_terms(logprobs, old, torch.tensor([1.0, 1.0]), mask)
    # s_0 = exp(-0.05) = 0.951229 (inside [1 - 3e-4, 1 + 4e-4]? no: below, and A > 0 keeps the unclipped term)
    # s_1 = exp(0.2) = 1.221403, above 1 + 4e-4 with A > 0: the clipped term 1.0004 is active
    assert torch.allclose(ratio[:, 0].detach(), torch.tensor([0.951229, 1.221403]), atol=1e-6)
    assert torch.allclose(per_token.detach(), torch.tensor([[-0.951229, -0.951229], [-1.0004, -1.0004]]), atol=1e-6)
    assert clipped.tolist() == [[False, False], [True, True]]
    loss = aggregate(per_token, mask, "seq-mean-token-mean")
    assert float(loss.detach()) == pytest.approx((-0.951229 - 1.0004) / 2, abs=1e-6)
    loss.backward()
    # row 0: d/d lp_t of -(1/2) · s_0 · A = -(1/2) · s_0 / |y_0| = -0.237807 per token; row 1 is clipped: 0
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.237807, -0.237807], [0.0, 0.0]]), atol=1e-6)


def test_gspo_token_has_the_sequence_ratio_and_each_tokens_gradient():
    logprobs, old, mask = gspo_batch()
    advantages = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    per_token, ratio, _ = gspo_loss_terms(logprobs, old, advantages, mask, token_level=True)
    assert torch.allclose(ratio.detach()[0], torch.tensor([0.951229, 0.951229]), atol=1e-6)
    aggregate(per_token, mask, "seq-mean-token-mean").backward()
    # row 0, token 0: -(1/2)(1/2) · s_0 · 2 = -0.475615; token 1 has advantage 0; row 1 clipped
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.475615, 0.0], [0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        gspo_loss_terms(logprobs, old, advantages, mask)


def test_gspo_token_equals_gspo_with_sequence_advantages():
    grads = []
    for token_level in (False, True):
        logprobs, old, mask = gspo_batch()
        per_token, _, _ = gspo_loss_terms(logprobs, old, torch.tensor([-1.0, 0.5]), mask, token_level=token_level)
        aggregate(per_token, mask, "seq-mean-token-mean").backward()
        grads.append(logprobs.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)
