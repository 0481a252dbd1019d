"""`RolloutPool`: the run's rollout workers as one party.

It owns the worker actors and, per worker, its incarnation (0 for its first process, n after n
restarts or re-additions, so a late report about a process already replaced is recognised) and the
newest policy version sent to it (what its next rollout generates with; the version it confirmed
loading is the `WeightSync`'s). It pushes each published version to every worker, records their
confirmations, and replaces a worker that died with a new process holding the newest weights.

The number of workers changes during the run (`scale_to`):

- added workers are placed whole or not at all: their bundles are reserved as placement groups of
  their own (`reserve_workers`; bundles that removed workers of the run's own placement group left
  free are used first) and, once the cluster holds them all, each new worker loads the newest weights
  before it is given any call; a reservation the cluster cannot hold within
  `cluster.ready_timeout_seconds` is given back and the change refused, saying what was asked for;
- removed workers (the highest-numbered; worker-0, which evaluates, stays) get no new call: one with a
  rollout in flight finishes it, and its groups are taken in like any other, before its process is
  ended. One that dies meanwhile is not restarted: its prompts are handed back to the driver, which
  gives them to another worker.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from orchard.config import RunConfig
from orchard.rollout.prompts import PromptFormat
from orchard.rollout.worker import RolloutWorker
from orchard.services.metrics import RunMetrics
from orchard.services.placement import Slot, WorkerReservation, initial_slot, reserve_workers, slot_options
from orchard.services.run.learners import LearnerDied, LearnerGroup, alive
from orchard.services.run.loop import DriverError, Rollout, WeightPush, WorkerDied
from orchard.services.weights.sync import WeightSync


@dataclass
class ScaleChange:
    """One change of the number of workers, as the summary and status show it."""

    workers: int
    policy_version: int
    reason: str
    at_seconds: float
    added: dict[str, int] = field(default_factory=dict)  # new worker -> the version it loaded first
    removed: list[str] = field(default_factory=list)


def worker_index(name: str) -> int:
    return int(name.removeprefix("worker-"))


class RolloutPool:
    def __init__(
        self,
        config: RunConfig,
        placement: Any,
        prompt_format: PromptFormat,
        weight_sync: WeightSync,
        metrics: RunMetrics,
        log: Callable[[str], None],
        reward_models: dict[str, tuple[Any, list[Any]]] | None = None,
    ) -> None:
        """Starts `rollout.num_workers` workers, named worker-0, worker-1, ...; `reward_models`: the
        settings and actors of the run's reward models, handed to every worker."""
        self.config, self.placement, self.prompt_format = config, placement, prompt_format
        self.reward_models = reward_models or {}
        self.weight_sync, self.metrics, self.log = weight_sync, metrics, log
        self.incarnations: Counter[str] = Counter()
        names = [f"worker-{index}" for index in range(config.rollout.num_workers)]
        self.slots: dict[str, Slot] = {}  # each worker's bundle (none for initial workers without placement groups)
        for index, name in enumerate(names):
            slot = initial_slot(placement, index)
            if slot is not None:
                self.slots[name] = slot
        self.actors = {name: self._new_actor(worker_index(name), options=self._options_of(name)) for name in names}
        self.ever_started = set(names)
        self.scheduled: dict[str, int] = {}
        self.last_sync_seconds: float | None = None  # publish until the last worker loaded, newest complete version
        self.busy: Counter[str] = Counter()  # rollout calls in flight, per worker
        self.retiring: dict[str, Any] = {}  # removed workers finishing their call
        self.free_slots: list[Slot] = []  # bundles of the run's own placement group that removed workers left
        self.reservations: list[WorkerReservation] = []  # placed, held until their workers are all removed
        self.pending: WorkerReservation | None = None  # being placed
        self._pending_names: list[str] = []  # the workers the pending change adds (some in free slots)
        self._pending_reason = ""
        self.changes: list[ScaleChange] = []
        self._started = time.perf_counter()

    def _new_actor(self, index: int, incarnation: int = 0, *, options: dict[str, Any]) -> Any:
        config = self.config
        return RolloutWorker.options(**options).remote(
            f"worker-{index}",
            config.model,
            config.rollout,
            seed=config.seed * 1000 + index + 7919 * incarnation,
            prompt_format=self.prompt_format,
            delay_seconds=config.faults.rollout_delay_seconds
            + config.faults.rollout_delay_by_worker.get(f"worker-{index}", 0.0),
            reward_models=self.reward_models,
        )

    def _options_of(self, name: str) -> dict[str, Any]:
        return slot_options(self.config, self.slots.get(name))

    def load_published(self) -> None:
        """Every worker loads the version just published (blocking: before the run's first call)."""
        self.weight_sync.push_and_wait(self.actors)
        self.metrics.declare_workers(self.actors)
        self.metrics.set_workers(len(self.actors))
        for worker, version in self.weight_sync.worker_versions.items():
            self.metrics.observe_worker_version(worker, version)
        self.scheduled = dict.fromkeys(self.actors, self.weight_sync.version)

    def rollout(self, worker: str, kind: str, prompts: list, submit: Callable[[Any, list], Any]) -> Rollout:
        """`submit(actor, prompts)` on `worker`'s current process, as a call in flight."""
        handle = submit(self.actors[worker], prompts)
        self.busy[worker] += 1
        return Rollout(worker, kind, prompts, handle, incarnation=self.incarnations[worker])

    def result(self, call: Rollout) -> Any:
        """A finished rollout's result; raises `WorkerDied` when its process died. A removed worker's
        process ends once its last call is in."""
        try:
            return ray.get(call.handle)
        except ray.exceptions.RayActorError as error:
            raise WorkerDied(str(error)) from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"rollout worker {call.worker} failed: {error}") from error
        finally:
            self.busy[call.worker] -= 1
            self._end_if_idle(call.worker)

    # ------------------------------------------------------------------ the number of workers
    @property
    def target(self) -> int:
        """The number of workers once a change under way is applied."""
        return len(self.actors) + (len(self._pending_names) if self.pending is not None else 0)

    def scale_to(self, count: int, reason: str, learners: LearnerGroup) -> str | None:
        """Start changing the number of workers to `count` (at least 1): removal at once, addition once
        the cluster has placed the new bundles (`poll`). Nothing happens while an addition is under way.
        Returns the refusal of an addition whose workers could not start."""
        if count < 1:
            raise ValueError(f"a run needs at least 1 rollout worker, asked for {count}")
        current = len(self.actors)
        if self.pending is not None or count == current:
            return None
        if count < current:
            self._remove(sorted(self.actors, key=worker_index)[count:], reason, learners)
            return None
        names = self._free_names(count - current)
        reused = dict(zip(names, self.free_slots, strict=False))
        del self.free_slots[: len(reused)]
        self.slots.update(reused)
        rest = [name for name in names if name not in reused]
        if not rest:  # all in bundles the run holds already
            return self._add(names, reason, learners)
        self._pending_names, self._pending_reason = names, reason
        self.pending = reserve_workers(self.config, rest, time.perf_counter())
        self.log(f"scaling to {count} rollout workers: reserving {self.pending.bundles} for {', '.join(rest)}")
        return None

    def poll(self, learners: LearnerGroup) -> str | None:
        """Finish an addition the cluster has placed, or refuse one it could not place in time; returns
        the refusal, naming the resources asked for."""
        pending = self.pending
        if pending is None:
            return None
        if pending.placed():
            self.pending = None
            self.reservations.append(pending)
            self.slots.update(pending.slots)
            return self._add(self._pending_names, self._pending_reason, learners)
        if time.perf_counter() < pending.deadline:
            return None
        self.pending = None
        pending.release()
        for name in self._pending_names:  # bundles reused from the run's own group go back to the free ones
            if name in self.slots:
                self.free_slots.append(self.slots.pop(name))
        refusal = (
            f"scaling to {len(self.actors) + len(self._pending_names)} rollout workers refused: the cluster could not "
            f"place {pending.bundles} within cluster.ready_timeout_seconds={self.config.cluster.ready_timeout_seconds}"
            f"; free now: {ray.available_resources()}. The run goes on with {len(self.actors)}"
        )
        self.log(refusal)
        return refusal

    def _free_names(self, count: int) -> list[str]:
        taken = {worker_index(name) for name in (*self.actors, *self.retiring)}
        names, index = [], 0
        while len(names) < count:
            if index not in taken:
                names.append(f"worker-{index}")
            index += 1
        return names

    def _add(self, names: list[str], reason: str, learners: LearnerGroup) -> str | None:
        """Start workers `names` in their slots, each loading the newest weights before its first call.
        Workers that fail to start or load are ended and their bundles given back: the change is refused
        (the message returned), and the run goes on with the workers it had."""
        latest = self.weight_sync.latest
        started = {}
        for name in names:
            if name in self.ever_started:  # a new process under a name used before
                self.incarnations[name] += 1
            self.ever_started.add(name)
            started[name] = self._new_actor(worker_index(name), self.incarnations[name], options=self._options_of(name))
        loads = {
            name: actor.load_weights.remote(latest.version, learners.readable(latest.ref))
            for name, actor in started.items()
        }
        try:
            confirmed = {name: ray.get(load).version for name, load in loads.items()}
        except ray.exceptions.RayError as error:
            for actor in started.values():
                ray.kill(actor)
            self._release_slots(names)
            refusal = (
                f"scaling to {len(self.actors) + len(names)} rollout workers refused: new workers "
                f"{', '.join(names)} failed to start or load version {latest.version}: {error}"
            )
            self.log(refusal)
            return refusal
        self.actors.update(started)
        learners.form_broadcast_group(self.actors)
        for name, version in confirmed.items():
            self.weight_sync.confirm(name, version)
            self.scheduled[name] = version
        self.metrics.declare_workers(started)
        for name, version in confirmed.items():
            self.metrics.observe_worker_version(name, version)
        self._record(ScaleChange(len(self.actors), latest.version, reason, self._elapsed(), added=confirmed))
        return None

    def _remove(self, names: list[str], reason: str, learners: LearnerGroup) -> None:
        for name in names:
            self.retiring[name] = self.actors.pop(name)
            self.scheduled.pop(name, None)
            self.weight_sync.forget(name)
            self.metrics.forget_worker(name)
            self._end_if_idle(name)
        learners.form_broadcast_group(self.actors)
        self._record(ScaleChange(len(self.actors), self.weight_sync.version, reason, self._elapsed(), removed=names))

    def _end_if_idle(self, name: str) -> None:
        """End a removed worker's process once no call of it is in flight, and give its bundle back."""
        if name not in self.retiring or self.busy[name] > 0:
            return
        ray.kill(self.retiring.pop(name))
        self._release_slots([name])

    def _release_slots(self, names: list[str]) -> None:
        """Give back the bundles of `names`: a reservation of added workers once none of its workers is
        left; a bundle of the run's own placement group is kept for the next worker added."""
        for name in names:
            slot = self.slots.pop(name, None)
            if slot is None:
                continue
            owner = next((r for r in self.reservations if slot.group in r.groups), None)
            if owner is None:
                self.free_slots.append(slot)
            elif not any(other.group in owner.groups for other in self.slots.values()):
                self.reservations.remove(owner)
                owner.release()

    def _record(self, change: ScaleChange) -> None:
        self.changes.append(change)
        self.metrics.set_workers(len(self.actors))
        what = (
            f"added {', '.join(f'{n} (v{v})' for n, v in change.added.items())}"
            if change.added
            else f"removed {', '.join(change.removed)}"
        )
        self.log(
            f"rollout workers: {change.workers}, {what}; newest policy version v{change.policy_version}: {change.reason}"
        )

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    # ------------------------------------------------------------------ weights
    def push(self) -> list[WeightPush]:
        """Send the latest published weights to every worker."""
        version = self.weight_sync.version
        pushes = []
        for handle, worker in self.weight_sync.push(self.actors).items():
            pushes.append(WeightPush(worker, version, handle, incarnation=self.incarnations[worker]))
            self.scheduled[worker] = version
        return pushes

    def finish_push(self, call: WeightPush, learners: LearnerGroup) -> None:
        """Record a worker's confirmation; replace a worker that died receiving. A failed push of weights
        that a dead learner never handed over is only logged: superseded, or about to be, once its
        failed step brings up a new learner."""
        if call.worker not in self.actors or call.incarnation != self.incarnations[call.worker]:
            if call.worker not in self.actors or alive(self.actors[call.worker]):
                return  # to a removed worker, or to a process already replaced: superseded
        try:
            confirmed = ray.get(call.handle)
        except ray.exceptions.RayError as error:
            if call.incarnation != self.incarnations[call.worker] or not alive(self.actors[call.worker]):
                self.replace(call, error, learners)
                return
            if call.version < self.weight_sync.version or not learners.alive():
                self.log(f"weight sync of version {call.version} to {call.worker} failed: {error}")
                return
            raise DriverError(f"weight sync to {call.worker} failed: {error}") from error
        seconds = self.weight_sync.confirm(call.worker, confirmed.version)
        self.metrics.observe_worker_version(call.worker, self.weight_sync.worker_versions[call.worker])
        if seconds is not None:
            self.last_sync_seconds = seconds
            self.metrics.observe_weight_sync(seconds)

    # ------------------------------------------------------------------ restarts
    def replace(self, call: Rollout | WeightPush, error: BaseException, learners: LearnerGroup) -> bool:
        """`call`'s worker died: a new process, unless an earlier report about the same one replaced it.
        False when the worker had been removed: it is not restarted, and the caller hands its work on."""
        if call.worker not in self.actors:
            self.log(f"removed rollout worker {call.worker} died ({type(error).__name__}) finishing its last call")
            return False
        if call.incarnation == self.incarnations[call.worker]:
            self._restart(call.worker, error, learners)
        self.scheduled[call.worker] = self.weight_sync.worker_versions[call.worker]
        return True

    def _restart(self, name: str, error: BaseException, learners: LearnerGroup) -> None:
        """Start a new process for worker `name` and load the newest weights into it (a copy of its own;
        under transport 'nccl' it joins the re-formed broadcast group after). Gives up, failing the run,
        after `supervision.max_worker_restarts` restarts of one worker."""
        limit = self.config.supervision.max_worker_restarts
        if self.incarnations[name] >= limit:
            raise DriverError(
                f"rollout worker {name} died again after {self.incarnations[name]} restarts "
                f"(supervision.max_worker_restarts={limit}); giving up: {error}"
            )
        self.incarnations[name] += 1
        self.log(f"rollout worker {name} died ({type(error).__name__}); restart {self.incarnations[name]}")
        self.metrics.worker_restarts.labels(worker=name).inc()
        actor = self.actors[name] = self._new_actor(
            worker_index(name), self.incarnations[name], options=self._options_of(name)
        )
        latest = self.weight_sync.latest
        try:
            confirmed = ray.get(actor.load_weights.remote(latest.version, learners.readable(latest.ref)))
        except ray.exceptions.RayError as failed:
            if not learners.alive():  # the new learner will publish and push to every worker, this one too
                raise LearnerDied(
                    f"the learner died; version {latest.version}'s weights for restarted {name} went with it"
                ) from failed
            raise DriverError(f"weights for restarted {name} failed: {failed}") from failed
        learners.form_broadcast_group(self.actors)
        self.weight_sync.confirm(name, confirmed.version)
        self.metrics.observe_worker_version(name, confirmed.version)

    def close(self) -> None:
        for actor in [*self.actors.values(), *self.retiring.values()]:
            ray.kill(actor)
        for reservation in [*self.reservations, *([self.pending] if self.pending else [])]:
            reservation.release()
