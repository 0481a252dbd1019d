"""Keys and values a torch engine keeps between calls, so that a sequence continued in the next call
(a multi-turn trajectory: the turn so far plus a tool's observation) is not computed again.

A `generate` call with `SamplingParams.resumable` keeps, for every row that ended on a stop string,
the keys and values of its prompt and completion (all but the last token, whose keys the engine never
computed). The next call looks each prompt up: one that extends a kept sequence needs only its new
tokens run through the model. What is kept lives for one call, and is dropped when the weights change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KeptPrefixes:
    """Kept sequences (token ids) and their keys and values, `[layers, 2, kv_heads, tokens, head_dim]`."""

    def __init__(self) -> None:
        self._by_length: dict[int, dict[tuple[int, ...], torch.Tensor]] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._by_length.values())

    def keep(self, tokens: Sequence[int], keys_values: torch.Tensor) -> None:
        if keys_values.shape[3] != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but keys and values of {keys_values.shape[3]}")
        self._by_length.setdefault(len(tokens), {})[tuple(tokens)] = keys_values

    def longest_prefix(self, prompt: Sequence[int]) -> torch.Tensor | None:
        """The keys and values of the longest kept sequence that `prompt` strictly extends, or None."""
        for length in sorted(self._by_length, reverse=True):
            if length < len(prompt):
                found = self._by_length[length].get(tuple(prompt[:length]))
                if found is not None:
                    return found
        return None

    def clear(self) -> None:
        self._by_length.clear()


def window_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """`[batch, 1, length - start, length]`: what each query of the window `start:` of left-padded rows
    (`valid` marks real tokens) may attend to: earlier and own real slots; a padding query only itself,
    so its softmax is never over an empty set."""
    length = valid.shape[1]
    queries = torch.arange(start, length, device=valid.device)
    slots = torch.arange(length, device=valid.device)
    causal = slots[None, :] <= queries[:, None]
    own = slots[None, :] == queries[:, None]
    return ((causal[None] & valid[:, None, :]) | own[None])[:, None]
