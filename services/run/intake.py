"""The intake: a finished rollout call's way into the buffer.

rollout result → counters and metrics → prompt statistics and the curriculum (plain samples only) →
the rescues' hooks (DeepSearch mixes in cached solutions; a rescue's own call reports to it) and the
rescue queue for all-fail prompts → the filters (a rescue's own for the groups it claims, the
sampler's for the rest) → the buffer. Only plain
samples inform the curriculum and the prompt statistics: a rescue's groups are not the policy's own
pass rate on the prompt. When the filters drop everything for `STARVATION_STEPS` steps' worth of
groups, the run says so.
"""

from __future__ import annotations

import sys
from collections import Counter

from orchard.config import RunConfig
from orchard.protocols import Buffer
from orchard.records import Group
from orchard.rollout.reward_models import REWARD_MODEL_ERROR as REWARD_MODEL_ERROR_PREFIX
from orchard.rollout.worker import RolloutResult
from orchard.services.curriculum.filtering import REWARD_MODEL_ERROR
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.metrics import RunMetrics
from orchard.services.rescue.queue import RescueQueue
from orchard.services.run.throughput import Throughput
from orchard.services.run_dir import RunDirectory
from orchard.services.samples import SampleKeeper

#: Steps' worth of groups dropped by the filters in a row before the run says it is starving.
STARVATION_STEPS = 10


class Intake:
    def __init__(
        self,
        config: RunConfig,
        buffer: Buffer,
        sampler: PromptSampler,
        rescue: RescueQueue,
        *,
        throughput: Throughput,
        filtered: Counter[str],
        metrics: RunMetrics,
        run_dir: RunDirectory,
        samples: SampleKeeper,
    ) -> None:
        """`filtered`: the run's count of groups dropped, by reason (kept across a resume)."""
        self.config, self.buffer, self.sampler, self.rescue = config, buffer, sampler, rescue
        self.throughput, self.filtered, self.metrics = throughput, filtered, metrics
        self.run_dir, self.samples = run_dir, samples
        self._filtered_since_step: Counter[str] = Counter()
        self._starvation_notice_at = 0

    def take(self, result: RolloutResult, kind: str = "sample") -> None:
        """Groups of a finished call (`kind`: "sample" or the rescue's name): statistics, all-fail prompts
        offered for rescue, the rest filtered and put in the buffer."""
        self.throughput.generated_tokens += result.generated_tokens
        self.throughput.generated_groups += len(result.groups)
        self.throughput.worker_busy_seconds += result.generate_seconds + result.verify_seconds
        self.metrics.observe_rollout(result.worker, result.generated_tokens, len(result.groups))
        for message in result.verifier_errors[:3]:
            self.run_dir.event(f"verifier error on {result.worker}: {message}")
        self.metrics.observe_tool_calls(result.tool_calls)
        self.throughput.count_tool_calls(result.tool_calls)
        for message in result.tool_errors[:3]:
            self.run_dir.event(f"tool raised on {result.worker}: {message}")
        self._drop_unscored(result)
        groups = result.groups
        self.samples.observe(groups)
        if kind == "sample":
            self.sampler.observe(groups)
            for group in groups:
                self.buffer.record_prompt_stats(
                    group.prompt.id, group.prompt.distribution, group.pass_rate, group.policy_version
                )
            groups = self.rescue.on_plain(result)
            self.rescue.offer(groups)
        else:
            self.rescue.by_name(kind).on_result(result)
        kept = []
        for group in groups:
            self.throughput.signal_groups += group.has_signal
            owner = self.rescue.owner(group)
            reason = (owner or self.sampler).filter_reason(group)
            if reason is not None and kind == "sample" and self._hpt_trains(group):
                reason = None  # HPT trains it on the prompt's reference solution
            if reason is not None:
                self.filtered[reason] += 1
                self._filtered_since_step[reason] += 1
                self.metrics.observe_filtered(reason)
                continue
            kept.append(group)
        if kept:
            self.buffer.put_many(kept)
            self.stepped()  # not starving: the count is of groups dropped in a row
        self._notice_starvation()
        self.metrics.observe_buffer(self.buffer.ready_count(), self.buffer.pending_count())

    def _drop_unscored(self, result: RolloutResult) -> None:
        """Groups whose every completion lost its score to a reward model that failed or timed out are
        dropped first, counted and logged once per call: their rewards are not the policy's."""
        unscored = [
            group
            for group in result.groups
            if group.completions
            and all((c.verifier_error or "").startswith(REWARD_MODEL_ERROR_PREFIX) for c in group.completions)
        ]
        if not unscored:
            return
        dropped = {id(group) for group in unscored}
        result.groups = [group for group in result.groups if id(group) not in dropped]
        self.filtered[REWARD_MODEL_ERROR] += len(unscored)
        self.metrics.observe_filtered(REWARD_MODEL_ERROR, len(unscored))
        self.run_dir.event(
            f"{len(unscored)} groups from {result.worker} dropped unscored: {unscored[0].completions[0].verifier_error}"
        )

    def stepped(self) -> None:
        """The learner took a step (or a group was kept): the starvation count starts again."""
        self._filtered_since_step.clear()
        self._starvation_notice_at = 0

    def _notice_starvation(self) -> None:
        """An event (and a line on stderr) when the filters have dropped `STARVATION_STEPS` steps' worth of
        groups in a row (none kept, no learner step), and again at every doubling: a policy that solves none (or all) of its
        prompts gives the learner nothing, and a run that waits silently looks hung."""
        dropped = sum(self._filtered_since_step.values())
        first_notice = STARVATION_STEPS * self.config.learner.groups_per_step
        if dropped < max(self._starvation_notice_at, first_notice):
            return
        self._starvation_notice_at = 2 * dropped
        reasons = ", ".join(f"{reason} {count}" for reason, count in self._filtered_since_step.most_common())
        message = (
            f"no learner step for {dropped} groups: the filters dropped them all ({reasons}); a policy that"
            " solves none (or all) of its prompts gives no signal: train a longer warm start (warmstart.steps),"
            " check the answer format in the samples (orchard samples), or relax learner.dynamic_sampling and the"
            " curriculum filters"
        )
        self.run_dir.event(message)
        print(f"orchard: {message}", file=sys.stderr, flush=True)

    def _hpt_trains(self, group: Group) -> bool:
        """Whether HPT switches this plain group to the SFT loss of its prompt's solution, so that the
        filters (dynamic sampling drops all-fail groups) must let it through to the learner."""
        hpt = self.config.learner.hpt
        return hpt.enabled and bool(group.prompt.solution) and group.pass_rate <= hpt.pass_rate_threshold
