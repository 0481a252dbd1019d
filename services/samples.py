"""Rollouts a person can read: a few recent groups written to `runs/<id>/samples.jsonl` at every
evaluation, each prompt rendered exactly as the model saw it (chat template, system prompt and prompt
template included), with a completion, its reward and its distribution.

`SampleKeeper` keeps the newest groups the driver received; `sample_records` picks one completion of each
of the newest distinct prompts as plain records (what `samples.jsonl`, the trackers and `orchard
samples` show).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from orchard.records import Group, Prompt

#: Groups kept between evaluations to pick samples from.
KEPT_GROUPS = 64


class SampleKeeper:
    """The newest groups the rollout workers produced (whether the filters kept them or not)."""

    def __init__(self, capacity: int = KEPT_GROUPS) -> None:
        self.groups: deque[Group] = deque(maxlen=capacity)

    def observe(self, groups: Iterable[Group]) -> None:
        self.groups.extend(groups)


def sample_records(
    groups: Iterable[Group], count: int, *, step: int, render: Callable[[Prompt], str]
) -> list[dict[str, Any]]:
    """Up to `count` samples, newest first, from distinct prompts: per group the first completion
    that differs from the group's majority verdict when there is one (a success among failures is
    the interesting one), else its first completion."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for group in reversed(list(groups)):
        if len(records) >= count:
            break
        if group.prompt.id in seen or not group.completions:
            continue
        seen.add(group.prompt.id)
        majority = group.pass_rate >= 0.5
        completion = next((c for c in group.completions if c.correct != majority), group.completions[0])
        records.append(
            {
                "step": step,
                "policy_version": completion.policy_version,
                "distribution": group.prompt.distribution,
                "prompt_id": group.prompt.id,
                "prompt": render(group.prompt),
                "completion": completion.text,
                "reward": completion.reward,
                "correct": completion.correct,
                "finish_reason": completion.finish_reason,
                "source": completion.source,
                "group_pass_rate": group.pass_rate,
            }
        )
    return records


def format_samples(records: Iterable[dict[str, Any]]) -> str:
    """Samples as text for a terminal: a header line per sample, then the prompt and the completion."""
    blocks = []
    for record in records:
        verdict = "correct" if record["correct"] else "wrong"
        header = (
            f"--- step {record['step']}  {record['distribution']}  reward {record['reward']:.3f} ({verdict})"
            f"  group pass rate {record['group_pass_rate']:.2f}  prompt {record['prompt_id']}"
        )
        blocks.append(f"{header}\n[prompt]\n{record['prompt']}\n[completion]\n{record['completion']}")
    return "\n\n".join(blocks)
