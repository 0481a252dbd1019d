"""GAIN-RL's ranking pass: the starting policy prefills every candidate prompt once and each prompt's angle
concentration is read from its last layer's MLP input (`services.curriculum.gain`, docs/algorithms.md §7).

The policy is a Hugging Face model built in the driver from the run's model config and the initial
weights, whichever engine the run samples with (vLLM exposes no hidden states), on the GPU when the
driver sees one (before the run's workers and learner take it) and the CPU otherwise, and dropped
afterwards (the driver keeps its CUDA context: on an H200, 34.6 MB stayed allocated after the pass, the
size of cuBLAS's workspace there).
Prompts are tokenised by the run's `PromptRenderer`, exactly as the rollout engine sees them, and run
in batches of similar length whose states are reduced to one number per prompt at once.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchard.config import ModelConfig
from orchard.records import Prompt
from orchard.rollout.hidden_states import up_projection_inputs
from orchard.rollout.model import build_model
from orchard.rollout.prompts import PromptFormat, PromptRenderer
from orchard.rollout.tokenizer import load_tokenizer
from orchard.services.curriculum.gain import angle_concentration


@dataclass(frozen=True)
class Ranking:
    """The concentrations of the candidates (in their order) and what measuring them took."""

    concentrations: list[float]
    seconds: float
    device: str
    tokens: int
    #: Prompts with context before the question (C_inter counted), and those whose question text was not
    #: found verbatim in the rendered prompt (their whole prompt after a leading BOS taken as question).
    with_context: int
    question_not_found: int

    def describe(self) -> str:
        """The events.log line."""
        values = sorted(self.concentrations, reverse=True)
        return (
            f"GAIN-RL ranking: {len(values)} prompts ({self.tokens} tokens) by the starting policy's angle"
            f" concentration in {self.seconds:.1f} s on {self.device}; C from {values[0]:.4f} to {values[-1]:.4f};"
            f" {self.with_context} with context before the question, {self.question_not_found} whose question"
            " text was not found in the rendered prompt"
        )


def segments(length: int, span: tuple[int, int] | None, *, starts_with_bos: bool) -> tuple[int, int, int]:
    """`(context_start, question_start, question_end)` of a prompt of `length` tokens whose question is
    `span` (`PromptRenderer.encode_with_question`): a leading BOS token is neither context nor question (the
    attention sink every prompt shares); without a span the whole prompt after it is the question."""
    context_start = 1 if starts_with_bos and length > 1 else 0
    start, end = span if span is not None else (context_start, length)
    start = max(start, context_start)
    if start >= end:
        return 0, 0, length
    return context_start, start, end


def measure_concentrations(
    model_config: ModelConfig,
    weights: Mapping[str, Any],
    prompt_format: PromptFormat,
    prompts: Sequence[Prompt],
    *,
    inter_weight: float = 1.0,
    batch_size: int = 64,
    device: str | None = None,
) -> Ranking:
    """The angle concentration of each of `prompts` under the policy with `weights` (a state dict of
    `build_model(model_config)`); `device` None: CUDA when available, else the CPU."""
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_config)
    renderer = PromptRenderer(tokenizer, prompt_format)
    model = build_model(model_config, tokenizer)
    model.load_state_dict(dict(weights), strict=False)
    model.to(device)
    encoded = [renderer.encode_with_question(prompt) for prompt in prompts]
    concentrations = [0.0] * len(prompts)
    with_context = not_found = 0
    # a batch's states are reduced to numbers at once: all prompts' states together would not fit
    by_length = sorted(range(len(prompts)), key=lambda index: len(encoded[index][0]))
    try:
        for first in range(0, len(by_length), batch_size):
            batch = by_length[first : first + batch_size]
            states = up_projection_inputs(
                model, [encoded[index][0] for index in batch], pad_id=tokenizer.pad_id, batch_size=batch_size
            )
            for index, hidden in zip(batch, states, strict=True):
                ids, span = encoded[index]
                not_found += span is None
                context_start, start, end = segments(len(ids), span, starts_with_bos=ids[0] == tokenizer.bos_id)
                with_context += start > context_start
                concentrations[index] = angle_concentration(
                    hidden, start, end, context_start=context_start, inter_weight=inter_weight
                )
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return Ranking(
        concentrations,
        seconds=time.perf_counter() - started,
        device=device,
        tokens=sum(len(ids) for ids, _ in encoded),
        with_context=with_context,
        question_not_found=not_found,
    )
