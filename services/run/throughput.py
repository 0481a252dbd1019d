"""Counters over a run's RL phase, from which its rates are derived."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Throughput:
    """Counters over the RL phase, from which the summary's rates are derived."""

    started: float = field(default_factory=time.perf_counter)
    learner_busy_seconds: float = 0.0
    worker_busy_seconds: float = 0.0  # summed over workers: generating and verifying
    issued_prompts: int = 0  # prompts given to workers the first time (not again after a worker died)
    eval_seconds: float = 0.0
    generated_tokens: int = 0
    generated_groups: int = 0
    signal_groups: int = 0  # generated groups with non-zero advantage (the effective ratio's numerator)
    trained_groups: int = 0
    trained_tokens: int = 0
    #: Multi-turn rollouts: tool calls by "tool/outcome".
    tool_calls: dict[str, int] = field(default_factory=dict)

    def count_tool_calls(self, calls: dict[tuple[str, str], int]) -> None:
        for (tool, outcome), count in calls.items():
            key = f"{tool}/{outcome}"
            self.tool_calls[key] = self.tool_calls.get(key, 0) + count

    def wall(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds

    def per_second(self, count: float) -> float:
        """`count` over the wall time so far (0 before any time has passed)."""
        wall = self.wall()
        return count / wall if wall > 0 else 0.0

    def effective_ratio(self) -> float:
        """The share of generated groups with a learning signal."""
        return self.signal_groups / max(1, self.generated_groups)

    def learner_idle_fraction(self) -> float:
        wall = self.wall()
        return max(0.0, 1.0 - self.learner_busy_seconds / wall) if wall > 0 else 0.0
