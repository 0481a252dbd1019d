"""The interfaces between Orchard's components.

Each protocol is small so that adapters (vLLM or torch engines, Redis or in-process buffers) can be
swapped without the rest of the system noticing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from orchard.records import Group, Prompt


@dataclass(frozen=True)
class SamplingParams:
    """How an engine samples. `max_new_tokens` bounds every completion."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: The caller may continue some of these sequences (prompt, completion and more tokens) in its next
    #: call, as a multi-turn trajectory does: an engine may keep what saves computing them again.
    resumable: bool = False


@dataclass
class GenerationOutput:
    """One generated sequence: token ids and the sampling distribution's logprob of each."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    text: str = ""


@runtime_checkable
class WeightSource(Protocol):
    """Weights an engine copies from instead of a mapping of tensors (the shared-memory store's
    `WeightHandle`, a weight broadcast's `BroadcastSource`).

    `layout`: a spec per tensor (`name`, `shape`, `torch_dtype`), checked before anything is copied;
    `copy_into(targets)` copies one consistent version, `version` or a newer one, into the tensors
    `targets` names and returns the version copied.
    """

    version: int
    layout: Sequence[Any]

    def copy_into(self, targets: Mapping[str, torch.Tensor]) -> int: ...


@runtime_checkable
class PinnableWeightSource(WeightSource, Protocol):
    """A weight source whose versions a reader on the same node may use in place: while `pinnable`,
    `pin()` returns read-only `views` of one complete `version` that the writer leaves alone until
    the pin's `release()`."""

    @property
    def pinnable(self) -> bool: ...

    def pin(self) -> Any: ...


@runtime_checkable
class Engine(Protocol):
    """Batched generation with per-token logprobs and in-place weight updates (`TorchEngine`,
    `VLLMEngine`).

    - `generate`: one completion per prompt (token ids), each token with the logprob of the
      distribution it was sampled from.
    - `next_token_logprobs`: per prompt, the `top_k` most probable next tokens under `params`'
      temperature and top-p as `(token id, logprob)`, most probable first, with the logprobs
      `generate` would report for them (DeepSearch's 'prior' expansion orders a node's children by
      them).
    - `token_logprobs`: per `(prompt, completion)`, the logprob `generate` would report for each
      completion token (re-scoring a cached solution under the current weights).
    - `load_weights`: become policy `version` (a mapping of tensors, or a `WeightSource`); returns the
      version held, which a weight source may make newer. A refused update raises and leaves the
      engine serving what it held.
    - `eos_token_ids` end a completion; `weights_valid` is False while a torn copy left the weights
      inconsistent; `has_loaded_weights` once any version was loaded; `receives_broadcast`: the
      engine's own worker processes join the learner's weight broadcast (`join_broadcast`,
      `receive_broadcast`), instead of taking it through `load_weights`.
    """

    policy_version: int
    eos_token_ids: tuple[int, ...]
    weights_valid: bool
    has_loaded_weights: bool
    receives_broadcast: bool

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]: ...

    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, top_k: int
    ) -> list[list[tuple[int, float]]]: ...

    def token_logprobs(
        self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], params: SamplingParams
    ) -> list[list[float]]: ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | WeightSource, version: int) -> int: ...


@runtime_checkable
class BroadcastEngine(Engine, Protocol):
    """An engine whose own worker processes take the learner's weight broadcast (`receives_broadcast`
    True: vLLM on GPUs): they join the group at ranks from `first_rank` on (returned), and receive
    each version straight into the engine, returning the version now held."""

    def join_broadcast(self, host: str, port: int, first_rank: int, world_size: int, timeout_s: float) -> list[int]: ...

    def receive_broadcast(self, version: int, layout: tuple, bucket_bytes: int) -> int: ...


@dataclass(frozen=True)
class VerifierResult:
    """A verifier's judgement: the reward, whether the answer is correct, and any error raised."""

    reward: float
    correct: bool
    error: str | None = None
    details: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Verifier(Protocol):
    """Scores a completion of a prompt. Must not raise on any model output."""

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult: ...


@runtime_checkable
class Buffer(Protocol):
    """The replay buffer: whole groups in, whole groups out, acknowledged after the learner step.

    `take` moves groups to a pending set; `ack` removes them for good; `requeue_pending` returns
    everything unacknowledged (after a learner restart) so that delivery is at-least-once.
    Groups older than `min_policy_version` are dropped at `take` and counted as stale.
    """

    def put(self, group: Group) -> None: ...

    def put_many(self, groups: Sequence[Group]) -> int:
        """Put several groups in one round trip; returns how many were new (not duplicates)."""

    def take(self, count: int, *, min_policy_version: int) -> list[Group]: ...

    def ack(self, group_ids: Sequence[str]) -> None: ...

    def requeue_pending(self) -> int: ...

    def ready_count(self, *, min_policy_version: int = 0) -> int: ...

    def pending_count(self) -> int: ...

    def stats(self) -> dict[str, int]: ...

    def record_prompt_stats(self, prompt_id: str, distribution: str, pass_rate: float, policy_version: int) -> None:
        """Count one observed pass rate of a prompt (and of its distribution) under a policy version."""

    def save_state(self, name: str, payload: bytes) -> None:
        """Keep `payload` under `name` (e.g. the curriculum's state), replacing what was there."""

    def load_state(self, name: str) -> bytes | None:
        """What `save_state` last kept under `name`, or None."""

    def close(self) -> None: ...
