"""The autoscaling policy of the rollout workers (`rollout.autoscale`), as a pure rule.

Over a window of the RL phase's wall time (evaluation excluded) the driver measures

    learner idle  = 1 − learner busy seconds / window seconds
    worker idle   = 1 − Σ worker busy seconds / (workers × window seconds)
    stale         = groups the buffer dropped as too stale in the window

and the rule is

    add one worker     when learner idle > target_learner_idle and worker idle ≤ max_worker_idle
                       (the learner waits for data and the workers are all generating),
    remove one worker  when stale > 0, or worker idle > max_worker_idle and learner idle ≤ target_learner_idle
                       (the workers make more than the learner can take: the admission gate holds
                       them back, or what they made went stale),

within [min, max], one worker per window; the window starts again after every change, so each
decision looks at the run as it is since the last one. When both are idle (the run is evaluating,
or waiting on something else) nothing changes: another worker would not help.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchard.config import AutoscaleConfig


@dataclass(frozen=True)
class ScaleWindow:
    """What the run did over one window, with `workers` rollout workers throughout."""

    seconds: float
    workers: int
    learner_busy_seconds: float
    worker_busy_seconds: float
    stale_groups: int

    @property
    def learner_idle(self) -> float:
        return min(1.0, max(0.0, 1.0 - self.learner_busy_seconds / self.seconds)) if self.seconds > 0 else 0.0

    @property
    def worker_idle(self) -> float:
        capacity = self.workers * self.seconds
        return min(1.0, max(0.0, 1.0 - self.worker_busy_seconds / capacity)) if capacity > 0 else 0.0

    def describe(self) -> str:
        return (
            f"over {self.seconds:.0f} s with {self.workers} workers: learner idle {self.learner_idle:.0%}, "
            f"workers idle {self.worker_idle:.0%}, {self.stale_groups} groups went stale"
        )


@dataclass(frozen=True)
class ScaleDecision:
    """Change the number of rollout workers to `workers` ("up" or "down"), because of `reason`."""

    workers: int
    direction: str
    reason: str


def decide(window: ScaleWindow, settings: AutoscaleConfig) -> ScaleDecision | None:
    """The change the policy makes after `window`, or None (keep; also before a whole window has passed)."""
    workers = window.workers
    if workers < settings.min:
        return ScaleDecision(settings.min, "up", f"{workers} workers are below rollout.autoscale.min={settings.min}")
    if workers > settings.max:
        return ScaleDecision(settings.max, "down", f"{workers} workers are above rollout.autoscale.max={settings.max}")
    if window.seconds < settings.window_seconds:
        return None
    learner_waits = window.learner_idle > settings.target_learner_idle
    workers_wait = window.worker_idle > settings.max_worker_idle
    if workers > settings.min and (window.stale_groups > 0 or (workers_wait and not learner_waits)):
        why = "groups went stale in the buffer" if window.stale_groups > 0 else "the workers outpace the learner"
        return ScaleDecision(workers - 1, "down", f"one worker removed, {why} ({window.describe()})")
    if workers < settings.max and learner_waits and not workers_wait:
        return ScaleDecision(workers + 1, "up", f"one worker added, the learner waits for data ({window.describe()})")
    return None
