"""`LearnerGroup`: the run's learner, one party however many DeepSpeed ranks it has.

It starts the learner's actors (rank 0 forwards every call to the others, `services/learner_actor.py`),
issues a step — whose result carries the step's new weights as a second object, so publishing them
takes no second call — publishes and announces each new policy version, saves and loads checkpoints,
and replaces a learner that died by one restored from the last checkpoint. Ray errors become
`LearnerDied` (the process is gone; the loop restarts it) or `DriverError` (the run cannot go on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from orchard.config import RunConfig
from orchard.records import Group
from orchard.rollout.weight_broadcast import BroadcastTicket
from orchard.services.control.run_control import RunControl, WeightVersionConflict
from orchard.services.learner_actor import LearnerStep, create_learner
from orchard.services.run import loop
from orchard.services.run.loop import DriverError, Step
from orchard.services.weights.sync import WeightSync, form_broadcast_group


class LearnerDied(DriverError, loop.LearnerDied):
    """The learner actor's process died (the loop restarts it from the last checkpoint)."""


def get(ref: Any, what: str) -> Any:
    """`ray.get(ref)`, a failure named by `what`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        raise DriverError(f"{what} failed: {error}") from error


def alive(actor: Any) -> bool:
    """Whether `actor`'s process still answers."""
    try:
        ray.get(actor.ping.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return False
    return True


class LearnerGroup:
    def __init__(
        self,
        config: RunConfig,
        initial_weights: Any,
        placement: Any,
        weight_sync: WeightSync,
        control: RunControl,
        log: Callable[[str], None],
    ) -> None:
        """`initial_weights`: an object-store reference to the warm start's weights (where a learner that
        dies before the first checkpoint starts again); `log`: the run's event log."""
        self.config = config
        self.placement = placement
        self.weight_sync = weight_sync
        self.control = control
        self.log = log
        self._initial_weights = initial_weights
        self.actor, self.peers = create_learner(config, initial_weights, placement)
        self.restarts = 0

    @property
    def broadcasts(self) -> bool:
        return self.config.weight_sync.transport == "nccl"

    # ------------------------------------------------------------------ steps and weights
    def start_step(self, groups: list[Group], started: float, *, inject_nonfinite: bool = False) -> Step:
        step, weights = self.actor.train_step.remote(groups, inject_nonfinite)
        return Step(groups, started, step, weights=weights, learner=self.restarts)

    def finish_step(self, call: Step, step_number: int) -> LearnerStep:
        """The finished step's result; its new weights (unless skipped) published and announced."""
        try:
            step: LearnerStep = ray.get(call.handle)
        except ray.exceptions.RayActorError as error:
            raise LearnerDied(f"the learner died during step {step_number}: {error}") from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"learner failed: {error}") from error
        if not step.result.skipped:  # under 'nccl' the step returned no weights: they are broadcast
            self.publish(step.policy_version, None if self.broadcasts else call.weights)
        return step

    def publish(self, version: int, weights: Any | None = None) -> None:
        """Publish `version` and announce it through the run's control, as `POST .../weights` does.

        `weights`: what a step returned, or the warm start's; None: the learner's current weights,
        exported now, or under transport 'nccl' a ticket: the learner broadcasts meanwhile and the
        workers receive when they are handed the ticket."""
        if weights is None and self.broadcasts:
            self.actor.broadcast_weights.remote()  # its outcome reaches the driver through the receivers' calls
            weights = BroadcastTicket(version)
        elif weights is None:
            weights = self.actor.export_weights.remote()
        self.weight_sync.publish(version, weights)
        location = f"ray-object:{weights.hex()}" if isinstance(weights, ray.ObjectRef) else str(weights)
        try:
            self.control.announce_weights(version, location)
        except WeightVersionConflict as conflict:
            self.log(f"weight announcement of version {version} refused: {conflict}")

    def readable(self, weights: Any) -> Any:
        """A published version as weights one reader can fetch on its own: a broadcast ticket becomes a
        copy through the object store; other publications already are."""
        if isinstance(weights, BroadcastTicket):
            return self.actor.export_weights_object_store.remote()
        return weights

    def form_broadcast_group(self, workers: Mapping[str, Any]) -> None:
        """Transport 'nccl': (re)form the broadcast group of the learner and `workers`."""
        if not self.broadcasts:
            return
        settings = self.config.weight_sync
        vllm = self.config.rollout.engine == "vllm"
        group = form_broadcast_group(
            self.actor,
            workers,
            ranks_per_worker=self.config.rollout.vllm.tensor_parallel_size if vllm else 1,
            bucket_bytes=settings.bucket_bytes,
            timeout_s=settings.timeout_seconds,
        )
        self.log(
            f"weight broadcast group formed: {group.world_size} ranks over {group.backend} "
            f"at {group.host}:{group.port}, buckets of {settings.bucket_mb} MiB"
        )

    # ------------------------------------------------------------------ checkpoints and restarts
    def save_checkpoint(self, path: Path, step_number: int) -> None:
        """The learner's DeepSpeed checkpoint and Hugging Face model, into `path`."""
        try:
            ray.get(self.actor.save_checkpoint.remote(str(path)))
        except ray.exceptions.RayActorError as error:
            raise LearnerDied(f"the learner died while checkpointing step {step_number}: {error}") from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"learner checkpoint failed: {error}") from error

    def load_checkpoint(self, path: Path) -> int:
        """Restore the learner from checkpoint `path`; returns the policy version it holds."""
        return get(self.actor.load_checkpoint.remote(str(path)), "learner checkpoint load")

    def restart(self, error: BaseException, checkpoint: Path | None) -> int:
        """A new learner from `checkpoint` (the warm start when None) after one died; returns the policy
        version its weights are published under: one past any the dead learner published.

        A new learner that dies before it is restored counts as one more restart and is replaced in
        turn. Gives up after `supervision.max_learner_restarts` restarts."""
        limit = self.config.supervision.max_learner_restarts
        while True:
            if self.restarts >= limit:
                raise DriverError(
                    f"the learner died again after {self.restarts} restarts "
                    f"(supervision.max_learner_restarts={limit}); giving up: {error}"
                )
            self.restarts += 1
            for actor in [self.actor, *self.peers]:  # a dead learner's ranks cannot join a new process group
                ray.kill(actor)
            self.actor, self.peers = create_learner(self.config, self._initial_weights, self.placement)
            try:
                if checkpoint is not None:
                    ray.get(self.actor.load_checkpoint.remote(str(checkpoint)))
                return ray.get(self.actor.renumber.remote(self.weight_sync.version + 1))
            except ray.exceptions.RayActorError as died:
                self.log(f"the restarted learner died before it was restored: {died}")
                error = died
            except ray.exceptions.RayError as failed:
                raise DriverError(f"learner restore from {checkpoint or 'the warm start'} failed: {failed}") from failed

    def alive(self) -> bool:
        return alive(self.actor)

    def ping(self) -> int:
        return get(self.actor.ping.remote(), "learner start")

    def close(self, log_failure: Callable[[str], None]) -> None:
        """Remove the shared-memory weight segment at once (else: when the process exits), then stop
        every rank; a dead or stuck learner does not keep the rest from stopping."""
        try:
            ray.get(self.actor.close.remote(), timeout=30)
        except Exception as error:
            log_failure(f"learner close failed: {type(error).__name__}: {error}")
        for actor in [self.actor, *self.peers]:
            ray.kill(actor)

    @property
    def actors(self) -> Sequence[Any]:
        return [self.actor, *self.peers]
