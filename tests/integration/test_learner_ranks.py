"""A learner of two DeepSpeed ranks (ZeRO-3, gloo on the CPU accelerator), each a Ray actor in its own
bundle, each training on its share of the batch (whole groups; 3 groups over 2 ranks): the same step as
one rank on the whole batch, for every loss aggregation, and exports and checkpoints through rank 0.

Tolerance on the CPU: the losses agree to 1e-5 (relative) and the weights after two Adam steps at
lr 1e-2 to 5e-5 — the ranks' gradients are summed in another order than one rank's, and Adam divides
tiny gradients by their own scale, so float32 rounding differences grow to a few 1e-6."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import ray
import torch

from orchard.config import ConfigError, RunConfig, config_from_dict
from orchard.learner.weights import state_dict_to_numpy
from orchard.records import Group
from orchard.rollout.model import build_model
from orchard.services.learner_actor import create_learner
from orchard.services.placement import reserve
from tests.integration.test_trainer import MAX_LENGTH, MODEL_CONFIG, TEMPERATURE, TOKENIZER, random_groups


def run_config(
    ranks: int,
    gpus: int = 0,
    aggregation: str = "token-mean",
    micro_batch_size: int = 64,
    lora: int = 0,
    objective: str = "grpo",
    advantage: str = "grpo",
) -> RunConfig:
    return RunConfig(
        model=MODEL_CONFIG,
        rollout={"temperature": TEMPERATURE, "max_new_tokens": MAX_LENGTH},
        learner={
            "zero_stage": 3,
            "lr": 1e-2,
            "num_cpus": 0.5,
            "aggregation": aggregation,
            "micro_batch_size": micro_batch_size,
            "lora": {"rank": lora},
            "objective": objective,
            "advantage": advantage,
        },
        weight_sync={"transport": "object_store"},
        cluster={"placement_groups": True, "learner_ranks": ranks, "learner_gpus": gpus, "ready_timeout_seconds": 60},
    )


def test_two_ranks_train_like_one_and_export_through_rank_0(ray_local, tmp_path):
    train_one_and_two_ranks(tmp_path, gpus=0)


@pytest.mark.parametrize(
    ("aggregation", "micro_batch_size", "groups"),
    [
        ("seq-mean-token-mean", 64, 3),
        ("seq-mean-token-sum", 64, 3),
        ("seq-mean-token-sum-norm", 64, 3),
        ("token-mean", 2, 3),  # rank 0: 1 group, 2 micro-batches (and 2 idle ones); rank 1: 2 groups, 4
        ("token-mean", 64, 1),  # fewer groups than ranks: rank 1 trains nothing, and takes part
    ],
    ids=["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "uneven-micro-batches", "one-group"],
)
def test_two_ranks_train_like_one_for_every_aggregation(ray_local, tmp_path, aggregation, micro_batch_size, groups):
    train_one_and_two_ranks(
        tmp_path, gpus=0, aggregation=aggregation, micro_batch_size=micro_batch_size, groups=groups, checkpoint=False
    )


def test_two_ranks_with_lora_adapters_train_like_one_and_export_merged_weights(ray_local, tmp_path):
    """Both ranks start from the same adapters (seeded alike), so their shares of the batch give one update;
    the export under the base model's keys is the merged policy, and the checkpoint holds the adapter."""
    train_one_and_two_ranks(tmp_path, gpus=0, lora=4)
    assert (tmp_path / "step-2" / "adapter" / "adapter_config.json").is_file()


def test_two_ranks_train_disco_like_one(ray_local, tmp_path):
    """DisCO's batch loss couples the groups (its KL penalty is over the whole batch): the ranks reduce
    its pieces, so two ranks on their shares take the step one rank takes on the batch."""
    train_one_and_two_ranks(tmp_path, gpus=0, micro_batch_size=2, objective="disco", checkpoint=False)


def test_two_ranks_train_ppo_and_its_critic_like_one(ray_local, tmp_path):
    """GAE's whitening is over the whole batch and the critic trains on each rank's share: the ranks'
    critics take one update, so the second step's advantages, value loss and policy agree with one rank's;
    the checkpoint holds the critic and restores through rank 0's call."""
    train_one_and_two_ranks(tmp_path, gpus=0, micro_batch_size=2, advantage="gae")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two learner ranks on GPUs need two GPUs")
def test_two_ranks_on_two_gpus_train_like_one(ray_local, tmp_path):
    """NCCL between the DeepSpeed ranks (the one-rank learner takes a third GPU when there is one)."""
    train_one_and_two_ranks(tmp_path, gpus=1)


def with_correct_above(group: Group, threshold: float) -> Group:
    completions = [dataclasses.replace(c, correct=c.reward > threshold) for c in group.completions]
    return dataclasses.replace(group, completions=completions)


def train_one_and_two_ranks(
    tmp_path,
    *,
    gpus: int,
    aggregation: str = "token-mean",
    micro_batch_size: int = 64,
    groups: int = 3,
    checkpoint: bool = True,
    lora: int = 0,
    objective: str = "grpo",
    advantage: str = "grpo",
) -> None:
    # on GPUs the one-rank learner may run on the CPU: other rounding
    loss_tolerance, tolerance = (1e-5, 5e-5) if gpus == 0 else (1e-3, 1e-3)
    initial = state_dict_to_numpy(build_model(MODEL_CONFIG, TOKENIZER, seed=5).state_dict())
    learners, placements = {}, []
    try:
        for ranks in (1, 2):
            config = run_config(
                ranks,
                gpus=gpus if ranks == 2 or torch.cuda.device_count() > 2 else 0,
                aggregation=aggregation,
                micro_batch_size=micro_batch_size,
                lora=lora,
                objective=objective,
                advantage=advantage,
            )
            placements.append(placement := reserve(config))
            learners[ranks] = create_learner(config, initial, placement)
        assert len(learners[2][1]) == 1
        for step in range(2):
            batch = random_groups(seed=step, count=groups)
            if objective == "disco":  # DisCO discriminates correct from incorrect answers
                batch = [with_correct_above(group, 0.5) for group in batch]
            results = ray.get([learners[ranks][0].train_step.remote(batch)[0] for ranks in (1, 2)])
            assert [r.result.skipped for r in results] == [False, False]
            assert results[0].result.loss == pytest.approx(results[1].result.loss, rel=loss_tolerance)
            assert results[0].result.num_tokens == results[1].result.num_tokens
            assert results[0].result.value_loss == pytest.approx(results[1].result.value_loss, rel=1e-4)
        one, two = ray.get([learners[ranks][0].export_weights.remote() for ranks in (1, 2)])
        assert set(one) == set(two) == set(initial)
        assert max(float(np.abs(one[name] - two[name]).max()) for name in one) < tolerance
        assert any(not np.array_equal(one[name], initial[name]) for name in one)  # it did train
        if not checkpoint:
            return

        path = ray.get(learners[2][0].save_checkpoint.remote(str(tmp_path / "step-2")))
        assert (tmp_path / "step-2" / "model" / "config.json").is_file()
        # the checkpoint's model is a whole Hugging Face checkpoint: a run (or vLLM) can start from it
        from orchard.config import ModelConfig
        from orchard.rollout.model import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(ModelConfig(kind="hf", path=str(tmp_path / "step-2" / "model")))
        assert sum(p.numel() for p in model.parameters()) > 0
        assert ray.get(learners[2][0].load_checkpoint.remote(path)) == 2
        # the optimizer state is partitioned by rank: a learner of another size refuses it, saying why
        with pytest.raises(ray.exceptions.RayTaskError, match="written by 2 learner ranks and this learner has 1"):
            ray.get(learners[1][0].load_checkpoint.remote(path))
    finally:
        for rank0, peers in learners.values():
            for actor in [rank0, *peers]:
                ray.kill(actor)
        for placement in placements:
            placement.release()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"cluster": {"learner_ranks": 2}}, "needs cluster.placement_groups"),
        (
            {"cluster": {"learner_ranks": 2, "placement_groups": True}, "weight_sync": {"transport": "auto"}},
            "needs weight_sync.transport",
        ),
    ],
)
def test_several_ranks_need_placement_groups_and_a_cross_node_transport(settings, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict(settings)


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ray_local):
    """A broken behaviour logprob in one group: only the rank that trains it sees a non-finite loss,
    and every rank skips the step (the reduced gradients are non-finite); the next step trains."""
    initial = state_dict_to_numpy(build_model(MODEL_CONFIG, TOKENIZER, seed=5).state_dict())
    config = run_config(2)
    placement = reserve(config)
    rank0, peers = create_learner(config, initial, placement)
    try:
        batch = random_groups(seed=0, count=3)
        batch[2].completions[0].logprobs[0] = math.nan
        step = ray.get(rank0.train_step.remote(batch)[0])
        assert step.result.skipped and step.result.non_finite and step.policy_version == 0
        exported = ray.get(rank0.export_weights.remote())
        assert all(np.array_equal(exported[name], initial[name]) for name in initial)
        step = ray.get(rank0.train_step.remote(random_groups(seed=1))[0])
        assert not step.result.skipped and step.policy_version == 1
    finally:
        for actor in [rank0, *peers]:
            ray.kill(actor)
        placement.release()
