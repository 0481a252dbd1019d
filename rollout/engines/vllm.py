"""The vLLM engine behind `orchard.protocols.Engine` (GPU rollout workers).

Typed against vLLM 0.30.0 (the `gpu` extra pins it), as documented at
https://docs.vllm.ai/en/v0.30.0/api/vllm/ and https://docs.vllm.ai/en/v0.30.0/configuration/engine_args/:

- `vllm.LLM(model=..., dtype=..., gpu_memory_utilization=..., tensor_parallel_size=...,
  enable_prefix_caching=..., max_model_len=..., enforce_eager=..., seed=..., logprobs_mode=...,
  worker_extension_cls=...)`;
- `LLM.generate([TokensPrompt(prompt_token_ids=...)], SamplingParams(n=1, temperature, top_p,
  max_tokens, stop, logprobs=0, seed))` → one `RequestOutput` per prompt whose `outputs[0]` is a
  `CompletionOutput` with `token_ids`, `text`, `finish_reason` and `logprobs`: one
  `dict[token id, Logprob]` per generated token, holding at least the sampled token
  (`logprobs=0` asks for the sampled token alone);
- `logprobs_mode="processed_logprobs"`: logprobs of the distribution actually sampled from (after
  temperature and top-p), which is what the learner's importance ratios need; vLLM's default,
  `raw_logprobs`, is taken before temperature;
- in-place weight updates through a worker extension (`worker_extension_cls`, called with
  `LLM.collective_rpc(method, args=...)` on every tensor-parallel worker), whose methods call the
  model's own `load_weights(weights=iterable of (name, tensor))`, the pattern of vLLM's RLHF example
  (examples/offline_inference/rlhf.py and rlhf_utils.py).

- `SamplingParams(max_tokens=1, logprobs=k)` for DeepSearch's next-token candidates: the position's `k`
  most probable tokens (plus the sampled one) in `CompletionOutput.logprobs[0]`.

vLLM is imported only when an engine is built, so this module imports without it; the conversions of
vLLM's outputs into our records (`generations_from_request_outputs`, `next_tokens_from_request_outputs`)
are pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from orchard.protocols import GenerationOutput, SamplingParams

#: vLLM's finish reasons and ours ("abort" and others mean the request did not finish normally).
FINISH_REASONS = {"stop": "stop", "length": "length"}


def sampling_params_kwargs(params: SamplingParams) -> dict[str, Any]:
    """`vllm.SamplingParams` keyword arguments for `params`: one sample per prompt with its logprob."""
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "logprobs": 0,
        "seed": params.seed,
    }


def generations_from_request_outputs(request_outputs: Sequence[Any]) -> list[GenerationOutput]:
    """Our `GenerationOutput` for each vLLM `RequestOutput` (its first `CompletionOutput`), in order.

    Each position's logprob is the `Logprob.logprob` of the token sampled there, looked up by token
    id in that position's dict. A missing logprob, a non-finite one or an unknown finish reason is
    an error naming the request, never a silent zero: the learner's ratios depend on them.
    """
    generations = []
    for request in request_outputs:
        if not request.outputs:
            raise ValueError(f"vLLM request {request.request_id} returned no completion")
        completion = request.outputs[0]
        token_ids = [int(token) for token in completion.token_ids]
        positions = completion.logprobs
        if positions is None or len(positions) != len(token_ids):
            got = "none" if positions is None else len(positions)
            raise ValueError(
                f"vLLM request {request.request_id}: {len(token_ids)} tokens but {got} logprob entries; "
                "the engine must sample with SamplingParams(logprobs=0)"
            )
        logprobs = []
        for index, (token, entries) in enumerate(zip(token_ids, positions, strict=True)):
            entry = entries.get(token)
            if entry is None:
                raise ValueError(
                    f"vLLM request {request.request_id}: no logprob for sampled token {token} at position {index}"
                )
            value = float(entry.logprob)
            if not math.isfinite(value):
                raise ValueError(
                    f"vLLM request {request.request_id}: logprob {value} for token {token} at position {index}"
                )
            logprobs.append(value)
        reason = FINISH_REASONS.get(str(completion.finish_reason))
        if reason is None:
            raise ValueError(
                f"vLLM request {request.request_id} finished with {completion.finish_reason!r}, not 'stop' or 'length'"
            )
        generations.append(
            GenerationOutput(token_ids=token_ids, logprobs=logprobs, finish_reason=reason, text=completion.text or "")
        )
    return generations


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


class WeightLoaderExtension:
    """Methods vLLM mixes into each of its GPU workers (`worker_extension_cls`), called through
    `LLM.collective_rpc`. `self.model_runner.model` is the worker's model, whose `load_weights`
    takes Hugging Face names and handles vLLM's fused and sharded parameters."""

    def orchard_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        loaded = self.model_runner.model.load_weights(weights=named_tensors)  # type: ignore[attr-defined]
        return len(loaded) if loaded is not None else len(named_tensors)

    def orchard_join_broadcast(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> int:
        """Join the learner's weight broadcast group as rank `first_rank` + this worker's rank."""
        from vllm.distributed.parallel_state import get_world_group

        from rollout.weight_broadcast import BroadcastGroup

        rank = first_rank + get_world_group().rank
        self.orchard_broadcast = BroadcastGroup.join(host, port, rank, world_size, backend="nccl", timeout_s=timeout_s)
        return rank

    def orchard_receive_broadcast(self, version: int, layout: tuple, bucket_bytes: int) -> int:
        """Receive `version` from the broadcast, each tensor loaded as soon as its bytes arrived."""
        stream = self.orchard_broadcast.receive_tensors(version, layout, bucket_bytes)
        self.model_runner.model.load_weights(weights=stream)  # type: ignore[attr-defined]
        for _ in stream:  # a model that stops early must still take every bucket
            pass
        return version


class VLLMEngine:
    """Batched generation on vLLM with per-token logprobs of the sampling distribution; weights are
    replaced in place between calls (`load_weights`, or `receive_broadcast` on the NCCL transport)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        gpu_memory_utilization: float,
        tensor_parallel_size: int,
        enable_prefix_caching: bool,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        from vllm import LLM

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
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
        )
        self.tensor_parallel_size = tensor_parallel_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.policy_version = 0
        self.weights_valid = True
        self._has_loaded_weights = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        outputs = self.llm.generate(requests, VLLMSamplingParams(**sampling_params_kwargs(params)), use_tqdm=False)
        return generations_from_request_outputs(outputs)

    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, top_k: int
    ) -> list[list[tuple[int, float]]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        sampling = VLLMSamplingParams(**next_token_sampling_kwargs(params, top_k))
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return next_tokens_from_request_outputs(outputs, top_k)

    def _check_version(self, version: int) -> None:
        if version < self.policy_version or (version == self.policy_version and self._has_loaded_weights):
            raise ValueError(
                f"load_weights got version {version}, but the engine already holds policy version "
                f"{self.policy_version}; every update must carry a larger version"
            )

    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | Any, version: int) -> int:
        """Load a mapping of tensors or numpy arrays (the object-store path), or a weight source with
        `layout` and `copy_into` (shared memory), into every tensor-parallel worker in place."""
        self._check_version(version)
        if isinstance(state_dict, Mapping):
            named = [(name, torch.as_tensor(value)) for name, value in state_dict.items()]
        else:
            targets = {spec.name: torch.empty(spec.shape, dtype=spec.torch_dtype) for spec in state_dict.layout}
            version = int(state_dict.copy_into(targets))
            named = list(targets.items())
        self.weights_valid = False
        self.llm.collective_rpc("orchard_load_weights", args=(named,))
        self.llm.reset_prefix_cache()  # cached prefixes hold the old weights' keys and values
        self.weights_valid = True
        self.policy_version = version
        self._has_loaded_weights = True
        return version

    def join_broadcast(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> list[int]:
        """Every tensor-parallel worker joins the learner's broadcast group; returns their ranks."""
        return list(
            self.llm.collective_rpc("orchard_join_broadcast", args=(host, port, first_rank, world_size, timeout_s))
        )

    def receive_broadcast(self, version: int, layout: tuple, bucket_bytes: int) -> int:
        """Take version `version` from the learner's broadcast straight into the GPU workers.

        No version check first: a member that stayed out would leave the others waiting; the learner
        only ever broadcasts a version larger than the last (`WeightSync.publish`)."""
        self.weights_valid = False
        self.llm.collective_rpc("orchard_receive_broadcast", args=(version, layout, bucket_bytes))
        self.llm.reset_prefix_cache()
        self.weights_valid = True
        self.policy_version = version
        self._has_loaded_weights = True
        return version
