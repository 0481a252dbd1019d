"""The learner with a real DeepSpeed engine (CPU accelerator, one rank) on a tiny Qwen2, plus SFT warm start.

DeepSpeed runs in this process: `torch.distributed` is initialised by the first trainer and reused by
the others. The environment variables the trainer sets for that are restored after the module, so
processes started later (Ray, CLI runs) pick their own port.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

import orchard.learner.trainer as trainer_module
from orchard.config import LearnerConfig, RunConfig
from orchard.learner.algorithms import policy_loss
from orchard.learner.batching import build_training_tensors, sequence_logprobs
from orchard.learner.sft import cache_key_digest, cached_warm_start, sft_train
from orchard.learner.trainer import GRPOTrainer, StepResult
from orchard.learner.weights import numpy_to_state_dict, state_dict_to_numpy
from orchard.records import Completion, Group, Prompt
from orchard.rollout.model import build_model
from tests.integration.trainer_setup import MODEL_CONFIG, TOKENIZER, restore_environment  # noqa: F401

TEMPERATURE = 0.8
MAX_LENGTH = 8


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_model(MODEL_CONFIG, TOKENIZER, seed=seed)


def make_trainer(model: torch.nn.Module | None = None, **learner: object) -> GRPOTrainer:
    config = LearnerConfig(**{"lr": 1e-2, **learner})
    return GRPOTrainer(
        model if model is not None else tiny_model(),
        config,
        pad_id=TOKENIZER.pad_id,
        seed=0,
        temperature=TEMPERATURE,
        max_length=MAX_LENGTH,
    )


def make_group(name: str, prompt: str, answers: list[str], rewards: list[float], logprob: float = -4.0) -> Group:
    completions = [
        Completion(
            text=answer,
            token_ids=TOKENIZER.encode(answer),
            logprobs=[logprob] * len(answer),
            policy_version=0,
            reward=reward,
        )
        for answer, reward in zip(answers, rewards, strict=True)
    ]
    return Group(
        prompt=Prompt(id=f"prompt-{name}", text=prompt, answer="", distribution="test"),
        prompt_token_ids=TOKENIZER.encode(prompt),
        completions=completions,
        id=name,
    )


def random_groups(seed: int = 0, count: int = 3, size: int = 4) -> list[Group]:
    """Groups of varied prompt and completion lengths with distinct rewards."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return "".join(rng.choice("0123456789+=") for _ in range(rng.randint(low, high)))

    return [
        make_group(
            f"g{index}", text(2, 6), [text(1, MAX_LENGTH) for _ in range(size)], [rng.random() for _ in range(size)]
        )
        for index in range(count)
    ]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


# ------------------------------------------------------------------------------------------ ZeRO stages


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_each_zero_stage_trains_and_exports_full_weights(stage):
    model = tiny_model()
    expected = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainer = make_trainer(model, zero_stage=stage, micro_batch_size=4)
    assert max_difference(trainer.export_weights(), expected) == 0.0

    result = trainer.train_step(random_groups())

    assert not result.skipped and result.skip_reason is None
    assert result.num_sequences == 12 and result.num_tokens > 0
    assert result.grad_norm > 0 and math.isfinite(result.loss) and result.entropy > 0
    json.dumps(dict(vars(result)), allow_nan=False)
    exported = trainer.export_weights()
    assert {name: tuple(t.shape) for name, t in exported.items()} == {
        name: tuple(t.shape) for name, t in expected.items()
    }
    assert all(t.device.type == "cpu" for t in exported.values())
    assert max_difference(exported, expected) > 0
    assert trainer.step == 1 and trainer.policy_version == 1
    # the export is a copy: a later step does not change it
    snapshot = {name: tensor.clone() for name, tensor in exported.items()}
    trainer.train_step(random_groups(seed=1))
    assert max_difference(exported, snapshot) == 0.0


def test_positive_advantage_raises_the_logprob_of_its_completion():
    model = tiny_model()
    trainer = make_trainer(model, lr=3e-3)
    group = make_group("arith", "2+2=", ["4", "5"], [1.0, 0.0])
    tensors = build_training_tensors([group], TOKENIZER.pad_id)

    def completion_logprobs() -> torch.Tensor:
        with torch.no_grad():
            logprobs, _ = sequence_logprobs(model, tensors.input_ids, tensors.attention_mask, TEMPERATURE)
        return (logprobs * tensors.completion_mask).sum(-1)

    before = completion_logprobs()
    # on-policy behaviour logprobs, as a sampler at the same temperature would have recorded them
    for completion, logprob in zip(group.completions, before.tolist(), strict=True):
        completion.logprobs = [logprob]
    for _ in range(4):
        assert not trainer.train_step([group]).skipped
    after = completion_logprobs()
    assert after[0] > before[0] + 0.05, (before, after)
    assert after[1] < before[1] - 0.05, (before, after)


def test_a_batch_without_signal_is_skipped_without_touching_the_weights():
    trainer = make_trainer()
    before = trainer.export_weights()
    groups = [make_group("same", "1+1=", ["2", "3"], [1.0, 1.0]), make_group("zero", "1+2=", ["3", "4"], [0.0, 0.0])]
    result = trainer.train_step(groups)
    assert result.skipped and result.skip_reason == "no signal" and not result.non_finite
    assert result.advantages_abs_mean == 0.0 and result.num_sequences == 4
    assert max_difference(trainer.export_weights(), before) == 0.0
    assert trainer.step == 1 and trainer.policy_version == 0


# ------------------------------------------------------------------------------------------ micro-batching


def full_batch_reference(groups: list[Group], config: LearnerConfig) -> tuple[float, float]:
    """Loss and gradient norm of the whole batch in one plain forward/backward (no DeepSpeed)."""
    from orchard.learner.algorithms import group_advantages

    model = tiny_model()
    tensors = build_training_tensors(groups, TOKENIZER.pad_id)
    advantages = group_advantages(tensors.rewards, tensors.group_index, std=config.advantage_std)
    logprobs, _ = sequence_logprobs(model, tensors.input_ids, tensors.attention_mask, TEMPERATURE)
    loss, _ = policy_loss(
        logprobs,
        tensors.old_logprobs,
        advantages,
        tensors.completion_mask,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        aggregation=config.aggregation,
        max_length=MAX_LENGTH,
    )
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return float(loss.detach()), float(norm)


@pytest.mark.parametrize(
    ("stage", "aggregation"),
    [
        (0, "token-mean"),
        (0, "seq-mean-token-mean"),
        (0, "seq-mean-token-sum"),
        (0, "seq-mean-token-sum-norm"),
        (2, "token-mean"),
        (3, "token-mean"),
    ],
)
def test_micro_batching_does_not_change_the_step(stage, aggregation):
    """Micro-batches of 2 sequences, of the whole batch, or by a token budget: the same step."""
    groups = random_groups(seed=3, count=3, size=5)
    settings = {
        "small": {"micro_batch_size": 2},
        "whole": {"micro_batch_size": 64},
        "tokens": {"micro_batch_size": 64, "max_tokens_per_micro_batch": 40},
    }
    results: dict[str, StepResult] = {}
    weights = {}
    for name, batching in settings.items():
        trainer = make_trainer(zero_stage=stage, aggregation=aggregation, **batching)
        results[name] = trainer.train_step(groups)
        weights[name] = trainer.export_weights()
    loss, grad_norm = full_batch_reference(groups, trainer.config)
    for result in results.values():
        assert result.loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert result.grad_norm == pytest.approx(grad_norm, rel=1e-4)
        assert result.entropy == pytest.approx(results["whole"].entropy, rel=1e-5)
        assert result.clip_fraction == pytest.approx(results["whole"].clip_fraction, abs=1e-6)
    for name in ("small", "tokens"):
        assert max_difference(weights[name], weights["whole"]) < 1e-4, name
    # length-sorted micro-batches pad less than one batch padded to its longest sequence
    assert 0 <= results["tokens"].padding_share < results["whole"].padding_share


# ------------------------------------------------------------------------------------------ refusals and skips


def test_a_non_finite_reward_is_refused_naming_the_group():
    trainer = make_trainer()
    groups = random_groups()
    groups[1].completions[2].reward = math.nan
    with pytest.raises(ValueError, match="group g1 .*non-finite reward nan on completion 2"):
        trainer.train_step(groups)
    assert trainer.step == 0


@pytest.mark.parametrize("stage", [0, 3])
def test_a_non_finite_loss_skips_the_step(stage):
    trainer = make_trainer(zero_stage=stage, micro_batch_size=2)
    before = trainer.export_weights()
    groups = random_groups()
    groups[2].completions[0].logprobs[0] = math.nan  # a broken behaviour logprob
    result = trainer.train_step(groups)
    assert result.skipped and result.non_finite and "non-finite loss" in result.skip_reason
    json.dumps(dict(vars(result)), allow_nan=False)
    assert max_difference(trainer.export_weights(), before) == 0.0
    # nothing accumulated leaks into the next step: it equals a fresh trainer's first step
    fresh = make_trainer(zero_stage=stage, micro_batch_size=2)
    expected = fresh.train_step(random_groups())
    actual = trainer.train_step(random_groups())
    assert actual.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    assert max_difference(trainer.export_weights(), fresh.export_weights()) < 1e-6
    assert trainer.policy_version == 1 and trainer.step == 2


@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_gradient_skips_the_step(stage, monkeypatch):
    trainer = make_trainer(zero_stage=stage, micro_batch_size=4)
    before = trainer.export_weights()
    finite_scores = trainer_module.sequence_scores

    def nan_gradient(model, input_ids, attention_mask, temperature=1.0, **options):
        scores = finite_scores(model, input_ids, attention_mask, temperature, **options)
        logprobs = scores.logprobs
        # same values forward; backward goes through sqrt at 0, whose derivative is inf, times 0: NaN
        scores.logprobs = torch.where(torch.ones_like(logprobs, dtype=torch.bool), logprobs, (logprobs * 0).sqrt())
        return scores

    monkeypatch.setattr(trainer_module, "sequence_scores", nan_gradient)
    result = trainer.train_step(random_groups())
    assert result.skipped and result.non_finite and result.skip_reason.startswith("non-finite gradient norm")
    assert math.isfinite(result.loss) and result.loss != 0.0
    assert result.grad_norm == 0.0  # not finite, so reported as 0 (the value is in skip_reason)
    assert max_difference(trainer.export_weights(), before) == 0.0
    monkeypatch.undo()
    assert not trainer.train_step(random_groups()).skipped


# ------------------------------------------------------------------------------------------ KL, checkpoints


def test_kl_to_the_reference_starts_at_zero_and_grows():
    trainer = make_trainer(kl_coef=0.1, kl_kind="k3")
    assert trainer.reference is not None
    first = trainer.train_step(random_groups())
    assert first.kl == pytest.approx(0.0, abs=1e-7)
    second = trainer.train_step(random_groups())
    assert second.kl > 1e-6
    assert make_trainer().reference is None


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_checkpoint_round_trip_restores_weights_optimizer_and_counters(stage, tmp_path):
    trainer = make_trainer(zero_stage=stage, micro_batch_size=4)
    trainer.train_step(random_groups(seed=1))
    trainer.save_checkpoint(tmp_path / "checkpoint")
    saved = trainer.export_weights()
    second = trainer.train_step(random_groups(seed=2))
    after_second = trainer.export_weights()
    assert max_difference(after_second, saved) > 0

    trainer.load_checkpoint(tmp_path / "checkpoint")
    assert trainer.step == 1 and trainer.policy_version == 1
    assert max_difference(trainer.export_weights(), saved) == 0.0
    # Adam's moments came back too: repeating the second step lands on the same weights
    repeated = trainer.train_step(random_groups(seed=2))
    assert repeated.loss == pytest.approx(second.loss, rel=1e-6)
    assert max_difference(trainer.export_weights(), after_second) < 1e-6

    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        trainer.load_checkpoint(tmp_path / "empty")


def test_the_learner_actor_core_trains_and_exports_numpy():
    from orchard.services.learner_actor import LearnerCore

    threads = torch.get_num_threads()
    try:
        config = RunConfig(
            model=MODEL_CONFIG,
            learner=LearnerConfig(micro_batch_size=4),
            seed=0,
            weight_sync={"transport": "object_store"},
        )
        initial = state_dict_to_numpy(tiny_model(seed=5).state_dict())
        core = LearnerCore(config, initial, initial_version=3)
        exported = core.export_weights()
        assert exported.keys() == initial.keys()
        assert all(np.array_equal(exported[name], initial[name]) for name in initial)
        step, weights = core.train_step(random_groups())  # the step's new weights come with it
        json.dumps(dataclasses.asdict(step), allow_nan=False)
        assert step.policy_version == 4 and not step.result.skipped
        assert weights.keys() == initial.keys()
        assert any(not np.array_equal(weights[name], initial[name]) for name in initial)
    finally:
        torch.set_num_threads(threads)


def test_weights_round_trip_through_numpy():
    state = tiny_model().state_dict()
    arrays = state_dict_to_numpy(state)
    assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays.values())
    restored = numpy_to_state_dict(arrays)
    assert max_difference(restored, dict(state)) == 0.0
    bf16 = state_dict_to_numpy({"w": torch.tensor([1.5, -2.25], dtype=torch.bfloat16)})
    assert bf16["w"].dtype == np.float32 and bf16["w"].tolist() == [1.5, -2.25]
    read_only = arrays["model.norm.weight"].copy()
    read_only.flags.writeable = False
    assert numpy_to_state_dict({"w": read_only})["w"].shape == read_only.shape
    with pytest.raises(TypeError, match="weight 'w' is a list"):
        numpy_to_state_dict({"w": [1.0]})


# ------------------------------------------------------------------------------------------ SFT warm start


def copy_examples(count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        text = "".join(rng.choice("0123456789") for _ in range(3))
        examples.append((TOKENIZER.encode(f"copy {text}:"), TOKENIZER.encode(text) + [TOKENIZER.eos_id]))
    return examples


def test_sft_loss_is_the_cross_entropy_of_the_target_tokens_only():
    model = tiny_model()
    prompt, target = TOKENIZER.encode("ab="), TOKENIZER.encode("cd")
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    # target token k sits at position len(prompt)+k and is predicted at the position before it
    expected = -sum(float(logprobs[len(prompt) + k - 1, token]) for k, token in enumerate(target)) / len(target)
    losses = sft_train(model, [(prompt, target)], steps=1, batch_size=1, lr=1e-3, seed=0, log_every=1)
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert not model.training  # left in the mode it came in


def test_sft_lowers_the_loss_on_a_copy_task():
    messages: list[str] = []
    losses = sft_train(
        tiny_model(), copy_examples(256), steps=60, batch_size=16, lr=1e-2, seed=0, log_every=20, log=messages.append
    )
    assert len(losses) == 60 and all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses
    assert messages == [f"sft step {step}/60: loss {losses[step - 1]:.4f}" for step in (20, 40, 60)]


def test_cached_warm_start_trains_once_then_loads(tmp_path):
    calls: list[int] = []

    def train(model) -> None:
        calls.append(1)
        sft_train(model, copy_examples(32), steps=3, batch_size=8, lr=1e-2, seed=0, log_every=10)

    key = {"recipe": "copy", "steps": 3}
    first, cached = cached_warm_start(tmp_path, key, tiny_model, train)
    assert not cached and len(calls) == 1
    entry = tmp_path / cache_key_digest(key)
    assert json.loads((entry / "key.json").read_text()) == key
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temporary directories left

    second, cached = cached_warm_start(tmp_path, key, tiny_model, train)
    assert cached and len(calls) == 1
    assert max_difference(second.state_dict(), first.state_dict()) == 0.0
    assert max_difference(second.state_dict(), tiny_model().state_dict()) > 0  # trained, not fresh
    assert not second.training

    _, cached = cached_warm_start(tmp_path, {"recipe": "copy", "steps": 4}, tiny_model, train)
    assert not cached and len(calls) == 2


@pytest.mark.parametrize("damage", ["garbage weights", "truncated weights", "other key", "no key file"])
def test_a_corrupt_cache_entry_is_retrained(tmp_path, damage):
    calls: list[int] = []

    def train(model) -> None:
        calls.append(1)
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)

    key = {"recipe": "shift"}
    cached_warm_start(tmp_path, key, tiny_model, train)
    entry = tmp_path / cache_key_digest(key)
    weights = entry / "model.safetensors"
    if damage == "garbage weights":
        weights.write_bytes(b"not a safetensors file")
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "other key":
        (entry / "key.json").write_text(json.dumps({"recipe": "something else"}))
    else:
        (entry / "key.json").unlink()

    with pytest.warns(RuntimeWarning, match="unusable.*training again"):
        model, cached = cached_warm_start(tmp_path, key, tiny_model, train)
    assert not cached and len(calls) == 2
    assert torch.allclose(model.model.norm.weight, torch.full_like(model.model.norm.weight, 2.0))
    _, cached = cached_warm_start(tmp_path, key, tiny_model, train)
    assert cached and len(calls) == 2
