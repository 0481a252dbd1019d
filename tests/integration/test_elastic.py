"""Rollout workers added and removed while a run trains, on a real local Ray (4 CPUs).

Each run executes in a thread of its own, as the control plane runs it, while the test asks its
`RunControl` for other numbers of workers and reads its progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from orchard.services.control.run_control import RunControl, RunState
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config

RUNNING = [
    "buffer.backend=memory",
    "max_steps=100000",  # ended by the test
    "eval.every_steps=1000",
    "checkpoint.every_steps=0",
]


class Background:
    """A driver running in a thread; `summary` once it has ended."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.driver.run()
        except BaseException as error:
            self.error = error

    def wait_for(self, condition: Callable[[Any], object], what: str, timeout: float = 180.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise AssertionError(f"the run failed while waiting for {what}") from self.error
            if self.driver.throughput is not None and (value := condition(self.driver.progress())):
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {self.driver.progress()}")

    def stop(self) -> dict[str, Any]:
        self.driver.control.request_stop()
        self.thread.join(180)
        if self.error is not None:
            raise self.error
        assert self.summary is not None, "the run did not end"
        return self.summary


def start(tmp_path, warm_cache, name: str, *overrides: str) -> Background:
    config = small_config(tmp_path, warm_cache, *RUNNING, *overrides)
    control = RunControl()
    return Background(Driver(config, RunDirectory(tmp_path, name), show_progress=False, control=control))


def test_scale_one_to_three_to_one_conserves_every_group(ray_local, tmp_path, warm_cache):
    # calls of 2 prompts: the admission gate lets 8 groups be in flight, so all three workers generate
    run = start(tmp_path, warm_cache, "scale", "rollout.prompts_per_call=2")
    run.wait_for(lambda p: p.step >= 2, "two steps on one worker")
    run.driver.control.request_workers(3)
    at_three = run.wait_for(lambda p: p.rollout_workers == 3 and p, "three workers")
    tokens = run.driver.metrics.rollout_tokens
    run.wait_for(
        lambda p: (
            p.step >= at_three.step + 4 and all(tokens.labels(worker=f"worker-{i}")._value.get() for i in range(3))
        ),
        "four steps on three workers, each of which has generated",
    )
    run.driver.control.request_workers(1)
    at_one = run.wait_for(lambda p: p.rollout_workers == 1 and p, "one worker again")
    run.wait_for(lambda p: p.step >= at_one.step + 2, "two steps after the removal")
    summary = run.stop()

    up, down = summary["scale_changes"]
    # every new worker loaded the newest version before its first call
    assert sorted(up["added"]) == ["worker-1", "worker-2"] and up["workers"] == 3
    assert set(up["added"].values()) == {up["policy_version"]}
    assert down["removed"] == ["worker-1", "worker-2"] and down["workers"] == 1
    assert summary["rollout_workers"] == 1
    # no group lost or duplicated: one group per prompt issued, and every group put is accounted for
    conservation(summary)
    assert summary["buffer"]["duplicates"] == 0
    assert summary["issued_prompts"] == summary["generated_groups"]
    assert summary["generated_groups"] == summary["buffer"]["put"] + sum(summary["filtered"].values())
    events = (run.driver.run_dir.path / "events.log").read_text()
    assert "rollout workers: 3, added worker-1" in events and "rollout workers: 1, removed worker-1, worker-2" in events


def test_an_addition_the_cluster_cannot_place_is_refused_whole(ray_local, tmp_path, warm_cache):
    run = start(tmp_path, warm_cache, "refused", "cluster.ready_timeout_seconds=3")
    run.wait_for(lambda p: p.step >= 1, "a step")
    run.driver.control.request_workers(8)  # 7 more CPUs; the cluster has 2 free
    refused = run.wait_for(lambda p: p.scaling_refused, "the refusal", timeout=60)
    assert "scaling to 8 rollout workers refused" in refused and "{'CPU': 1.0}" in refused
    progress = run.driver.progress()
    assert progress.rollout_workers == 1 and progress.rollout_workers_target == 1  # nothing half-applied
    steps = progress.step
    run.wait_for(lambda p: p.step >= steps + 2, "steps after the refusal")
    import ray

    time.sleep(1)
    assert ray.available_resources().get("CPU", 0) >= 2  # the reservation was given back
    summary = run.stop()
    assert summary["scale_changes"] == [] and summary["state"] == "stopped"
    assert run.driver.metrics.scale_changes.labels(direction="refused", cause="request")._value.get() == 1
    conservation(summary)


@pytest.fixture
def fault_injection(monkeypatch):
    monkeypatch.setenv("ORCHARD_FAULT_INJECTION", "1")


def test_a_removed_worker_that_dies_in_its_last_call_hands_its_prompts_back(
    ray_local, tmp_path, warm_cache, fault_injection
):
    # worker-1's calls take 10 s more than worker-0's: removed while it generates, it is still in its call
    # when the test kills it, and worker-0's calls and the learner's steps keep the loop turning meanwhile
    run = start(
        tmp_path,
        warm_cache,
        "hand-back",
        "rollout.num_workers=2",
        "rollout.prompts_per_call=2",
        "faults.rollout_delay_by_worker={worker-1: 10.0}",
    )
    run.wait_for(lambda p: p.step >= 1 and run.driver.pool.busy["worker-1"] > 0, "a step, and worker-1 in a call")
    pool = run.driver.pool
    run.driver.control.request_workers(1)
    retiring = run.wait_for(lambda p: pool.retiring.get("worker-1"), "worker-1 removed during its call", timeout=8)
    import ray

    ray.kill(retiring)
    run.wait_for(lambda p: "worker-1" not in pool.retiring, "worker-1's call given up", timeout=60)
    steps = run.driver.progress().step
    run.wait_for(lambda p: p.step >= steps + 2, "two steps on worker-0 alone")
    summary = run.stop()

    events = (run.driver.run_dir.path / "events.log").read_text()
    assert "removed rollout worker worker-1 died (WorkerDied) finishing its last call" in events
    assert "rollout worker worker-1 died" not in events.replace("removed rollout worker worker-1 died", "")
    assert summary["rollout_workers"] == 1 and summary["scale_changes"][-1]["removed"] == ["worker-1"]
    # its prompts went to worker-0: still one group per prompt issued, none lost or duplicated
    assert summary["issued_prompts"] == summary["generated_groups"]
    assert summary["buffer"]["duplicates"] == 0
    conservation(summary)


def test_a_scale_up_whose_workers_cannot_start_is_refused_and_the_run_goes_on(ray_local, tmp_path, warm_cache):
    from orchard.config import ModelConfig
    from orchard.rollout.worker import RolloutWorker

    run = start(tmp_path, warm_cache, "failed-start")
    run.wait_for(lambda p: p.step >= 1, "a step")
    pool = run.driver.pool
    real = pool._new_actor
    missing = ModelConfig(kind="hf", path=str(tmp_path / "no-such-model"))

    def new_actor(index: int, incarnation: int = 0, *, options: dict[str, Any]) -> Any:
        if index == 0:  # a restart of the running worker stays as it was
            return real(index, incarnation, options=options)
        return RolloutWorker.options(**options).remote(
            f"worker-{index}", missing, pool.config.rollout, prompt_format=pool.prompt_format
        )

    pool._new_actor = new_actor  # every added worker's process fails in its constructor: no model there
    run.driver.control.request_workers(2)
    refused = run.wait_for(lambda p: p.scaling_refused, "the refusal", timeout=120)
    assert "scaling to 2 rollout workers refused: new workers worker-1 failed to start or load" in refused
    assert "no-such-model" in refused
    progress = run.driver.progress()
    assert progress.rollout_workers == 1 and progress.rollout_workers_target == 1
    steps = progress.step
    run.wait_for(lambda p: p.step >= steps + 2, "steps after the refusal")
    import ray

    time.sleep(1)
    assert ray.available_resources().get("CPU", 0) >= 2  # the new worker's bundle was given back
    summary = run.stop()
    assert summary["state"] == "stopped" and summary["scale_changes"] == []
    conservation(summary)


AUTOSCALE = "rollout.autoscale={min: 1, max: 2, window_seconds: 6}"


def test_autoscaling_adds_a_worker_while_the_learner_waits_for_slow_workers(
    ray_local, tmp_path, warm_cache, fault_injection
):
    run = start(tmp_path, warm_cache, "slow-worker", AUTOSCALE, "faults.rollout_delay_seconds=1.5")
    run.wait_for(lambda p: p.rollout_workers == 2, "a second worker", timeout=120)
    summary = run.stop()
    (change,) = summary["scale_changes"][:1]
    assert change["added"] == {"worker-1": change["policy_version"]}
    assert "the learner waits for data" in change["reason"]
    assert run.driver.metrics.scale_changes.labels(direction="up", cause="autoscale")._value.get() >= 1
    conservation(summary)


def test_autoscaling_removes_a_worker_the_slow_learner_cannot_use(ray_local, tmp_path, warm_cache, fault_injection):
    run = start(
        tmp_path, warm_cache, "slow-learner", AUTOSCALE, "rollout.num_workers=2", "faults.learner_step_delay_seconds=2"
    )
    run.wait_for(lambda p: p.rollout_workers == 1, "the second worker removed", timeout=120)
    summary = run.stop()
    change = summary["scale_changes"][0]
    assert change["removed"] == ["worker-1"] and change["workers"] == 1
    assert "outpace the learner" in change["reason"] or "went stale" in change["reason"]
    assert run.driver.metrics.scale_changes.labels(direction="down", cause="autoscale")._value.get() >= 1
    assert summary["issued_prompts"] == summary["generated_groups"]
    conservation(summary)


def test_a_run_that_cannot_be_placed_waits_in_pending_saying_why(ray_local, tmp_path, warm_cache):
    blocker = start(tmp_path, warm_cache, "blocker", "cluster.placement_groups=true", "rollout.num_workers=2")
    blocker.wait_for(lambda p: p.step >= 1, "the first run's first step")  # holds 3 of the 4 CPUs
    waiting = start(tmp_path, warm_cache, "waiting", "cluster.placement_groups=true")
    control: RunControl = waiting.driver.control
    deadline = time.monotonic() + 120
    while control.pending_reason is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert control.state is RunState.PENDING
    assert "waiting for the cluster to place" in control.pending_reason and "'CPU': 1.0" in control.pending_reason
    blocker.stop()
    waiting.wait_for(lambda p: p.step >= 1, "the waiting run's first step once the first run ended")
    assert control.pending_reason is None and control.state is RunState.RUNNING
    summary = waiting.stop()
    conservation(summary)
