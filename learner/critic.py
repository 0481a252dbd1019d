"""PPO's critic: a copy of the policy's decoder with a scalar value head (`learner.advantage: gae`).

The critic reads the same tokens as the policy. Its value at position t estimates the return of the
state before token t (the prompt and completion tokens `x_<t`), from the decoder's last hidden state
at position t − 1 — the same position whose logits give `log π(x_t | x_<t)` — so values line up with
`learner.batching`'s per-token tensors (position 0 holds 0). It starts from the initial policy's
decoder (verl and OpenRLHF initialise the critic from the actor's checkpoint) and a zero head, so
its first values are 0 and the first advantages are plain discounted returns.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ValueModel(nn.Module):
    """`decoder` (a Hugging Face base model, e.g. `Qwen2Model`) and a linear head to one value per token."""

    def __init__(self, decoder: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.decoder = decoder
        dtype = next(decoder.parameters()).dtype
        self.value_head = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """A critic with a copy of `policy`'s decoder (its `base_model`, the causal LM without its LM head).

        A ValueError names what is missing when `policy` is not a Hugging Face causal LM."""
        decoder = getattr(policy, "base_model", None)
        hidden_size = getattr(getattr(policy, "config", None), "hidden_size", None)
        if not isinstance(decoder, nn.Module) or decoder is policy or not isinstance(hidden_size, int):
            raise ValueError(
                f"learner.advantage 'gae' builds its critic from the policy's decoder and hidden size, and"
                f" {type(policy).__name__} has no Hugging Face `base_model` and `config.hidden_size`: use a"
                " Hugging Face causal LM (model.kind 'tiny' or 'hf'), or another advantage"
            )
        return cls(copy.deepcopy(decoder), hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[N, L] float32 values, `values[:, t]` of the state before token t; position 0 is 0."""
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        values = self.value_head(hidden[:, :-1]).squeeze(-1).float()
        return torch.cat([values.new_zeros((values.shape[0], 1)), values], dim=1)
