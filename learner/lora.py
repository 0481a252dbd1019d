"""LoRA adapters through `peft`: which weights train, and the merged weights everyone else sees.

`add_adapters` wraps the policy so that each targeted linear layer computes `W x + (α/r)·B A x`
(Hu et al., 2021, arXiv:2106.09685; B starts at zero, so the wrapped policy starts equal to the
base) and only A and B require gradients: the optimizer holds their state alone. The rollout
engines never see adapters: `merged_state_dict` gives the policy as the base model's own state
dict with `W + (α/r)·B A` in place of each adapted `W`, under the base model's key names, which
every engine (torch, vLLM) and `from_pretrained` load unchanged. The adapter alone is what
`PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads back onto the base.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor

from orchard.config import LoraConfig

#: peft's name for the one adapter Orchard trains.
ADAPTER = "default"


def add_adapters(model: torch.nn.Module, config: LoraConfig) -> PeftModel:
    """`model` wrapped with LoRA adapters of `config` (in place: its layers are replaced); only the
    adapters require gradients. A and B are initialised from torch's global RNG, so processes that
    seed it alike (data-parallel learner ranks) start with the same adapters.

    The policy stays in eval mode; the adapters' dropout is switched on only when `config.dropout` > 0.
    Raises ValueError naming the option when no module matches `target_modules` or when an adapted
    weight is tied to another (tied embeddings: the merge could not keep them equal).
    """
    if not config.enabled:
        raise ValueError("learner.lora.rank is 0: LoRA is off, there is nothing to add")
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            # peft warns when a tied layer is adapted; `_refuse_tied_weights` refuses it, saying what to do
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
            wrapped = get_peft_model(model, peft_config)
    except ValueError as error:
        raise ValueError(f"learner.lora.target_modules {config.target_modules!r}: {error}") from error
    _refuse_tied_weights(wrapped, config)
    wrapped.eval()
    for layer in lora_layers(wrapped).values():
        layer.lora_dropout[ADAPTER].train(config.dropout > 0)
    return wrapped


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The adapted layers of `model`, by their name in the base model."""
    return {name: module for name, module in model.get_base_model().named_modules() if isinstance(module, LoraLayer)}


def merged_state_dict(model: PeftModel) -> dict[str, Tensor]:
    """The base model's state dict with each adapted weight replaced by `W + (α/r)·B A`.

    Keys are exactly those of the unwrapped model's `state_dict()`. Weights without an adapter are the
    module's own tensors (no copy); merged ones are new tensors in the base weight's dtype, summed in
    float32. Under ZeRO-3 call it inside `GatheredParameters` and copy before leaving it.
    """
    base = model.get_base_model()
    merged: dict[str, Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:  # peft's adapter parameters: lora_A, lora_B (and their embedding forms)
            continue
        merged[key.replace(".base_layer.", ".")] = tensor
    for name, layer in lora_layers(model).items():
        weight = merged[f"{name}.weight"]
        delta = layer.get_delta_weight(ADAPTER)
        merged[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype)
    return merged


def _refuse_tied_weights(model: PeftModel, config: LoraConfig) -> None:
    names: dict[int, list[str]] = defaultdict(list)
    for name, parameter in model.get_base_model().named_parameters(remove_duplicate=False):
        names[id(parameter)].append(name)
    for layer_name, layer in lora_layers(model).items():
        tied = names[id(layer.get_base_layer().weight)]
        if len(tied) > 1:
            raise ValueError(
                f"learner.lora.target_modules {config.target_modules!r} adapts {layer_name}, whose weight is tied"
                f" to {', '.join(n for n in tied if not n.startswith(layer_name + '.'))} (tied embeddings): a merged"
                " adapter would untie them; target other modules (e.g. 'all-linear' leaves the output head alone)"
            )
