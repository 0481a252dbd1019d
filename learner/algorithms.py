"""Pure RLVR algorithm functions on tensors: advantages, reward shaping, the PPO-clip policy loss,
DisCO's discriminative objective, KL estimators, Lp-Reg, hinted-sample clipping and HPT's SFT/RL switch.

Every function here is side-effect free and documented with its formula and source (docs/algorithms.md
§1-6, §8 and §9). Functions are registered by name in `ADVANTAGE_ESTIMATORS`, `AGGREGATIONS` and
`KL_ESTIMATORS` so a config string picks one.

Notation: `N` sequences, `T` token positions, `m` the 0/1 mask of completion tokens,
`ρ = exp(log π_θ − log π_old)` the importance ratio, `Â` the advantage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: Bound on |log π_θ − log π_old| before `exp`, so a very stale or very unlikely behaviour token
#: cannot overflow the ratio to inf (the same ±20 bound verl applies); inside it nothing changes.
MAX_LOG_RATIO = 20.0
#: Bound on the k3 estimator's value, `k3 = exp(δ) − δ − 1` with δ clamped to ±`MAX_LOG_RATIO` first
#: (verl's `low_var_kl` bounds it to [−10, 10]; k3 ≥ 0, so only the upper bound acts): one token far
#: from the reference (δ = 20 would give ~4.9e8) cannot dominate a step's penalty. Beyond it the
#: token's penalty is constant and passes no gradient.
MAX_K3 = 10.0


def bounded_k3(delta: Tensor) -> Tensor:
    """`min(exp(δ') − δ' − 1, MAX_K3)` with `δ' = clamp(δ, ±MAX_LOG_RATIO)`: Schulman's k3 estimator
    bounded as verl bounds it (`low_var_kl`); unchanged for |δ| up to about 2.4, where k3 reaches 10."""
    delta = delta.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return (torch.expm1(delta) - delta).clamp(max=MAX_K3)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """`Σ m·x / Σ m` over `dim` (all elements when None); 0 where the mask is empty, never NaN."""
    if values.shape != mask.shape:
        raise ValueError(f"masked_mean: values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# ------------------------------------------------------------------------------------------ advantages


def _check_rewards(rewards: Tensor, group_index: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_index.shape != rewards.shape:
        raise ValueError(
            f"group_index shape {tuple(group_index.shape)} must equal rewards shape {tuple(rewards.shape)}"
        )
    if group_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
    if group_index.numel() and int(group_index.min()) < 0:
        raise ValueError("group_index must be non-negative")


def _result_dtype(rewards: Tensor) -> torch.dtype:
    """Advantages are floats even for integer rewards (0/1 accuracy)."""
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _group_stats(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per element: its group's reward sum, count, and sum of squares."""
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    rewards = rewards.to(torch.float64)
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, rewards)
    squares = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, rewards * rewards)
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(rewards))
    return sums[group_index], counts[group_index], squares[group_index]


def group_advantages(rewards: Tensor, group_index: Tensor, *, std: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-relative outcome advantages, one per sequence.

    `Â_i = (r_i − mean_g(r)) / (σ + eps)` with `mean_g` the mean of `i`'s group and
    - `std="group"`: σ = std of `i`'s group — GRPO, DeepSeekMath (Shao et al., 2024, arXiv:2402.03300);
    - `std="batch"`: σ = std of all rewards in the batch — Lite PPO ("Part I: Tricks or Traps? A Deep
      Dive into RL for LLM Reasoning", Liu et al., 2025, arXiv:2508.08221) and DLER;
    - `std="none"`: no division, `Â_i = r_i − mean_g(r)` — Dr. GRPO ("Understanding R1-Zero-Like
      Training", Liu et al., 2025, arXiv:2503.20783).
    σ is the unbiased sample std (`torch.std`, as GRPO implementations use); a group or batch of one
    has σ = 0. A group whose rewards are all equal gets Â = 0 exactly (no NaN).
    """
    _check_rewards(rewards, group_index)
    if std not in ("group", "batch", "none"):
        raise ValueError(f"std must be 'group', 'batch' or 'none', got {std!r}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if rewards.numel() == 0:
        return rewards.to(_result_dtype(rewards), copy=True)
    sums, counts, squares = _group_stats(rewards, group_index)
    centred = rewards.to(torch.float64) - sums / counts
    if std == "none":
        return centred.to(_result_dtype(rewards))
    if std == "group":
        # unbiased variance from sums: (Σr² − (Σr)²/n) / (n − 1); clamp guards rounding below 0
        variance = ((squares - sums * sums / counts) / (counts - 1).clamp(min=1.0)).clamp(min=0.0)
        sigma = variance.sqrt()
    else:
        sigma = rewards.to(torch.float64).std() if rewards.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return (centred / (sigma + eps)).to(_result_dtype(rewards))


def rloo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """REINFORCE leave-one-out: `Â_i = r_i − (Σ_{j≠i} r_j) / (G − 1)` over `i`'s group of size G.

    Source: "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (Ahmadian et al., 2024, arXiv:2402.14740). A group of one has no baseline;
    its advantage is 0.
    """
    _check_rewards(rewards, group_index)
    if rewards.numel() == 0:
        return rewards.to(_result_dtype(rewards), copy=True)
    sums, counts, _ = _group_stats(rewards, group_index)
    values = rewards.to(torch.float64)
    baseline = (sums - values) / (counts - 1).clamp(min=1.0)
    advantages = torch.where(counts > 1, values - baseline, torch.zeros_like(values))
    return advantages.to(_result_dtype(rewards))


def _batch_normalised(values: Tensor, eps: float) -> Tensor:
    """`(x − mean_B(x)) / (std_B(x) + eps)` over the whole batch (unbiased std; 0 for one element)."""
    values = values.to(torch.float64)
    sigma = values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return (values - values.mean()) / (sigma + eps)


def reinforce_pp_advantages(
    rewards: Tensor, group_index: Tensor, *, baseline: bool = False, eps: float = 1e-6
) -> Tensor:
    """REINFORCE++: outcome returns normalised over the global batch, no critic and no group std.

    `Â_i = (r_i − mean_B(r)) / std_B(r)`; REINFORCE++-baseline first subtracts the group's mean
    reward, `A_i = r_i − mean_{g(i)}(r)`, then normalises the same way: `Â_i = (A_i − mean_B(A)) / std_B(A)`.
    Source: "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models"
    (Hu et al., 2025, arXiv:2501.03262), §3 (OpenRLHF's `reinforce_plus_plus` and
    `reinforce_plus_plus_baseline`). The paper puts a per-token KL penalty into the return; here a KL
    to the reference is the loss term `learner.kl_coef` instead (OpenRLHF's `use_kl_loss`), so the
    return is the outcome reward. The batch is the whole step's (every rank computes it on all groups).
    """
    _check_rewards(rewards, group_index)
    if rewards.numel() == 0:
        return rewards.to(_result_dtype(rewards), copy=True)
    values = rewards.to(torch.float64)
    if baseline:
        sums, counts, _ = _group_stats(rewards, group_index)
        values = values - sums / counts
    return _batch_normalised(values, eps).to(_result_dtype(rewards))


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "grpo": lambda r, g: group_advantages(r, g, std="group"),
    "lite_ppo": lambda r, g: group_advantages(r, g, std="batch"),
    "dr_grpo": lambda r, g: group_advantages(r, g, std="none"),
    "rloo": rloo_advantages,
    "reinforce_pp": lambda r, g: reinforce_pp_advantages(r, g, baseline=False),
    "reinforce_pp_baseline": lambda r, g: reinforce_pp_advantages(r, g, baseline=True),
}


def outcome_advantages(rewards: Tensor, group_index: Tensor, estimator: str = "grpo") -> Tensor:
    """One advantage per sequence by the named estimator of `ADVANTAGE_ESTIMATORS` (docs/algorithms.md §1):
    `grpo` (group std), `dr_grpo` (no std), `lite_ppo` (group mean, batch std), `rloo` (leave-one-out),
    `reinforce_pp` (batch mean and std), `reinforce_pp_baseline` (group mean, then batch mean and std)."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} is unknown; choose one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group_index)


# ------------------------------------------------------------------------- PPO with a learned critic


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[N, T]: each sequence's outcome reward on its last completion token (`mask`), 0 elsewhere; a row
    without completion tokens gets none. PPO's per-token reward of a verifiable outcome."""
    if rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"{rewards.shape[0]} rewards for {mask.shape[0]} rows")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(-1).values  # -1: no completion token
    token_rewards = torch.zeros(mask.shape, dtype=_result_dtype(rewards), device=mask.device)
    rows = (last >= 0).nonzero().squeeze(-1)
    token_rewards[rows, last[rows]] = rewards[rows].to(token_rewards.dtype)
    return token_rewards


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each sequence's completion tokens: `(advantages, returns)`, [N, T].

    With `t' ` the next completion token after `t` (tokens off `mask`, e.g. a tool's observation, are
    skipped: they are the environment's, not actions) and `V(t') = 0` after the last one:
    `δ_t = r_t + γ·V(t') − V(t)`, `Â_t = δ_t + γλ·Â_{t'}`, `R_t = Â_t + V(t)` (the critic's target).
    `values[i, t]` is the critic's estimate of the state before token t (`ValueModel`'s alignment).
    Source: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
    (2015, arXiv:1506.02438), eq. 16; with outcome rewards as in Ouyang et al. (2022) and verl's
    `compute_gae_advantage_return` (γ = 1, λ = 0.95 are OpenRLHF's defaults). Both are 0 off `mask`.
    """
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError(
            f"gae_advantages: rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and mask"
            f" {tuple(mask.shape)} must have one shape"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    dtype = torch.promote_types(_result_dtype(token_rewards), values.dtype)
    rewards, values, on = token_rewards.to(dtype), values.detach().to(dtype), mask > 0
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.shape[0], dtype=dtype, device=values.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(on[:, t], advantage, 0.0)
        next_value = torch.where(on[:, t], values[:, t], next_value)
        next_advantage = torch.where(on[:, t], advantage, next_advantage)
    returns = (advantages + values) * on
    return advantages, returns


def whiten(values: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """`(x − mean) / (std + eps)` over the tokens of `mask` (the whole batch), 0 off it: PPO's advantage
    normalisation (verl's `masked_whiten`; unbiased std, 0 for a single token)."""
    if values.shape != mask.shape:
        raise ValueError(f"whiten: values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    on = mask > 0
    count = int(on.sum())
    if count == 0:
        return torch.zeros_like(values)
    picked = values[on].to(torch.float64)
    sigma = picked.std() if count > 1 else torch.zeros((), dtype=torch.float64, device=values.device)
    normalised = (values.to(torch.float64) - picked.mean()) / (sigma + eps)
    return (normalised * on).to(values.dtype)


def value_loss_terms(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss per token and whether the clipped term was the larger: `(loss, clipped)`, [N, T].

    `V_clip = V_old + clamp(V − V_old, −ε_v, ε_v)`, `L_t = ½·max((V − R)², (V_clip − R)²)`; without `clip`
    `L_t = ½·(V − R)²`. Source: the PPO2 baselines implementation (Dhariwal et al., 2017) as described in
    "Implementation Matters in Deep Policy Gradients" (Engstrom et al., 2020, arXiv:2005.12729) and used
    by verl (`compute_value_loss`, cliprange_value) and OpenRLHF (`ValueLoss`, value_clip). Aggregate with
    `aggregate`; 0 off `mask`."""
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError("value_loss_terms: values, old_values, returns and mask must have one shape")
    values, returns = values.float(), returns.float()
    unclipped = (values - returns).pow(2)
    if clip is None:
        return 0.5 * unclipped * mask, torch.zeros_like(mask, dtype=torch.bool)
    old_values = old_values.float()
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).pow(2)
    return 0.5 * torch.maximum(unclipped, clipped) * mask, (clipped > unclipped) & (mask > 0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """`1 − Var(R − V) / Var(R)` over the tokens of `mask`: how much of the returns the critic explains
    (1 perfect, 0 no better than a constant, negative worse); 0.0 when the returns do not vary."""
    on = mask > 0
    if int(on.sum()) < 2:
        return 0.0
    target = returns[on].double()
    spread = float(target.var())
    if spread == 0.0:
        return 0.0
    return 1.0 - float((target - values[on].double()).var()) / spread


def tree_advantages(token_values: Tensor, value_mask: Tensor, group_index: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Token-level advantages of tree-search trajectories (DeepSearch, Wu et al., 2025, docs/algorithms.md §8).

    `token_values[i, t]` is the score of the tree step that token t of trajectory i belongs to
    (`Completion.token_values`), `value_mask` is 1 on those tokens. A trajectory's final score `s_i`
    is its last token's value (the terminal node's value). Per group g ("sibling mean-std"):
    `Â_{i,t} = (v_{i,t} − mean_g(s)) / (std_g(s) + eps)` with the population std over the group's
    trajectories. A group of one trajectory is not normalised at all (mean 0, std 1: `Â = v`), as
    the reference code does (smiles724/DeepSearch, `compute_mcts_outcome_advantage`, "sibling_mean_std").
    Siblings whose final scores are all equal (std 0) are centred only, so their step values are
    not divided by ~0 (the driver drops such groups anyway, `services.rescue.deepsearch.tree_filter_reason`).
    Rows without values (an all-zero mask row) take no part and get 0.
    """
    if token_values.dim() != 2 or token_values.shape != value_mask.shape:
        raise ValueError(
            f"token_values and value_mask must both be [N, T], got {tuple(token_values.shape)}"
            f" and {tuple(value_mask.shape)}"
        )
    if group_index.shape != token_values.shape[:1]:
        raise ValueError(f"group_index must be [N] = [{token_values.shape[0]}], got {tuple(group_index.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    mask = value_mask.to(torch.bool)
    values = token_values.to(torch.float64)
    has_values = mask.any(-1)
    advantages = torch.zeros_like(values)
    if not bool(has_values.any()):
        return advantages.to(_result_dtype(token_values))
    positions = torch.arange(values.shape[1]).expand_as(values)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(-1).values.clamp(min=0)
    finals = values.gather(1, last.unsqueeze(-1)).squeeze(-1)
    for group in torch.unique(group_index[has_values]):
        rows = has_values & (group_index == group)
        scores = finals[rows]
        if scores.numel() == 1:
            mean, sigma = 0.0, 1.0 - eps
        else:
            mean = scores.mean()
            sigma = ((scores - mean) ** 2).mean().sqrt()
            if float(sigma) == 0.0:
                sigma = 1.0 - eps  # equal final scores: centre only, never divide step values by ~0
        advantages[rows] = (values[rows] - mean) / (sigma + eps)
    return torch.where(mask, advantages, torch.zeros_like(advantages)).to(_result_dtype(token_values))


def prefix_credit(advantages: Tensor, token_ids: Tensor, completion_mask: Tensor, group_index: Tensor) -> Tensor:
    """Each sequence's outcome advantage spread over its tokens by where it parts from its group.

    For sequences of one group that share prefixes (a tree's trajectories share their path from the
    root), let `V(p)` be the mean outcome advantage `Â` of the group's sequences whose completion
    starts with the token prefix `p` (`V` of the empty prefix is the group's mean). Token t of
    sequence i gets `A_{i,t} = V(o_{i,≤t}) − V(o_{i,<t})`: what choosing that token changed in the
    expected outcome of the group's sequences through it. A token every sibling on that prefix shares
    gets 0; the token where a solution leaves a wrong path gets the difference. The sum over a
    sequence telescopes to `Â_i − mean_g(Â)`, which is `Â_i` for the centred estimators (grpo,
    dr_grpo, lite_ppo, rloo): under token-sum aggregation each sequence carries its outcome advantage,
    only placed on the tokens that decided it. Ours (docs/algorithms.md §8, "prefix credit"); the idea of
    crediting steps by the change of value between a tree node and its parent is that of tree-based
    RL methods such as TreeRPO and TreeRL.

    `advantages` `[N]` per sequence, `token_ids` and `completion_mask` `[N, T]` (1 on completion
    tokens, in order), `group_index` `[N]`. Returns `[N, T]`, 0 off the completion. Plain loops over a
    trie of each group's completions: linear in the completion tokens.
    """
    if advantages.dim() != 1 or token_ids.dim() != 2 or token_ids.shape != completion_mask.shape:
        raise ValueError(
            f"need advantages [N] and token_ids, completion_mask [N, T]; got {tuple(advantages.shape)},"
            f" {tuple(token_ids.shape)}, {tuple(completion_mask.shape)}"
        )
    if group_index.shape != advantages.shape or token_ids.shape[0] != advantages.shape[0]:
        raise ValueError(f"group_index and advantages must both be [N = {token_ids.shape[0]}]")
    credit = torch.zeros(token_ids.shape, dtype=torch.float64)
    mask = completion_mask.to(torch.bool)
    values = advantages.to(torch.float64).tolist()
    rows_of: dict[int, list[int]] = {}
    for row, group in enumerate(group_index.tolist()):
        rows_of.setdefault(group, []).append(row)
    for rows in rows_of.values():
        completions = {
            row: (mask[row].nonzero().squeeze(-1).tolist(), token_ids[row][mask[row]].tolist()) for row in rows
        }
        # a trie of the group's completions: per node its children and the sum and count of Â through it
        root: dict[str, Any] = {"children": {}, "sum": 0.0, "count": 0}
        for row in rows:
            node = root
            node["sum"] += values[row]
            node["count"] += 1
            for token in completions[row][1]:
                node = node["children"].setdefault(token, {"children": {}, "sum": 0.0, "count": 0})
                node["sum"] += values[row]
                node["count"] += 1
        for row in rows:
            node, before = root, root["sum"] / root["count"]
            positions, tokens = completions[row]
            for position, token in zip(positions, tokens, strict=True):
                node = node["children"][token]
                after = node["sum"] / node["count"]
                credit[row, position] = after - before
                before = after
    return credit.to(_result_dtype(advantages))


# ------------------------------------------------------------------------------------------ reward shaping


def overlong_penalty(lengths: Tensor, *, max_length: int, cache_length: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, eq. 13), added to the reward.

    With `L_max = max_length`, `L_cache = cache_length` and `|o|` the completion's length in tokens:
    `0` if `|o| ≤ L_max − L_cache`; `((L_max − L_cache) − |o|) / L_cache` if `L_max − L_cache < |o| ≤ L_max`
    (from 0 down to −1 across the soft zone); `−1` beyond `L_max`.
    """
    if cache_length <= 0 or max_length <= cache_length:
        raise ValueError(
            f"need 0 < cache_length < max_length, got cache_length {cache_length}, max_length {max_length}"
        )
    expected = max_length - cache_length
    lengths = lengths.to(torch.float32)
    soft = (expected - lengths) / cache_length
    penalty = torch.where(lengths <= expected, torch.zeros_like(lengths), soft)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def truncation_rewards(rewards: Tensor, lengths: Tensor, truncated: Tensor, *, target_length: int) -> Tensor:
    """DLER's truncation length penalty ("DLER: Doing Length pEnalty Right", NVIDIA, 2025, arXiv:2510.15110):
    a completion longer than the target length `L_T`, or cut off by the generation limit before it
    finished, gets reward 0 (it is treated as truncated); every other reward is kept.
    `r'_i = 0 if |o_i| > L_T or truncated_i else r_i`. DLER pairs it with batch-wise reward
    normalisation (the `lite_ppo` estimator), which the config enforces.
    """
    if target_length <= 0:
        raise ValueError(f"target_length must be a positive number of tokens, got {target_length}")
    if not rewards.shape == lengths.shape == truncated.shape:
        raise ValueError(
            f"rewards, lengths and truncated must have one shape, got {tuple(rewards.shape)},"
            f" {tuple(lengths.shape)} and {tuple(truncated.shape)}"
        )
    cut = (lengths > target_length) | truncated.to(torch.bool)
    return torch.where(cut, torch.zeros_like(rewards), rewards)


# ------------------------------------------------------------------------------------------ aggregation


def _token_mean(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """DAPO / Lite PPO: `Σ_{i,t} m·ℓ / Σ_{i,t} m` — every token weighs the same."""
    return masked_mean(values, mask)


def active_rows(mask: Tensor) -> int:
    """Rows the mask keeps any token of: the `N` of the per-sequence aggregations. A row the mask
    removes entirely (an empty completion, a row masked out whole) counts in no denominator, so
    masking a row never scales the rest of the loss down."""
    return int((mask.sum(-1) > 0).sum())


def _seq_mean_token_sum(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """`mean_i(Σ_t m·ℓ)` over the active rows — longer sequences weigh more."""
    return (values * mask).sum() / max(1, active_rows(mask))


def _seq_mean_token_mean(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """Original GRPO: `mean_i(Σ_t m·ℓ / Σ_t m)` over the active rows — every sequence weighs the same."""
    return masked_mean(values, mask, dim=-1).sum() / max(1, active_rows(mask))


def _seq_mean_token_sum_norm(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """Dr. GRPO: `Σ_{i,t} m·ℓ / (N · L_max)` with a constant `L_max` (default: the padded width T) and
    `N` the active rows."""
    length = max_length if max_length is not None else values.shape[-1]
    return (values * mask).sum() / (max(1, active_rows(mask)) * length)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(values: Tensor, mask: Tensor, aggregation: str = "token-mean", max_length: int | None = None) -> Tensor:
    """Reduce per-token values [N, T] to a scalar with one of `AGGREGATIONS` (docs/algorithms.md §2).

    Every aggregation's denominator counts only what the mask keeps: tokens for token-mean, and for the
    per-sequence ones the rows with at least one kept token (`active_rows`)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is unknown; choose one of {sorted(AGGREGATIONS)}")
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(f"values and mask must both be [N, T], got {tuple(values.shape)} and {tuple(mask.shape)}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return AGGREGATIONS[aggregation](values, mask.to(values.dtype), max_length)


# ------------------------------------------------------------------------------------------ losses


def _per_sequence(value: float | Tensor, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A clip bound as a [N, 1] column (a float for every row, or one value per row)."""
    if isinstance(value, Tensor):
        if value.shape != (rows,):
            raise ValueError(f"a per-sequence clip bound must be [N] = [{rows}], got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).unsqueeze(-1)
    return torch.full((rows, 1), float(value), dtype=dtype, device=device)


def policy_loss_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor = 0.2,
    clip_high: float | Tensor = 0.2,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO-clip loss `ℓ_{i,t}` [N, T], the ratio `ρ` and whether the clipped term is active.

    `ℓ_{i,t} = −min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1−ε_low, 1+ε_high) Â_{i,t})`, see `policy_loss`.
    `clip_low` and `clip_high` are floats, or [N] tensors for a clip range per sequence (hinted
    samples, `hint_clip_ranges`). `advantages` is [N] (broadcast) or [N, T]; `mask` only checks shape here.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal logprobs shape {tuple(logprobs.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be [N] or [N, T] matching logprobs {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
        )
    rows, dtype, device = logprobs.shape[0], logprobs.dtype, logprobs.device
    low = _per_sequence(clip_low, rows, dtype, device)
    high = _per_sequence(clip_high, rows, dtype, device)
    if bool((low < 0).any()) or bool((low >= 1).any()) or bool((high < 0).any()):
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low} and {clip_high}")
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -torch.minimum(torch.maximum(ratio, 1.0 - low), 1.0 + high) * advantages
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | Tensor = 0.2,
    clip_high: float | Tensor = 0.2,
    aggregation: str = "token-mean",
    max_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip surrogate with asymmetric clipping, aggregated over tokens and sequences.

    `ℓ_{i,t} = −min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1−ε_low, 1+ε_high) Â_{i,t})`
    (PPO, Schulman et al., 2017; GRPO uses ε_low = ε_high = 0.2; DAPO's "clip-higher",
    Yu et al., 2025, arXiv:2503.14476, uses ε_high = 0.28). `advantages` is per sequence [N]
    (broadcast over tokens, outcome rewards) or per token [N, T]. The log-ratio is clamped to
    ±`MAX_LOG_RATIO` before `exp` so the ratio stays finite.

    Returns the aggregated loss and stats over masked tokens: `clip_fraction` (share of tokens
    whose clipped term is the active one, i.e. whose gradient is zero) and `ratio_mean`.
    """
    per_token, ratio, clipped = policy_loss_terms(
        logprobs, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high
    )
    loss = aggregate(per_token, mask, aggregation, max_length)
    with torch.no_grad():
        float_mask = mask.to(per_token.dtype)
        stats = {
            "clip_fraction": float(masked_mean(clipped.to(per_token.dtype), float_mask)),
            "ratio_mean": float(masked_mean(ratio.detach(), float_mask)),
        }
    return loss, stats


# ------------------------------------------------------------------------------------------ GSPO


def gspo_loss_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    token_level: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """GSPO's per-token loss [N, T], the ratio [N, T] and whether the clipped term is active [N, T].

    Group Sequence Policy Optimization (Zheng et al., 2025, arXiv:2507.18071, eqs. 5–7 and 13–14): the
    importance ratio is the sequence's, length-normalised,

        s_i = exp( (1/|y_i|) Σ_t (log π_θ(y_{i,t}) − log π_old(y_{i,t})) ),

    clipped per sequence, `ℓ_i = −min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)`, placed on every token
    of the row, so that the aggregation 'seq-mean-token-mean' gives GSPO's `(1/G) Σ_i ℓ_i` (the
    paper's ε: 3e-4 and 4e-4). `advantages` is [N], or [N, T] constant along each row's completion.

    GSPO-token (`token_level`): `s_{i,t} = sg[s_i] · π_θ(y_{i,t}) / sg[π_θ(y_{i,t})]`, equal to `s_i` in
    value (so clipped where the sequence is) with the gradient of token t's own logprob, and a
    per-token advantage `Â_{i,t}` [N, T]; `ℓ_{i,t} = −min(s_{i,t} Â_{i,t}, clip(s_{i,t}) Â_{i,t})`.
    With `Â_{i,t} = Â_i` its gradient equals GSPO's.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal logprobs shape {tuple(logprobs.shape)}")
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low} and {clip_high}")
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be [N] or [N, T] matching logprobs {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
        )
    weights = mask.to(logprobs.dtype)
    lengths = weights.sum(-1).clamp(min=1.0)
    if not token_level:
        row_mean = (advantages * weights).sum(-1, keepdim=True) / lengths.unsqueeze(-1)
        if bool((((advantages - row_mean) * weights).abs() > 1e-6).any()):
            raise ValueError("sequence-level GSPO takes one advantage per sequence; per-token ones need GSPO-token")
    mean_log_ratio = ((logprobs - old_logprobs) * weights).sum(-1) / lengths
    sequence_ratio = torch.exp(mean_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)).unsqueeze(-1)  # [N, 1]
    if token_level:
        ratio = sequence_ratio.detach() * torch.exp(logprobs - logprobs.detach())
    else:
        ratio = sequence_ratio.expand_as(logprobs)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


# ------------------------------------------------------------------------------------------ DisCO

#: DisCO's sequence scores `s_θ(o, q)` (docs: `disco_loss`).
DISCO_SCORES = ("log_l", "l_ratio")


def disco_scores(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, score: str = "log_l") -> Tensor:
    """One score per sequence [N], length-normalised so long and short answers compare.

    `log_l`: `s = (1/|o|) Σ_t log π_θ(o_t)`; `l_ratio`: `s = (1/|o|) Σ_t π_θ(o_t) / π_old(o_t)` (the mean
    of the token ratios, not of their logs; DisCO's `compute_policy_loss_disco_{logL,Lratio}`, the
    `global_scores` line). The log-ratio is clamped to ±`MAX_LOG_RATIO` before `exp`, as everywhere
    here. A row without completion tokens scores 0.
    """
    if score not in DISCO_SCORES:
        raise ValueError(f"DisCO score {score!r} is unknown; choose one of {list(DISCO_SCORES)}")
    if score == "log_l":
        return masked_mean(logprobs, mask, dim=-1)
    ratio = torch.exp((logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return masked_mean(ratio, mask, dim=-1)


def _disco_group_objective(scores: Tensor, positive: Tensor, negative: Tensor, robust: bool, tau: float) -> Tensor:
    """`mean_{o⁺} s(o⁺) − agg_{o⁻} s(o⁻)` of one group that has both kinds of answer."""
    pos_mean = scores[positive].mean()
    negatives = scores[negative]
    if not robust:
        return pos_mean - negatives.mean()
    count = torch.tensor(float(negatives.numel()), dtype=scores.dtype, device=scores.device)
    return pos_mean - tau * (torch.logsumexp(negatives / tau, dim=0) - torch.log(count))


def disco_objective(
    scores: Tensor, correct: Tensor, group_index: Tensor, *, robust: bool = True, tau: float = 10.0
) -> tuple[Tensor, int]:
    """`Σ_g J_g` over the groups with a correct and an incorrect answer (see `disco_loss`), and their count.

    A group with only one kind of answer has nothing to discriminate and adds nothing; the sum keeps a
    graph to `scores` even when no group counts, so a backward pass through it is always possible."""
    correct = correct.to(torch.bool)
    total = scores.sum() * 0.0
    counted = 0
    for group in torch.unique(group_index):
        members = group_index == group
        positive, negative = members & correct, members & ~correct
        if bool(positive.any()) and bool(negative.any()):
            total = total + _disco_group_objective(scores, positive, negative, robust, tau)
            counted += 1
    return total, counted


def disco_penalty(kl: Tensor, *, delta: float = 1e-4, beta: float = 1e3) -> Tensor:
    """DisCO's squared-hinge KL constraint `β · max(KL − δ, 0)²`: zero (and no gradient) inside the trust
    region KL ≤ δ, a quadratic pull back beyond it."""
    return beta * torch.clamp(kl - delta, min=0.0) ** 2


def disco_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    correct: Tensor,
    group_index: Tensor,
    *,
    score: str = "log_l",
    robust: bool = True,
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
) -> tuple[Tensor, dict[str, float]]:
    """DisCO's discriminative objective with a squared-hinge KL constraint instead of PPO's clip.

    Source: "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization"
    (Li et al., 2025, arXiv:2505.12366), reference code Optimization-AI/DisCO,
    `verl/verl/trainer/ppo/core_algos.py` (`compute_policy_loss_disco{,b}_{logL,Lratio}`) and the
    recipes `scripts/train/run_disco*_8k.sh`. With `G` the groups present (all of them, as the
    reference's `num_questions`), `P_g` / `N_g` a group's correct / incorrect answers and `s` the
    score of `disco_scores`:

        J_g  = mean_{o∈P_g} s(o) − mean_{o∈N_g} s(o)                          (DisCO-b, robust=False)
        J_g  = mean_{o∈P_g} s(o) − τ · log mean_{o∈N_g} exp(s(o)/τ)            (DisCO, robust=True)
        KL   = Σ_{i,t} m·(log π_old − log π_θ) / Σ_{i,t} m                    (token mean over the batch)
        loss = −(1/G) Σ_{g: P_g≠∅, N_g≠∅} J_g + β · max(KL − δ, 0)²

    The robust form is distributionally robust over the negatives: as τ → 0 it pushes down the
    highest-scoring wrong answer, as τ → ∞ it becomes the mean. A group without a correct or without an
    incorrect answer gives no signal and adds nothing (it still counts in `G`, as in the reference).
    The KL estimate is the reference recipes' `ppo_kl_type=kl` (the k1 estimate of KL(π_old ‖ π_θ)
    from the sampled tokens). Defaults are the recipes': δ = 1e-4, β = 1e3, τ = 10 for `log_l`
    (their L-ratio runs use τ = 1).

    Two deliberate differences in value, none in the direction of the update: the reference writes
    the robust term as `Σexp / stopgrad(Σexp)` (value 1, gradient that of log Σ exp), here it is the
    paper's τ·log mean exp, whose gradient is the same; and it writes the penalty as
    `stopgrad(β·[KL − δ]₊) · KL`, whose gradient β·[KL − δ]₊·∇KL is half that of the paper's
    β·[KL − δ]₊² used here, so the reference's β = 1e3 is β = 500 here for the same step.

    `correct` is a boolean [N] (the verifier's pass); `group_index` an integer [N]. Returns the loss
    and stats: `disco_kl`, `disco_penalty` (β·[KL − δ]₊², 0 below δ), `disco_groups` (groups with a
    signal).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal logprobs shape {tuple(logprobs.shape)}")
    rows = logprobs.shape[0]
    for name, tensor in (("correct", correct), ("group_index", group_index)):
        if tensor.shape != (rows,):
            raise ValueError(f"{name} must be [N] = [{rows}], got shape {tuple(tensor.shape)}")
    if tau <= 0 or delta < 0 or beta < 0:
        raise ValueError(f"DisCO needs tau > 0, delta >= 0 and beta >= 0, got {tau}, {delta} and {beta}")
    mask = mask.to(logprobs.dtype)
    scores = disco_scores(logprobs, old_logprobs, mask, score)
    objective, signal = disco_objective(scores, correct, group_index, robust=robust, tau=tau)
    kl = masked_mean(old_logprobs - logprobs, mask)
    penalty = disco_penalty(kl, delta=delta, beta=beta)
    loss = -objective / max(1, int(torch.unique(group_index).numel())) + penalty
    stats = {"disco_kl": float(kl.detach()), "disco_penalty": float(penalty.detach()), "disco_groups": float(signal)}
    return loss, stats


def hint_clip_ranges(
    is_hinted: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    hint_clip_low: float | None = None,
    hint_clip_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence clip bounds [N]: hinted samples get their own range, the rest the learner's.

    A hinted completion (Guide, "Adaptive Guidance Accelerates Reinforcement Learning of Reasoning
    Models", Nath et al., 2025, arXiv:2506.13923; Scaf-GRPO, arXiv:2510.19807) was sampled with a hint
    `h` in context and is trained against the unhinted prompt, so its importance ratio is the
    off-policy correction `ρ = π_θ(o_t | q, o_<t) / π_old(o_t | q, h, o_<t)` and the PPO clip
    `clip(ρ, 1−ε_low, 1+ε_high)` applies to it as to any ratio. Guide-GRPO clips this ratio with the
    same ε as on-policy samples (our reading of the paper; its abstract describes only "adjusting the
    importance sampling ratio"), so `hint_clip_low/high = None` keep the learner's ε; set them to
    widen or narrow the range for hinted samples alone. With `ρ < 1` typical (the hint made the
    completion likelier than the bare prompt does), a positive advantage keeps its gradient (the
    unclipped term is the smaller) and a negative one is cut at `1 − ε_low`.
    """
    if is_hinted.dim() != 1:
        raise ValueError(f"is_hinted must be [N], got shape {tuple(is_hinted.shape)}")
    hinted = is_hinted.to(torch.bool)
    low = hint_clip_low if hint_clip_low is not None else clip_low
    high = hint_clip_high if hint_clip_high is not None else clip_high
    lows = torch.where(hinted, torch.tensor(float(low)), torch.tensor(float(clip_low)))
    highs = torch.where(hinted, torch.tensor(float(high)), torch.tensor(float(clip_high)))
    return lows, highs


# ------------------------------------------------------------------------------------------ Lp-Reg


def lp_reg_proxy_logprobs(logits: Tensor, targets: Tensor, *, min_p: float) -> Tensor:
    """`log π_proxy(target)` at each position, the proxy distribution of Lp-Reg (docs/algorithms.md §5).

    "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable Reward"
    (Huang et al., 2025, arXiv:2510.03222; code CarlanLark/Lp-Reg-dev, `apply_min_p` in
    `verl/workers/actor/dp_actor.py`): the proxy keeps the tokens whose probability under `π_θ` is at
    least `τ = min_p · max_v π_θ(v)` — a min-p cut relative to the position's most likely token, so
    `min_p` (κ) is a fraction of the max probability, not an absolute probability — and renormalises
    over them: `π_proxy(v) = π_θ(v)·1[π_θ(v) ≥ τ] / Σ_u π_θ(u)·1[π_θ(u) ≥ τ]`. A target below the cut
    (presumed noise) gets `−inf`. `logits` [..., V] (already divided by the sampling temperature),
    `targets` [...]; computed without gradient (the proxy is a fixed target).
    """
    if not 0 < min_p <= 1:
        raise ValueError(f"min_p must be in (0, 1], got {min_p}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocabulary axis")
    with torch.no_grad():
        log_probabilities = torch.log_softmax(logits.detach().float(), dim=-1)
        cut = log_probabilities.max(-1, keepdim=True).values + math.log(min_p)
        kept = torch.where(log_probabilities >= cut, log_probabilities, torch.full_like(log_probabilities, -math.inf))
        proxy = kept - torch.logsumexp(kept, dim=-1, keepdim=True)
        return proxy.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def lp_reg_loss(
    per_token_loss: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    proxy_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    coef: float = 1.0,
    low_fraction: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Lp-Reg's regularised per-token loss and the mask of the tokens it regularised.

    Following the paper (arXiv:2510.03222) and its code (`compute_policy_loss_lp_reg`): among the
    masked tokens with negative advantage, take the `low_fraction` with the lowest `log π_θ`
    (at least one), and of those the ones the proxy keeps with more mass than the policy gives them
    (`log π_θ < log π_proxy`, i.e. not cut as noise). For these "reasoning sparks" the PPO term is
    replaced by its unclipped form plus the KL penalty towards the proxy:
    `ℓ_{i,t} = −ρ_{i,t} Â_{i,t} + β_lp · k3(δ)`, `δ = log π_proxy − log π_θ`, `k3 = exp(δ) − δ − 1`
    (the reference's `low_var_kl`, an estimate of the KL between proxy and policy on the sampled
    token); every other token keeps `per_token_loss`. Defaults are the reference recipe's
    (`ppo_kl_coef=1`, `logp_neg_k_percent=0.01`). The reference applies the penalty only when two or
    more tokens are selected; here one selected token is regularised too.
    """
    if not 0 < low_fraction <= 1:
        raise ValueError(f"low_fraction must be in (0, 1], got {low_fraction}")
    if coef < 0:
        raise ValueError(f"coef must be non-negative, got {coef}")
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("proxy_logprobs", proxy_logprobs)):
        if tensor.shape != per_token_loss.shape:
            raise ValueError(
                f"{name} shape {tuple(tensor.shape)} must equal the loss shape {tuple(per_token_loss.shape)}"
            )
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(per_token_loss)
    negative = (mask > 0) & (advantages < 0)
    selected = torch.zeros_like(negative)
    count = int(negative.sum())
    if count == 0 or coef == 0:
        return per_token_loss, selected
    with torch.no_grad():
        candidates = torch.where(negative, logprobs.detach(), torch.full_like(logprobs, math.inf)).flatten()
        lowest = torch.topk(candidates, max(1, int(count * low_fraction)), largest=False).indices
        selected.view(-1)[lowest] = True
        selected &= logprobs.detach() < proxy_logprobs
    if not bool(selected.any()):
        return per_token_loss, selected
    ratio = torch.exp((logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    regularised = -ratio * advantages + coef * bounded_k3(proxy_logprobs - logprobs)
    return torch.where(selected, regularised, per_token_loss), selected


# ------------------------------------------------------------------------------------------ HPT and SFT


def hpt_weights(
    pass_rates: Tensor,
    has_solution: Tensor,
    *,
    threshold: float = 0.0,
    rl_coef: float = 1.0,
    sft_coef: float = 1.0,
    mix: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-group weights `(α_g, β_g)` of the RL and SFT losses, switched by pass rate (HPT).

    "Towards a Unified View of Large Language Model Post-Training" (Lv et al., 2025, arXiv:2509.04419;
    code TsinghuaC3I/Unify-Post-Training, `unify_strategy=switch`, `switch_gate=0`,
    `sft_loss_coef=1.0`): a prompt whose pass rate over its rollouts is at most `threshold` and that
    has a reference solution trains on the SFT loss of that solution instead of the RL loss:
    `(α, β) = (0, sft_coef)` if `p_g ≤ threshold` and a solution exists, else `(rl_coef, 0)`.
    The paper's gate counts correct rollouts (0 of 8 by default), i.e. `threshold = 0`. With
    `mix=True` a switched group keeps its RL loss too, `(rl_coef, sft_coef)` — the `α·L_RL + β·L_SFT`
    mixture the paper's unified estimator allows.
    """
    if pass_rates.dim() != 1 or has_solution.shape != pass_rates.shape:
        raise ValueError(
            f"pass_rates and has_solution must both be [G], got {tuple(pass_rates.shape)} and {tuple(has_solution.shape)}"
        )
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a pass rate in [0, 1], got {threshold}")
    if rl_coef < 0 or sft_coef < 0:
        raise ValueError(f"rl_coef and sft_coef must be non-negative, got {rl_coef} and {sft_coef}")
    switched = (pass_rates <= threshold) & has_solution.to(torch.bool)
    rl = torch.where(switched & (not mix), torch.tensor(0.0), torch.tensor(float(rl_coef)))
    sft = torch.where(switched, torch.tensor(float(sft_coef)), torch.tensor(0.0))
    return rl, sft


def sft_loss(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the target tokens: `−Σ m·log π_θ / Σ m` (0 when empty)."""
    return -masked_mean(logprobs, mask.to(logprobs.dtype))


def _k1(delta: Tensor) -> Tensor:
    return -delta


def _k2(delta: Tensor) -> Tensor:
    return 0.5 * delta * delta


def _k3(delta: Tensor) -> Tensor:
    return bounded_k3(delta)


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the sampled tokens' logprobs.

    With `δ = log π_ref − log π_θ`: `k1 = −δ`, `k2 = ½δ²`, `k3 = exp(δ) − δ − 1` (unbiased and
    non-negative). Source: J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx);
    k3 is GRPO's penalty (DeepSeekMath eq. 4). k3 is bounded as verl bounds it (`bounded_k3`: δ
    clamped to ±20, the value to at most 10), so one far-off token cannot dominate a step.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL kind {kind!r} is unknown; choose one of {sorted(KL_ESTIMATORS)}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs shape {tuple(logprobs.shape)} must equal ref_logprobs shape {tuple(ref_logprobs.shape)}"
        )
    return KL_ESTIMATORS[kind](ref_logprobs - logprobs)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: `H = −Σ_v p_v log p_v`, `p = softmax(z)`.

    `logits` is [..., V]; returns [...]. Computed in float32 at least, for bf16 logits. A token with
    probability 0 (logit −inf) contributes 0, not NaN.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_probabilities = torch.log_softmax(logits, dim=-1)
    probabilities = log_probabilities.exp()
    terms = torch.where(probabilities > 0, probabilities * log_probabilities, torch.zeros_like(probabilities))
    return -terms.sum(-1)


def truncated_importance_weights(learner_logprobs: Tensor, behaviour_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS) of the rollout engine's samples, per token [N, T]:

    `w_{i,t} = min(exp(log π_learner(o_{i,t}) − log π_behaviour(o_{i,t})), C)`, detached,

    multiplying each token's policy loss, so that a gradient built on the learner's own logprobs of
    samples drawn by an engine whose numbers differ (other kernels, bf16, a stale version) is
    reweighted towards the engine's distribution, and the cap `C` bounds its variance (F. Yao, L. Liu
    et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025; verl's
    token-level `rollout_is` in mode 'truncate', slime's `--use-tis`, OpenRLHF's vLLM IS correction;
    threshold 2 in verl's and slime's examples). The log-ratio is bounded by ±`MAX_LOG_RATIO` first.
    """
    if learner_logprobs.shape != behaviour_logprobs.shape:
        raise ValueError(
            f"learner_logprobs shape {tuple(learner_logprobs.shape)} must equal behaviour_logprobs shape "
            f"{tuple(behaviour_logprobs.shape)}"
        )
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"the TIS cap must be a positive number, got {cap}")
    log_ratio = (learner_logprobs - behaviour_logprobs).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap)


def logprob_mismatch(learner_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the rollout engine's logprobs are from the learner's for the same tokens under the same
    weights (rollout–training mismatch), over the tokens where `mask` is 1:

    - `k3`: `mean(r − 1 − log r)`, `r = π_learner / π_behaviour`, Schulman's k3 estimate of
      KL(π_behaviour ‖ π_learner) from the engine's samples (verl's `mismatch_k3_kl`);
    - `abs_mean`, `abs_max`: mean and largest `|log π_learner − log π_behaviour|`;
    - `tokens`: how many tokens were compared. No tokens give zeros.
    """
    if not (learner_logprobs.shape == behaviour_logprobs.shape == mask.shape):
        raise ValueError(
            f"learner_logprobs {tuple(learner_logprobs.shape)}, behaviour_logprobs {tuple(behaviour_logprobs.shape)}"
            f" and mask {tuple(mask.shape)} must have one shape"
        )
    selected = mask.bool()
    count = int(selected.sum())
    if count == 0:
        return {"k3": 0.0, "abs_mean": 0.0, "abs_max": 0.0, "tokens": 0}
    delta = (learner_logprobs.detach() - behaviour_logprobs)[selected].double().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return {
        "k3": float((torch.expm1(delta) - delta).mean()),
        "abs_mean": float(delta.abs().mean()),
        "abs_max": float(delta.abs().max()),
        "tokens": count,
    }
