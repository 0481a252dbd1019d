"""Learner step time and memory: data-parallel ranks, token-budget micro-batches, LoRA against full fine-tuning.

Data parallelism: learner steps/s of 2 DeepSpeed ranks (two processes over gloo, one thread each, each
training on its share of the batch) against 1 rank (one process, one thread) on the same global batch
(16 groups of 8 completions of 16–64 tokens), a rank per core.

Micro-batches, on a batch with a long tail of lengths:

One `GRPOTrainer` (DeepSpeed, ZeRO 0, float32, on the CPU) per setting, the same model (width 256,
4 layers, 512 positions) and the same batch: 8 groups of 8 completions whose lengths follow a long
tail (most 16–64 tokens, one in eight 320–448), rewards 0/1 so every group has signal. Settings:

- fixed: `micro_batch_size: 16` (rows sorted by length, 16 per micro-batch, each padded to its longest);
- tokens ×16, ×32: `max_tokens_per_micro_batch` set to 16 (32) × the median sequence length, rows sorted
  by length: as many tokens as 16 (32) typical sequences.

The two steps compute the same update (tests/integration/test_trainer.py checks it); this measures
the cost. Steps alternate between the settings (a warm-up step each first) and the median is reported
with the padding share each computed.

LoRA: the same model and batch, full fine-tuning against LoRA adapters (rank 8 and 32, every linear
layer but the tied output head): the bytes of the optimizer's state after a step (Adam's two moments of
every trainable parameter), the trainable parameters, and the median step time.

Run: `python bench/learner.py [--steps 5] [--threads 2] [--parts ranks,tokens,lora]`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Any

import torch

from orchard.config import LearnerConfig, ModelConfig, TinyModelConfig
from orchard.learner.trainer import GRPOTrainer
from orchard.records import Completion, Group, Prompt
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()
MODEL = ModelConfig(
    tiny=TinyModelConfig(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024, max_position_embeddings=512
    )
)


def long_tail_groups(seed: int, groups: int = 8, size: int = 8, long_share: float = 0.125) -> list[Group]:
    rng = random.Random(seed)
    batch = []
    for g in range(groups):
        completions = []
        for i in range(size):
            length = rng.randint(320, 448) if rng.random() < long_share else rng.randint(16, 64)
            tokens = [rng.randint(4, 30) for _ in range(length)]
            completions.append(
                Completion(
                    text="x" * length,
                    token_ids=tokens,
                    logprobs=[-3.0] * length,
                    policy_version=0,
                    reward=float(i % 2),
                    correct=bool(i % 2),
                )
            )
        prompt = Prompt(id=f"p{g}", text="12+34=", answer="46", distribution="bench")
        batch.append(Group(prompt=prompt, prompt_token_ids=TOKENIZER.encode("12+34="), completions=completions))
    return batch


def trainer(**learner: object) -> GRPOTrainer:
    model = build_model(MODEL, TOKENIZER, seed=0)
    config = LearnerConfig(lr=1e-5, **learner)
    return GRPOTrainer(model, config, pad_id=TOKENIZER.pad_id, seed=0, temperature=1.0, max_length=448)


def rank_steps(rank: int, world: int, port: int, steps: int, results: Any) -> None:
    """One data-parallel rank (a process of its own): `steps` timed steps after a warm-up."""
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    learner = trainer(micro_batch_size=16)
    groups = long_tail_groups(seed=1, groups=16, long_share=0.0)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        learner.train_step(groups)
        if step:
            times.append(time.perf_counter() - started)
    if rank == 0:
        results.put(statistics.median(times))


def data_parallel_speed(steps: int) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    medians = {}
    for world in (1, 2):
        results = context.Queue()
        port = 29500 + random.randint(0, 20000)
        processes = [
            context.Process(target=rank_steps, args=(rank, world, port, steps, results)) for rank in range(world)
        ]
        for process in processes:
            process.start()
        medians[world] = results.get(timeout=1800)
        for process in processes:
            process.join()
    print(f"\n{'ranks':<8}{'step s (median)':>17}{'steps/s':>10}")
    for world, seconds in medians.items():
        print(f"{world:<8}{seconds:>17.3f}{1 / seconds:>10.2f}")
    print(f"ratio 2 ranks / 1 rank learner steps/s: {medians[1] / medians[2]:.2f}x (target >= 1.6x)")


def alternate(settings: dict[str, GRPOTrainer], groups: list[Group], steps: int) -> dict[str, list[Any]]:
    """Step every setting in turn `steps` + 1 times; per setting, the results and the times after the warm-up."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    results: dict[str, list[Any]] = {name: [] for name in settings}
    for step in range(steps + 1):  # the first step of each is a warm-up
        for name, learner in settings.items():
            started = time.perf_counter()
            results[name].append(learner.train_step(groups))
            if step:
                times[name].append(time.perf_counter() - started)
    return {name: [times[name], results[name]] for name in settings}


def token_budget_speed(steps: int) -> None:
    groups = long_tail_groups(seed=0)
    lengths = sorted(len(c.token_ids) + len(g.prompt_token_ids) for g in groups for c in g.completions)
    median = int(statistics.median(lengths))
    print(
        f"batch: {len(lengths)} sequences, lengths {lengths[0]}–{lengths[-1]} (median {statistics.median(lengths):.0f}),"
        f" {sum(lengths)} tokens; token budgets {16 * median} and {32 * median}"
    )
    settings = {
        "fixed": trainer(micro_batch_size=16),
        "tokens ×16": trainer(max_tokens_per_micro_batch=16 * median),
        "tokens ×32": trainer(max_tokens_per_micro_batch=32 * median),
    }
    measured = alternate(settings, groups, steps)
    times = {name: measured[name][0] for name in settings}
    padding = {name: measured[name][1][-1].padding_share for name in settings}
    print(f"\n{'setting':<12}{'step s (median)':>17}{'padding share':>15}")
    for name in settings:
        print(f"{name:<12}{statistics.median(times[name]):>17.3f}{padding[name]:>14.1%}")
    for name in ("tokens ×16", "tokens ×32"):
        ratio = statistics.median(times["fixed"]) / statistics.median(times[name])
        print(f"ratio fixed/{name} step time: {ratio:.2f}x (target >= 1.5x, padding share < 10 %)")


def optimizer_state_bytes(learner: GRPOTrainer) -> int:
    """Bytes of every tensor in the optimizer's state (ZeRO 0: DeepSpeed steps the torch optimizer itself)."""
    state = learner.engine.optimizer.state
    return sum(t.numel() * t.element_size() for entry in state.values() for t in entry.values() if torch.is_tensor(t))


def lora_memory(steps: int) -> None:
    groups = long_tail_groups(seed=0, long_share=0.0)
    settings = {
        "full": trainer(micro_batch_size=16),
        "LoRA r=8": trainer(micro_batch_size=16, lora={"rank": 8, "alpha": 16}),
        "LoRA r=32": trainer(micro_batch_size=16, lora={"rank": 32, "alpha": 64}),
    }
    measured = alternate(settings, groups, steps)
    state = {name: optimizer_state_bytes(learner) for name, learner in settings.items()}
    print(f"\n{'setting':<12}{'trainable params':>18}{'optimizer state MiB':>21}{'step s (median)':>17}")
    for name, learner in settings.items():
        trainable = sum(p.numel() for p in learner.engine.module.parameters() if p.requires_grad)
        seconds = statistics.median(measured[name][0])
        print(f"{name:<12}{trainable:>18,}{state[name] / 2**20:>21.2f}{seconds:>17.3f}")
    for name in ("LoRA r=8", "LoRA r=32"):
        print(f"ratio {name}/full optimizer-state memory: {state[name] / state['full']:.3f}")


PARTS = {"ranks": data_parallel_speed, "tokens": token_budget_speed, "lora": lora_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which comparisons, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if "ranks" in parts:  # first: its processes set up their own DeepSpeed environment
        data_parallel_speed(args.steps)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    for name in parts:
        if name != "ranks":
            PARTS[name](args.steps)


if __name__ == "__main__":
    main()
