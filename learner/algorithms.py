"""Pure RLVR algorithm functions on tensors: advantages, the PPO-clip policy loss, KL estimators.

Every function here is side-effect free and documented with its formula and source (see
/work/shared/ALGORITHMS.md §1-2). Functions are registered by name in `ADVANTAGE_ESTIMATORS`,
`AGGREGATIONS` and `KL_ESTIMATORS` so a config string picks one.

Notation: `N` sequences, `T` token positions, `m` the 0/1 mask of completion tokens,
`ρ = exp(log π_θ − log π_old)` the importance ratio, `Â` the advantage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: Bound on |log π_θ − log π_old| before `exp`, so a very stale or very unlikely behaviour token
#: cannot overflow the ratio to inf (the same ±20 bound verl applies); inside it nothing changes.
MAX_LOG_RATIO = 20.0


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


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "grpo": lambda r, g: group_advantages(r, g, std="group"),
    "lite-ppo": lambda r, g: group_advantages(r, g, std="batch"),
    "dr-grpo": lambda r, g: group_advantages(r, g, std="none"),
    "rloo": rloo_advantages,
}


# ------------------------------------------------------------------------------------------ aggregation


def _token_mean(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """DAPO / Lite PPO: `Σ_{i,t} m·ℓ / Σ_{i,t} m` — every token weighs the same."""
    return masked_mean(values, mask)


def _seq_mean_token_sum(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """`mean_i(Σ_t m·ℓ)` — longer sequences weigh more."""
    return (values * mask).sum(-1).mean()


def _seq_mean_token_mean(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """Original GRPO: `mean_i(Σ_t m·ℓ / Σ_t m)` — every sequence weighs the same."""
    return masked_mean(values, mask, dim=-1).mean()


def _seq_mean_token_sum_norm(values: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """Dr. GRPO: `Σ_{i,t} m·ℓ / (N · L_max)` with a constant `L_max` (default: the padded width T)."""
    length = max_length if max_length is not None else values.shape[-1]
    return (values * mask).sum() / (values.shape[0] * length)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(values: Tensor, mask: Tensor, aggregation: str = "token-mean", max_length: int | None = None) -> Tensor:
    """Reduce per-token values [N, T] to a scalar with one of `AGGREGATIONS` (ALGORITHMS.md §2)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is unknown; choose one of {sorted(AGGREGATIONS)}")
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(f"values and mask must both be [N, T], got {tuple(values.shape)} and {tuple(mask.shape)}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return AGGREGATIONS[aggregation](values, mask.to(values.dtype), max_length)


# ------------------------------------------------------------------------------------------ losses


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
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
    if clip_low < 0 or clip_high < 0 or clip_low >= 1:
        raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low} and {clip_high}")
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token, mask, aggregation, max_length)
    with torch.no_grad():
        float_mask = mask.to(per_token.dtype)
        stats = {
            "clip_fraction": float(masked_mean((clipped > unclipped).to(per_token.dtype), float_mask)),
            "ratio_mean": float(masked_mean(ratio.detach(), float_mask)),
        }
    return loss, stats


def _k1(delta: Tensor) -> Tensor:
    return -delta


def _k2(delta: Tensor) -> Tensor:
    return 0.5 * delta * delta


def _k3(delta: Tensor) -> Tensor:
    return torch.expm1(delta) - delta


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the sampled tokens' logprobs.

    With `δ = log π_ref − log π_θ`: `k1 = −δ`, `k2 = ½δ²`, `k3 = exp(δ) − δ − 1` (unbiased and
    non-negative). Source: J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx);
    k3 is GRPO's penalty (DeepSeekMath eq. 4).
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
