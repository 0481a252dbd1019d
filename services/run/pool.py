"""`RolloutPool`: the run's rollout workers as one party.

It owns the worker actors and, per worker, its incarnation (0 for its first process, n after n
restarts, so a late report about a process already replaced is recognised) and the newest policy
version sent to it (what its next rollout generates with; the version it confirmed loading is the
`WeightSync`'s). It pushes each published version to every worker, records their confirmations, and
replaces a worker that died with a new process holding the newest weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import ray

from orchard.config import RunConfig
from orchard.rollout.prompts import PromptFormat
from orchard.rollout.worker import RolloutWorker
from orchard.services.metrics import RunMetrics
from orchard.services.placement import rollout_options
from orchard.services.run.learners import LearnerDied, LearnerGroup, alive
from orchard.services.run.loop import DriverError, Rollout, WeightPush, WorkerDied
from orchard.services.weights.sync import WeightSync


class RolloutPool:
    def __init__(
        self,
        config: RunConfig,
        placement: Any,
        prompt_format: PromptFormat,
        weight_sync: WeightSync,
        metrics: RunMetrics,
        log: Callable[[str], None],
    ) -> None:
        """Starts `rollout.num_workers` workers, named worker-0, worker-1, ..."""
        self.config, self.placement, self.prompt_format = config, placement, prompt_format
        self.weight_sync, self.metrics, self.log = weight_sync, metrics, log
        self.incarnations: Counter[str] = Counter()
        self.actors = {f"worker-{index}": self._new_actor(index) for index in range(config.rollout.num_workers)}
        self.scheduled: dict[str, int] = {}
        self.last_sync_seconds: float | None = None  # publish until the last worker loaded, newest complete version

    def _new_actor(self, index: int, incarnation: int = 0) -> Any:
        config = self.config
        return RolloutWorker.options(**rollout_options(config, self.placement, index)).remote(
            f"worker-{index}",
            config.model,
            config.rollout,
            seed=config.seed * 1000 + index + 7919 * incarnation,
            prompt_format=self.prompt_format,
        )

    def load_published(self) -> None:
        """Every worker loads the version just published (blocking: before the run's first call)."""
        self.weight_sync.push_and_wait(self.actors)
        self.metrics.declare_workers(self.actors)
        for worker, version in self.weight_sync.worker_versions.items():
            self.metrics.observe_worker_version(worker, version)
        self.scheduled = dict.fromkeys(self.actors, self.weight_sync.version)

    def rollout(self, worker: str, kind: str, prompts: list, submit: Callable[[Any, list], Any]) -> Rollout:
        """`submit(actor, prompts)` on `worker`'s current process, as a call in flight."""
        handle = submit(self.actors[worker], prompts)
        return Rollout(worker, kind, prompts, handle, incarnation=self.incarnations[worker])

    def result(self, call: Rollout) -> Any:
        """A finished rollout's result; raises `WorkerDied` when its process died."""
        try:
            return ray.get(call.handle)
        except ray.exceptions.RayActorError as error:
            raise WorkerDied(str(error)) from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"rollout worker {call.worker} failed: {error}") from error

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
    def replace(self, call: Rollout | WeightPush, error: BaseException, learners: LearnerGroup) -> None:
        """`call`'s worker died: a new process, unless an earlier report about the same one replaced it."""
        if call.incarnation == self.incarnations[call.worker]:
            self._restart(call.worker, error, learners)
        self.scheduled[call.worker] = self.weight_sync.worker_versions[call.worker]

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
        index = int(name.removeprefix("worker-"))
        actor = self.actors[name] = self._new_actor(index, self.incarnations[name])
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
        for actor in self.actors.values():
            ray.kill(actor)
