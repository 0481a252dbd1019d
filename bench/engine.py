"""Generation throughput: `TorchEngine` against transformers' `model.generate`, same model, same work.

Both run side by side in one process with `torch.set_num_threads(1)` on a batch of 64 left-padded
prompts of about 10 characters, sampling at temperature 1 (no top-k/top-p) for exactly
`--new-tokens` tokens each (eos disabled in the engine, `min_new_tokens` in `generate`). One warm-up,
then the median of several repeats. Configs: the demo's tiny model (hidden 128, 4 layers, 4 heads,
2 kv heads, MLP 512) and a larger one (hidden 512, 8 layers, 8 heads, 4 kv heads, MLP 2048).

Run: `python bench/engine.py [--repeats 5] [--batch 64] [--new-tokens 32] [--skip-large]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time
from collections.abc import Callable

import torch

from orchard.config import ModelConfig, TinyModelConfig
from orchard.protocols import SamplingParams
from rollout.engines.torch_engine import TorchEngine
from rollout.model import build_model
from rollout.tokenizer import CharTokenizer

CONFIGS = {
    "demo (h128 L4)": TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "large (h512 L8)": TinyModelConfig(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2048
    ),
}


def make_prompts(tokenizer: CharTokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of 8-12 random characters, each led by bos, like the demo's short tasks."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " +*=?"
    return [
        [tokenizer.bos_id, *tokenizer.encode("".join(rng.choices(alphabet, k=rng.randint(8, 12))))]
        for _ in range(count)
    ]


def median_seconds(run: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median wall time of `run` after one warm-up call, and the tokens one call generates."""
    tokens = run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), tokens


def bench_config(name: str, tiny: TinyModelConfig, args: argparse.Namespace) -> tuple[float, float]:
    tokenizer = CharTokenizer()
    model = build_model(ModelConfig(tiny=tiny), tokenizer)
    prompts = make_prompts(tokenizer, args.batch)
    new_tokens = args.new_tokens
    engine = TorchEngine(model, tokenizer, eos_token_ids=(), max_batch_size=args.batch)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=0)

    def run_engine() -> int:
        outputs = engine.generate(prompts, params)
        return sum(len(output.token_ids) for output in outputs)

    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[tokenizer.pad_id] * (length - len(p)) + p for p in prompts])
    attention_mask = (input_ids != tokenizer.pad_id).long()

    def run_hf() -> int:
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_id,
            )
        return int((output.shape[1] - length) * output.shape[0])

    torch.manual_seed(0)
    engine_seconds, engine_tokens = median_seconds(run_engine, args.repeats)
    hf_seconds, hf_tokens = median_seconds(run_hf, args.repeats)
    if engine_tokens != hf_tokens:
        raise RuntimeError(f"{name}: engine generated {engine_tokens} tokens, generate {hf_tokens}; not comparable")
    engine_rate, hf_rate = engine_tokens / engine_seconds, hf_tokens / hf_seconds
    print(
        f"| {name:<16} | {args.batch:>5} | {new_tokens:>6} | {hf_rate:>12,.0f} | {engine_rate:>12,.0f} "
        f"| {engine_rate / hf_rate:>5.2f}x |",
        flush=True,
    )
    return engine_rate, hf_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-large", action="store_true", help="only the demo-sized model")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"TorchEngine vs transformers generate, 1 thread, median of {args.repeats} (tokens/s)")
    print("| model            | batch | tokens | HF generate  | TorchEngine  | ratio  |")
    print("| ---------------- | ----- | ------ | ------------ | ------------ | ------ |")
    for name, tiny in CONFIGS.items():
        if args.skip_large and name.startswith("large"):
            continue
        bench_config(name, tiny, args)


if __name__ == "__main__":
    main()
