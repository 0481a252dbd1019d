"""Rollout–training mismatch: the engines' logprobs against the learner's forward of the same weights.

For each engine (our torch engine, vLLM's CPU engine) and dtype (float32, bfloat16), one process
generates completions of the demo's procedural prompts (8 samples each, temperature 1, the demo's
length and stop string) and the learner's own function (`learner.batching.sequence_logprobs`, what
`GRPOTrainer` computes its ratios with) scores the same tokens under the same weights in the same
dtype. Per token, with `Δ = log π_learner − log π_engine` (`learner.algorithms.logprob_mismatch`):
k3 = mean(e^Δ − 1 − Δ), an estimate of KL(engine ‖ learner); mean and largest |Δ|; and the share of
tokens whose truncated importance weight min(e^Δ, 2) differs from 1 by more than 1 %.

The model is the demo's (width 128, 4 layers) warm-started by the demo's supervised stage (read from
the warm-start cache, trained there first if missing), so the distributions are peaked as in a run.
Run: `python bench/rollout_mismatch.py [--prompts 64] [--no-vllm]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from orchard.config import DEMO_CONFIG, load_config
from orchard.learner.algorithms import logprob_mismatch, truncated_importance_weights
from orchard.learner.batching import sequence_logprobs
from orchard.protocols import SamplingParams
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import DTYPES, build_model, save_model
from orchard.rollout.prompts import encode_prompt
from orchard.rollout.tokenizer import load_tokenizer
from orchard.services.compare import PLAIN_GRPO
from orchard.services.warmstart import warm_start
from orchard.verifiers.sources import PromptPool


def learner_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(model, ids, torch.ones_like(ids), 1.0)
    return logprobs[0, len(prompt) :].float()


def measure(engine, model, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    batch = [prompt for prompt in prompts for _ in range(8)]
    started = time.perf_counter()
    outputs = engine.generate(batch, params)
    seconds = time.perf_counter() - started
    learner, behaviour = [], []
    for prompt, output in zip(batch, outputs, strict=True):
        if output.token_ids:
            learner.append(learner_logprobs(model, prompt, output.token_ids))
            behaviour.append(torch.tensor(output.logprobs))
    learner_values, behaviour_values = torch.cat(learner)[None], torch.cat(behaviour)[None]
    result = logprob_mismatch(learner_values, behaviour_values, torch.ones_like(learner_values))
    weights = truncated_importance_weights(learner_values, behaviour_values, 2.0)
    result["tis_off_one"] = float(((weights - 1).abs() > 0.01).float().mean())
    result["seconds"] = seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(DEMO_CONFIG, [*PLAIN_GRPO, "max_minutes=null"])
    pool = PromptPool.from_config(config.data)
    state_dict, _ = warm_start(config, pool, log=lambda line: print(f"# {line}"))
    tokenizer = load_tokenizer(config.model)
    prompts = [encode_prompt(tokenizer, prompt.text) for prompt in pool.held_out[: args.prompts]]
    params = SamplingParams(
        temperature=1.0, max_new_tokens=config.rollout.max_new_tokens, stop=tuple(config.rollout.stop), seed=0
    )
    print(
        f"{len(prompts)} held-out prompts x 8 samples, temperature 1, up to {params.max_new_tokens} tokens; "
        "Δ = log π_learner − log π_engine per generated token"
    )
    print("| engine | dtype | tokens | k3 KL(engine ‖ learner) | mean abs Δ | max abs Δ | TIS weight ≠ 1 (>1 %) |")
    print("| ------ | ----- | ------ | ----------------------- | ---------- | --------- | --------------------- |")
    for dtype in ("float32", "bfloat16"):
        model = build_model(config.model.model_copy(update={"dtype": dtype}), tokenizer)
        model.load_state_dict({name: tensor.to(DTYPES[dtype]) for name, tensor in state_dict.items()})
        engines = {"torch": lambda m=model: TorchEngine(m, tokenizer)}
        directory = tempfile.TemporaryDirectory(prefix="orchard-mismatch-")
        if not args.no_vllm:
            from orchard.rollout.engines.vllm import VLLMEngine

            save_model(model, tokenizer, directory.name)
            engines["vLLM (CPU)"] = lambda path=directory.name, dtype=dtype: VLLMEngine(
                path, dtype=dtype, enforce_eager=True, eos_token_ids=(tokenizer.eos_id,)
            )
        for name, build in engines.items():
            engine = build()
            result = measure(engine, model, prompts, params)
            print(
                f"| {name} | {dtype} | {result['tokens']:,} | {result['k3']:.2e} | {result['abs_mean']:.2e} "
                f"| {result['abs_max']:.2e} | {result['tis_off_one'] * 100:.2f} % |",
                flush=True,
            )
            if hasattr(engine, "close"):
                engine.close()
        directory.cleanup()


if __name__ == "__main__":
    main()
