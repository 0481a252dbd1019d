"""The run loop without Ray: its port is a fake run on a virtual clock (rollouts, learner steps and weight
pushes take set times; the earliest to end finishes first), with the real buffer, gate, run control and
checkpoints (the learner's part of a checkpoint is a file)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchard.records import Completion, Group, Prompt
from orchard.services.buffer.memory import MemoryBuffer
from orchard.services.control.run_control import RunControl, RunState
from orchard.services.run.admission import AdmissionGate
from orchard.services.run.checkpoints import Checkpoints, DriverState, latest_checkpoint, read_step
from orchard.services.run.loop import LearnerDied, LoopStalled, Rollout, RunLoop, Step, WeightPush, WorkerDied
from orchard.services.run_dir import RunDirectory


@dataclass
class Faults:
    """Which calls fail: by their order among calls of their kind (1 for the first)."""

    rollouts: set[int] = field(default_factory=set)  # the worker's process dies during the call
    steps: set[int] = field(default_factory=set)  # the learner's process dies during the step
    checkpoints: set[int] = field(default_factory=set)  # ... or while checkpointing
    replacements: set[int] = field(default_factory=set)  # ... before a replaced worker got its weights


class FakeRun:
    """`RunPort` on a virtual clock: every call ends after its kind's duration."""

    def __init__(
        self,
        run_dir: RunDirectory,
        *,
        workers: int = 2,
        per_call: int = 2,
        batch: int = 4,
        staleness: int = 1,
        capacity: int = 8,
        rollout_seconds: float = 1.0,
        step_seconds: float = 1.0,
        push_seconds: float = 0.1,
        checkpoint_every: int = 2,
        max_steps: int = 8,
        faults: Faults | None = None,
    ) -> None:
        self.gate = AdmissionGate.of(batch, staleness, capacity)
        self.control = RunControl()
        self.control.start()
        self.buffer = MemoryBuffer()
        self.run_dir = run_dir
        self.checkpoints = Checkpoints(run_dir, self.buffer, self._save_learner, keep_last=0)
        self.per_call, self.max_steps, self.checkpoint_every = per_call, max_steps, checkpoint_every
        self.seconds = {"rollout": rollout_seconds, "step": step_seconds, "push": push_seconds}
        self.faults = faults or Faults()
        self.calls: Counter[str] = Counter()
        self.now = 0.0
        self._sequence = itertools.count()
        self._generates_with: dict[tuple, int] = {}  # rollout handle -> the version it generates with
        self.policy_version = 0
        self.learners = 0  # learner restarts so far
        self.published = 0  # the newest version ever published (a restarted learner continues above it)
        self.step = 0
        self.scheduled = {f"worker-{index}": 0 for index in range(workers)}
        self.loaded = dict(self.scheduled)
        self.incarnation: Counter[str] = Counter()
        self.trained: list[tuple[int, list[int]]] = []  # (version training, versions of the batch's groups)
        self.steps_in_flight = 0
        self.rollouts_in_flight = 0
        self.overlap = False  # a rollout and a learner step in flight together
        self.peak_admitted = 0  # fresh ready groups plus groups in flight, after each admission
        self.events: list[str] = []
        self.died: list[tuple[str, list[str]]] = []  # (worker, prompt ids) of calls whose worker died
        self.repeated: list[tuple[str, list[str]]] = []  # (worker, prompt ids) of calls started again
        self.generating = 0
        self.on_step: dict[int, object] = {}  # step -> callable run when it finishes
        self.on_pause = self.control.request_resume

    def done(self) -> bool:
        return self.step >= self.max_steps

    def loop(self) -> RunLoop:
        return RunLoop(self, self.gate, self.control, self.done)

    # ------------------------------------------------------------------ RunPort
    def scheduled_versions(self) -> dict[str, int]:
        return self.scheduled

    def fresh_ready(self, min_policy_version: int) -> int:
        return self.buffer.ready_count(min_policy_version=min_policy_version)

    def start_step(self, count: int, min_policy_version: int) -> Step:
        groups = self.buffer.take(count, min_policy_version=min_policy_version)
        self.steps_in_flight += 1
        self.overlap |= self.rollouts_in_flight > 0
        return Step(groups, self.now, self._handle("step"), learner=self.learners)

    def start_rollout(self, worker: str, again: Rollout | None = None) -> Rollout:
        prompts = (
            again.prompts
            if again is not None
            else [Prompt(id=f"p{next(self._sequence)}", text="1+1=", answer="2", distribution="d")] * self.per_call
        )
        if again is not None:
            self.repeated.append((worker, [prompt.id for prompt in again.prompts]))
        handle = self._handle("rollout")
        self._generates_with[handle] = self.scheduled[worker]
        self.rollouts_in_flight += 1
        self.overlap |= self.steps_in_flight > 0
        target = self.gate.training_version(self.policy_version, learner_busy=self.steps_in_flight > 0)
        fresh = self.fresh_ready(self.gate.oldest_trainable(target))
        self.generating += len(prompts)
        self.peak_admitted = max(self.peak_admitted, fresh + self.generating)
        return Rollout(worker, "sample", prompts, handle, incarnation=self.incarnation[worker])

    def wait(self, calls):
        call = min(calls, key=lambda call: call.handle)
        self.now = call.handle[0]
        return call

    def finish_rollout(self, call: Rollout) -> None:
        self.rollouts_in_flight -= 1
        self.calls["rollouts finished"] += 1
        if self.calls["rollouts finished"] in self.faults.rollouts:
            self.died.append((call.worker, [prompt.id for prompt in call.prompts]))
            raise WorkerDied(f"{call.worker} killed")
        self.generating -= len(call.prompts)
        version = self._generates_with[call.handle]
        self.buffer.put_many(group(prompt, version, call.worker) for prompt in call.prompts)

    def replace_worker(self, call: Rollout, error: BaseException) -> bool:
        self.generating -= len(call.prompts)  # start_rollout counts them again
        if call.incarnation == self.incarnation[call.worker]:
            self.incarnation[call.worker] += 1
            self.calls["replacements"] += 1
            self.events.append(f"{call.worker} restarted: {error}")
            if self.calls["replacements"] in self.faults.replacements:
                raise LearnerDied(f"the learner died; the weights for the new {call.worker} went with it")
            self.scheduled[call.worker] = self.loaded[call.worker] = self.published
        return True

    def scale(self) -> None:
        self.calls["scale turns"] += 1

    def finish_push(self, call: WeightPush) -> None:
        self.calls["pushes finished"] += 1
        self.loaded[call.worker] = max(self.loaded[call.worker], call.version)

    def finish_step(self, call: Step) -> list[WeightPush]:
        self.steps_in_flight -= 1
        if call.learner != self.learners:  # taken by a learner since replaced: its groups were requeued
            self.calls["steps lost"] += 1
            return []
        self.calls["steps finished"] += 1
        if self.calls["steps finished"] in self.faults.steps:
            raise LearnerDied("learner killed during a step")
        self.trained.append((self.policy_version, [g.policy_version for g in call.groups]))
        self.checkpoints.trained(g.id for g in call.groups)
        self.step += 1
        self.policy_version = self.published = self.published + 1
        if self.step in self.on_step:
            self.on_step.pop(self.step)()
        return self._push()

    def at_step_boundary(self) -> None:
        if self.step % self.checkpoint_every == 0:
            state = DriverState(self.step, self.policy_version, Counter(), (3, (0,), None), (0.0, {}))
            self.checkpoints.commit(state, "periodic")

    def _save_learner(self, path: Path) -> None:
        self.calls["checkpoints"] += 1
        if self.calls["checkpoints"] in self.faults.checkpoints:
            raise LearnerDied("learner killed while checkpointing")
        path.mkdir(parents=True)
        (path / "learner").write_text(f"step {self.step}")

    def replace_learner(self, error: BaseException) -> list[WeightPush]:
        self.learners += 1
        requeued = self.buffer.requeue_pending()
        self.checkpoints.forget_trained()
        checkpoint = latest_checkpoint(self.run_dir)
        self.step = read_step(checkpoint) if checkpoint is not None else 0
        self.policy_version = self.published = self.published + 1
        self.events.append(f"learner restarted at step {self.step}, {requeued} groups requeued: {error}")
        return self._push()

    def wait_while_paused(self) -> None:
        self.events.append(f"paused at step {self.step}")
        self.on_pause()

    def describe(self) -> str:
        return f"buffer {self.buffer.stats()}"

    def _push(self) -> list[WeightPush]:
        pushes = []
        for worker in self.scheduled:
            self.scheduled[worker] = self.policy_version
            pushes.append(WeightPush(worker, self.policy_version, self._handle("push"), self.incarnation[worker]))
        self.calls["pushes issued"] += len(pushes)
        return pushes

    def _handle(self, kind: str) -> tuple[float, int]:
        return (self.now + self.seconds[kind], next(self._sequence))


def group(prompt: Prompt, version: int, worker: str) -> Group:
    completions = [
        Completion(text="2", token_ids=[5], logprobs=[-0.5], policy_version=version, reward=r, correct=bool(r))
        for r in (0.0, 1.0)
    ]
    return Group(prompt=prompt, prompt_token_ids=[1, 2], completions=completions, worker=worker)


def test_synchronous_loop_never_overlaps_and_trains_only_on_the_current_policy(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), staleness=0, capacity=64, rollout_seconds=1.0, step_seconds=3.0)
    run.loop().run()
    assert run.step == 8
    assert not run.overlap
    assert all(version == trained for trained, versions in run.trained for version in versions)
    assert run.peak_admitted <= run.gate.batch_groups  # capacity is one batch when synchronous


def test_asynchronous_loop_overlaps_within_its_staleness_and_capacity(tmp_path):
    run = FakeRun(
        RunDirectory(tmp_path, "run"),
        staleness=1,
        capacity=8,
        workers=3,
        per_call=2,
        rollout_seconds=1.0,
        step_seconds=2.5,
        max_steps=10,
    )
    run.loop().run()
    assert run.step == 10 and run.overlap
    staleness = [trained - version for trained, versions in run.trained for version in versions]
    assert max(staleness) == 1 and min(staleness) >= 0
    assert run.peak_admitted < run.gate.capacity + run.per_call  # checked before a call's groups are added
    assert run.peak_admitted >= run.gate.capacity  # ... and the bound is reached (the learner is the bottleneck)


@pytest.mark.parametrize("staleness", [1, 2])
def test_a_learner_bound_run_generates_no_group_that_goes_stale(tmp_path, staleness):
    """Workers twice as fast as the learner, a capacity of four batches: the gate admits only what the
    next batches can take before it ages out, so every group put is trained (or still ready at the end)."""
    run = FakeRun(
        RunDirectory(tmp_path, "run"),
        staleness=staleness,
        capacity=64,
        workers=2,
        per_call=8,
        batch=16,
        rollout_seconds=1.0,
        step_seconds=3.0,
        max_steps=20,
    )
    run.loop().run()
    stats = run.buffer.stats()
    assert stats["stale"] == 0
    assert stats["put"] == stats["taken"] + stats["ready"] and stats["ready"] <= staleness * 16
    # the first batch, then 20 steps back to back (the learner never waits), then the last push
    assert run.now == pytest.approx(1.0 + 20 * 3.0 + 0.1)
    staleness_seen = [trained - version for trained, versions in run.trained for version in versions]
    assert max(staleness_seen) == staleness


def test_the_loop_stops_at_its_end_with_nothing_left_in_flight(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), max_steps=3)
    loop = run.loop()
    loop.run()
    assert run.step == 3 and loop.in_flight == []
    assert run.rollouts_in_flight == 0 and run.steps_in_flight == 0


def test_a_dead_workers_call_runs_again_on_its_replacement(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), faults=Faults(rollouts={3}))
    run.loop().run()
    assert run.step == 8
    [(worker, prompt_ids)] = run.died
    assert run.repeated == [(worker, prompt_ids)]
    assert run.incarnation == Counter({worker: 1})
    assert run.events == [f"{worker} restarted: {worker} killed"]


def test_a_replaced_worker_whose_weights_died_with_the_learner_gets_the_new_learners_and_its_call_again(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), faults=Faults(rollouts={3}, replacements={1}))
    run.loop().run()
    assert run.step == 8
    [(worker, prompt_ids)] = run.died
    assert run.repeated == [(worker, prompt_ids)]
    assert any(event.startswith("learner restarted") and "went with it" in event for event in run.events)
    assert all(version == run.published for version in run.loaded.values())  # the new worker too
    assert run.buffer.stats()["acked"] == 8 * run.gate.batch_groups and run.buffer.pending_count() == 0


def test_a_learner_dying_in_a_step_restarts_from_the_checkpoint_and_its_groups_are_trained_again(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), checkpoint_every=2, faults=Faults(steps={3}))
    run.loop().run()
    assert run.step == 8
    assert any(event.startswith("learner restarted at step 2, 4 groups requeued") for event in run.events)
    assert run.published == 9  # 8 steps, one of them lost, and one version for the restored weights
    # the lost step's groups were requeued and trained again: every trained group acknowledged once
    assert run.buffer.stats()["acked"] == 8 * run.gate.batch_groups and run.buffer.pending_count() == 0


def test_a_learner_dying_at_a_checkpoint_keeps_the_steps_weight_pushes_in_flight(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), checkpoint_every=2, faults=Faults(checkpoints={2}), max_steps=6)
    run.loop().run()
    assert run.step == 6
    assert any(event.startswith("learner restarted at step 2") for event in run.events)
    # steps 1-4, 3-6 again after the restart to step 2, and the restored weights: 9 versions to 2 workers
    assert run.calls["pushes finished"] == run.calls["pushes issued"] == 9 * 2
    assert all(version == run.published for version in run.loaded.values())


def test_groups_are_acknowledged_only_by_a_checkpoint(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), checkpoint_every=3, max_steps=7)
    acknowledged = []
    for step in range(1, 8):
        run.on_step[step] = lambda: acknowledged.append(run.buffer.stats()["acked"])
    run.loop().run()
    batch = run.gate.batch_groups
    # seen as each step ends, before its checkpoint: steps 1-3 acknowledged by step 3's, 4-6 by step 6's
    assert acknowledged == [0, 0, 0, 3 * batch, 3 * batch, 3 * batch, 6 * batch]
    assert run.buffer.pending_count() == batch  # step 7's: no checkpoint since
    assert run.checkpoints.paths == [str(tmp_path / "run" / "checkpoints" / f"step-{n}") for n in (3, 6)]
    assert [read_step(Path(path)) for path in run.checkpoints.paths] == [3, 6]


def test_a_paused_run_drains_what_is_in_flight_then_waits_and_resumes(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), max_steps=6)
    started_while_paused = []
    original_start = run.start_rollout

    def start_rollout(worker, again=None):
        if run.control.state is not RunState.RUNNING and again is None:
            started_while_paused.append(worker)
        return original_start(worker, again)

    run.start_rollout = start_rollout
    run.on_step[2] = run.control.request_pause
    run.loop().run()
    # the step in flight when the pause was asked for (if any) completes first
    assert run.events in (["paused at step 2"], ["paused at step 3"])
    assert started_while_paused == []
    assert run.rollouts_in_flight == 0
    assert run.step == 6


def test_a_stop_requested_while_paused_ends_the_loop(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"), max_steps=10)
    run.on_step[2] = run.control.request_pause
    run.on_pause = run.control.request_stop
    run.loop().run()
    assert run.step in (2, 3) and run.control.stop_requested()


def test_a_loop_that_can_never_progress_says_so(tmp_path):
    run = FakeRun(RunDirectory(tmp_path, "run"))
    run.scheduled = {"worker-0": -5}  # a worker too old for any batch, and nothing in flight
    with pytest.raises(LoopStalled, match="nothing in flight and can issue no work: buffer"):
        run.loop().run()
