"""Sampling parameters, next-token sampling and stop strings, shared by the engines.

`sample_next` draws from the tempered, top-p truncated distribution and returns the untruncated logprob
(the one the learner recomputes); `gumbel_noise` draws its noise ahead, for many steps at once;
`find_stop` finds stop strings without decoding the whole completion at every step; `top_next_tokens`
lists the most probable next tokens (DeepSearch's 'prior' expansion).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from orchard.protocols import SamplingParams
from orchard.rollout.tokenizer import Tokenizer


def validate_params(params: SamplingParams) -> None:
    """Raise `ValueError` naming the first field of `params` an engine cannot honour."""
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if (
        isinstance(params.max_new_tokens, bool)
        or not isinstance(params.max_new_tokens, int)
        or params.max_new_tokens < 1
    ):
        raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {params.max_new_tokens!r}")
    if isinstance(params.stop, str) or not all(isinstance(stop, str) and stop for stop in params.stop):
        raise ValueError(f"SamplingParams.stop must be a tuple of non-empty strings, got {params.stop!r}")
    if params.seed is not None and not isinstance(params.seed, int):
        raise ValueError(f"SamplingParams.seed must be an int or None, got {params.seed!r}")


def gumbel_noise(
    shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard Gumbel noise `-log(-log U)`, U ~ U[0, 1), float32: what `sample_next` adds to the logits.

    Values lie in [-inf, 17): U = 0 gives -inf (that token is not drawn), never +inf or NaN. An engine
    draws it for several steps in one call (`[steps, batch, vocab]`) and passes one step's slice.
    """
    return torch.rand(tuple(shape), generator=generator, device=device).log_().neg_().log_().neg_()


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens `[batch]` and their logprobs `[batch]` from float32 `logits` `[batch, vocab]`.

    logprob = log_softmax(logits / T)[token] with T = 1 when greedy (`temperature == 0`, argmax). This is
    the untruncated distribution, the one the learner recomputes from the same logits; top-p only
    restricts which tokens may be drawn (Holtzman et al. 2020: keep the smallest prefix of tokens sorted
    by probability whose mass reaches `top_p`). Drawing is the Gumbel-max trick, `argmax_i (log p_i + G_i)`
    with G_i iid standard Gumbel, which picks i with probability p_i / sum(p): no softmax is
    exponentiated and nothing is sorted unless `top_p < 1`. `noise` (`[batch, vocab]`, from
    `gumbel_noise`) is drawn here from `generator` when not given; greedy ignores it.
    """
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits if temperature == 1 else logits / temperature
    logprobs = F.log_softmax(scaled, -1)
    if noise is None:
        noise = gumbel_noise(logits.shape, generator, logits.device)
    if top_p < 1:
        sorted_logprobs, order = logprobs.sort(-1, descending=True)
        probs = sorted_logprobs.exp()
        # The noise is iid, so adding it in sorted order draws from the same distribution.
        kept = sorted_logprobs.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        tokens = order.gather(-1, (kept + noise).argmax(-1, keepdim=True)).squeeze(-1)
    else:
        # log_softmax only shifts each row, so the scaled logits give the same argmax.
        tokens = (scaled + noise).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def top_next_tokens(logits: torch.Tensor, temperature: float, top_p: float, k: int) -> list[list[tuple[int, float]]]:
    """Per row of float32 `logits` `[batch, vocab]`, the `k` most probable next tokens that `sample_next`
    may draw, as `(token id, logprob)` most probable first, with the logprobs `sample_next` reports:
    log_softmax(logits / T), T = 1 when greedy. Top-p keeps the same nucleus as `sample_next` (the
    smallest prefix by probability whose mass reaches `top_p`); tokens of probability 0 are left out.
    """
    if k < 1:
        raise ValueError(f"top_next_tokens needs k >= 1, got {k}")
    scaled = logits if temperature in (0, 1) else logits / temperature
    logprobs = F.log_softmax(scaled, -1)
    top_logprobs, top_tokens = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    if top_p < 1:
        probs = top_logprobs.exp()
        # a token is in the nucleus while the mass of the more probable tokens is below top_p
        top_logprobs = top_logprobs.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    return [
        [(token, logprob) for token, logprob in zip(tokens, values, strict=True) if logprob > float("-inf")]
        for tokens, values in zip(top_tokens.tolist(), top_logprobs.tolist(), strict=True)
    ]


def find_stop(tokenizer: Tokenizer, token_ids: Sequence[int], stops: Sequence[str]) -> str | None:
    """The completion's text before its first stop string, or None when it holds none yet.

    Called after every new token, so a new occurrence ends in the last token's text and starts at most
    `len(stop) - 1` characters before it. Decoding a tail that long first avoids decoding the whole
    completion at every step; the tail grows past tokens that decode to nothing (special tokens).
    """
    longest = max(map(len, stops))
    last_length = len(tokenizer.decode(token_ids[-1:]))
    window = longest + 1
    while True:
        tail = tokenizer.decode(token_ids[-window:])
        # One character of slack: a tail that starts inside a multi-byte character decodes it as U+FFFD.
        if len(tail) >= last_length + longest or window >= len(token_ids):
            break
        window *= 2
    if not any(stop in tail for stop in stops):
        return None
    text = tokenizer.decode(token_ids)
    cuts = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return text[: min(cuts)] if cuts else None
