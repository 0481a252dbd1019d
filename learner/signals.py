"""From a batch of scored groups to the learner's training signals, as the config's options say.

- `shaped_rewards`: the verifier's rewards with DAPO's overlong punishment added and DLER's
  truncation penalty applied (docs/algorithms.md §3-4);
- `token_advantages`: the outcome advantage of the configured estimator on every completion token,
  or a tree trajectory's own per-token advantages (§1, §8);
- `gae_signals`: with a learned critic (`advantage: gae`), GAE's per-token advantages and the critic's
  targets (§1, "PPO with a critic");
- `select_signals`: which rows the RL loss trains on and with what weight (overlong filtering, HPT's
  α), and HPT's SFT examples with their weight β (§6).

Plain functions of the config and tensors (`learner.batching.TrainingTensors`); the trainer calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchard.config import LearnerConfig
from orchard.learner.algorithms import (
    gae_advantages,
    hpt_weights,
    masked_mean,
    outcome_advantages,
    outcome_token_rewards,
    overlong_penalty,
    prefix_credit,
    tree_advantages,
    truncation_rewards,
    whiten,
)
from orchard.learner.batching import TrainingTensors
from orchard.records import Group


def shaped_rewards(config: LearnerConfig, tensors: TrainingTensors, max_length: int) -> Tensor:
    """[N]: rewards + DAPO's overlong punishment (when on), then DLER's truncation to 0 (when on).
    `max_length` (rollout.max_new_tokens) is the default `L_max` and `L_T`."""
    rewards = tensors.rewards
    overlong, length_penalty = config.overlong, config.length_penalty
    if overlong.enabled:
        longest, cache_length = overlong.resolved_lengths(max_length)
        rewards = rewards + overlong_penalty(tensors.lengths, max_length=longest, cache_length=cache_length)
    if length_penalty.enabled:
        target = length_penalty.target_length if length_penalty.target_length is not None else max_length
        rewards = truncation_rewards(rewards, tensors.lengths, tensors.truncated, target_length=target)
    return rewards


def token_advantages(config: LearnerConfig, tensors: TrainingTensors, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """`(per token [N, L], per sequence [N])`: the estimator's outcome advantage on every completion
    token; on tree trajectories as `learner.tree_advantage` says (`prefix_credit` by default,
    `tree_advantages` of their token values with 'node_values'); 0 off the completion."""
    outcome = outcome_advantages(rewards, tensors.group_index, config.advantage)
    advantages = outcome.unsqueeze(-1).expand_as(tensors.old_logprobs).clone()
    if config.tree_advantage != "outcome" and tensors.tree is not None and bool(tensors.tree.any()):
        if config.tree_advantage == "node_values":
            tree_rows = tensors.tree & tensors.value_mask.to(torch.bool).any(-1)
            tree = tree_advantages(tensors.token_values, tensors.value_mask, tensors.group_index)
        else:
            tree_rows = tensors.tree
            tree = prefix_credit(outcome, tensors.input_ids, tensors.completion_mask, tensors.group_index)
        advantages[tree_rows] = tree[tree_rows].to(advantages.dtype)
    return advantages * tensors.completion_mask, outcome


def gae_signals(
    config: LearnerConfig, tensors: TrainingTensors, rewards: Tensor, values: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`(advantages [N, L], returns [N, L], per sequence [N])` from the critic's `values` (aligned with
    `tensors`): each sequence's reward on its last completion token, GAE(γ, λ) over its completion
    tokens, the advantages whitened over the batch's completion tokens when `critic.normalize_advantages`;
    the per-sequence figure is the mean of a row's advantages (for |Â|). Returns are not whitened."""
    mask = tensors.completion_mask
    critic = config.critic
    token_rewards = outcome_token_rewards(rewards, mask)
    advantages, returns = gae_advantages(token_rewards, values, mask, gamma=critic.gamma, lam=critic.lam)
    if critic.normalize_advantages:
        advantages = whiten(advantages, mask)
    advantages = advantages.to(torch.float32) * mask
    return advantages, returns.to(torch.float32), masked_mean(advantages, mask, dim=-1)


@dataclass
class Signals:
    """Which rows the RL loss uses and HPT's supervised examples."""

    keep: Tensor  # [N] bool: rows trained with the RL loss
    rl_weights: Tensor  # [N] α of each row (1 without HPT)
    sft_examples: list[tuple[list[int], list[int], float]]  # (prompt tokens, solution tokens, β)


def select_signals(
    config: LearnerConfig,
    groups: Sequence[Group],
    tensors: TrainingTensors,
    solution_tokens: Callable[[str], list[int]] | None,
) -> Signals:
    """Rows left out: truncated ones under overlong filtering, and those of groups HPT switched to
    SFT (α = 0). HPT's examples are the switched groups' prompt tokens and `solution_tokens(solution)`."""
    keep = torch.ones(tensors.num_sequences, dtype=torch.bool)
    if config.overlong.mask_truncated:
        keep &= ~tensors.truncated
    row_weights = torch.ones(tensors.num_sequences)
    examples: list[tuple[list[int], list[int], float]] = []
    hpt = config.hpt
    if hpt.enabled:
        if solution_tokens is None:
            raise ValueError("learner.hpt needs solution_tokens, the tokenizer's encoding of a reference solution")
        rl, sft = hpt_weights(
            torch.tensor([group.pass_rate for group in groups]),
            torch.tensor([bool(group.prompt.solution) for group in groups]),
            threshold=hpt.pass_rate_threshold,
            rl_coef=hpt.rl_coef,
            sft_coef=hpt.sft_coef,
            mix=hpt.mix,
        )
        row_weights = rl[tensors.group_index]
        keep &= row_weights > 0
        for group, weight in zip(groups, sft.tolist(), strict=True):
            if weight > 0:
                examples.append((list(group.prompt_token_ids), solution_tokens(group.prompt.solution), weight))
    return Signals(keep=keep, rl_weights=row_weights, sft_examples=examples)
