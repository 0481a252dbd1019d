"""Hints for all-fail prompts in a run (Guide, arXiv:2506.13923; Scaf-GRPO, arXiv:2510.19807; docs/algorithms.md §6).

`HintRescue` is the `Rescue` of `learner.hints.enabled`: a prompt whose plain group failed every
sample and that carries hints (procedural tasks do; JSONL lines may) is queued, and an idle worker
samples it again with its hints in context, most abstract first (`RolloutWorkerCore.rollout_with_hints`).
The hinted completions are recorded against the bare prompt with their hinted behaviour logprobs,
so the learner trains them as if the context had no hint, the importance ratio
`π_θ(o|q) / π_old(o|q,h)` correcting for it (`learner.algorithms.hint_clip_ranges`). A hinted group
then goes through the same filters as any group (dynamic sampling drops one that still failed
everywhere).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchard.config import RunConfig
from orchard.records import Group, Prompt
from orchard.services.rescue.queue import Rescue


@dataclass
class HintRescue(Rescue):
    """Sampling with hints in context for all-fail prompts that have hints, once a prompt has failed
    `learner.hints.after_failures` plain groups (Scaf-GRPO hints only where learning has stalled)."""

    config: RunConfig
    name: str = "hint"
    #: All-fail plain groups seen per prompt not yet hinted, oldest first; bounded by `max_tracked_prompts`.
    failures: OrderedDict[str, int] = field(default_factory=OrderedDict)
    max_tracked_prompts: int = 4096

    def wants(self, group: Group) -> bool:
        """Called for each all-fail plain group: True when its prompt has hints and has now failed often enough."""
        if not group.prompt.hints:
            return False
        prompt_id = group.prompt.id
        count = self.failures.pop(prompt_id, 0) + 1
        if count >= self.config.learner.hints.after_failures:
            return True
        self.failures[prompt_id] = count
        while len(self.failures) > self.max_tracked_prompts:
            self.failures.popitem(last=False)
        return False

    def submit(self, worker: Any, prompts: Sequence[Prompt]) -> Any:
        return worker.rollout_with_hints.remote(list(prompts))
