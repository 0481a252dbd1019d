"""`Elastic`: the number of rollout workers during a run, by request and by the autoscaling policy.

At every turn of the run loop (so no later than the next step boundary) it

1. finishes an addition the cluster has now placed, or records its refusal (`RolloutPool.poll`);
2. applies the newest request (`POST /v1/runs/{id}/workers`, `orchard scale`), already checked against
   the run's quota by the control plane;
3. with `rollout.autoscale`, closes the current window once it is `window_seconds` long and applies
   the policy's decision (`services/run/autoscale.py`); the window starts again after any change.

Every change is an event in `events.log`, a `ScaleChange` in the summary, and the metrics
`orchard_rollout_workers` and `orchard_rollout_scale_changes_total{direction, cause}`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from orchard.config import RunConfig
from orchard.services.control.run_control import RunControl
from orchard.services.metrics import RunMetrics
from orchard.services.run.autoscale import ScaleWindow, decide
from orchard.services.run.learners import LearnerGroup
from orchard.services.run.pool import RolloutPool
from orchard.services.run.throughput import Throughput


@dataclass(frozen=True)
class WindowStart:
    """The run's counters when the current window began."""

    wall: float
    learner_busy_seconds: float
    worker_busy_seconds: float
    stale_groups: int


class Elastic:
    def __init__(
        self,
        config: RunConfig,
        pool: RolloutPool,
        control: RunControl,
        metrics: RunMetrics,
        *,
        stale_groups: Callable[[], int],
        log: Callable[[str], None],
    ) -> None:
        """`stale_groups`: the buffer's count of groups dropped as stale so far."""
        self.config, self.pool, self.control, self.metrics = config, pool, control, metrics
        self.stale_groups, self.log = stale_groups, log
        self.refusal: str | None = None  # the latest addition refused, until one succeeds
        self._window: WindowStart | None = None
        self._cause = "request"  # of the change under way

    def turn(self, throughput: Throughput, learners: LearnerGroup) -> None:
        pool = self.pool
        if pool.pending is not None:
            before = len(pool.actors)
            refusal = pool.poll(learners)
            if refusal is not None:
                self.refusal = refusal
                self.metrics.observe_scale("refused", self._cause)
                self._restart_window(throughput)
            elif len(pool.actors) != before:
                self.refusal = None
                self.metrics.observe_scale("up", self._cause)
                self._restart_window(throughput)
            return
        requested = self.control.take_workers_request()
        if requested is not None and requested != pool.target:
            self._apply(requested, "request", f"requested {requested} workers", throughput, learners)
            return
        settings = self.config.rollout.autoscale
        if settings is None:
            return
        if self._window is None:
            self._restart_window(throughput)
        window = self._close_window(throughput)
        decision = decide(window, settings)
        if decision is not None:
            self._apply(decision.workers, "autoscale", f"autoscale: {decision.reason}", throughput, learners)
        elif window.seconds >= settings.window_seconds:  # a whole window and no change: the next one starts
            self._restart_window(throughput)

    def _apply(self, count: int, cause: str, reason: str, throughput: Throughput, learners: LearnerGroup) -> None:
        pool = self.pool
        before = len(pool.actors)
        self._cause = cause
        refusal = pool.scale_to(count, reason, learners)
        if refusal is not None:
            self.refusal = refusal
            self.metrics.observe_scale("refused", cause)
        elif len(pool.actors) != before:
            self.refusal = None
            self.metrics.observe_scale("up" if len(pool.actors) > before else "down", cause)
        self._restart_window(throughput)

    def _restart_window(self, throughput: Throughput) -> None:
        self._window = WindowStart(
            throughput.wall(), throughput.learner_busy_seconds, throughput.worker_busy_seconds, self.stale_groups()
        )

    def _close_window(self, throughput: Throughput) -> ScaleWindow:
        start = self._window
        seconds = throughput.wall() - start.wall
        long_enough = seconds >= self.config.rollout.autoscale.window_seconds
        return ScaleWindow(
            seconds=seconds,
            workers=len(self.pool.actors),
            learner_busy_seconds=throughput.learner_busy_seconds - start.learner_busy_seconds,
            worker_busy_seconds=throughput.worker_busy_seconds - start.worker_busy_seconds,
            # the buffer is asked only once the window is whole (decide() looks at nothing before)
            stale_groups=self.stale_groups() - start.stale_groups if long_enough else 0,
        )
