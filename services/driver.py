"""The driver: wires a run's parts together and is the run loop's `RunPort`.

The parts, each an object of its own:

- the run loop (`services/run/loop.py`) keeps rollout calls, a learner step and weight pushes in flight
  together and wakes on whichever finishes first; what it may issue is the admission gate's rule
  (`services/run/admission.py`: bounded staleness and backpressure; `max_staleness: 0` is synchronous);
- the rollout workers (`RolloutPool`) and the learner (`LearnerGroup`), with their restarts; a step's
  result carries its new weights, which are published and pushed to every worker;
- the intake (`Intake`): a rollout's groups through the prompt statistics, the rescues
  (`services/rescue/`) and the filters into the buffer;
- checkpoints (`Checkpoints`: trained groups are acknowledged only when one commits), held-out
  evaluation (`HeldOut`), the typed step record, progress and summary (`services/run/report.py`).

The driver builds them from the config, routes each finished call to its part, records every step
(metrics.jsonl, trackers, samples.jsonl, Prometheus `RunMetrics`) and obeys the run's `RunControl` at
step boundaries: while the run is not `running` nothing new is issued; what is in flight completes,
then a pausing run waits as `paused` and a stopping one ends with a final checkpoint and summary.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from statistics import fmean
from typing import Any

import ray
import torch

from orchard.config import RunConfig
from orchard.learner.trainer import StepResult
from orchard.protocols import Buffer
from orchard.records import Group
from orchard.rollout.model import hidden_size
from orchard.rollout.prompts import PromptFormat, PromptRenderer
from orchard.rollout.tokenizer import load_tokenizer
from orchard.rollout.tools import TOOL_OUTCOMES
from orchard.services.buffer.factory import make_buffer
from orchard.services.control.run_control import RunControl, RunState
from orchard.services.curriculum.filtering import REASONS as FILTER_REASONS
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.evaluation import HeldOut
from orchard.services.learner_actor import LearnerStep
from orchard.services.metrics import RunMetrics
from orchard.services.placement import reserve
from orchard.services.rescue.queue import RescueQueue, build_rescues
from orchard.services.reward_models import RewardModelServers
from orchard.services.run.admission import AdmissionGate
from orchard.services.run.checkpoints import Checkpoints, DriverState, read_step, resume_checkpoint
from orchard.services.run.elastic import Elastic
from orchard.services.run.intake import Intake
from orchard.services.run.learners import LearnerGroup
from orchard.services.run.loop import DriverError, InFlight, LoopStalled, Rollout, RunLoop, Step, WeightPush
from orchard.services.run.pool import RolloutPool
from orchard.services.run.report import LEARNER_OPTION_STATS, RunProgress, RunSummary, StepRecord
from orchard.services.run.throughput import Throughput
from orchard.services.run_dir import RunDirectory
from orchard.services.samples import SampleKeeper, sample_records
from orchard.services.supervision import NonFiniteGuard
from orchard.services.trackers import Trackers
from orchard.services.warmstart import warm_start
from orchard.services.weights.sync import WeightSync
from orchard.verifiers.sources import PromptPool

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
        self._last_record: StepRecord | None = None
        self._last_eval: float | None = None  # the latest held-out accuracy
        self.throughput: Throughput | None = None  # counts from the RL phase's start
        self.resumed_from: str | None = None
        self.rescue = RescueQueue([])  # the configured rescues open with the buffer
        self.prompt_format = PromptFormat.from_config(config.data)
        self.trackers = Trackers([])  # the configured ones open when the run starts
        self._deadline: float | None = None  # max_minutes, as a time.perf_counter() value
        self._progress = None  # the progress bar, when shown
        self.handed_back: deque[tuple[str, list]] = deque()  # (kind, prompts) of removed workers that died
        self.elastic: Elastic | None = None

    # ----------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        config = self.config
        torch.set_num_threads(1)
        self.prompt_pool = PromptPool.from_config(config.data)
        self.run_dir.event(
            f"prompt pool: distributions {self.prompt_pool.distributions}, {len(self.prompt_pool.held_out)} held out"
        )
        for problem in self.prompt_pool.problems:
            self.run_dir.event(f"skipped prompt line: {problem}")
        # the newest checkpoint that verifies; damaged newer ones are logged and set aside
        checkpoint = resume_checkpoint(self.run_dir, self.run_dir.event) if self.resume else None
        self.buffer, self._redis_server = make_buffer(
            config.buffer, namespace=self.run_dir.run_id, directory=self.run_dir.path / "redis"
        )
        self.run_dir.event(f"buffer: {type(self.buffer).__name__}")
        self._checkpoints = Checkpoints(
            self.run_dir,
            self.buffer,
            self._save_learner,
            keep_last=config.checkpoint.keep_last,
            on_error=config.checkpoint.on_error,
            on_failure=self.metrics.checkpoint_failures.inc,
        )
        self.sampler = PromptSampler(
            self.prompt_pool,
            config.curriculum,
            advantage_std=config.learner.advantage_std,
            dynamic_sampling=config.learner.dynamic_sampling,
            state_dimension=hidden_size(config.model) if config.curriculum.pcl.features == "policy" else 0,
            seed=config.seed,
        )
        saved = self.buffer.load_state(CURRICULUM_STATE)
        if saved is not None:
            self.sampler.load_bytes(saved)
            self.run_dir.event("curriculum state restored from the buffer")

        if checkpoint is not None:
            state_dict = self._restore(checkpoint)
        else:
            state_dict, self.warm_start_info = warm_start(config, self.prompt_pool, log=self.run_dir.event)
        if self.sampler.gain is not None:  # before the learner and the workers take the accelerator
            self._rank_prompts(state_dict)
        from orchard.learner.weights import state_dict_to_numpy

        initial_ref = ray.put(state_dict_to_numpy(state_dict))
        self._initial_weights_ref = initial_ref  # a learner that dies before any checkpoint starts again from these
        self.placement = (
            reserve(config, waiting=self._waiting_for_placement) if config.cluster.placement_groups else None
        )
        self.control.set_pending_reason(None)
        self.weight_sync = WeightSync(initial_version=self.policy_version)
        self.learners = LearnerGroup(
            config, initial_ref, self.placement, self.weight_sync, self.control, self.run_dir.event
        )
        if checkpoint is not None:
            version = self.learners.load_checkpoint(checkpoint)
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
        self.reward_models = RewardModelServers(config, self.run_dir.event) if config.reward_models else None
        self.pool = RolloutPool(
            config,
            self.placement,
            self.prompt_format,
            self.weight_sync,
            self.metrics,
            self.run_dir.event,
            reward_models=self.reward_models.for_workers() if self.reward_models else None,
        )
        self.non_finite = NonFiniteGuard(config.supervision.max_nonfinite_steps)
        self.learners.publish(self.policy_version, initial_ref)
        self.pool.load_published()
        self.elastic = Elastic(
            config,
            self.pool,
            self.control,
            self.metrics,
            stale_groups=lambda: self.buffer.stats().get("stale", 0),
            log=self.run_dir.event,
        )
        self.learners.form_broadcast_group(self.pool.actors)
        self.learners.ping()
        self.rescue = RescueQueue(build_rescues(config))
        self.rescue.open(self.buffer, self.run_dir.event, self.metrics)
        self.metrics.declare_filter_reasons(FILTER_REASONS)
        self.metrics.declare_tools(self.config.rollout.multi_turn.close_marks(), TOOL_OUTCOMES)
        self.metrics.set_distributions(self.sampler.probabilities())
        self.metrics.observe_buffer(self.buffer.ready_count(), self.buffer.pending_count())

        self.held_out = HeldOut(
            config,
            self.prompt_pool.held_out,
            self.prompt_format,
            worker=lambda: self.pool.actors["worker-0"],
            readable=self.learners.readable,
            log=self.run_dir.event,
            reward_models=self.reward_models.for_workers() if self.reward_models else None,
        )
        self.held_out.load(self.policy_version, state_dict)
        if config.curriculum.pcl.features == "policy":
            self.sampler.prompt_states = self.held_out.prompt_states
        self.renderer = PromptRenderer(load_tokenizer(config.model), self.prompt_format)
        self.samples = SampleKeeper()

    def _waiting_for_placement(self, reason: str) -> None:
        self.control.set_pending_reason(reason)
        self.run_dir.event(f"run pending: {reason}")

    def _rank_prompts(self, state_dict: dict[str, torch.Tensor]) -> None:
        """GAIN-RL's ranking of its pool by the policy of `state_dict` (the starting one), unless a saved
        curriculum state already holds it."""
        gain = self.sampler.gain
        if gain.is_ranked:
            self.run_dir.event(
                f"GAIN-RL ranking of {len(gain.ranked)} prompts restored, sampling mean at rank {gain.mean:.1f}"
            )
            return
        from orchard.services.curriculum.gain_ranking import measure_concentrations

        settings = self.config.curriculum.gain
        ranking = measure_concentrations(
            self.config.model,
            state_dict,
            self.prompt_format,
            gain.candidates,
            inter_weight=settings.inter_weight,
            batch_size=settings.batch_size,
        )
        gain.rank(ranking.concentrations)
        self.run_dir.event(ranking.describe())

    def _evaluate(self, weights_ref: Any | None = None) -> tuple[float, dict[str, float]]:
        """Held-out accuracy of the current policy version (published as `weights_ref`); its time is not
        counted in the run's rates."""
        started = time.perf_counter()
        accuracy, by_distribution = self.held_out.evaluate(self.policy_version, weights_ref)
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
        return self.pool.scheduled

    def fresh_ready(self, min_policy_version: int) -> int:
        return self.buffer.ready_count(min_policy_version=min_policy_version)

    def start_step(self, count: int, min_policy_version: int) -> Step:
        groups = self.buffer.take(count, min_policy_version=min_policy_version)
        poisoned = self.step + 1 in self.config.faults.nonfinite_loss_at_steps
        return self.learners.start_step(groups, time.perf_counter(), inject_nonfinite=poisoned)

    def start_rollout(self, worker: str, again: Rollout | None = None) -> Rollout:
        kind, prompts = (again.kind, again.prompts) if again is not None else self._next_rollout()
        if kind == "sample":  # with the cached solutions a group of these prompts may get, to score
            score = self.rescue.to_score(prompts, self.pool.scheduled[worker])
            return self.pool.rollout(
                worker, kind, prompts, lambda actor, prompts: actor.rollout.remote(prompts, score=score)
            )
        return self.pool.rollout(worker, kind, prompts, self.rescue.by_name(kind).submit)

    def wait(self, calls: Sequence[InFlight]) -> InFlight:
        by_handle = {call.handle: call for call in calls}
        ready, _ = ray.wait(list(by_handle), num_returns=1)
        return by_handle[ready[0]]

    def finish_rollout(self, call: Rollout) -> None:
        self.intake.take(self.pool.result(call), call.kind)
        if self.stop_when is not None and self.control.may_start_work():
            reason = self.stop_when(self.throughput)
            if reason is not None:
                self.control.request_stop(reason)

    def replace_worker(self, call: Rollout, error: BaseException) -> bool:
        if self.pool.replace(call, error, self.learners):
            return True
        self.handed_back.append((call.kind, call.prompts))
        self.run_dir.event(f"{len(call.prompts)} prompts of removed {call.worker} handed back to the other workers")
        return False

    def scale(self) -> None:
        self.elastic.turn(self.throughput, self.learners)

    def finish_push(self, call: WeightPush) -> None:
        self.pool.finish_push(call, self.learners)

    def finish_step(self, call: Step) -> list[WeightPush]:
        if call.learner != self.learners.restarts:  # taken by a learner since replaced: its groups were requeued
            self.run_dir.event(f"a step on {len(call.groups)} groups was lost with the learner that took it")
            return []
        step = self.learners.finish_step(call, self.step + 1)
        self.throughput.learner_busy_seconds += time.perf_counter() - call.started
        self._checkpoints.trained(g.id for g in call.groups)
        pushes = [] if step.result.skipped else self.pool.push()
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
        return self.pool.push()

    def wait_while_paused(self) -> None:
        self._wait_while_paused(self._progress)

    def describe(self) -> str:
        return f"buffer {self.buffer.stats()}"

    def _replace_learner(self, error: BaseException) -> None:
        """Start a new learner from the last checkpoint (the warm start before the first) after one died.

        The groups trained since that checkpoint were never acknowledged: they go back to the buffer
        and are trained again, and the step counter and `metrics.jsonl` go back to the checkpoint.
        The restored weights are published under a new policy version, larger than any the dead
        learner published. Gives up after `supervision.max_learner_restarts` restarts.
        """
        checkpoint = self._checkpoints.restorable()  # verified; a damaged one is skipped (logged)
        restarts_before = self.learners.restarts
        version = self.learners.restart(error, checkpoint)
        step = read_step(checkpoint) if checkpoint is not None else 0
        requeued = self.buffer.requeue_pending()
        self._checkpoints.forget_trained()
        self.step, self.policy_version = step, version
        self.run_dir.truncate_metrics(step)
        self.run_dir.event(
            f"learner died ({type(error).__name__}); restart {self.learners.restarts} from "
            f"{checkpoint or 'the warm start'} at step {step} as policy version {version}; {requeued} groups requeued"
        )
        self.metrics.learner_restarts.inc(self.learners.restarts - restarts_before)
        self.learners.form_broadcast_group(self.pool.actors)
        self.learners.publish(version)

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

    def _checkpoint(self, why: str) -> str | None:
        """Commit the run at this step boundary (the learner is idle here): see `Checkpoints.commit`
        (None: it could not be written and `checkpoint.on_error` is `keep_previous`)."""
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
        self.learners.save_checkpoint(path, self.step)

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

    def _next_rollout(self) -> tuple[str, list]:
        """The next call for an idle worker: prompts handed back by a removed worker that died first, then
        all-fail prompts waiting for a rescue, else sampled prompts."""
        if self.handed_back:
            return self.handed_back.popleft()
        size = self.config.rollout.prompts_per_call
        rescue = self.rescue.take(size)
        if rescue is not None:
            kind, prompts = rescue[0].name, rescue[1]
        else:
            kind, prompts = "sample", self.sampler.next_prompts(size, self.rng)
        self.throughput.issued_prompts += len(prompts)
        return kind, prompts

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
        if self.sampler.prompt_states is not None and self.step % self.config.curriculum.pcl.refresh_steps == 0:
            self.held_out.refresh(self.policy_version, weights_ref, purpose="PCL's reading of prompts")
        probabilities = self.sampler.on_learner_step()
        self.metrics.set_distributions(probabilities)
        value_model_error = self.sampler.value_model_error()
        if value_model_error is not None:
            self.metrics.observe_value_model_error(value_model_error)
        self.buffer.save_state(CURRICULUM_STATE, self.sampler.to_bytes())
        throughput = self.throughput
        record = StepRecord(
            step=self.step,
            policy_version=self.policy_version,
            elapsed_seconds=throughput.wall(),
            loss=result.loss,
            kl=result.kl,
            entropy=result.entropy,
            clip_fraction=result.clip_fraction,
            grad_norm=result.grad_norm,
            skipped=result.skipped,
            learner_step_seconds=result.seconds,
            reward_mean=fmean(r for g in groups for r in g.rewards),
            reward_by_distribution={d: fmean(v) for d, v in sorted(rewards_by_distribution.items())},
            advantage_abs_mean=result.advantages_abs_mean,
            staleness_mean=fmean(staleness),
            staleness_max=max(staleness),
            buffer=self.buffer.stats(),
            filtered=dict(self.filtered),
            generated_groups=throughput.generated_groups,
            effective_ratio=throughput.effective_ratio(),
            trained_signal_ratio=sum(g.has_signal for g in groups) / len(groups),
            scheduler_probabilities=probabilities,
            value_model_abs_error=value_model_error,
            selection_seconds=self.sampler.selection_seconds,
            gain_center=self.sampler.gain.mean if self.sampler.gain is not None else None,
            generated_tokens=throughput.generated_tokens,
            rollout_tokens_per_second=throughput.per_second(throughput.generated_tokens),
            learner_idle_fraction=throughput.learner_idle_fraction(),
            weight_sync_seconds=self.pool.last_sync_seconds,
            worker_versions=dict(self.weight_sync.worker_versions),
            learner_options={key: getattr(result, key) for key in LEARNER_OPTION_STATS},
            rescue=self.rescue.step_figures(groups),
        )
        samples: list[dict[str, Any]] = []
        if self.step % self.config.eval.every_steps == 0:
            accuracy, by_distribution = self._evaluate(weights_ref)
            record.eval_accuracy, record.eval_by_distribution = accuracy, by_distribution
            self._last_eval = accuracy
            self.metrics.observe_eval(accuracy)
            samples = sample_records(
                self.samples.groups, self.config.eval.samples, step=self.step, render=self.renderer.text
            )
        self._last_record = record
        line = record.line()
        self.run_dir.append_metrics(line)
        self.trackers.log_metrics(self.step, line)
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
            reward_by_distribution=record.reward_by_distribution,
            staleness=staleness,
            learner_idle_fraction=record.learner_idle_fraction,
            mismatch=(result.mismatch_k3, result.mismatch_abs_mean) if result.mismatch_tokens else None,
            critic=(result.value_loss, result.value_explained_variance)
            if self.config.learner.advantage == "gae" and not result.skipped
            else None,
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
            "reward": f"{record.reward_mean:.2f}",
            "tok/s": f"{record.rollout_tokens_per_second:.0f}",
            "stale": f"{record.staleness_mean:.1f}",
        }
        if self._last_eval is not None:
            postfix["held-out"] = f"{self._last_eval:.2f}"
        return postfix

    def progress(self) -> RunProgress:
        """What status shows about the run's progress (read from the control plane's thread)."""
        record, throughput = self._last_record, self.throughput
        weight_sync = getattr(self, "weight_sync", None)
        return RunProgress(
            step=self.step,
            policy_version=self.policy_version,
            worker_versions=dict(weight_sync.worker_versions) if weight_sync else {},
            reward_mean=record.reward_mean if record else None,
            reward_by_distribution=record.reward_by_distribution if record else {},
            eval_accuracy=self._last_eval,
            staleness_mean=record.staleness_mean if record else None,
            learner_steps_per_second=throughput.per_second(self.step) if throughput else 0.0,
            rollout_tokens_per_second=throughput.per_second(throughput.generated_tokens) if throughput else 0.0,
            learner_idle_fraction=throughput.learner_idle_fraction() if throughput else None,
            buffer=self.buffer.stats() if self.buffer is not None else {},
            filtered=dict(self.filtered),
            checkpoints=list(self.checkpoints),
            rollout_workers=len(pool.actors) if (pool := getattr(self, "pool", None)) else 0,
            rollout_workers_target=pool.target if pool else 0,
            scaling_refused=self.elastic.refusal if self.elastic else None,
        )

    def _summary(
        self, final_accuracy: float, final_by_distribution: dict[str, float], *, state: RunState = RunState.FINISHED
    ) -> dict[str, Any]:
        initial_accuracy, initial_by_distribution = self.initial_eval
        throughput, progress = self.throughput, self.progress()
        sync = self.weight_sync.sync_seconds
        summary = RunSummary(
            run_id=self.run_dir.run_id,
            state=str(state),
            stopped_reason=self.stopped_reason or "max_steps",
            checkpoints=progress.checkpoints,
            resumed_from=self.resumed_from,
            steps=progress.step,
            policy_version=progress.policy_version,
            rl_seconds=throughput.wall(),
            warm_start=self.warm_start_info,
            held_out_prompts=len(self.held_out.prompts),
            held_out_accuracy_initial=initial_accuracy,
            held_out_accuracy_final=final_accuracy,
            held_out_accuracy_gain=final_accuracy - initial_accuracy,
            held_out_by_distribution_initial=initial_by_distribution,
            held_out_by_distribution_final=final_by_distribution,
            learner_steps_per_second=progress.learner_steps_per_second,
            trained_groups_per_second=throughput.per_second(throughput.trained_groups),
            rollout_tokens_per_second=progress.rollout_tokens_per_second,
            learner_idle_fraction=progress.learner_idle_fraction,
            generated_groups=throughput.generated_groups,
            generated_tokens=throughput.generated_tokens,
            trained_groups=throughput.trained_groups,
            weight_sync_seconds_mean=fmean(sync) if sync else None,
            buffer=progress.buffer,
            filtered=progress.filtered,
            effective_ratio=throughput.effective_ratio(),
            value_model_abs_error=self.sampler.value_model_error(),
            max_staleness=self.config.buffer.max_staleness,
            staleness_mean=fmean(self.staleness_seen) if self.staleness_seen else 0.0,
            tool_calls=dict(throughput.tool_calls),
            worker_restarts=sum(self.pool.incarnations.values()),
            learner_restarts=self.learners.restarts,
            nonfinite_steps=self.non_finite.total,
            checkpoint_failures=self._checkpoints.failures,
            issued_prompts=throughput.issued_prompts,
            rollout_workers=len(self.pool.actors),
            scale_changes=[asdict(change) for change in self.pool.changes],
            **self.rescue.summary(),
        )
        return summary.model_dump()

    def _shutdown(self) -> None:
        trackers = getattr(self, "trackers", None)
        if trackers is not None:
            trackers.close()
        learners = getattr(self, "learners", None)
        if learners is not None:
            learners.close(self.run_dir.event)
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
        reward_models = getattr(self, "reward_models", None)
        if reward_models is not None:
            reward_models.close()
        placement = getattr(self, "placement", None)
        if placement is not None:  # a long-lived cluster gets the reserved bundles back
            placement.release()
        self.rescue.close()
        if self.buffer is not None:
            self.buffer.close()
        if self._redis_server is not None:
            self._redis_server.stop()
