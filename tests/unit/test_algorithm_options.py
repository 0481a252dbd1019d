"""The learner's algorithm options (advantage estimators, reward shaping, Lp-Reg, hints, HPT, tree
advantages) against values worked out by hand; the arithmetic is in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from orchard.learner.algorithms import (
    hint_clip_ranges,
    hpt_weights,
    lp_reg_loss,
    lp_reg_proxy_logprobs,
    outcome_advantages,
    overlong_penalty,
    policy_loss,
    policy_loss_terms,
    prefix_credit,
    sft_loss,
    tree_advantages,
    truncation_rewards,
)

# group 0 = rewards (1, 2, 3), group 1 = rewards (10, 14), interleaved
REWARDS = torch.tensor([1.0, 10.0, 2.0, 14.0, 3.0])
GROUPS = torch.tensor([0, 1, 0, 1, 0])


def close(actual: torch.Tensor, expected: list | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ advantages


def test_each_estimator_by_name():
    # grpo: group 0 mean 2, sample std 1 → (−1, 0, 1); group 1 mean 12, std sqrt(8) → ∓2/2.8284
    close(outcome_advantages(REWARDS, GROUPS, "grpo"), [-1.0, -0.707107, 0.0, 0.707107, 1.0])
    # dr_grpo: centred only
    close(outcome_advantages(REWARDS, GROUPS, "dr_grpo"), [-1.0, -2.0, 0.0, 2.0, 1.0])
    # lite_ppo: batch mean 6, squared deviations 25+16+16+64+9 = 130, sample std sqrt(130/4) = 5.700877
    close(
        outcome_advantages(REWARDS, GROUPS, "lite_ppo"),
        [-1 / 5.700877, -2 / 5.700877, 0.0, 2 / 5.700877, 1 / 5.700877],
    )
    # rloo: 1 − (2+3)/2 = −1.5; 10 − 14 = −4; 2 − 2 = 0; 14 − 10 = 4; 3 − 1.5 = 1.5
    close(outcome_advantages(REWARDS, GROUPS, "rloo"), [-1.5, -4.0, 0.0, 4.0, 1.5])
    with pytest.raises(ValueError, match="'ppo' is unknown"):
        outcome_advantages(REWARDS, GROUPS, "ppo")


def test_tree_advantages_normalise_by_the_siblings_final_scores():
    values = torch.tensor(
        [
            [0.5, 1.0, 0.0],  # group 0, final 1.0
            [-1.0, 0.0, 0.0],  # group 0, final −1.0
            [0.2, -1.0, 0.0],  # group 0, final −1.0
            [0.3, -1.0, 0.0],  # group 1, alone
            [0.0, 0.0, 0.0],  # group 1, an outcome-rewarded completion (no values)
        ]
    )
    mask = torch.tensor(
        [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
    )
    advantages = tree_advantages(values, mask, torch.tensor([0, 0, 0, 1, 1]), eps=1e-9)
    # finals (1, −1, −1): mean −1/3, population std sqrt((16/9 + 4/9 + 4/9) / 3) = 0.942809
    std = 0.942809
    close(advantages[0], [(0.5 + 1 / 3) / std, (1.0 + 1 / 3) / std, 0.0])
    close(advantages[1], [(-1.0 + 1 / 3) / std, 0.0, 0.0])
    close(advantages[2], [(0.2 + 1 / 3) / std, (-1.0 + 1 / 3) / std, 0.0])
    # a lone trajectory is not normalised; the row without values gets nothing
    close(advantages[3], [0.3, -1.0, 0.0])
    close(advantages[4], [0.0, 0.0, 0.0])


def test_tree_siblings_with_equal_final_scores_are_centred_not_blown_up():
    values = torch.tensor([[0.4, 1.0], [-0.2, 1.0]])
    advantages = tree_advantages(values, torch.ones(2, 2), torch.tensor([0, 0]), eps=1e-9)
    close(advantages, [[0.4 - 1.0, 0.0], [-0.2 - 1.0, 0.0]])


def test_tree_advantages_errors():
    with pytest.raises(ValueError, match="both be"):
        tree_advantages(torch.zeros(2, 3), torch.zeros(2, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_index"):
        tree_advantages(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0]))


def test_prefix_credit_places_each_outcome_advantage_where_its_path_parts_from_its_siblings():
    E = 0  # eos
    # group 0: a tree's trajectories "9 5 E" (correct), "9 4 E" and "3 E" (wrong), after a 2-token prompt;
    # group 1: two sequences sharing nothing. Right-padded with token 8 (mask 0).
    token_ids = torch.tensor(
        [
            [1, 2, 9, 5, E],
            [1, 2, 9, 4, E],
            [1, 2, 3, E, 8],
            [1, 2, 6, E, 8],
            [1, 2, 7, E, 8],
        ]
    )
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])
    advantages = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.5, -0.5])  # dr_grpo of rewards (1, 0, 0) and (1, 0)
    credit = prefix_credit(advantages, token_ids, mask.float(), torch.tensor([0, 0, 0, 1, 1]))
    # V(root) = 0; V(9) = mean(2/3, −1/3) = 1/6; V(95) = 2/3, V(94) = −1/3, V(3) = −1/3; eos changes nothing
    close(credit[0], [0.0, 0.0, 1 / 6, 2 / 3 - 1 / 6, 0.0])
    close(credit[1], [0.0, 0.0, 1 / 6, -1 / 3 - 1 / 6, 0.0])
    close(credit[2], [0.0, 0.0, -1 / 3, 0.0, 0.0])
    close(credit[3], [0.0, 0.0, 0.5, 0.0, 0.0])  # no shared prefix: all of it on the first token
    close(credit[4], [0.0, 0.0, -0.5, 0.0, 0.0])
    # every sequence's credit sums to its (centred) outcome advantage
    close(credit.sum(-1), advantages.tolist())


def test_prefix_credit_of_identical_and_uncentred_sequences():
    # two identical sequences with different outcomes (a sampled group may repeat a completion): their
    # shared tokens carry the mean; an uncentred estimate is centred by the group's mean first
    token_ids = torch.tensor([[1, 4, 5], [1, 4, 5]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    credit = prefix_credit(torch.tensor([1.0, 0.0]), token_ids, mask, torch.tensor([0, 0]))
    close(credit, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="advantages"):
        prefix_credit(torch.zeros(2, 1), token_ids, mask, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_index"):
        prefix_credit(torch.zeros(2), token_ids, mask, torch.tensor([0]))


# ------------------------------------------------------------------------------------------ reward shaping


def test_overlong_penalty_zones():
    # L_max 10, L_cache 4: free up to 6, then (6 − L)/4, −1 beyond 10
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    close(overlong_penalty(lengths, max_length=10, cache_length=4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache_length < max_length"):
        overlong_penalty(lengths, max_length=4, cache_length=4)


def test_truncation_rewards_zero_long_and_cut_completions():
    rewards = torch.tensor([1.0, 1.0, 0.5, 1.0])
    lengths = torch.tensor([3, 5, 4, 2])
    truncated = torch.tensor([False, False, False, True])
    # length 5 > L_T = 4 → 0; length 4 is kept; the truncated one → 0
    close(truncation_rewards(rewards, lengths, truncated, target_length=4), [1.0, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="positive"):
        truncation_rewards(rewards, lengths, truncated, target_length=0)


# ------------------------------------------------------------------------------------------ hints


def test_hinted_samples_get_their_own_clip_range():
    lows, highs = hint_clip_ranges(
        torch.tensor([False, True]), clip_low=0.2, clip_high=0.28, hint_clip_low=None, hint_clip_high=0.5
    )
    close(lows, [0.2, 0.2])
    close(highs, [0.28, 0.5])
    # both ratios are 1.6 with Â = +1: row 0 is cut at 1.28, the hinted row at 1.5
    logprobs = torch.full((2, 1), math.log(1.6))
    loss, _ = policy_loss(logprobs, torch.zeros(2, 1), torch.ones(2), torch.ones(2, 1), clip_low=lows, clip_high=highs)
    close(loss, -(1.28 + 1.5) / 2)


def test_the_hinted_ratio_compares_the_bare_prompt_with_the_hinted_behaviour():
    # π_θ(o|q) = 0.25, π_old(o|q,h) = 0.5 → ρ = 0.5
    logprobs = torch.full((2, 1), math.log(0.25), requires_grad=True)
    behaviour = torch.full((2, 1), math.log(0.5))
    per_token, ratio, clipped = policy_loss_terms(
        logprobs, behaviour, torch.tensor([1.0, -1.0]), torch.ones(2, 1), clip_low=0.2, clip_high=0.28
    )
    close(ratio.detach(), [[0.5], [0.5]])
    # Â = +1: −min(0.5, 0.8) = −0.5, unclipped, gradient flows; Â = −1: −min(−0.5, −0.8) = 0.8, clipped
    close(per_token.detach(), [[-0.5], [0.8]])
    assert clipped.tolist() == [[False], [True]]
    per_token.sum().backward()
    close(logprobs.grad, [[-0.5], [0.0]])  # d(−ρ)/dlogπ = −ρ


def test_per_sequence_clip_bounds_must_match_the_batch():
    with pytest.raises(ValueError, match="per-sequence clip bound"):
        policy_loss_terms(
            torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2), torch.ones(2, 1), clip_low=torch.tensor([0.2])
        )


# ------------------------------------------------------------------------------------------ Lp-Reg


def test_proxy_cuts_below_min_p_times_the_max_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4, 4)
    proxy = lp_reg_proxy_logprobs(logits, torch.tensor([0, 1, 2, 3]), min_p=0.2)
    # cut at 0.2 · 0.5 = 0.1: 0.05 goes, the rest renormalised over 0.95
    close(proxy[:3].exp(), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95])
    assert proxy[3] == -math.inf
    # the cut is relative to the max: with min_p 1 only the argmax survives
    only_max = lp_reg_proxy_logprobs(logits[:1], torch.tensor([0]), min_p=1.0)
    close(only_max, [0.0])
    with pytest.raises(ValueError, match="min_p"):
        lp_reg_proxy_logprobs(logits, torch.tensor([0, 1, 2, 3]), min_p=0.0)


def test_lp_reg_regularises_the_lowest_probability_negative_tokens_the_proxy_keeps():
    per_token = torch.full((1, 5), 7.0)
    logprobs = torch.log(torch.tensor([[0.5, 0.1, 0.05, 0.2, 0.01]])).requires_grad_()
    proxy = torch.log(torch.tensor([[0.55, 0.12, 0.0, 0.25, 0.02]]))  # token 2 was cut (−inf)
    advantages = torch.tensor([[-1.0, -1.0, -1.0, -1.0, 1.0]])  # token 4 is positive: never a candidate
    mask = torch.ones(1, 5)
    loss, selected = lp_reg_loss(
        per_token, logprobs, logprobs.detach(), proxy, advantages, mask, coef=1.0, low_fraction=0.5
    )
    # 4 negative tokens, half of them (2) with the lowest π: tokens 2 (0.05) and 1 (0.1); token 2 is
    # cut by the proxy, so only token 1: −ρÂ + (exp(δ) − δ − 1), ρ = 1, δ = ln(0.12/0.1)
    delta = math.log(1.2)
    assert selected.tolist() == [[False, True, False, False, False]]
    close(loss.detach(), [[7.0, 1.0 + math.exp(delta) - delta - 1.0, 7.0, 7.0, 7.0]])
    # d/dlogπ [−ρÂ + e^δ − δ − 1] = −ρÂ + 1 − e^δ = 1 + 1 − 1.2: the KL term (1 − e^δ < 0) pushes the
    # spark's logprob up against the negative advantage
    loss.sum().backward()
    close(logprobs.grad, [[0.0, 1.0 + (1.0 - 1.2), 0.0, 0.0, 0.0]])


def test_lp_reg_penalty_is_the_bounded_k3():
    # a spark the proxy keeps with far more mass than the policy gives it: π = e^−30, π_proxy = 0.5,
    # δ = ln 0.5 + 30 = 29.31 → clamped to 20 → e^20 − 21 bounded to 10: ℓ = −ρÂ + 10 = 1 + 10
    logprobs = torch.tensor([[-30.0]])
    loss, selected = lp_reg_loss(
        torch.zeros(1, 1),
        logprobs,
        logprobs,
        torch.tensor([[math.log(0.5)]]),
        -torch.ones(1, 1),
        torch.ones(1, 1),
        coef=1.0,
        low_fraction=1.0,
    )
    assert selected.tolist() == [[True]]
    close(loss, [[11.0]])


def test_lp_reg_leaves_everything_alone_without_negative_tokens_or_coefficient():
    per_token = torch.ones(1, 2)
    logprobs = torch.log(torch.tensor([[0.1, 0.2]]))
    proxy = torch.log(torch.tensor([[0.2, 0.3]]))
    unchanged, selected = lp_reg_loss(per_token, logprobs, logprobs, proxy, torch.ones(1, 2), torch.ones(1, 2))
    assert torch.equal(unchanged, per_token) and not selected.any()
    unchanged, selected = lp_reg_loss(per_token, logprobs, logprobs, proxy, -torch.ones(1, 2), torch.ones(1, 2), coef=0)
    assert torch.equal(unchanged, per_token) and not selected.any()
    with pytest.raises(ValueError, match="low_fraction"):
        lp_reg_loss(per_token, logprobs, logprobs, proxy, -torch.ones(1, 2), torch.ones(1, 2), low_fraction=0)


# ------------------------------------------------------------------------------------------ HPT


def test_hpt_switches_low_pass_rate_groups_with_a_solution_to_sft():
    pass_rates = torch.tensor([0.0, 0.125, 0.0, 0.5])
    has_solution = torch.tensor([True, True, False, True])
    rl, sft = hpt_weights(pass_rates, has_solution, threshold=0.125, rl_coef=0.5, sft_coef=2.0)
    # switched: groups 0 and 1 (p ≤ 0.125, solution); group 2 has no solution, group 3 passes too often
    close(rl, [0.0, 0.0, 0.5, 0.5])
    close(sft, [2.0, 2.0, 0.0, 0.0])
    rl, sft = hpt_weights(pass_rates, has_solution, threshold=0.125, rl_coef=0.5, sft_coef=2.0, mix=True)
    close(rl, [0.5, 0.5, 0.5, 0.5])
    close(sft, [2.0, 2.0, 0.0, 0.0])
    # the paper's gate: only all-fail prompts
    rl, sft = hpt_weights(pass_rates, has_solution)
    close(sft, [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="threshold"):
        hpt_weights(pass_rates, has_solution, threshold=1.5)


def test_sft_loss_is_the_token_mean_nll_of_the_targets():
    logprobs = torch.tensor([[0.0, math.log(0.5), math.log(0.25)], [0.0, math.log(0.5), 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # (ln 2 + ln 4 + ln 2) / 3
    close(sft_loss(logprobs, mask), (math.log(2) + math.log(4) + math.log(2)) / 3)
    close(sft_loss(logprobs, torch.zeros_like(mask)), 0.0)
