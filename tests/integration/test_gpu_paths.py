"""GPU-only checks of the torch engine on CUDA and of the NCCL weight broadcast (skipped without CUDA;
the broadcast needs two GPUs, since NCCL refuses two ranks on one device)."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch

from orchard.config import ModelConfig, TinyModelConfig
from orchard.protocols import SamplingParams
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import load_tokenizer

pytestmark = pytest.mark.gpu

MODEL = ModelConfig(tiny=TinyModelConfig(hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=8))


def test_torch_engine_on_cuda_matches_the_cpu_greedily():
    tokenizer = load_tokenizer(MODEL)
    prompts = [tokenizer.encode(f"{index}+{index}=") for index in range(64)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=32)
    cuda = TorchEngine(build_model(MODEL, tokenizer, seed=3), tokenizer, device="cuda", eos_token_ids=())
    cpu = TorchEngine(build_model(MODEL, tokenizer, seed=3), tokenizer, eos_token_ids=())
    cuda.generate(prompts, greedy)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    on_cuda = cuda.generate(prompts, greedy)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(len(output.token_ids) for output in on_cuda)
    print(f"torch engine on {torch.cuda.get_device_name()}: {tokens / seconds:.0f} tok/s (batch 64, 32 new tokens)")
    on_cpu = cpu.generate(prompts, greedy)
    same = sum(
        a == b for x, y in zip(on_cuda, on_cpu, strict=True) for a, b in zip(x.token_ids, y.token_ids, strict=True)
    )
    assert same >= 0.9 * tokens  # float32 on both; ties may break differently after rounding


def _member(rank: int, port: int, state_bytes: int, bucket_bytes: int, results) -> None:
    from orchard.rollout.weight_broadcast import BroadcastGroup, layout_of

    torch.cuda.set_device(rank)
    generator = torch.Generator(device="cuda").manual_seed(0)
    count = state_bytes // 2 // 16
    state = {f"w{i}": torch.randn(count, device="cuda", generator=generator).to(torch.bfloat16) for i in range(16)}
    layout = layout_of(state)
    store = None
    if rank == 0:
        store = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    group = BroadcastGroup.join("127.0.0.1", port, rank, 2, backend="nccl", timeout_s=120, store=store)
    if rank == 0:
        group.send(state, 1, layout, bucket_bytes)  # warm-up
        stats = group.send(state, 2, layout, bucket_bytes)
        results.put(("sent", stats.bytes, stats.seconds))
    else:
        targets = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
        group.receive_into(targets, 1, layout, bucket_bytes)
        targets = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
        group.receive_into(targets, 2, layout, bucket_bytes)
        results.put(("exact", all(torch.equal(targets[name], state[name]) for name in state)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs two GPUs")
def test_nccl_broadcast_between_two_gpus_is_bit_exact():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    size = 1 << 30
    processes = [context.Process(target=_member, args=(rank, port, size, 256 << 20, results)) for rank in range(2)]
    for process in processes:
        process.start()
    replies = dict((kind, rest) for kind, *rest in (results.get(timeout=300) for _ in processes))
    for process in processes:
        process.join(timeout=60)
    assert replies["exact"] == [True]
    sent_bytes, seconds = replies["sent"]
    print(f"NCCL broadcast: {sent_bytes / 2**30 / seconds:.1f} GiB/s ({seconds / (sent_bytes / 2**30):.3f} s/GiB)")
