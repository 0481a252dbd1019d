"""Turning groups of completions into padded training tensors, and the policy's token logprobs.

Alignment convention used everywhere in the learner: for a sequence `x_0..x_{L−1}` (prompt then
completion), position `t` of every per-token tensor holds a quantity about token `x_t` — its
behaviour logprob, the current policy's logprob `log π(x_t | x_<t)`, the entropy of the
distribution that predicted it. Position 0 has no prediction and holds 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from orchard.learner.algorithms import lp_reg_proxy_logprobs, token_entropy
from orchard.learner.sft import IGNORE_INDEX, pad_supervised_batch
from orchard.records import Group


@dataclass
class TrainingTensors:
    """One learner batch, right-padded to the longest prompt+completion."""

    input_ids: Tensor  # [N, L] long, prompt + completion, then pad_id
    attention_mask: Tensor  # [N, L] long, 1 on real tokens
    completion_mask: Tensor  # [N, L] float, 1 on completion tokens the policy sampled (not on tool observations)
    old_logprobs: Tensor  # [N, L] float, behaviour logprob of token t at position t (0 elsewhere)
    rewards: Tensor  # [N] float
    group_index: Tensor  # [N] long, which group (0..len(groups)-1) each sequence belongs to
    lengths: Tensor | None = None  # [N] long, completion tokens the policy sampled
    truncated: Tensor | None = None  # [N] bool, cut off by the length limit (finish_reason "length")
    hinted: Tensor | None = None  # [N] bool, sampled with a hint in context (source "hint")
    tree: Tensor | None = None  # [N] bool, a tree-search trajectory (source "tree")
    policy_versions: Tensor | None = None  # [N] long, the policy version that produced each completion
    token_values: Tensor | None = None  # [N, L] float, tree trajectories' per-token scores at their positions
    value_mask: Tensor | None = None  # [N, L] float, 1 where token_values holds a score

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Completion tokens (the ones trained on)."""
        return int(self.completion_mask.sum())

    def select(self, indices: Tensor) -> TrainingTensors:
        """The rows `indices`, trimmed to their own longest sequence (a micro-batch)."""
        length = max(int(self.attention_mask[indices].sum(-1).max()), 1) if len(indices) else 1

        def rows(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[indices]

        def cells(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[indices, :length]

        return TrainingTensors(
            input_ids=self.input_ids[indices, :length],
            attention_mask=self.attention_mask[indices, :length],
            completion_mask=self.completion_mask[indices, :length],
            old_logprobs=self.old_logprobs[indices, :length],
            rewards=self.rewards[indices],
            group_index=self.group_index[indices],
            lengths=rows(self.lengths),
            truncated=rows(self.truncated),
            hinted=rows(self.hinted),
            tree=rows(self.tree),
            policy_versions=rows(self.policy_versions),
            token_values=cells(self.token_values),
            value_mask=cells(self.value_mask),
        )


def micro_batch_rows(lengths: Tensor, *, max_sequences: int, max_tokens: int | None = None) -> list[Tensor]:
    """Row indices of each micro-batch of sequences of `lengths` (tokens, prompt and completion).

    Rows go longest first, so a micro-batch (trimmed to its own longest row) pads little. With
    `max_tokens` (verl's dynamic batch size) a micro-batch takes rows while rows × its longest row stays
    within the budget — a row longer than the budget goes alone — so short sequences travel in larger
    micro-batches; without it, `max_sequences` rows each."""
    if len(lengths) == 0:
        return []
    order = torch.argsort(lengths, descending=True, stable=True)
    if max_tokens is None:
        return list(order.split(max_sequences))
    batches, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)  # the longest row of this micro-batch: its first
        count = max(1, max_tokens // width)
        batches.append(order[start : start + count])
        start += count
    return batches


def shard_groups(group_tokens: Sequence[int], ranks: int) -> list[list[int]]:
    """The groups (by index) each of `ranks` data-parallel ranks trains: whole groups, balanced by tokens
    (largest first, each to the rank with the fewest tokens so far, the lower rank on ties), each rank's
    list in index order. Deterministic, so every rank computes the same split."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for group in sorted(range(len(group_tokens)), key=lambda g: (-group_tokens[g], g)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        shares[rank].append(group)
        loads[rank] += group_tokens[group]
    return [sorted(share) for share in shares]


def padding_share(lengths: Tensor, batches: Sequence[Tensor]) -> float:
    """The share of the tokens computed over `batches` (rows × each micro-batch's longest row) that are
    padding."""
    computed = sum(len(rows) * int(lengths[rows].max()) for rows in batches if len(rows))
    return 1.0 - int(lengths.sum()) / computed if computed else 0.0


def build_training_tensors(groups: Sequence[Group], pad_id: int) -> TrainingTensors:
    """Stack every completion of `groups` as `prompt_token_ids + completion.token_ids`.

    Rewards are copied as they are (a non-finite reward is the trainer's to refuse, not ours). A hinted
    completion (source "hint") is stacked after the group's prompt tokens, which are the unhinted
    prompt's, with the logprobs it was sampled with in the hinted context. A tree trajectory's
    `token_values` land at its completion positions (`value_mask` 1 there). A multi-turn trajectory's
    observation tokens (`observation_spans`) stay in the sequence, as context for what follows, with
    `completion_mask` 0: no loss, KL or entropy on them, and `lengths` counts only the policy's tokens.
    """
    if pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id}")
    if not groups:
        raise ValueError("build_training_tensors needs at least one group, got none")
    rows: list[tuple[list[int], int, list[float], float, int]] = []
    completions = []
    for index, group in enumerate(groups):
        if not group.completions:
            raise ValueError(f"group {group.id} (prompt {group.prompt.id}) has no completions")
        if not group.prompt_token_ids:
            raise ValueError(
                f"group {group.id} (prompt {group.prompt.id}) has no prompt tokens; the first completion token"
                " needs at least one token before it to be predicted"
            )
        for completion in group.completions:
            ids = list(group.prompt_token_ids) + list(completion.token_ids)
            rows.append((ids, len(group.prompt_token_ids), completion.logprobs, completion.reward, index))
            completions.append(completion)
    width = max(len(ids) for ids, *_ in rows)
    count = len(rows)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    completion_mask = torch.zeros((count, width), dtype=torch.float32)
    old_logprobs = torch.zeros((count, width), dtype=torch.float32)
    token_values = torch.zeros((count, width), dtype=torch.float32)
    value_mask = torch.zeros((count, width), dtype=torch.float32)
    for row, (ids, prompt_length, logprobs, _, _) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, prompt_length : len(ids)] = 1.0
        for start, end in completions[row].observation_spans:
            completion_mask[row, prompt_length + start : prompt_length + end] = 0.0
        old_logprobs[row, prompt_length : len(ids)] = torch.tensor(logprobs, dtype=torch.float32)
        values = completions[row].token_values
        if values is not None and values:
            token_values[row, prompt_length : len(ids)] = torch.tensor(values, dtype=torch.float32)
            value_mask[row, prompt_length : len(ids)] = 1.0
    return TrainingTensors(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        rewards=torch.tensor([reward for *_, reward, _ in rows], dtype=torch.float32),
        group_index=torch.tensor([index for *_, index in rows], dtype=torch.long),
        lengths=torch.tensor([c.policy_token_count for c in completions], dtype=torch.long),
        truncated=torch.tensor([c.finish_reason == "length" for c in completions], dtype=torch.bool),
        hinted=torch.tensor([c.source == "hint" for c in completions], dtype=torch.bool),
        tree=torch.tensor([c.source == "tree" for c in completions], dtype=torch.bool),
        policy_versions=torch.tensor([c.policy_version for c in completions], dtype=torch.long),
        token_values=token_values,
        value_mask=value_mask,
    )


def build_sft_tensors(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> TrainingTensors:
    """Stack `(prompt_ids, target_ids)` pairs for a supervised loss on the targets (HPT's SFT signal),
    padded as the warm start pads them (`learner.sft`): `completion_mask` is 1 on the target tokens;
    rewards and behaviour logprobs are 0 (unused)."""
    if pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id}")
    if not examples:
        raise ValueError("build_sft_tensors needs at least one example, got none")
    for index, (prompt, target) in enumerate(examples):
        if not prompt or not target:
            raise ValueError(
                f"SFT example {index} has {len(prompt)} prompt and {len(target)} target tokens; both must be non-empty"
            )
    input_ids, attention_mask, labels = pad_supervised_batch(examples, pad_id)
    count = len(examples)
    return TrainingTensors(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=(labels != IGNORE_INDEX).to(torch.float32),
        old_logprobs=torch.zeros(input_ids.shape, dtype=torch.float32),
        rewards=torch.zeros(count, dtype=torch.float32),
        group_index=torch.arange(count, dtype=torch.long),
    )


def sequence_logprobs(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Token logprobs and entropies of `model` at `temperature`, aligned with `input_ids` (see
    `sequence_scores`)."""
    scores = sequence_scores(model, input_ids, attention_mask, temperature)
    return scores.logprobs, scores.entropy


@dataclass
class TokenScores:
    """What one forward pass says about each token, aligned with `input_ids` (position 0 holds 0)."""

    logprobs: Tensor  # [N, L] log π(x_t | x_<t), with gradient
    entropy: Tensor  # [N, L] entropy of the distribution that predicted x_t, no gradient
    proxy_logprobs: Tensor | None = None  # [N, L] Lp-Reg's log π_proxy(x_t), no gradient; −inf where cut


def sequence_scores(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    *,
    proxy_min_p: float | None = None,
) -> TokenScores:
    """Token logprobs and entropies of `model` at `temperature`, aligned with `input_ids`.

    `logits[:, :-1] / temperature` predict `input_ids[:, 1:]`; the results are shifted right by one
    so position t refers to token t (position 0 is 0). Temperature must match the sampler's so the
    importance ratio compares the same distributions. The logprobs carry gradients; the entropy
    (for reporting) does not.
    """
    if temperature <= 0:
        raise ValueError(
            f"temperature must be positive (greedy samples have no logprobs to train on), got {temperature}"
        )
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, L], got {tuple(input_ids.shape)}"
            f" and {tuple(attention_mask.shape)}"
        )
    # use_cache=False: training needs no KV cache, and building one costs memory
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = output.logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logprobs = picked - torch.logsumexp(logits, dim=-1)
    with torch.no_grad():
        entropy = token_entropy(logits.detach())
    padding = token_logprobs.new_zeros((input_ids.shape[0], 1))
    proxy = None
    if proxy_min_p is not None:
        proxy = torch.cat([padding, lp_reg_proxy_logprobs(logits, targets, min_p=proxy_min_p)], dim=1)
    return TokenScores(
        logprobs=torch.cat([padding, token_logprobs], dim=1),
        entropy=torch.cat([padding, entropy], dim=1),
        proxy_logprobs=proxy,
    )
