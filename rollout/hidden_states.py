"""What the policy's last decoder layer feeds its MLP: the input of `model.layers[-1].mlp.up_proj`, per
prompt token, read by a forward hook during a prefill (no generation, no gradients).

In a Qwen2/Llama-style layer that input is the post-attention RMSNorm of the residual stream, the hidden
states whose angles GAIN-RL measures (Wang et al., 2025, "Angles Don't Lie", arXiv:2506.02281; reference
code wangqinsi1/GAINRL, `data_processor.py`, which hooks the same module).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Where the module is looked for, from the causal LM (`Qwen2ForCausalLM.model.layers[-1].mlp.up_proj`).
UP_PROJECTION_PATH = "model.layers[-1].mlp.up_proj"


def last_up_projection(model: nn.Module) -> nn.Module:
    """The last decoder layer's MLP up-projection of a Hugging Face causal LM; a ValueError naming the
    path looked for when the model is not laid out that way."""
    try:
        module = model.model.layers[-1].mlp.up_proj  # type: ignore[union-attr,index]
    except (AttributeError, IndexError, TypeError):
        module = None
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no {UP_PROJECTION_PATH}: the angle concentration reads the input of the"
            " last decoder layer's MLP up-projection, which Qwen2, Llama, Mistral and Gemma causal LMs have"
        )
    return module


@torch.inference_mode()
def up_projection_inputs(
    model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """For each prompt (token ids), the `[tokens, hidden]` float32 CPU tensor that enters
    `model.layers[-1].mlp.up_proj` when `model` prefills it.

    Prompts are run through the decoder (`model.model`; the LM head is skipped) `batch_size` at a time,
    sorted by length so a batch pads little, right-padded with `pad_id` under an attention mask: a real
    token attends only to the real tokens before it, and positions count from each prompt's first token,
    so a prompt's states do not depend on its batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    up_projection = last_up_projection(model)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = up_projection.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    results: list[torch.Tensor | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    try:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            lengths = [len(prompts[index]) for index in batch]
            width = max(lengths)
            token_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (index, length) in enumerate(zip(batch, lengths, strict=True)):
                token_ids[row, :length] = torch.as_tensor(list(prompts[index]), dtype=torch.long)
                attention_mask[row, :length] = 1
            captured.clear()
            model.model(input_ids=token_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            if len(captured) != 1:
                raise RuntimeError(f"{UP_PROJECTION_PATH} ran {len(captured)} times in one forward pass, not once")
            states = captured[0].float().cpu()
            for row, (index, length) in enumerate(zip(batch, lengths, strict=True)):
                results[index] = states[row, :length].clone()
    finally:
        hook.remove()
    return [state for state in results if state is not None]
