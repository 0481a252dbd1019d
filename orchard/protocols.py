"""The interfaces between Orchard's components.

Each protocol is small so that adapters (vLLM or torch engines, Redis or in-process buffers) can be
swapped without the rest of the system noticing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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


@dataclass
class GenerationOutput:
    """One generated sequence: token ids and the sampling distribution's logprob of each."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    text: str = ""


@runtime_checkable
class Engine(Protocol):
    """Batched generation with per-token logprobs and in-place weight updates.

    `next_token_logprobs` lists, per prompt, the `top_k` most probable next tokens under `params`'
    temperature and top-p as `(token id, logprob)`, most probable first, with the logprobs `generate`
    would report for them (DeepSearch's 'prior' expansion orders a node's children by them).
    """

    policy_version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[GenerationOutput]: ...

    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, top_k: int
    ) -> list[list[tuple[int, float]]]: ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None: ...


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


@runtime_checkable
class Scheduler(Protocol):
    """Chooses which prompts to roll out next and learns from the learner's statistics."""

    def next_prompts(self, count: int) -> list[Prompt]: ...

    def observe(self, groups: Sequence[Group], advantages: Sequence[float]) -> None: ...
