"""The autoscaling rule as a pure function, on hand-made windows."""

from __future__ import annotations

import pytest

from orchard.config import AutoscaleConfig, ConfigError, load_config
from orchard.services.run.autoscale import ScaleWindow, decide

SETTINGS = AutoscaleConfig(min=1, max=3, target_learner_idle=0.2, max_worker_idle=0.5, window_seconds=10)


def window(*, learner_busy: float, worker_busy: float, workers: int = 2, stale: int = 0, seconds: float = 10):
    return ScaleWindow(
        seconds=seconds,
        workers=workers,
        learner_busy_seconds=learner_busy,
        worker_busy_seconds=worker_busy,
        stale_groups=stale,
    )


def test_idle_shares_are_computed_over_the_window():
    shown = window(learner_busy=7.5, worker_busy=12, workers=2)
    assert shown.learner_idle == pytest.approx(0.25)  # 1 - 7.5/10
    assert shown.worker_idle == pytest.approx(0.4)  # 1 - 12/(2*10)
    assert "learner idle 25%, workers idle 40%" in shown.describe()
    clamped = window(learner_busy=11, worker_busy=25)  # a step that began before the window
    assert clamped.learner_idle == 0.0 and clamped.worker_idle == 0.0


def test_a_waiting_learner_and_busy_workers_add_one():
    decision = decide(window(learner_busy=5, worker_busy=19), SETTINGS)  # learner idle 50 %, workers 5 %
    assert decision.workers == 3 and decision.direction == "up"
    assert "the learner waits for data" in decision.reason


def test_idle_workers_and_a_busy_learner_remove_one():
    decision = decide(window(learner_busy=9.5, worker_busy=6), SETTINGS)  # learner idle 5 %, workers 70 %
    assert decision.workers == 1 and decision.direction == "down"
    assert "outpace the learner" in decision.reason


def test_stale_groups_remove_one_whatever_the_shares():
    decision = decide(window(learner_busy=5, worker_busy=19, stale=3), SETTINGS)
    assert decision.workers == 1 and "went stale" in decision.reason


def test_both_idle_or_both_busy_keep():
    assert decide(window(learner_busy=2, worker_busy=4), SETTINGS) is None  # e.g. evaluating
    assert decide(window(learner_busy=9, worker_busy=19), SETTINGS) is None  # balanced


def test_bounds_hold():
    assert decide(window(learner_busy=5, worker_busy=29, workers=3), SETTINGS) is None  # at max
    assert decide(window(learner_busy=9.5, worker_busy=2, workers=1), SETTINGS) is None  # at min
    below = decide(window(learner_busy=0, worker_busy=0, workers=1, seconds=0), AutoscaleConfig(min=2, max=3))
    assert below.workers == 2 and below.direction == "up"  # at once, before any window
    above = decide(window(learner_busy=0, worker_busy=0, workers=5, seconds=0), SETTINGS)
    assert above.workers == 3 and above.direction == "down"


def test_nothing_before_a_whole_window():
    assert decide(window(learner_busy=0, worker_busy=9.9, seconds=9.9), SETTINGS) is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"min \(3\) exceeds max \(2\)"):
        AutoscaleConfig(min=3, max=2)
    with pytest.raises(ConfigError, match="rollout.autoscale.max: 4 rollout workers exceed the run's quota"):
        load_config(None, ["rollout.autoscale={max: 4}", "cluster.max_rollout_workers=3"])
    with pytest.raises(ConfigError, match="faults.learner_step_delay_seconds injects failures"):
        load_config(None, ["faults.learner_step_delay_seconds=1"])
