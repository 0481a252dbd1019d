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

from learner.algorithms import token_entropy
from orchard.records import Group


@dataclass
class TrainingTensors:
    """One learner batch, right-padded to the longest prompt+completion."""

    input_ids: Tensor  # [N, L] long, prompt + completion, then pad_id
    attention_mask: Tensor  # [N, L] long, 1 on real tokens
    completion_mask: Tensor  # [N, L] float, 1 on completion tokens
    old_logprobs: Tensor  # [N, L] float, behaviour logprob of token t at position t (0 elsewhere)
    rewards: Tensor  # [N] float
    group_index: Tensor  # [N] long, which group (0..len(groups)-1) each sequence belongs to

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
        return TrainingTensors(
            input_ids=self.input_ids[indices, :length],
            attention_mask=self.attention_mask[indices, :length],
            completion_mask=self.completion_mask[indices, :length],
            old_logprobs=self.old_logprobs[indices, :length],
            rewards=self.rewards[indices],
            group_index=self.group_index[indices],
        )


def build_training_tensors(groups: Sequence[Group], pad_id: int) -> TrainingTensors:
    """Stack every completion of `groups` as `prompt_token_ids + completion.token_ids`.

    Rewards are copied as they are (a non-finite reward is the trainer's to refuse, not ours).
    """
    if pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id}")
    if not groups:
        raise ValueError("build_training_tensors needs at least one group, got none")
    rows: list[tuple[list[int], int, list[float], float, int]] = []
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
    width = max(len(ids) for ids, *_ in rows)
    count = len(rows)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    completion_mask = torch.zeros((count, width), dtype=torch.float32)
    old_logprobs = torch.zeros((count, width), dtype=torch.float32)
    for row, (ids, prompt_length, logprobs, _, _) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, prompt_length : len(ids)] = 1.0
        old_logprobs[row, prompt_length : len(ids)] = torch.tensor(logprobs, dtype=torch.float32)
    return TrainingTensors(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        rewards=torch.tensor([reward for *_, reward, _ in rows], dtype=torch.float32),
        group_index=torch.tensor([index for *_, index in rows], dtype=torch.long),
    )


def sequence_logprobs(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
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
    return torch.cat([padding, token_logprobs], dim=1), torch.cat([padding, entropy], dim=1)
