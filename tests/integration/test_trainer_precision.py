"""Training precision follows the model's dtype: bfloat16 models train in DeepSpeed's bf16 mode (the
GPU recipes), float32 ones in float32 (the CPU default). Plus the learner on CUDA, where there is one."""

from __future__ import annotations

import time

import pytest
import torch

from tests.integration.test_trainer import make_trainer, random_groups, tiny_model
from tests.integration.trainer_setup import restore_environment  # noqa: F401


@pytest.mark.parametrize(("zero_stage", "lora"), [(0, 0), (3, 0), (0, 8), (3, 8)], ids=["0", "3", "0-lora", "3-lora"])
def test_a_bf16_model_trains_in_bf16_mode_and_exports_bf16(zero_stage, lora):
    """With LoRA too: the merged export is in the base model's dtype."""
    trainer = make_trainer(tiny_model().to(torch.bfloat16), zero_stage=zero_stage, lora={"rank": lora})
    assert trainer.engine.bfloat16_enabled()
    before = trainer.export_weights()
    result = trainer.train_step(random_groups())
    assert not result.skipped and result.grad_norm > 0
    after = trainer.export_weights()
    assert {tensor.dtype for tensor in after.values()} == {torch.bfloat16}
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_a_float32_model_trains_in_float32():
    trainer = make_trainer(tiny_model())
    assert not trainer.engine.bfloat16_enabled()
    assert {tensor.dtype for tensor in trainer.export_weights().values()} == {torch.float32}


@pytest.mark.gpu
def test_learner_step_on_cuda_in_bf16():
    """DeepSpeed ZeRO-3 on one GPU: the step runs on the device; its time is printed."""
    trainer = make_trainer(tiny_model().to(torch.bfloat16), zero_stage=3)
    assert trainer.device.type == "cuda"
    groups = random_groups(count=8, size=8)
    trainer.train_step(groups)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    started = time.perf_counter()
    steps = 5
    for seed in range(steps):
        assert not trainer.train_step(random_groups(seed=seed, count=8, size=8)).skipped
    torch.cuda.synchronize()
    print(f"learner step on {torch.cuda.get_device_name()}: {(time.perf_counter() - started) / steps * 1000:.1f} ms")
