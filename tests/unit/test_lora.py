"""LoRA adapters on the tiny Qwen2 (peft, no DeepSpeed): what trains, what the merge gives, what is refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from orchard.config import LoraConfig, ModelConfig, TinyModelConfig
from orchard.learner.lora import add_adapters, lora_layers, merged_state_dict
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()
MODEL = ModelConfig(
    tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
)


def tiny() -> torch.nn.Module:
    return build_model(MODEL, TOKENIZER, seed=3)


def trained_adapters(config: LoraConfig) -> torch.nn.Module:
    """The tiny policy with adapters whose B is random, as after training (peft starts B at zero)."""
    torch.manual_seed(0)
    policy = add_adapters(tiny(), config)
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    return policy


def test_only_the_adapters_train_and_the_wrapped_policy_starts_as_the_base():
    base = tiny()
    tokens = torch.tensor([TOKENIZER.encode("12+34=")])
    expected = base(tokens).logits
    policy = add_adapters(base, LoraConfig(rank=4))
    trainable = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    layers = lora_layers(policy)
    # all-linear: q, k, v, o, gate, up, down in each of the 2 layers; the tied output head is left alone
    assert len(layers) == 14
    assert not any(name.endswith("lm_head") for name in layers)
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(layers)
    torch.testing.assert_close(policy(tokens).logits, expected, rtol=0, atol=0)


def test_the_merged_weights_are_the_base_plus_scaled_b_a_under_the_base_keys():
    config = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "down_proj"])
    base_state = {name: tensor.clone() for name, tensor in tiny().state_dict().items()}
    policy = trained_adapters(config)
    merged = merged_state_dict(policy)
    assert list(merged) == list(base_state)
    adapted = lora_layers(policy)
    assert len(adapted) == 4
    for name, tensor in base_state.items():
        layer = adapted.get(name.removesuffix(".weight"))
        if layer is None:
            assert torch.equal(merged[name], tensor), name
            continue
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = tensor + (config.alpha / config.rank) * (b @ a)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        assert not torch.equal(merged[name], tensor)


def test_an_engine_given_the_merged_weights_computes_what_the_adapted_policy_computes():
    policy = trained_adapters(LoraConfig(rank=8, alpha=16.0))
    engine = TorchEngine.from_state_dict(
        merged_state_dict(policy), policy.get_base_model().config, TOKENIZER, fused_kernel=False
    )
    tokens = torch.tensor([TOKENIZER.encode("7*8=56"), TOKENIZER.encode("9+1=10")])
    with torch.no_grad():
        expected = policy(tokens).logits.float()
        plain = tiny()(tokens).logits.float()
    got = engine.logits(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapters changed the policy


def test_the_adapters_dropout_is_the_only_module_in_training_mode():
    policy = add_adapters(tiny(), LoraConfig(rank=4, dropout=0.1))
    training = {name for name, module in policy.named_modules() if module.training}
    assert training and all(name.endswith("lora_dropout.default") for name in training)
    without = add_adapters(tiny(), LoraConfig(rank=4))
    assert not any(module.training for module in without.modules())


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["lm_head"], r"adapts lm_head, whose weight is tied to model.embed_tokens.weight"),
        (["embed_tokens"], r"adapts model.embed_tokens, whose weight is tied to lm_head.weight"),
        (["attention_projection"], r"learner.lora.target_modules \['attention_projection'\]: Target modules"),
    ],
    ids=["tied-output-head", "tied-embedding", "no-such-module"],
)
def test_targets_that_cannot_be_adapted_are_refused_naming_the_option(targets, message):
    with pytest.raises(ValueError, match=message):
        add_adapters(tiny(), LoraConfig(rank=4, target_modules=targets))


def test_the_lora_section_refuses_an_empty_target_list_and_a_negative_rank():
    with pytest.raises(ValidationError, match="name at least one module"):
        LoraConfig(rank=4, target_modules=[])
    with pytest.raises(ValidationError, match="rank"):
        LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="learner.lora.rank is 0"):
        add_adapters(tiny(), LoraConfig())
