"""The driver: wires prompt sources, rollout workers, verifiers, the buffer and the learner.

The run loop itself (`services.run.loop.RunLoop`) keeps rollout calls, a learner step and weight pushes
in flight together and wakes on whichever finishes first; what it may issue is the admission gate's
rule (`services.run.admission`: bounded staleness and backpressure; with `max_staleness: 0` the loop is
synchronous). The driver is the loop's `RunPort`, with Ray actors behind it:

- a rollout result: groups are filtered (dynamic sampling), recorded in the prompt statistics and
  put in the buffer;
- a learner result: its batch waits for the next checkpoint's acknowledgement, the new weights are
  published through the object store and pushed to every worker (which swaps them between
  generation calls);
- a dead worker or learner is replaced (the learner from the last checkpoint).

The loop obeys a `RunControl` (the control plane's requests) at step boundaries: while the run is
not `running` no new rollout or learner step is issued; what is in flight completes (its groups
reach the buffer, its learner step is recorded and its weights pushed), then a pausing run
waits as `paused` and a stopping one ends with a final checkpoint and summary. Every figure is
recorded in the run's `RunMetrics`, which the control plane serves at `/metrics`.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

import ray
import torch

from orchard.config import RunConfig
from orchard.learner.trainer import StepResult
from orchard.protocols import Buffer
from orchard.records import Group
from orchard.rollout.prompts import PromptFormat, PromptRenderer
from orchard.rollout.tokenizer import load_tokenizer
from orchard.rollout.weight_broadcast import BroadcastTicket
from orchard.rollout.worker import RolloutWorker, RolloutWorkerCore
from orchard.services.buffer.factory import make_buffer
from orchard.services.control.run_control import RunControl, RunState, WeightVersionConflict
from orchard.services.curriculum.filtering import REASONS as FILTER_REASONS
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.evaluation import WorkerEvaluator, evaluate_by_distribution
from orchard.services.learner_actor import LearnerStep, create_learner
from orchard.services.metrics import RunMetrics
from orchard.services.placement import reserve, rollout_options
from orchard.services.rescue.deepsearch import RescoreFailed, SearchRescue, is_tree_group
from orchard.services.rescue.queue import RescueQueue, build_rescues
from orchard.services.run import loop
from orchard.services.run.admission import AdmissionGate
from orchard.services.run.checkpoints import Checkpoints, DriverState, latest_checkpoint, read_step
from orchard.services.run.intake import Intake, LogprobsOf
from orchard.services.run.loop import InFlight, LoopStalled, Rollout, RunLoop, Step, WeightPush, WorkerDied
from orchard.services.run.throughput import Throughput
from orchard.services.run_dir import RunDirectory
from orchard.services.samples import SampleKeeper, sample_records
from orchard.services.supervision import NonFiniteGuard
from orchard.services.trackers import Trackers
from orchard.services.warmstart import warm_start
from orchard.services.weights.sync import WeightSync, form_broadcast_group
from orchard.verifiers.sources import PromptPool


class DriverError(RuntimeError):
    """The run cannot continue; the message says which component failed and why."""


#: Per-step figures of the learner's algorithm options (`learner.trainer.StepResult`) kept in metrics.jsonl.
LEARNER_OPTION_STATS = (
    "completion_length_mean",
    "sft_groups",
    "sft_loss",
    "hinted_sequences",
    "lp_reg_tokens",
    "masked_truncated",
    "tree_sequences",
    "mismatch_k3",
    "mismatch_abs_mean",
    "mismatch_abs_max",
    "mismatch_tokens",
    "tis_weight_mean",
)


class LearnerDied(DriverError, loop.LearnerDied):
    """The learner actor's process died (the loop restarts it from the last checkpoint)."""


#: Name of the curriculum's state in the buffer's named state (survives a driver restart).
CURRICULUM_STATE = "curriculum"
#: How often a paused driver looks for checkpoint requests while it waits.
PAUSED_POLL_SECONDS = 0.5


class Driver:
    def __init__(
        self,
        config: RunConfig,
        run_dir: RunDirectory,
        *,
        show_progress: bool = True,
        control: RunControl | None = None,
        metrics: RunMetrics | None = None,
        resume: bool = False,
        stop_when: Callable[[Throughput], str | None] | None = None,
    ) -> None:
        """`resume`: continue `run_dir` from its newest checkpoint instead of starting afresh. `stop_when`:
        asked after every rollout with the run's counters; a reason it returns stops the run (as a stop
        request does: what is in flight completes, then a final checkpoint)."""
        self.stop_when = stop_when
        self.config = config
        self.resume = resume
        self.run_dir = run_dir
        self.show_progress = show_progress
        self.control = control or RunControl()
        self.metrics = metrics or RunMetrics()
        self.rng = random.Random(config.seed)
        self.buffer: Buffer | None = None
        self._redis_server = None
        self.step = 0
        self.policy_version = 0
        self.filtered: Counter[str] = Counter()
        self.staleness_seen: list[int] = []
        self.stopped_reason: str | None = None
        self._checkpoints: Checkpoints | None = None  # opens with the buffer
        self.intake: Intake | None = None  # opens when the RL phase starts
        self._last_record: dict[str, Any] | None = None
        self.resumed_from: str | None = None
        self.deepsearch: SearchRescue | None = None  # rollout.strategy 'mcts'
        self.prompt_format = PromptFormat.from_config(config.data)
        self.trackers = Trackers([])  # the configured ones open when the run starts
        self._scheduled: dict[str, int] = {}  # worker -> the newest version sent to it
        self._deadline: float | None = None  # max_minutes, as a time.perf_counter() value
        self._progress = None  # the progress bar, when shown

    # ----------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        config = self.config
        torch.set_num_threads(1)
        self.pool = PromptPool.from_config(config.data)
        self.run_dir.event(f"prompt pool: distributions {self.pool.distributions}, {len(self.pool.held_out)} held out")
        for problem in self.pool.problems:
            self.run_dir.event(f"skipped prompt line: {problem}")
        checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and checkpoint is None:
            raise DriverError(
                f"cannot resume {self.run_dir.path}: it has no checkpoint (checkpoints/step-N/driver.json)"
            )
        self.buffer, self._redis_server = make_buffer(
            config.buffer, namespace=self.run_dir.run_id, directory=self.run_dir.path / "redis"
        )
        self.run_dir.event(f"buffer: {type(self.buffer).__name__}")
        self._checkpoints = Checkpoints(
            self.run_dir, self.buffer, self._save_learner, keep_last=config.checkpoint.keep_last
        )
        self.sampler = PromptSampler(
            self.pool,
            config.curriculum,
            advantage_std=config.learner.advantage_std,
            dynamic_sampling=config.learner.dynamic_sampling,
        )
        saved = self.buffer.load_state(CURRICULUM_STATE)
        if saved is not None:
            self.sampler.load_bytes(saved)
            self.run_dir.event("curriculum state restored from the buffer")

        if checkpoint is not None:
            state_dict = self._restore(checkpoint)
        else:
            state_dict, self.warm_start_info = warm_start(config, self.pool, log=self.run_dir.event)
        from orchard.learner.weights import state_dict_to_numpy

        initial_ref = ray.put(state_dict_to_numpy(state_dict))
        self._initial_weights_ref = initial_ref  # a learner that dies before any checkpoint starts again from these
        self.placement = reserve(config) if config.cluster.placement_groups else None
        # rank 0; the other ranks of a multi-rank learner follow its calls
        self.learner, self._learner_peers = create_learner(config, initial_ref, self.placement)
        self.learner_restarts = 0
        if checkpoint is not None:
            version = self._get(self.learner.load_checkpoint.remote(str(checkpoint)), "learner checkpoint load")
            if version != self.policy_version:
                raise DriverError(
                    f"checkpoint {checkpoint} is inconsistent: the learner's state holds policy version {version}, "
                    f"driver.json says {self.policy_version}"
                )
            requeued = self.buffer.requeue_pending()
            self.run_dir.event(
                f"resumed from {checkpoint}: step {self.step}, policy version {self.policy_version}; "
                f"{requeued} groups trained after it are back in the buffer"
            )
        self.workers = {
            f"worker-{index}": self._new_worker(f"worker-{index}") for index in range(config.rollout.num_workers)
        }
        self.worker_restarts: Counter[str] = Counter()
        self.non_finite = NonFiniteGuard(config.supervision.max_nonfinite_steps)
        self.weight_sync = WeightSync(initial_version=self.policy_version)
        self.weight_sync.publish(self.policy_version, initial_ref)
        self._announce(self.policy_version, initial_ref)
        self.weight_sync.push_and_wait(self.workers)
        self._form_broadcast_group()
        ray.get(self.learner.ping.remote())
        self.metrics.declare_workers(self.workers)
        for worker, version in self.weight_sync.worker_versions.items():
            self.metrics.observe_worker_version(worker, version)
        self.rescue = RescueQueue(build_rescues(config))
        self.deepsearch = next((r for r in self.rescue.rescues if isinstance(r, SearchRescue)), None)
        if self.deepsearch is not None:
            cache = self.deepsearch.open_cache(self.buffer)
            self.run_dir.event(
                f"tree search for all-fail prompts; solution cache in {type(cache.store).__name__} "
                f"({len(cache.prompt_ids())} prompts cached)"
            )
        self.metrics.declare_filter_reasons(FILTER_REASONS)
        self.metrics.set_distributions(self.sampler.probabilities())
        self.metrics.observe_buffer(self.buffer.ready_count(), self.buffer.pending_count())

        if config.rollout.engine == "vllm":  # no engine in the driver: a rollout worker answers
            self.evaluator = WorkerEvaluator(lambda: self.workers["worker-0"])
        else:
            self.evaluator = RolloutWorkerCore(
                "evaluator", config.model, config.rollout, seed=config.seed, prompt_format=self.prompt_format
            )
        self.evaluator.load_weights(self.policy_version, state_dict)
        self.held_out = self.pool.held_out[: config.eval.num_prompts]
        self.renderer = PromptRenderer(load_tokenizer(config.model), self.prompt_format)
        self.samples = SampleKeeper()

    def _evaluate(self, weights_ref: Any | None = None) -> tuple[float, dict[str, float]]:
        started = time.perf_counter()
        if (
            weights_ref is not None
            and self.policy_version > self.evaluator.policy_version
            and not isinstance(self.evaluator, WorkerEvaluator)
        ):
            try:
                weights = ray.get(self._readable(weights_ref))
            except ray.exceptions.RayActorError as error:
                # the learner died before exporting these weights; its restart publishes new ones
                self.run_dir.event(
                    f"evaluation at step {self.step} used version {self.evaluator.policy_version}: {error}"
                )
            else:
                self.evaluator.load_weights(self.policy_version, weights)
        accuracy, by_distribution = evaluate_by_distribution(self.evaluator, self.held_out)
        self.throughput.eval_seconds += time.perf_counter() - started
        return accuracy, by_distribution

    # ----------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        config = self.config
        self.run_dir.write_config(config)
        self.run_dir.event(f"run {self.run_dir.run_id} starting")
        try:
            self.trackers = Trackers.open(
                config.logging,
                self.run_dir.path,
                self.run_dir.run_id,
                config.model_dump(mode="json", exclude={"control": {"token"}}),
                log=self.run_dir.event,
            )
            if self.trackers.names:
                self.run_dir.event(f"experiment trackers: {', '.join(self.trackers.names)}")
            self._setup()
            self.throughput = Throughput()
            self.intake = Intake(
                config,
                self.buffer,
                self.sampler,
                self.rescue,
                throughput=self.throughput,
                filtered=self.filtered,
                metrics=self.metrics,
                run_dir=self.run_dir,
                samples=self.samples,
                rescorer=self._rescorer,
                deepsearch=self.deepsearch,
            )
            if self.resumed_from is None:
                initial_accuracy, initial_by_distribution = self._evaluate()
                self.run_dir.event(f"warm-start held-out accuracy {initial_accuracy:.3f}")
                self.initial_eval = (initial_accuracy, initial_by_distribution)
            initial_accuracy = self.initial_eval[0]
            self._last_eval = initial_accuracy
            self.metrics.observe_eval(initial_accuracy)
            if self.control.start() is RunState.RUNNING:
                self.run_dir.event("run running")
            self._loop()
            final_state = RunState.STOPPED if self.control.stop_requested() else RunState.FINISHED
            if final_state is RunState.STOPPED:
                self.stopped_reason = self.control.reason or "stopped by request"
            self._checkpoint("final")
            final_accuracy, final_by_distribution = self._evaluate(self.weight_sync.latest.ref)
            self.metrics.observe_eval(final_accuracy)
            summary = self._summary(final_accuracy, final_by_distribution, state=final_state)
            self.run_dir.write_summary(summary)
            self.run_dir.plot_rewards()
            self.control.finish(final_state)
            self.run_dir.event(
                f"run {final_state}: {self.step} steps, held-out accuracy {initial_accuracy:.3f} -> {final_accuracy:.3f}"
            )
            return summary
        except BaseException as error:
            reason = f"{type(error).__name__}: {error}"
            self.control.finish(RunState.FAILED, reason)
            self.run_dir.event(f"run failed: {reason}")
            raise
        finally:
            self._shutdown()

    def _loop(self) -> None:
        config = self.config
        self._deadline = time.perf_counter() + config.max_minutes * 60 if config.max_minutes else None
        self._scheduled = dict.fromkeys(self.workers, self.policy_version)
        self._progress = self._progress_bar()
        try:
            RunLoop(self, AdmissionGate.from_config(config), self.control, self._done).run()
        except LoopStalled as error:
            raise DriverError(str(error)) from error
        if self._progress is not None:
            self._progress.close()

    def _done(self) -> bool:
        if self.step >= self.config.max_steps:
            return True
        if self._deadline is not None and time.perf_counter() > self._deadline:
            self.stopped_reason = "max_minutes"
            return True
        return False

    # ----------------------------------------------------------------------------- the loop's port (RunPort)
    def scheduled_versions(self) -> dict[str, int]:
        return self._scheduled

    def fresh_ready(self, min_policy_version: int) -> int:
        return self.buffer.ready_count(min_policy_version=min_policy_version)

    def start_step(self, count: int, min_policy_version: int) -> Step:
        groups = self.buffer.take(count, min_policy_version=min_policy_version)
        return Step(groups, time.perf_counter(), self.learner.train_step.remote(groups))

    def start_rollout(self, worker: str, again: Rollout | None = None) -> Rollout:
        kind, prompts = (again.kind, again.prompts) if again is not None else self._next_rollout()
        handle = self._submit(kind, self.workers[worker], prompts)
        return Rollout(worker, kind, prompts, handle, incarnation=self.worker_restarts[worker])

    def wait(self, calls: Sequence[InFlight]) -> InFlight:
        by_handle = {call.handle: call for call in calls}
        ready, _ = ray.wait(list(by_handle), num_returns=1)
        return by_handle[ready[0]]

    def finish_rollout(self, call: Rollout) -> None:
        try:
            result = ray.get(call.handle)
        except ray.exceptions.RayActorError as error:
            raise WorkerDied(str(error)) from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"rollout worker {call.worker} failed: {error}") from error
        self.intake.take(result, call.kind)
        if self.stop_when is not None and self.control.may_start_work():
            reason = self.stop_when(self.throughput)
            if reason is not None:
                self.control.request_stop(reason)

    def replace_worker(self, call: Rollout | WeightPush, error: BaseException) -> None:
        """`call`'s worker died: a new one, unless an earlier report about the same process replaced it."""
        if call.incarnation == self.worker_restarts[call.worker]:
            self._replace_worker(call.worker, error)
        self._scheduled[call.worker] = self.weight_sync.worker_versions[call.worker]

    def finish_push(self, call: WeightPush) -> None:
        try:
            confirmed = ray.get(call.handle)
        except ray.exceptions.RayError as error:
            if call.incarnation != self.worker_restarts[call.worker] or not self._alive(self.workers[call.worker]):
                self.replace_worker(call, error)
                return
            if call.version < self.weight_sync.latest.version or not self._alive(self.learner):
                # the weights of a learner that died before handing them over: superseded, or
                # about to be, once its failed step brings up a new learner
                self.run_dir.event(f"weight sync of version {call.version} to {call.worker} failed: {error}")
                return
            raise DriverError(f"weight sync to {call.worker} failed: {error}") from error
        seconds = self.weight_sync.confirm(call.worker, confirmed["version"])
        self.metrics.observe_worker_version(call.worker, self.weight_sync.worker_versions[call.worker])
        if seconds is not None:
            self._last_sync_seconds = seconds
            self.metrics.observe_weight_sync(seconds)

    def finish_step(self, call: Step) -> list[WeightPush]:
        try:
            step: LearnerStep = ray.get(call.handle)
        except ray.exceptions.RayActorError as error:
            raise LearnerDied(f"the learner died during step {self.step + 1}: {error}") from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"learner failed: {error}") from error
        self.throughput.learner_busy_seconds += time.perf_counter() - call.started
        self._checkpoints.trained(g.id for g in call.groups)
        pushes: list[WeightPush] = []
        if not step.result.skipped:
            weights_ref = self._export_weights(step.policy_version)
            self.weight_sync.publish(step.policy_version, weights_ref)
            self._announce(step.policy_version, weights_ref)
            pushes = self._push(step.policy_version)
        self._on_learner_step(step, call.groups, self.weight_sync.latest.ref)
        self._guard_non_finite(step.result, call.groups)
        if self._progress is not None:
            self._progress.update(1)
            self._progress.set_postfix(self._postfix(), refresh=False)
        return pushes

    def at_step_boundary(self) -> None:
        every = self.config.checkpoint.every_steps
        if self.control.take_checkpoint_request():
            self._checkpoint("requested")
        elif every and self.step % every == 0:
            self._checkpoint("periodic")

    def replace_learner(self, error: BaseException) -> list[WeightPush]:
        self._replace_learner(error)
        return self._push(self.policy_version)

    def wait_while_paused(self) -> None:
        self._wait_while_paused(self._progress)

    def describe(self) -> str:
        return f"buffer {self.buffer.stats()}"

    def _push(self, version: int) -> list[WeightPush]:
        """Send the latest published weights (`version`) to every worker."""
        pushes = []
        for handle, worker in self.weight_sync.push(self.workers).items():
            pushes.append(WeightPush(worker, version, handle, incarnation=self.worker_restarts[worker]))
            self._scheduled[worker] = version
        return pushes

    @staticmethod
    def _alive(actor: Any) -> bool:
        try:
            ray.get(actor.ping.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return False
        return True

    def _replace_learner(self, error: BaseException) -> None:
        """Start a new learner from the last checkpoint (the warm start before the first) after one died.

        The groups trained since that checkpoint were never acknowledged: they go back to the buffer
        and are trained again, and the step counter and `metrics.jsonl` go back to the checkpoint.
        The restored weights are published under a new policy version, larger than any the dead
        learner published. Gives up after `supervision.max_learner_restarts` restarts.
        """
        limit = self.config.supervision.max_learner_restarts
        if self.learner_restarts >= limit:
            raise DriverError(
                f"the learner died again after {self.learner_restarts} restarts "
                f"(supervision.max_learner_restarts={limit}); giving up: {error}"
            )
        self.learner_restarts += 1
        checkpoint = latest_checkpoint(self.run_dir)
        for peer in self._learner_peers:  # ranks of the dead learner's process group cannot join a new one
            ray.kill(peer)
        self.learner, self._learner_peers = create_learner(self.config, self._initial_weights_ref, self.placement)
        step = 0
        if checkpoint is not None:
            self._get(self.learner.load_checkpoint.remote(str(checkpoint)), "learner checkpoint load")
            step = read_step(checkpoint)
        version = self._get(self.learner.renumber.remote(self.weight_sync.version + 1), "learner renumber")
        requeued = self.buffer.requeue_pending()
        self._checkpoints.forget_trained()
        self.step, self.policy_version = step, version
        self.run_dir.truncate_metrics(step)
        self.run_dir.event(
            f"learner died ({type(error).__name__}); restart {self.learner_restarts} from "
            f"{checkpoint or 'the warm start'} at step {step} as policy version {version}; {requeued} groups requeued"
        )
        self.metrics.learner_restarts.inc()
        self._form_broadcast_group()
        weights_ref = self._export_weights(version)
        self.weight_sync.publish(version, weights_ref)
        self._announce(version, weights_ref)

    def _guard_non_finite(self, result: StepResult, groups: list[Group]) -> None:
        """Log a step skipped for non-finite values with its batch; fail the run after too many in a row."""
        if result.non_finite:
            ids = ", ".join(g.id for g in groups)
            self.run_dir.event(f"learner step {self.step} skipped: {result.skip_reason}; batch: {ids}")
            self.metrics.skipped_steps.labels(reason="non_finite").inc()
        if self.non_finite.observe(result):
            raise DriverError(
                f"{self.non_finite.consecutive} learner steps in a row had non-finite loss or gradients "
                f"(supervision.max_nonfinite_steps={self.non_finite.limit}); the weights were left unchanged; "
                f"last: {result.skip_reason}"
            )

    def _export_weights(self, version: int) -> Any:
        """What to publish for the learner's `version`: the learner's export (shared memory or object
        store), or with transport 'nccl' a ticket, the learner broadcasting meanwhile."""
        if self.config.weight_sync.transport != "nccl":
            return self.learner.export_weights.remote()
        # the broadcast's outcome reaches the driver through the workers' receiving calls
        self.learner.broadcast_weights.remote()
        return BroadcastTicket(version)

    def _readable(self, weights_ref: Any) -> Any:
        """A published version as weights one reader can fetch on its own: a broadcast ticket (transport
        'nccl') becomes a copy through the object store; other publications already are."""
        if isinstance(weights_ref, BroadcastTicket):
            return self.learner.export_weights_object_store.remote()
        return weights_ref

    def _form_broadcast_group(self) -> None:
        """Transport 'nccl': (re)form the broadcast group of the learner and the current workers."""
        if self.config.weight_sync.transport != "nccl":
            return
        settings = self.config.weight_sync
        vllm = self.config.rollout.engine == "vllm"
        group = form_broadcast_group(
            self.learner,
            self.workers,
            ranks_per_worker=self.config.rollout.vllm.tensor_parallel_size if vllm else 1,
            bucket_bytes=settings.bucket_bytes,
            timeout_s=settings.timeout_seconds,
        )
        self.run_dir.event(
            f"weight broadcast group formed: {group['world_size']} ranks over {group['backend']} "
            f"at {group['host']}:{group['port']}, buckets of {settings.bucket_mb} MiB"
        )

    def _new_worker(self, name: str, incarnation: int = 0) -> Any:
        index = int(name.removeprefix("worker-"))
        return RolloutWorker.options(**rollout_options(self.config, self.placement, index)).remote(
            name,
            self.config.model,
            self.config.rollout,
            seed=self.config.seed * 1000 + index + 7919 * incarnation,
            prompt_format=self.prompt_format,
        )

    def _replace_worker(self, name: str, error: BaseException) -> Any:
        """Start a new actor for a rollout worker that died and load the newest weights into it.

        Gives up, failing the run, after `supervision.max_worker_restarts` restarts of one worker.
        """
        limit = self.config.supervision.max_worker_restarts
        if self.worker_restarts[name] >= limit:
            raise DriverError(
                f"rollout worker {name} died again after {self.worker_restarts[name]} restarts "
                f"(supervision.max_worker_restarts={limit}); giving up: {error}"
            )
        self.worker_restarts[name] += 1
        self.run_dir.event(f"rollout worker {name} died ({type(error).__name__}); restart {self.worker_restarts[name]}")
        actor = self.workers[name] = self._new_worker(name, self.worker_restarts[name])
        latest = self.weight_sync.latest
        # a copy for the new worker (under 'nccl' it is not in the group yet; it joins below)
        weights = self._readable(latest.ref)
        confirmed = self._get(actor.load_weights.remote(latest.version, weights), f"weights for restarted {name}")
        self._form_broadcast_group()
        self.weight_sync.confirm(name, confirmed["version"])
        self.metrics.observe_worker_version(name, confirmed["version"])
        self.metrics.worker_restarts.labels(worker=name).inc()
        return actor

    def _wait_while_paused(self, progress: Any) -> None:
        """Nothing is in flight and the run is paused: wait for resume or stop, taking checkpoints."""
        self.run_dir.event(
            f"run paused at step {self.step}, policy version {self.policy_version}, buffer {self.buffer.stats()}"
        )
        if progress is not None:
            progress.set_description("paused")
        while True:
            if self.control.take_checkpoint_request():
                self._checkpoint("requested")
            state = self.control.wait_while_paused(PAUSED_POLL_SECONDS)
            if state is not RunState.PAUSED:
                break
        self.run_dir.event(f"run {state} after pause at step {self.step}")
        if progress is not None:
            progress.set_description("learner step")

    def _announce(self, version: int, weights_ref: Any) -> None:
        """Announce a published policy version through the run's control (as `POST .../weights` does)."""
        location = f"ray-object:{weights_ref.hex()}" if hasattr(weights_ref, "hex") else str(weights_ref)
        try:
            self.control.announce_weights(version, location)
        except WeightVersionConflict as conflict:
            self.run_dir.event(f"weight announcement of version {version} refused: {conflict}")

    def _checkpoint(self, why: str) -> str:
        """Commit the run at this step boundary (the learner is idle here): see `Checkpoints.commit`."""
        state = DriverState(
            step=self.step,
            policy_version=self.policy_version,
            filtered=self.filtered,
            rng_state=self.rng.getstate(),
            initial_eval=self.initial_eval,
            warm_start=self.warm_start_info,
            curriculum=self.sampler.state_dict(),
        )
        return self._checkpoints.commit(state, why)

    def _save_learner(self, path: Path) -> None:
        """The learner's DeepSpeed checkpoint and Hugging Face model, into `path`."""
        try:
            ray.get(self.learner.save_checkpoint.remote(str(path)))
        except ray.exceptions.RayActorError as error:
            raise LearnerDied(f"the learner died while checkpointing step {self.step}: {error}") from error
        except ray.exceptions.RayError as error:
            raise DriverError(f"learner checkpoint failed: {error}") from error

    @property
    def checkpoints(self) -> list[str]:
        """This run's complete checkpoints, oldest first."""
        return list(self._checkpoints.paths) if self._checkpoints is not None else []

    def _restore(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        """The driver's and the curriculum's state at `checkpoint`; returns the policy weights saved there."""
        from safetensors.torch import load_file

        saved = DriverState.read(checkpoint)
        self.step = saved.step
        self.policy_version = saved.policy_version
        self.filtered = saved.filtered
        self.rng.setstate(saved.rng_state)
        self.initial_eval = saved.initial_eval
        self.warm_start_info = saved.warm_start
        self.sampler.load_state_dict(saved.curriculum)  # as it was at the checkpoint, not later
        self._checkpoints.resumed(checkpoint)
        self.resumed_from = str(checkpoint)
        kept = self.run_dir.truncate_metrics(self.step)
        self.run_dir.event(f"metrics.jsonl kept its {kept} records up to step {self.step}")
        return load_file(str(checkpoint / "model" / "model.safetensors"))

    def _get(self, ref: Any, what: str) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as error:
            raise DriverError(f"{what} failed: {error}") from error

    def _next_rollout(self) -> tuple[str, list]:
        """The next call for an idle worker: all-fail prompts waiting for a rescue first, else sampled prompts."""
        size = self.config.rollout.prompts_per_call
        rescue = self.rescue.take(size)
        if rescue is not None:
            return rescue[0].name, rescue[1]
        return "sample", self.sampler.next_prompts(size, self.rng)

    def _submit(self, kind: str, actor: Any, prompts: list) -> Any:
        if kind == "sample":
            return actor.rollout.remote(prompts)
        return self.rescue.by_name(kind).submit(actor, prompts)

    def _rescorer(self, worker: str) -> LogprobsOf | None:
        """How rollout worker `worker` scores a cached solution (a blocking call), or None when it is gone."""
        actor = self.workers.get(worker)
        if actor is None:
            return None

        def logprobs_of(prompt_ids, token_ids) -> list[float]:
            try:
                return ray.get(actor.token_logprobs.remote(list(prompt_ids), list(token_ids)), timeout=60)
            except (ray.exceptions.RayError, TimeoutError) as error:
                raise RescoreFailed(f"{worker}: {type(error).__name__}") from error

        return logprobs_of

    def _on_learner_step(self, step: LearnerStep, groups: list[Group], weights_ref: Any) -> None:
        result = step.result
        learner_version_before = self.policy_version
        self.policy_version = step.policy_version
        self.step += 1
        self.intake.stepped()
        self.throughput.trained_groups += len(groups)
        self.throughput.trained_tokens += sum(g.num_tokens for g in groups)
        rewards_by_distribution: dict[str, list[float]] = defaultdict(list)
        for group in groups:
            rewards_by_distribution[group.prompt.distribution].extend(group.rewards)
        staleness = [learner_version_before - g.policy_version for g in groups]
        self.staleness_seen.extend(staleness)
        probabilities = self.sampler.on_learner_step()
        self.metrics.set_distributions(probabilities)
        value_model_error = self.sampler.value_model_error()
        if value_model_error is not None:
            self.metrics.observe_value_model_error(value_model_error)
        self.buffer.save_state(CURRICULUM_STATE, self.sampler.to_bytes())
        wall = self.throughput.wall()
        record: dict[str, Any] = {
            "step": self.step,
            "policy_version": self.policy_version,
            "elapsed_seconds": wall,
            "loss": result.loss,
            "kl": result.kl,
            "entropy": result.entropy,
            "clip_fraction": result.clip_fraction,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "learner_step_seconds": result.seconds,
            "reward_mean": fmean(r for g in groups for r in g.rewards),
            "reward_by_distribution": {d: fmean(v) for d, v in sorted(rewards_by_distribution.items())},
            "advantage_abs_mean": result.advantages_abs_mean,
            "staleness_mean": fmean(staleness),
            "staleness_max": max(staleness),
            "buffer": self.buffer.stats(),
            "filtered": dict(self.filtered),
            "generated_groups": self.throughput.generated_groups,
            "effective_ratio": self.throughput.signal_groups / max(1, self.throughput.generated_groups),
            "trained_signal_ratio": sum(g.has_signal for g in groups) / len(groups),
            "scheduler_probabilities": probabilities,
            "value_model_abs_error": value_model_error,
            "selection_seconds": self.sampler.selection_seconds,
            "generated_tokens": self.throughput.generated_tokens,
            "rollout_tokens_per_second": self.throughput.generated_tokens / wall if wall > 0 else 0.0,
            "learner_idle_fraction": self.throughput.learner_idle_fraction(),
            "weight_sync_seconds": getattr(self, "_last_sync_seconds", None),
            "worker_versions": dict(self.weight_sync.worker_versions),
            "eval_accuracy": None,
        }
        # what the learner's algorithm options did this step (0 when an option is off)
        record.update({key: getattr(result, key) for key in LEARNER_OPTION_STATS})
        if self.deepsearch is not None:
            record["deepsearch"] = self.deepsearch.counts.as_dict()
            record["tree_groups_trained"] = sum(is_tree_group(g) for g in groups)
        samples: list[dict[str, Any]] = []
        if self.step % self.config.eval.every_steps == 0:
            accuracy, by_distribution = self._evaluate(weights_ref)
            record["eval_accuracy"] = accuracy
            record["eval_by_distribution"] = by_distribution
            self._last_eval = accuracy
            self.metrics.observe_eval(accuracy)
            samples = sample_records(
                self.samples.groups, self.config.eval.samples, step=self.step, render=self.renderer.text
            )
        self._last_record = record
        self.run_dir.append_metrics(record)
        self.trackers.log_metrics(self.step, record)
        if samples:
            self.run_dir.append_samples(samples)
            self.trackers.log_samples(self.step, samples)
        self.metrics.observe_step(
            step=self.step,
            policy_version=self.policy_version,
            seconds=result.seconds,
            loss=result.loss,
            kl=result.kl,
            entropy=result.entropy,
            reward_by_distribution=record["reward_by_distribution"],
            staleness=staleness,
            learner_idle_fraction=record["learner_idle_fraction"],
            mismatch=(result.mismatch_k3, result.mismatch_abs_mean) if result.mismatch_tokens else None,
        )
        self.metrics.observe_buffer(self.buffer.ready_count(), self.buffer.pending_count())

    # ----------------------------------------------------------------------------- reporting
    def _progress_bar(self):
        if not self.show_progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.max_steps, desc="learner step", unit="step", dynamic_ncols=True)

    def _postfix(self) -> dict[str, str]:
        record = self._last_record
        postfix = {
            "reward": f"{record['reward_mean']:.2f}",
            "tok/s": f"{record['rollout_tokens_per_second']:.0f}",
            "stale": f"{record['staleness_mean']:.1f}",
        }
        if getattr(self, "_last_eval", None) is not None:
            postfix["held-out"] = f"{self._last_eval:.2f}"
        return postfix

    def progress(self) -> dict[str, Any]:
        """What status shows about the run's progress (read from the control plane's thread)."""
        record = self._last_record or {}
        throughput = getattr(self, "throughput", None)
        weight_sync = getattr(self, "weight_sync", None)
        wall = throughput.wall() if throughput else 0.0
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "worker_versions": dict(weight_sync.worker_versions) if weight_sync else {},
            "reward_mean": record.get("reward_mean"),
            "reward_by_distribution": record.get("reward_by_distribution", {}),
            "eval_accuracy": getattr(self, "_last_eval", None),
            "staleness_mean": record.get("staleness_mean"),
            "learner_steps_per_second": self.step / wall if wall > 0 else 0.0,
            "rollout_tokens_per_second": throughput.generated_tokens / wall if throughput and wall > 0 else 0.0,
            "learner_idle_fraction": throughput.learner_idle_fraction() if throughput else None,
            "buffer": self.buffer.stats() if self.buffer is not None else {},
            "filtered": dict(self.filtered),
            "checkpoints": list(self.checkpoints),
        }

    def _summary(
        self, final_accuracy: float, final_by_distribution: dict[str, float], *, state: RunState = RunState.FINISHED
    ) -> dict[str, Any]:
        initial_accuracy, initial_by_distribution = self.initial_eval
        wall = self.throughput.wall()
        sync = self.weight_sync.sync_seconds
        return {
            "run_id": self.run_dir.run_id,
            "state": str(state),
            "stopped_reason": self.stopped_reason or "max_steps",
            "checkpoints": list(self.checkpoints),
            "resumed_from": self.resumed_from,
            "steps": self.step,
            "policy_version": self.policy_version,
            "rl_seconds": wall,
            "warm_start": self.warm_start_info,
            "held_out_prompts": len(self.held_out),
            "held_out_accuracy_initial": initial_accuracy,
            "held_out_accuracy_final": final_accuracy,
            "held_out_accuracy_gain": final_accuracy - initial_accuracy,
            "held_out_by_distribution_initial": initial_by_distribution,
            "held_out_by_distribution_final": final_by_distribution,
            "learner_steps_per_second": self.step / wall if wall > 0 else 0.0,
            "trained_groups_per_second": self.throughput.trained_groups / wall if wall > 0 else 0.0,
            "rollout_tokens_per_second": self.throughput.generated_tokens / wall if wall > 0 else 0.0,
            "learner_idle_fraction": self.throughput.learner_idle_fraction(),
            "generated_groups": self.throughput.generated_groups,
            "generated_tokens": self.throughput.generated_tokens,
            "trained_groups": self.throughput.trained_groups,
            "weight_sync_seconds_mean": fmean(sync) if sync else None,
            "buffer": self.buffer.stats() if self.buffer else {},
            "filtered": dict(self.filtered),
            "effective_ratio": self.throughput.signal_groups / max(1, self.throughput.generated_groups),
            "value_model_abs_error": self.sampler.value_model_error(),
            "max_staleness": self.config.buffer.max_staleness,
            "staleness_mean": fmean(self.staleness_seen) if self.staleness_seen else 0.0,
            "deepsearch": self.deepsearch.summary() if self.deepsearch is not None else None,
        }

    def _shutdown(self) -> None:
        trackers = getattr(self, "trackers", None)
        if trackers is not None:
            trackers.close()
        learner = getattr(self, "learner", None)
        if learner is not None:
            try:  # removes the shared-memory weight segment at once (else: when this process exits)
                ray.get(learner.close.remote(), timeout=30)
            except Exception as error:  # a dead or stuck learner must not keep the rest from stopping
                self.run_dir.event(f"learner close failed: {type(error).__name__}: {error}")
        for actor in [*getattr(self, "workers", {}).values(), learner, *getattr(self, "_learner_peers", [])]:
            if actor is not None:
                ray.kill(actor)
        placement = getattr(self, "placement", None)
        if placement is not None:  # a long-lived cluster gets the reserved bundles back
            placement.release()
        if self.deepsearch is not None:
            self.deepsearch.close()
        if self.buffer is not None:
            self.buffer.close()
        if self._redis_server is not None:
            self._redis_server.stop()
