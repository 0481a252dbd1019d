"""The intake: a finished rollout call's way into the buffer.

rollout result → counters and metrics → prompt statistics and the curriculum (plain samples only) →
the solution cache and the rescue queue for all-fail prompts → the filters → the buffer. Only plain
samples inform the curriculum and the prompt statistics: a rescue's groups are not the policy's own
pass rate on the prompt. When the filters drop everything for `STARVATION_STEPS` steps' worth of
groups, the run says so.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Sequence

from orchard.config import RunConfig
from orchard.protocols import Buffer
from orchard.records import Group
from orchard.rollout.worker import RolloutResult
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.metrics import RunMetrics
from orchard.services.rescue.deepsearch import SearchRescue, is_tree_group
from orchard.services.rescue.queue import RescueQueue
from orchard.services.run.throughput import Throughput
from orchard.services.run_dir import RunDirectory
from orchard.services.samples import SampleKeeper

#: Steps' worth of groups dropped by the filters in a row before the run says it is starving.
STARVATION_STEPS = 10

#: `(prompt token ids, completion token ids) -> the sampling worker's logprobs of the completion`.
LogprobsOf = Callable[[Sequence[int], Sequence[int]], list[float]]


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
        rescorer: Callable[[str], LogprobsOf | None],
        deepsearch: SearchRescue | None,
    ) -> None:
        """`filtered`: the run's count of groups dropped, by reason (kept across a resume); `rescorer(worker)`:
        how that worker scores a cached solution, or None when it is gone; `deepsearch`: the tree-search
        rescue among `rescue`'s, when the run has one."""
        self.config, self.buffer, self.sampler, self.rescue = config, buffer, sampler, rescue
        self.throughput, self.filtered, self.metrics = throughput, filtered, metrics
        self.run_dir, self.samples = run_dir, samples
        self.rescorer = rescorer
        self.deepsearch = deepsearch
        self._filtered_since_step: Counter[str] = Counter()
        self._starvation_notice_at = 0

    def take(self, result: RolloutResult, kind: str = "sample") -> None:
        """Groups of a finished call (`kind`: "sample" or the rescue's name): statistics, all-fail prompts
        offered for rescue, the rest filtered and put in the buffer."""
        self.throughput.generated_tokens += result.generated_tokens
        self.throughput.generated_groups += len(result.groups)
        self.metrics.observe_rollout(result.worker, result.generated_tokens, len(result.groups))
        for message in result.verifier_errors[:3]:
            self.run_dir.event(f"verifier error on {result.worker}: {message}")
        groups = result.groups
        self.samples.observe(groups)
        if kind == "sample":
            self.sampler.observe(groups)
            for group in groups:
                self.buffer.record_prompt_stats(
                    group.prompt.id, group.prompt.distribution, group.pass_rate, group.policy_version
                )
            if self.deepsearch is not None:
                groups = self._replay_solutions(result)
            self.rescue.offer(groups)
        elif self.deepsearch is not None and kind == self.deepsearch.name:
            self._on_search(result)
        kept = []
        for group in groups:
            self.throughput.signal_groups += group.has_signal
            if self.deepsearch is not None and is_tree_group(group):
                reason = self.deepsearch.filter_reason(group)
            else:
                reason = self.sampler.filter_reason(group)
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
        self._notice_starvation()
        self.metrics.observe_buffer(self.buffer.ready_count(), self.buffer.pending_count())

    def stepped(self) -> None:
        """The learner took a step: the starvation count starts again."""
        self._filtered_since_step.clear()
        self._starvation_notice_at = 0

    def _notice_starvation(self) -> None:
        """An event (and a line on stderr) when the filters have dropped `STARVATION_STEPS` steps' worth of
        groups since the last step, and again at every doubling: a policy that solves none (or all) of its
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

    def _replay_solutions(self, result: RolloutResult) -> list[Group]:
        """Plain groups with the solution cache applied: retirement observed, cached solutions mixed in
        (re-scored by the worker that sampled the group)."""
        retired = self.deepsearch.counts.entries_retired
        groups, events = self.deepsearch.replay(
            result.groups, result.generated_tokens, logprobs_of=self.rescorer(result.worker)
        )
        for message in events:
            self.run_dir.event(message)
        self.metrics.observe_solution_cache(
            served=sum(c.source == "cache" for g in groups for c in g.completions),
            retired=self.deepsearch.counts.entries_retired - retired,
        )
        return groups

    def _on_search(self, result: RolloutResult) -> None:
        """A tree-search call: its cost metered, its solutions offered to the cache, one event line."""
        searched = len(result.groups) + len(result.unsearched_prompts)
        solved = sum(any(c.correct for c in g.completions) for g in result.groups)
        admitted = self.deepsearch.on_search(
            result.groups, prompts=searched, nodes_expanded=result.nodes_expanded, tokens=result.generated_tokens
        )
        self.metrics.observe_search(
            nodes_expanded=result.nodes_expanded,
            tokens=result.generated_tokens,
            solved=solved,
            unsolved=searched - solved,
        )
        self.metrics.observe_solution_cache(admitted=admitted)
        counts = self.deepsearch.counts
        self.run_dir.event(
            f"tree search on {result.worker} at policy version {result.policy_version}: {searched} prompts, "
            f"{solved} solved, {sum(len(g.completions) for g in result.groups)} trajectories, "
            f"{result.nodes_expanded} nodes expanded, {result.generated_tokens} tokens in "
            f"{result.generate_seconds + result.verify_seconds:.2f} s; {admitted} solutions cached; "
            f"search share of generated tokens {counts.tokens / max(1, counts.tokens + counts.plain_tokens):.2f}"
        )
