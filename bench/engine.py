"""Generation throughput: `TorchEngine`, vLLM's CPU engine (`VLLMEngine`) and transformers'
`model.generate`, same model, same work.

All run side by side in one process with the same `torch.set_num_threads` (1 unless `--threads`), on
the same batch of 64 left-padded prompts of 9-13 tokens (bos + 8-12 characters), sampling at
temperature 1 from the full distribution (no top-k/top-p) with a KV cache (`use_cache=True`). Neither
stops early: eos is disabled in both (`eos_token_ids=()` for the engine, `eos_token_id=None` for
`generate`; eos may be sampled but ends nothing) and there are no stop strings, so both generate exactly
`batch × new_tokens` tokens, and tokens/s counts exactly those (vLLM: `eos_token_ids=()` sets its
`ignore_eos`; it loads the same weights from a Hugging Face checkpoint written for it, float32, eager,
prefix caching on, in this process as a rollout worker runs it). The engine runs its compiled forward pass
(`rollout/engines/kernels.py`; the header says when it could not be built); the same engine in plain
torch (`fused_kernel=False`) is timed beside it. Calls alternate between the runs, one warm-up each, then
the median of `--repeats`. The last column times the weight matmuls of one
`generate` call alone (prefill, decode steps, lm head, on random activations): work both must do (the
engine skips the last layer's non-final prompt positions), so it bounds how far either can go. Before
timing, greedy decoding of a few prompts is checked to agree token for token (every engine against
`generate`), so they really run the same model. `--no-vllm` leaves vLLM out.

Configs: the demo's tiny model (hidden 128, 4 layers, 4 heads, 2 kv heads, MLP 512) and a larger one
(hidden 512, 8 layers, 8 heads, 4 kv heads, MLP 2048).

Run: `python bench/engine.py [--repeats 5] [--batch 64] [--new-tokens 32] [--threads 1] [--skip-large] [--no-vllm]`.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable

import torch

from orchard.config import ModelConfig, TinyModelConfig
from orchard.protocols import SamplingParams
from orchard.rollout.engines.kernels import forward_tokens_kernel
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import build_model, save_model
from orchard.rollout.tokenizer import CharTokenizer

CONFIGS = {
    "demo (h128 L4)": TinyModelConfig(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512
    ),
    "large (h512 L8)": TinyModelConfig(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2048
    ),
}
GREEDY_CHECK_PROMPTS = 4
GREEDY_CHECK_TOKENS = 8


def make_prompts(tokenizer: CharTokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of 8-12 random characters, each led by bos, like the demo's short tasks."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " +*=?"
    return [
        [tokenizer.bos_id, *tokenizer.encode("".join(rng.choices(alphabet, k=rng.randint(8, 12))))]
        for _ in range(count)
    ]


def alternating_medians(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, int]]:
    """Median seconds of each run and the tokens it generates; runs alternate so drift hits all alike."""
    tokens = {name: run() for name, run in runs.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(seconds[name]), tokens[name]) for name in runs}


def matmuls_alone(engine: TorchEngine, batch: int, prompt_length: int, new_tokens: int) -> Callable[[], int]:
    """Only the weight matmuls one generation call performs (prefill, decode steps, lm head), on random
    activations: work that both implementations must do, so a lower bound on either call's time."""
    hidden = engine.hidden_size
    layers = [
        (layer.qkv_weight, layer.output_weight_t.t(), layer.gate_up_weight, layer.down_weight_t.t())
        for layer in engine._layers
    ]

    shapes = {(rows, weight.shape[1]) for rows in (batch, batch * prompt_length) for w in layers for weight in w}
    inputs = {shape: torch.randn(shape) for shape in shapes | {(batch, hidden)}}

    def run_layers(rows: int) -> None:
        for weights in layers:
            for weight in weights:
                torch.nn.functional.linear(inputs[rows, weight.shape[1]], weight)

    def run() -> int:
        with torch.inference_mode():
            run_layers(batch * prompt_length)
            for _ in range(new_tokens - 1):
                run_layers(batch)
            for _ in range(new_tokens):
                torch.nn.functional.linear(inputs[batch, hidden], engine._lm_head)
        return 0

    return run


def vllm_engine(model: torch.nn.Module, tokenizer: CharTokenizer, directory: str) -> object:
    """A `VLLMEngine` on `model`'s weights (written to `directory` as a Hugging Face checkpoint)."""
    from orchard.rollout.engines.vllm import VLLMEngine

    save_model(model, tokenizer, directory)
    return VLLMEngine(directory, dtype="float32", enforce_eager=True, eos_token_ids=())


def bench_config(name: str, tiny: TinyModelConfig, args: argparse.Namespace) -> None:
    """Print one table row."""
    tokenizer = CharTokenizer()
    model = build_model(ModelConfig(tiny=tiny), tokenizer)
    checkpoint = tempfile.TemporaryDirectory(prefix="orchard-bench-engine-")
    vllm = None if args.no_vllm else vllm_engine(model, tokenizer, checkpoint.name)
    prompts = make_prompts(tokenizer, args.batch)
    new_tokens = args.new_tokens
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, seed=0)
    engine = TorchEngine(model, tokenizer, eos_token_ids=(), max_batch_size=args.batch)
    plain = TorchEngine(model, tokenizer, eos_token_ids=(), max_batch_size=args.batch, fused_kernel=False)

    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[tokenizer.pad_id] * (length - len(p)) + p for p in prompts])
    attention_mask = (input_ids != tokenizer.pad_id).long()
    sampling = copy.deepcopy(model.generation_config)
    sampling.update(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, eos_token_id=None,
        pad_token_id=tokenizer.pad_id, use_cache=True,
    )  # fmt: skip

    greedy = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_CHECK_TOKENS)
    for prompt in prompts[:GREEDY_CHECK_PROMPTS]:
        with torch.inference_mode():
            greedy_hf = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY_CHECK_TOKENS, eos_token_id=None,
                pad_token_id=tokenizer.pad_id,
            )[0, len(prompt) :].tolist()  # fmt: skip
        for each in (engine, plain, vllm):
            if each is None:
                continue
            tokens = each.generate([prompt], greedy)[0].token_ids
            if greedy_hf != tokens:
                raise RuntimeError(f"{name}: greedy tokens differ, engine {tokens} vs generate {greedy_hf}")

    def run_engine() -> int:
        return sum(len(output.token_ids) for output in engine.generate(prompts, params))

    def run_plain() -> int:
        return sum(len(output.token_ids) for output in plain.generate(prompts, params))

    def run_hf() -> int:
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=sampling)
        return int((output.shape[1] - length) * output.shape[0])

    def run_vllm() -> int:
        return sum(len(output.token_ids) for output in vllm.generate(prompts, params))

    torch.manual_seed(0)
    floor = matmuls_alone(engine, args.batch, length, new_tokens)
    runs = {"engine": run_engine, "hf": run_hf, "plain": run_plain, "floor": floor}
    if vllm is not None:
        runs["vllm"] = run_vllm
    results = alternating_medians(runs, args.repeats)
    if vllm is not None:
        vllm.close()
    checkpoint.cleanup()
    (engine_seconds, engine_tokens), (hf_seconds, hf_tokens) = results["engine"], results["hf"]
    plain_seconds, plain_tokens = results["plain"]
    if not engine_tokens == plain_tokens == hf_tokens == args.batch * new_tokens:
        raise RuntimeError(
            f"{name}: engine generated {engine_tokens} tokens, plain {plain_tokens}, generate {hf_tokens}; "
            "not comparable"
        )
    engine_rate, hf_rate, plain_rate = (
        engine_tokens / engine_seconds,
        hf_tokens / hf_seconds,
        plain_tokens / plain_seconds,
    )
    floor_seconds = results["floor"][0]
    if "vllm" in results:
        vllm_seconds, vllm_tokens = results["vllm"]
        if vllm_tokens != args.batch * new_tokens:
            raise RuntimeError(f"{name}: vLLM generated {vllm_tokens} tokens, not {args.batch * new_tokens}")
        vllm_rate = vllm_tokens / vllm_seconds
        vllm_cells = (
            f"| {vllm_rate:>8,.0f} ({vllm_seconds * 1e3:>5,.0f} ms) {vllm_rate / hf_rate:>5.2f}x "
            f"| {engine_rate / vllm_rate:>5.2f}x "
        )
    else:
        vllm_cells = "| – | – "
    print(
        f"| {name:<16} | {args.batch:>5} | {new_tokens:>6} | {hf_rate:>8,.0f} ({hf_seconds * 1e3:>5,.0f} ms) "
        f"| {engine_rate:>8,.0f} ({engine_seconds * 1e3:>5,.0f} ms) | {engine_rate / hf_rate:>5.2f}x "
        f"{vllm_cells}"
        f"| {plain_rate:>8,.0f} ({plain_seconds * 1e3:>5,.0f} ms) {plain_rate / hf_rate:>5.2f}x "
        f"| {floor_seconds * 1e3:>15,.0f} ms | {hf_seconds / floor_seconds:>16.2f}x |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for both")
    parser.add_argument("--skip-large", action="store_true", help="only the demo-sized model")
    parser.add_argument("--only-large", action="store_true", help="only the larger model")
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM's CPU engine out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"TorchEngine and vLLM vs transformers generate: {args.threads} thread(s), float32, median of {args.repeats} calls; "
        f"tokens/s over batch x new tokens, every one generated (eos ignored by both, no stop strings)"
    )
    print(
        f"greedy check: generate and both engines decode the same {GREEDY_CHECK_TOKENS} tokens for {GREEDY_CHECK_PROMPTS} prompts per model"
    )
    kernel = "compiled forward pass" if forward_tokens_kernel() is not None else "plain torch (kernel NOT built)"
    print(f"TorchEngine runs: {kernel}; 'plain torch engine' is the same engine with fused_kernel=False")
    print("matmuls alone: the weight matmuls of one generate call on their own (prefill, decode, lm head)")
    print("ratio bound: HF's call time over the matmuls alone, the ratio an engine doing nothing else would reach")
    print("vLLM: vLLM 0.32's CPU build in this process; its ratio is to HF generate, 'torch/vLLM' TorchEngine's to it")
    print(
        "| model            | batch | tokens | HF generate tok/s (call) | TorchEngine tok/s (call) | ratio  "
        "| vLLM tok/s (call) ratio | torch/vLLM "
        "| plain torch engine tok/s (call) ratio | matmuls alone (call) | ratio bound (HF/mm) |"
    )
    print(
        "| ---------------- | ----- | ------ | ------------------------ | ------------------------ | ------ "
        "| ----------------------- | ---------- "
        "| ------------------------------------- | -------------------- | ------------------- |"
    )
    for name, tiny in CONFIGS.items():
        if (args.skip_large and name.startswith("large")) or (args.only_large and not name.startswith("large")):
            continue
        bench_config(name, tiny, args)


if __name__ == "__main__":
    main()
