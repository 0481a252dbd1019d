"""Learner step time: token-budget micro-batches against fixed ones, on a batch with a long tail of lengths.

One `GRPOTrainer` (DeepSpeed, ZeRO 0, float32, on the CPU) per setting, the same model (width 256,
4 layers, 512 positions) and the same batch: 8 groups of 8 completions whose lengths follow a long
tail (most 16–64 tokens, one in eight 320–448), rewards 0/1 so every group has signal. Settings:

- fixed: `micro_batch_size: 16` (rows sorted by length, 16 per micro-batch, each padded to its longest);
- tokens ×16, ×32: `max_tokens_per_micro_batch` set to 16 (32) × the median sequence length, rows sorted
  by length: as many tokens as 16 (32) typical sequences.

The two steps compute the same update (tests/integration/test_trainer.py checks it); this measures
the cost. Steps alternate between the settings (a warm-up step each first) and the median is reported
with the padding share each computed.

Run: `python bench/learner.py [--steps 5] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

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


def long_tail_groups(seed: int, groups: int = 8, size: int = 8) -> list[Group]:
    rng = random.Random(seed)
    batch = []
    for g in range(groups):
        completions = []
        for i in range(size):
            length = rng.randint(320, 448) if rng.random() < 0.125 else rng.randint(16, 64)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)

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
    times: dict[str, list[float]] = {name: [] for name in settings}
    padding: dict[str, float] = {}
    for step in range(args.steps + 1):  # the first step of each is a warm-up
        for name, learner in settings.items():
            started = time.perf_counter()
            result = learner.train_step(groups)
            if step:
                times[name].append(time.perf_counter() - started)
            padding[name] = result.padding_share
    print(f"\n{'setting':<12}{'step s (median)':>17}{'padding share':>15}")
    for name in settings:
        print(f"{name:<12}{statistics.median(times[name]):>17.3f}{padding[name]:>14.1%}")
    for name in ("tokens ×16", "tokens ×32"):
        ratio = statistics.median(times["fixed"]) / statistics.median(times[name])
        print(f"ratio fixed/{name} step time: {ratio:.2f}x (target >= 1.5x, padding share < 10 %)")


if __name__ == "__main__":
    main()
