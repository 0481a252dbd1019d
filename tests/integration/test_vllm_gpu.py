"""vLLM on a GPU (`pip install .[gpu]`, bfloat16, its own engine processes): skipped without a CUDA GPU.

The same engine runs for real on CPUs in every test run (tests/integration/test_vllm_engine.py); this
checks what only a GPU has: bf16 kernels and the multi-process engine that loads weights through
`collective_rpc` into its worker processes."""

from __future__ import annotations

import os
import time

import pytest
import torch

from orchard.protocols import SamplingParams

pytestmark = pytest.mark.gpu

#: A small Hugging Face causal LM directory on local disk (vLLM loads it; nothing is downloaded).
MODEL_PATH = os.environ.get("ORCHARD_TEST_HF_MODEL")


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    if not MODEL_PATH:
        pytest.skip("set ORCHARD_TEST_HF_MODEL to a local Hugging Face checkpoint directory (e.g. Qwen2.5-0.5B)")
    from orchard.rollout.engines.vllm import VLLMEngine

    return VLLMEngine(
        MODEL_PATH,
        dtype="bfloat16",
        gpu_memory_utilization=0.5,
        tensor_parallel_size=1,
        enable_prefix_caching=True,
        max_model_len=512,
        enforce_eager=True,
    )


def test_vllm_generates_with_logprobs_and_loads_weights_in_place(engine):
    from transformers import AutoModelForCausalLM

    prompts = [[1, 2, 3, 4]] * 8
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1)
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"vLLM: {tokens} tokens in {seconds:.3f} s ({tokens / seconds:.0f} tok/s)")
    assert len(outputs) == 8 and all(len(o.token_ids) == len(o.logprobs) > 0 for o in outputs)
    assert all(lp <= 0 for o in outputs for lp in o.logprobs)

    model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=torch.bfloat16)
    state = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}
    assert engine.load_weights(state, 1) == 1  # all-zero weights: uniform next-token distribution
    greedy = engine.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_new_tokens=4, seed=2))
    vocabulary = model.config.vocab_size
    assert all(abs(lp + torch.log(torch.tensor(float(vocabulary)))) < 0.1 for lp in greedy[0].logprobs)
    assert engine.load_weights(model.state_dict(), 2) == 2


def test_vllm_next_token_candidates_are_its_most_probable_tokens(engine):
    """DeepSearch's 'prior' expansion on vLLM: the top logprobs of one position, most probable first, and
    the token vLLM samples at temperature 0 is the first of them."""
    prompt = [1, 2, 3, 4]
    [candidates] = engine.next_token_logprobs([prompt], SamplingParams(temperature=1.0), 8)
    assert len(candidates) == 8
    assert [lp for _, lp in candidates] == sorted((lp for _, lp in candidates), reverse=True)
    assert all(lp <= 0 for _, lp in candidates) and sum(torch.tensor(lp).exp() for _, lp in candidates) <= 1.0001
    [greedy] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=1))
    assert greedy.token_ids[0] == candidates[0][0]
