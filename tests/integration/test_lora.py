"""The learner with LoRA adapters (peft) under a real DeepSpeed engine (CPU accelerator, one rank): only
the adapters train and sit in the optimizer, every export is the merged policy under the base model's
keys, the KL reference is the base, and checkpoints hold the adapter and a merged Hugging Face model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from orchard.learner.lora import lora_layers, merged_state_dict
from orchard.learner.trainer import GRPOTrainer
from tests.integration.test_trainer import make_trainer, random_groups, tiny_model
from tests.integration.trainer_setup import restore_environment  # noqa: F401

LORA = {"rank": 4, "alpha": 8.0}


def lora_trainer(**learner: object) -> GRPOTrainer:
    return make_trainer(tiny_model(seed=1), lora=LORA, **learner)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_only_the_adapters_train_and_the_export_is_the_merged_policy(stage):
    base = {name: tensor.clone() for name, tensor in tiny_model(seed=1).state_dict().items()}
    trainer = lora_trainer(zero_stage=stage)
    adapters = {
        id(p) for layer in lora_layers(trainer.engine.module).values() for p in layer.parameters() if p.requires_grad
    }
    if stage == 0:  # ZeRO's optimizers hold flat partitions; stage 0's holds the parameters themselves
        in_optimizer = {id(p) for group in trainer.engine.optimizer.param_groups for p in group["params"]}
        assert in_optimizer == adapters
    assert trainer.export_weights().keys() == base.keys()
    for step in range(2):
        assert not trainer.train_step(random_groups(seed=step)).skipped
    exported = trainer.export_weights()
    assert list(exported) == list(base)
    with trainer._gathered():
        layers = lora_layers(trainer.engine.module)
        frozen = {
            key.replace(".base_layer.", "."): tensor.detach().clone()
            for key, tensor in trainer.engine.module.get_base_model().state_dict().items()
            if ".lora_" not in key
        }
        deltas = {
            f"{name}.weight": (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().clone()
            * (LORA["alpha"] / LORA["rank"])
            for name, layer in layers.items()
        }
    for name, tensor in base.items():
        assert torch.equal(frozen[name], tensor), f"{name}: a frozen base weight changed"
        if name in deltas:
            assert deltas[name].abs().max() > 0, f"{name}: its adapter did not train"
            torch.testing.assert_close(exported[name], tensor + deltas[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(exported[name], tensor), name


def test_the_kl_reference_is_the_base_policy():
    trainer = lora_trainer(kl_coef=0.1)
    assert trainer.reference is None  # no copy of the model is kept
    first = trainer.train_step(random_groups(seed=0))
    assert first.kl == pytest.approx(0.0, abs=1e-7)  # B starts at zero: policy = base
    second = trainer.train_step(random_groups(seed=1))
    assert second.kl > 1e-7


def test_a_checkpoint_holds_the_adapter_and_a_merged_model_and_resumes(tmp_path):
    trainer = lora_trainer()
    trainer.train_step(random_groups(seed=0))
    trainer.save_checkpoint(tmp_path)
    written = trainer.save_model(tmp_path)
    saved = trainer.export_weights()
    assert all(torch.equal(written[name], saved[name]) for name in saved)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(merged[name], saved[name]) for name in saved)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny_model(seed=1), tmp_path / "adapter")
    again = merged_state_dict(reloaded)
    assert all(torch.allclose(again[name], saved[name], rtol=0, atol=1e-6) for name in saved)

    trainer.train_step(random_groups(seed=1))
    assert any(not torch.equal(trainer.export_weights()[name], saved[name]) for name in saved)
    trainer.load_checkpoint(tmp_path)
    restored = trainer.export_weights()
    assert all(torch.equal(restored[name], saved[name]) for name in saved)
    assert trainer.step == 1 and trainer.policy_version == 1


def test_an_unknown_target_module_stops_the_learner_naming_the_option():
    with pytest.raises(ValueError, match=r"learner.lora.target_modules \['qkv'\]"):
        make_trainer(tiny_model(), lora={"rank": 4, "target_modules": ["qkv"]})
