"""Second chances for prompts whose every sampled completion failed.

A group whose completions all fail carries no signal for group-relative losses: it is filtered out
and the prompt teaches nothing. A `Rescue` takes such prompts and has an idle rollout worker try
them another way — tree search (DeepSearch) or sampling with a hint in context (Guide, Scaf-GRPO).
Its groups go to the buffer like any others. The driver owns one `RescueQueue`; each rescue says
which prompts it takes and how it calls the worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchard.config import RunConfig
from orchard.protocols import Buffer
from orchard.records import Group, Prompt
from orchard.rollout.worker import RolloutResult
from orchard.services.metrics import RunMetrics


class Rescue:
    """One way of retrying all-fail prompts on a rollout worker.

    `wants` and `submit` make a rescue; the other methods are hooks into the run's data path, which do
    nothing unless a rescue needs them (DeepSearch's solution cache uses all of them)."""

    #: Names the kind of call in events and metrics, e.g. "search" or "hint".
    name: str

    def wants(self, group: Group) -> bool:
        """Whether this all-fail group's prompt should be retried this way."""
        raise NotImplementedError

    def submit(self, worker: Any, prompts: Sequence[Prompt]) -> Any:
        """Issue the call on `worker` (a `RolloutWorker` actor); returns the Ray ref of a `RolloutResult`."""
        raise NotImplementedError

    def open(self, buffer: Buffer, log: Callable[[str], None], metrics: RunMetrics) -> None:
        """Attach to the run as it starts: its buffer, event log and metrics."""

    def to_score(self, prompts: Sequence[Prompt], policy_version: int) -> dict[str, list[list[int]]]:
        """Completions (token ids, by prompt id) that a plain rollout of `prompts` at `policy_version`
        should also score with the policy it samples with (`RolloutResult.solution_logprobs`)."""
        return {}

    def on_plain(self, result: RolloutResult, groups: list[Group]) -> list[Group]:
        """A plain rollout's groups, seen (and possibly changed) before they are offered for rescue."""
        return groups

    def on_result(self, result: RolloutResult) -> None:
        """One of this rescue's own calls finished."""

    def claims(self, group: Group) -> bool:
        """Whether `group` is filtered by this rescue's `filter_reason` instead of the sampler's."""
        return False

    def filter_reason(self, group: Group) -> str | None:
        """Why a group this rescue claims is dropped, or None to keep it."""
        return None

    def step_figures(self, groups: Sequence[Group]) -> dict[str, Any]:
        """What this rescue adds to a learner step's record in metrics.jsonl (`groups`: the step's batch)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """What this rescue adds to the run's summary.json."""
        return {}

    def close(self) -> None:
        """The run ends: release what `open` took."""


def is_all_fail(group: Group) -> bool:
    return bool(group.completions) and not any(c.correct for c in group.completions)


@dataclass
class RescueQueue:
    """All-fail prompts waiting for a rescue, first come first served, at most `capacity` in all.

    A prompt already waiting is not queued twice; when the queue is full, new prompts are dropped
    (they come back through the prompt sampler like any other prompt).
    """

    rescues: list[Rescue]
    capacity: int = 256
    waiting: dict[str, deque[Prompt]] = field(default_factory=dict)
    queued_ids: set[str] = field(default_factory=set)
    dropped: int = 0

    def __post_init__(self) -> None:
        for rescue in self.rescues:
            self.waiting.setdefault(rescue.name, deque())

    def __len__(self) -> int:
        return sum(len(prompts) for prompts in self.waiting.values())

    def offer(self, groups: Sequence[Group]) -> int:
        """Queue the prompts of the all-fail groups that a rescue wants; returns how many were queued."""
        queued = 0
        for group in groups:
            if not is_all_fail(group) or group.prompt.id in self.queued_ids:
                continue
            rescue = next((r for r in self.rescues if r.wants(group)), None)
            if rescue is None:
                continue
            if len(self) >= self.capacity:
                self.dropped += 1
                continue
            self.waiting[rescue.name].append(group.prompt)
            self.queued_ids.add(group.prompt.id)
            queued += 1
        return queued

    def take(self, size: int) -> tuple[Rescue, list[Prompt]] | None:
        """Up to `size` waiting prompts of the rescue with the most waiting, or None when none wait."""
        rescue = max(self.rescues, key=lambda r: len(self.waiting[r.name]), default=None)
        if rescue is None or not self.waiting[rescue.name]:
            return None
        waiting = self.waiting[rescue.name]
        prompts = [waiting.popleft() for _ in range(min(size, len(waiting)))]
        self.queued_ids.difference_update(p.id for p in prompts)
        return rescue, prompts

    def by_name(self, name: str) -> Rescue:
        return next(r for r in self.rescues if r.name == name)

    # ------------------------------------------------------------------ every rescue's hooks, in order
    def open(self, buffer: Buffer, log: Callable[[str], None], metrics: RunMetrics) -> None:
        for rescue in self.rescues:
            rescue.open(buffer, log, metrics)

    def to_score(self, prompts: Sequence[Prompt], policy_version: int) -> dict[str, list[list[int]]]:
        wanted: dict[str, list[list[int]]] = {}
        for rescue in self.rescues:
            for prompt_id, completions in rescue.to_score(prompts, policy_version).items():
                wanted.setdefault(prompt_id, []).extend(completions)
        return wanted

    def on_plain(self, result: RolloutResult) -> list[Group]:
        groups = list(result.groups)
        for rescue in self.rescues:
            groups = rescue.on_plain(result, groups)
        return groups

    def owner(self, group: Group) -> Rescue | None:
        """The rescue whose filter applies to `group`, if any."""
        return next((r for r in self.rescues if r.claims(group)), None)

    def step_figures(self, groups: Sequence[Group]) -> dict[str, Any]:
        return {key: value for rescue in self.rescues for key, value in rescue.step_figures(groups).items()}

    def summary(self) -> dict[str, Any]:
        return {key: value for rescue in self.rescues for key, value in rescue.summary().items()}

    def close(self) -> None:
        for rescue in self.rescues:
            rescue.close()


def build_rescues(config: RunConfig) -> list[Rescue]:
    """The rescues a run's config asks for, in order of preference (the first that wants a prompt gets it)."""
    rescues: list[Rescue] = []
    if config.rollout.strategy == "mcts":  # DeepSearch: tree search, its solutions cached and replayed
        from orchard.services.rescue.deepsearch import SearchRescue

        rescues.append(SearchRescue(config))
    if config.learner.hints.enabled:  # Guide, Scaf-GRPO: sampled again with the prompt's hints in context
        from orchard.services.rescue.hints import HintRescue

        rescues.append(HintRescue(config))
    return rescues
