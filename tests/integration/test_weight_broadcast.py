"""The bucketed weight broadcast between Ray actors, over gloo on CPUs (NCCL runs the same code on
GPUs): bit-exact arrival, bounded buckets, a group that survives a refused or mismatched version,
and the learner actor broadcasting into real rollout workers."""

from __future__ import annotations

import pytest
import ray
import torch

from orchard.config import ModelConfig, RunConfig, TinyModelConfig
from orchard.learner.weights import state_dict_to_numpy
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import load_tokenizer
from orchard.rollout.weight_broadcast import BroadcastGroup, BroadcastTicket, layout_of, open_store
from orchard.rollout.worker import RolloutWorker, RolloutWorkerCore
from orchard.services.learner_actor import LearnerActor
from orchard.services.weights.sync import WeightSync, form_broadcast_group

BUCKET = 4096


def reference_state(seed: int) -> dict[str, torch.Tensor]:
    """Tensors of several dtypes and sizes, one larger than a bucket, one empty, with awkward values."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        "big": torch.randn(3000, generator=generator),  # 12 000 bytes: spans buckets
        "bf16": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "half": torch.randn(33, generator=generator).to(torch.float16),
        "double": torch.randn(4, 4, generator=generator, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "tiny": torch.tensor([-0.0, 1e-38, 3.4e38]),
    }
    state["big"][5] = float("-0.0")
    return state


@ray.remote(num_cpus=0.5)
class Member:
    """One end of the broadcast; the state it sends or compares against is rebuilt from a seed."""

    def open(self, world_size: int) -> tuple[str, int]:
        self.store, host = open_store(world_size, host="127.0.0.1", timeout_s=60)
        return host, self.store.port

    def join(self, host: str, port: int, rank: int, world_size: int) -> int:
        store = getattr(self, "store", None) if rank == 0 else None
        self.group = BroadcastGroup.join(host, port, rank, world_size, backend="gloo", timeout_s=60, store=store)
        return rank

    def send(self, seed: int, version: int, *, poison: bool = False) -> dict:
        state = reference_state(seed)
        if poison:
            state["double"][1, 1] = float("nan")
        stats = self.group.send(state, version, layout_of(reference_state(seed)), BUCKET)
        return vars(stats)

    def receive(
        self, seed: int, version: int, *, into_other_dtypes: bool = False, bucket: int = BUCKET, leave_out: str = ""
    ) -> dict:
        expected = reference_state(seed)
        layout = layout_of(expected)
        if into_other_dtypes:  # e.g. an engine that keeps float32 while the learner trains in bf16
            targets = {name: torch.full(t.shape, 7.0, dtype=torch.float64) for name, t in expected.items()}
        else:
            targets = {name: torch.full_like(t, 7.0) for name, t in expected.items()}
        targets.pop(leave_out, None)  # e.g. a tied alias the engine does not ask for
        stats = self.group.receive_into(targets, version, layout, bucket)
        exact = {
            name: bool(
                torch.equal(targets[name].to(t.dtype).view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
            )
            for name, t in expected.items()
            if name in targets
        }
        return {"stats": vars(stats), "exact": exact}

    def receive_tensors(self, seed: int, version: int) -> dict:
        expected = reference_state(seed)
        received = dict(self.group.receive_tensors(version, layout_of(expected), BUCKET))
        return {
            name: received[name].dtype == t.dtype and torch.equal(received[name], t) for name, t in expected.items()
        }


@pytest.fixture
def members(ray_local):
    actors = [Member.remote() for _ in range(3)]
    host, port = ray.get(actors[0].open.remote(3))
    ray.get([actor.join.remote(host, port, rank, 3) for rank, actor in enumerate(actors)])
    yield actors
    for actor in actors:
        ray.kill(actor)


def test_every_tensor_arrives_bit_exact_in_bounded_buckets(members):
    sender, *receivers = members
    total = sum(t.numel() * t.element_size() for t in reference_state(1).values())
    sent = sender.send.remote(1, version=3)
    replies = ray.get(
        [
            receivers[0].receive.remote(1, 3, leave_out="bf16"),
            receivers[1].receive.remote(1, 3, into_other_dtypes=True),
        ]
    )
    sent = ray.get(sent)
    assert sent["bytes"] == total and sent["buckets"] == -(-total // BUCKET)
    assert "bf16" not in replies[0]["exact"] and len(replies[1]["exact"]) == 6
    for reply in replies:
        assert all(reply["exact"].values()), reply["exact"]
        assert reply["stats"]["largest_bucket_bytes"] <= BUCKET and reply["stats"]["buckets"] == sent["buckets"]
    assert sent["largest_bucket_bytes"] <= BUCKET

    # the same group carries the next version, received tensor by tensor (the vLLM path)
    sent = sender.send.remote(2, version=4)
    streamed = ray.get([receiver.receive_tensors.remote(2, 4) for receiver in receivers])
    ray.get(sent)
    assert all(all(reply.values()) for reply in streamed), streamed


def test_a_refused_or_mismatched_version_leaves_the_group_usable(members):
    sender, *receivers = members
    refused = sender.send.remote(1, version=5, poison=True)
    for reply in [receiver.receive.remote(1, 5) for receiver in receivers]:
        with pytest.raises(ray.exceptions.RayTaskError, match="refused to broadcast version 5"):
            ray.get(reply)
    with pytest.raises(ray.exceptions.RayTaskError, match="non-finite values in double"):
        ray.get(refused)

    # a receiver that expects another version or bucket size drains the broadcast and says why
    sent = sender.send.remote(1, version=6)
    wrong = receivers[0].receive.remote(1, 7)
    other_bucket = receivers[1].receive.remote(1, 6, bucket=BUCKET // 2)
    ray.get(sent)
    for reply in (wrong, other_bucket):
        with pytest.raises(ray.exceptions.RayTaskError, match="broadcast mismatch"):
            ray.get(reply)

    sent = sender.send.remote(2, version=8)
    replies = ray.get([receiver.receive.remote(2, 8) for receiver in receivers])
    ray.get(sent)
    assert all(all(reply["exact"].values()) for reply in replies)


TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_the_learner_broadcasts_into_rollout_workers(ray_local):
    """Transport 'nccl' end to end on CPUs: the learner actor, two rollout worker actors, the group
    formed by `form_broadcast_group`, a version published as a ticket and received into each torch
    engine, which then holds exactly the learner's weights."""
    config = RunConfig(
        model=ModelConfig(tiny=TINY),
        rollout={"num_workers": 2, "max_new_tokens": 4},
        weight_sync={"transport": "nccl", "bucket_mb": 0.01, "timeout_seconds": 60},
    )
    tokenizer = load_tokenizer(config.model)
    model = build_model(config.model, tokenizer, seed=11)
    learner_weights = state_dict_to_numpy(model.state_dict())
    learner = LearnerActor.options(num_cpus=0.5).remote(config, learner_weights)
    workers = {
        f"worker-{i}": RolloutWorker.options(num_cpus=0.5).remote(f"worker-{i}", config.model, config.rollout, seed=i)
        for i in range(2)
    }
    try:
        other = state_dict_to_numpy(build_model(config.model, tokenizer, seed=12).state_dict())
        ray.get([worker.load_weights.remote(0, other) for worker in workers.values()])
        group = form_broadcast_group(
            learner,
            workers,
            ranks_per_worker=1,
            bucket_bytes=config.weight_sync.bucket_bytes,
            timeout_s=config.weight_sync.timeout_seconds,
        )
        assert group.backend == "gloo" and group.world_size == 3

        sync = WeightSync()
        version = ray.get(learner.renumber.remote(1))
        sync.publish(version, BroadcastTicket(version))
        sent = learner.broadcast_weights.remote()
        assert sync.push_and_wait(workers) >= 0
        sent = ray.get(sent)
        assert sync.worker_versions == {"worker-0": 1, "worker-1": 1}
        assert sent.buckets > 1 and sent.bytes > config.weight_sync.bucket_bytes

        local = RolloutWorkerCore("check", config.model, config.rollout)
        local.load_weights(1, ray.get(learner.export_weights_object_store.remote()))
        prompt, completion = [1, 5, 6, 7], [8, 9, 10]
        expected = local.token_logprobs(prompt, completion)
        for worker in workers.values():
            assert ray.get(worker.token_logprobs.remote(prompt, completion)) == expected
        stale = RolloutWorkerCore("stale", config.model, config.rollout)
        stale.load_weights(0, other)
        assert stale.token_logprobs(prompt, completion) != expected  # the broadcast changed the weights
    finally:
        for actor in [learner, *workers.values()]:
            ray.kill(actor)
