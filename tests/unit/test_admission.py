"""The admission gate's rules as pure functions, and its invariants over random interleavings of a
pipeline that obeys it (workers starting and finishing calls, the learner taking batches and training)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchard.config import RunConfig
from orchard.services.run.admission import AdmissionGate


def test_room_is_the_batches_left_before_a_workers_groups_go_stale_within_the_capacity():
    synchronous = AdmissionGate.of(batch_groups=16, max_staleness=0, capacity_groups=64)
    assert synchronous.room(worker_version=5, training_version=5) == 16  # one batch, trained next
    assert synchronous.room(worker_version=5, training_version=6) == 0  # nothing while the learner trains
    gate = AdmissionGate.of(batch_groups=16, max_staleness=2, capacity_groups=40)
    assert gate.room(worker_version=5, training_version=5) == 40  # three batches, capped by the capacity
    assert gate.room(worker_version=5, training_version=6) == 32  # learner busy: batches 6 and 7
    assert gate.room(worker_version=4, training_version=6) == 16  # its groups are last trainable at 6
    assert gate.room(worker_version=3, training_version=6) == 0  # too old for any batch
    config = RunConfig.model_validate({"buffer": {"max_staleness": 2, "capacity_groups": 40}})
    gate = AdmissionGate.from_config(config)
    assert (gate.batch_groups, gate.max_staleness, gate.capacity) == (config.learner.groups_per_step, 2, 40)
    assert AdmissionGate.of(batch_groups=16, max_staleness=1, capacity_groups=4).capacity == 16


def test_an_inconsistent_gate_is_refused_with_its_numbers():
    with pytest.raises(ValueError, match="capacity >= batch_groups; got 16, 1, 8"):
        AdmissionGate(batch_groups=16, max_staleness=1, capacity=8)


def test_a_worker_too_old_for_the_next_batch_waits_for_weights():
    gate = AdmissionGate.of(batch_groups=4, max_staleness=1, capacity_groups=8)
    training = gate.training_version(policy_version=5, learner_busy=True)
    assert training == 6
    assert gate.may_start(worker_version=5, training_version=training, fresh_ready=0, in_flight=0)
    assert not gate.may_start(worker_version=4, training_version=training, fresh_ready=0, in_flight=0)
    assert gate.may_start(worker_version=4, training_version=5, fresh_ready=0, in_flight=0)


def test_backpressure_counts_ready_and_in_flight_groups():
    gate = AdmissionGate.of(batch_groups=4, max_staleness=1, capacity_groups=8)
    assert gate.may_start(worker_version=3, training_version=3, fresh_ready=4, in_flight=3)
    assert not gate.may_start(worker_version=3, training_version=3, fresh_ready=4, in_flight=4)
    assert not gate.may_train(fresh_ready=3)
    assert gate.may_train(fresh_ready=4)


@given(
    batch=st.integers(1, 32),
    staleness=st.integers(0, 4),
    capacity=st.integers(1, 128),
    worker_version=st.integers(0, 20),
    policy_version=st.integers(0, 20),
    fresh=st.integers(0, 200),
    in_flight=st.integers(0, 200),
)
def test_admission_is_monotone(batch, staleness, capacity, worker_version, policy_version, fresh, in_flight):
    """Admitted stays admitted with a newer worker, fewer ready or fewer in-flight groups, or an idle learner."""
    gate = AdmissionGate.of(batch, staleness, capacity)
    busy = gate.training_version(policy_version, learner_busy=True)
    if gate.may_start(worker_version, busy, fresh, in_flight):
        assert gate.may_start(worker_version + 1, busy, fresh, in_flight)
        assert gate.may_start(worker_version, busy, max(0, fresh - 1), max(0, in_flight - 1))
        assert gate.may_start(
            worker_version, gate.training_version(policy_version, learner_busy=False), fresh, in_flight
        )


@dataclass
class Pipeline:
    """A pipeline obeying the gate: the loop's bookkeeping without Ray, workers or a learner."""

    gate: AdmissionGate
    workers: int
    per_call: int
    policy_version: int = 0
    worker_versions: list[int] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)  # worker -> the version its call generates with
    ready: list[int] = field(default_factory=list)  # versions of the groups in the buffer
    training: list[int] | None = None  # the batch on the learner
    trained: list[tuple[int, list[int]]] = field(default_factory=list)  # (learner version, batch versions)
    peak: int = 0  # most groups trainable by the next batch's version, ready or in flight

    def __post_init__(self) -> None:
        self.worker_versions = [0] * self.workers

    @property
    def in_flight(self) -> int:
        return len(self.calls) * self.per_call

    def fresh(self, training_version: int) -> int:
        return sum(v >= self.gate.oldest_trainable(training_version) for v in self.ready)

    def issue(self) -> None:
        """What the loop does after every event: a batch for an idle learner, then calls for idle workers."""
        gate = self.gate
        if self.training is None and gate.may_train(self.fresh(self.policy_version)):
            oldest = gate.oldest_trainable(self.policy_version)
            self.ready = sorted(v for v in self.ready if v >= oldest)  # as the buffers: stale dropped, oldest first
            self.training, self.ready = self.ready[: gate.batch_groups], self.ready[gate.batch_groups :]
        target = gate.training_version(self.policy_version, learner_busy=self.training is not None)
        for worker in range(self.workers):
            if worker in self.calls:
                continue
            if gate.may_start(self.worker_versions[worker], target, self.fresh(target), self.in_flight):
                self.calls[worker] = self.worker_versions[worker]
        self.peak = max(self.peak, self.fresh(target) + self.in_flight)

    def finish_call(self, worker: int) -> None:
        self.ready.extend([self.calls.pop(worker)] * self.per_call)

    def finish_step(self) -> None:
        self.trained.append((self.policy_version, self.training))
        self.training = None
        self.policy_version += 1
        self.worker_versions = [self.policy_version] * self.workers  # pushed between calls


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, 12),
    staleness=st.integers(0, 3),
    capacity=st.integers(1, 40),
    workers=st.integers(1, 4),
    per_call=st.integers(1, 6),
    choices=st.lists(st.integers(0, 4), min_size=40, max_size=300),
)
def test_any_interleaving_stays_within_staleness_and_capacity_and_keeps_training(
    batch, staleness, capacity, workers, per_call, choices
):
    gate = AdmissionGate.of(batch, staleness, capacity)
    pipeline = Pipeline(gate, workers, per_call)
    pipeline.issue()
    for choice in choices:
        events = [("call", worker) for worker in sorted(pipeline.calls)]
        if pipeline.training is not None:
            events.append(("step", None))
        assert events, "the pipeline has nothing in flight and may issue nothing (the loop would raise)"
        kind, worker = events[choice % len(events)]
        if kind == "call":
            pipeline.finish_call(worker)
        else:
            pipeline.finish_step()
        pipeline.issue()
        if staleness == 0 and pipeline.training is not None:
            assert not pipeline.calls, "synchronous: nothing generates while the learner trains"
    # every group trained came from a version at most `staleness` behind the learner's
    assert all(version - v <= staleness for version, batch_versions in pipeline.trained for v in batch_versions)
    assert all(len(batch_versions) == batch for _, batch_versions in pipeline.trained)
    # admission is checked before a call's groups are added: at most one call's worth beyond capacity
    assert pipeline.peak < gate.capacity + per_call


def test_synchronous_batches_all_come_from_the_current_policy():
    gate = AdmissionGate.of(batch_groups=4, max_staleness=0, capacity_groups=64)
    pipeline = Pipeline(gate, workers=2, per_call=2)
    pipeline.issue()
    for _ in range(30):
        for worker in sorted(pipeline.calls):
            pipeline.finish_call(worker)
        pipeline.issue()
        if pipeline.training is not None:
            pipeline.finish_step()
            pipeline.issue()
    assert len(pipeline.trained) >= 10
    assert all(v == version for version, batch_versions in pipeline.trained for v in batch_versions)
