"""DeepSearch in a run: all-fail prompts go to tree search, and what it finds is cached and replayed.

docs/algorithms.md §8. `SearchRescue` is the `Rescue` of `rollout.strategy: mcts`:

- **Routing** (`wants`): a prompt whose plain group failed every sample is queued for tree search
  (`RolloutWorkerCore.search`) while the search's generated tokens are at most
  `rollout.mcts.search_token_share` of the run's; past it, all-fail prompts are left to the sampler.
- **Search results** (`on_search`): every correct trajectory is offered to the solution cache
  (admission, `services.rescue.solution_cache`); the tree groups go on to the learner (with their per-token
  values, `Completion.token_values`), unless they hold no contrast (`tree_filter_reason`).
- **Replay** (`replay`): every plain group's pass rate is observed (a prompt the policy now solves
  above the registration threshold retires its entries); a plain group of a prompt with fresh cached
  solutions gets them in place of wrong completions, scored by the worker that sampled the group in
  the same call (`to_score` names them when the call is issued). Such a group is no longer all-fail, so the prompt is served from the
  cache instead of being searched again.

The cache lives beside the replay buffer: in the buffer's Redis namespace when the buffer is Redis
(it survives a driver restart and a resumed run), in process for the in-memory buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchard.config import RunConfig
from orchard.protocols import Buffer
from orchard.records import Group, Prompt
from orchard.rollout.worker import RolloutResult
from orchard.services.buffer.redis_buffer import RedisBuffer
from orchard.services.curriculum.filtering import ZERO_ADVANTAGE
from orchard.services.metrics import RunMetrics
from orchard.services.rescue.queue import Rescue
from orchard.services.rescue.solution_cache import (
    MemorySolutionStore,
    RedisSolutionStore,
    SolutionCache,
    SolutionStore,
    newest,
)

#: `logprobs_of(prompt token ids, completion token ids)`: the current policy's logprob of each token.
LogprobsOf = Callable[[Sequence[int], Sequence[int]], list[float]]


class RescoreFailed(RuntimeError):
    """A cached solution could not be re-scored (the worker that would score it is gone)."""


def scored_by(result: RolloutResult) -> LogprobsOf:
    """`logprobs_of` answered from what the rollout call scored (`RolloutResult.solution_logprobs`); a
    solution it was not asked to score (cached after the call was issued) raises `RescoreFailed`."""

    def logprobs_of(prompt_token_ids: Sequence[int], token_ids: Sequence[int]) -> list[float]:
        scored = result.solution_logprobs.get((tuple(prompt_token_ids), tuple(token_ids)))
        if scored is None:
            raise RescoreFailed(f"{result.worker} was not asked to score it (cached after the call was issued)")
        return scored

    return logprobs_of


def is_tree_group(group: Group) -> bool:
    """A group of tree-search trajectories."""
    return any(c.source == "tree" for c in group.completions)


def tree_filter_reason(group: Group, tree_advantage: str = "prefix_credit") -> str | None:
    """Why a tree group is kept from the learner, or None when it is trained on.

    With `learner.tree_advantage: node_values` the learner normalises a tree group's token values by
    the mean and population std of its trajectories' final scores (sibling mean-std). With two or
    more trajectories whose final scores are all equal that std is 0: the group has no outcome
    contrast and its step values divided by ~0 would blow up, so it is dropped as `zero_advantage`.
    Such a group with differing final scores is kept even when its rewards are all equal (a wrong
    answer and an incomplete path may both score reward 0). With 'prefix_credit' and 'outcome' the
    advantages come from the rewards: a group whose rewards are all equal has none and is dropped.
    This holds whether or not dynamic sampling is on. The difficulty band does not apply either: it
    judges the policy's own pass rate, which for a searched prompt is 0 by construction, so it would
    drop every rescue.
    """
    if tree_advantage != "node_values" or not any(c.token_values for c in group.completions):
        return None if group.has_signal else ZERO_ADVANTAGE
    finals = [c.token_values[-1] for c in group.completions if c.token_values]
    if len(finals) >= 2 and max(finals) == min(finals):
        return ZERO_ADVANTAGE
    return None


def solution_store(buffer: Buffer) -> SolutionStore:
    """The cache's store beside `buffer`: its Redis and namespace, or in process."""
    if isinstance(buffer, RedisBuffer):
        return RedisSolutionStore(buffer.url, buffer.namespace)
    return MemorySolutionStore()


@dataclass
class SearchCounts:
    """What tree search and the cache did in this run (the summary's `deepsearch` figures)."""

    calls: int = 0
    prompts_searched: int = 0
    prompts_solved: int = 0
    nodes_expanded: int = 0
    tokens: int = 0
    tree_groups_kept: int = 0
    tree_groups_dropped: int = 0
    solutions_admitted: int = 0
    cache_hits: int = 0  # plain groups that received cached solutions
    solutions_mixed: int = 0  # completions replaced by cached solutions
    solutions_rescored: int = 0
    entries_retired: int = 0
    plain_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SearchRescue(Rescue):
    """Tree search for all-fail prompts, with the solution cache (see the module)."""

    config: RunConfig
    name: str = "search"
    counts: SearchCounts = field(default_factory=SearchCounts)
    cache: SolutionCache | None = None
    #: The newest plain pass rate of prompts that may be waiting for a search (their plain group failed
    #: every sample): what a found solution is admitted against. Bounded; a prompt not here counts as 0.
    plain_pass_rate: dict[str, float] = field(default_factory=dict)
    max_tracked_prompts: int = 4096
    log: Callable[[str], None] = print
    metrics: RunMetrics | None = None

    # ----------------------------------------------------------------------------- the rescue
    def wants(self, group: Group) -> bool:
        """True while tree search has used at most its share of the run's generated tokens."""
        total = self.counts.tokens + self.counts.plain_tokens
        return total == 0 or self.counts.tokens <= self.config.rollout.mcts.search_token_share * total

    def submit(self, worker: Any, prompts: Sequence[Prompt]) -> Any:
        return worker.search.remote(list(prompts))

    # ----------------------------------------------------------------------------- hooks of the data path
    def open(self, buffer: Buffer, log: Callable[[str], None], metrics: RunMetrics) -> None:
        self.log, self.metrics = log, metrics
        cache = self.open_cache(buffer)
        log(
            f"tree search for all-fail prompts; solution cache in {type(cache.store).__name__} "
            f"({len(cache.prompt_ids())} prompts cached)"
        )

    def to_score(self, prompts: Sequence[Prompt], policy_version: int) -> dict[str, list[list[int]]]:
        """The cached solutions a plain group of each prompt may get (the newest `mix_per_group`, as mixing
        picks them): the sampling worker scores them with the policy it samples with, in the same call
        (`replay`'s `logprobs_of`)."""
        config = self.cache.config if self.cache is not None else None
        if config is None or not config.enabled or config.mix_per_group == 0:
            return {}
        wanted = {}
        for prompt in prompts:
            entries = newest(self.cache.lookup(prompt.id, policy_version), config.mix_per_group)
            if entries:
                wanted[prompt.id] = [list(entry.token_ids) for entry in entries]
        return wanted

    def on_plain(self, result: RolloutResult, groups: list[Group]) -> list[Group]:
        """Plain groups with the solution cache applied: retirement observed, cached solutions mixed in,
        with the logprobs the sampling worker gave them in the same call."""
        retired = self.counts.entries_retired
        groups, events = self.replay(groups, result.generated_tokens, logprobs_of=scored_by(result))
        for message in events:
            self.log(message)
        if self.metrics is not None:
            self.metrics.observe_solution_cache(
                served=sum(c.source == "cache" for g in groups for c in g.completions),
                retired=self.counts.entries_retired - retired,
            )
        return groups

    def on_result(self, result: RolloutResult) -> None:
        """A tree-search call: its cost metered, its solutions offered to the cache, one event line."""
        searched = len(result.groups) + len(result.unsearched_prompts)
        solved = sum(any(c.correct for c in g.completions) for g in result.groups)
        admitted = self.on_search(
            result.groups, prompts=searched, nodes_expanded=result.nodes_expanded, tokens=result.generated_tokens
        )
        if self.metrics is not None:
            self.metrics.observe_search(
                nodes_expanded=result.nodes_expanded,
                tokens=result.generated_tokens,
                solved=solved,
                unsolved=searched - solved,
            )
            self.metrics.observe_solution_cache(admitted=admitted)
        counts = self.counts
        self.log(
            f"tree search on {result.worker} at policy version {result.policy_version}: {searched} prompts, "
            f"{solved} solved, {sum(len(g.completions) for g in result.groups)} trajectories, "
            f"{result.nodes_expanded} nodes expanded, {result.generated_tokens} tokens in "
            f"{result.generate_seconds + result.verify_seconds:.2f} s; {admitted} solutions cached; "
            f"search share of generated tokens {counts.tokens / max(1, counts.tokens + counts.plain_tokens):.2f}"
        )

    def claims(self, group: Group) -> bool:
        return is_tree_group(group)

    def step_figures(self, groups: Sequence[Group]) -> dict[str, Any]:
        return {"deepsearch": self.counts.as_dict(), "tree_groups_trained": sum(is_tree_group(g) for g in groups)}

    def summary(self) -> dict[str, Any]:
        return {"deepsearch": self.figures()}

    # ----------------------------------------------------------------------------- the cache
    def open_cache(self, buffer: Buffer) -> SolutionCache:
        """Attach the solution cache beside the run's buffer; returns it."""
        self.cache = SolutionCache(solution_store(buffer), self.config.rollout.mcts.cache)
        return self.cache

    def close(self) -> None:
        store = self.cache.store if self.cache is not None else None
        if isinstance(store, RedisSolutionStore):
            store.close()

    def replay(
        self, groups: Sequence[Group], generated_tokens: int, *, logprobs_of: LogprobsOf | None = None
    ) -> tuple[list[Group], list[str]]:
        """Plain groups after retirement and mixing: the groups to use instead, and event lines.

        `logprobs_of` re-scores a cached solution with the policy of the worker that sampled the group;
        when it raises `RescoreFailed`, the solution keeps the behaviour logprobs and policy version it
        was cached with (the group then counts as that old for staleness).
        """
        self.counts.plain_tokens += generated_tokens
        if self.cache is None:
            return list(groups), []
        out, events = [], []
        for group in groups:
            self._track(group)
            retired_before = self.cache.retired
            if self.cache.observe(group.prompt.id, group.pass_rate):
                events.append(f"cache: {group.prompt.id} retired (plain pass rate {group.pass_rate:.2f})")
            try:
                mixed, count = self.cache.mix(group, logprobs_of=logprobs_of)
                self.counts.solutions_rescored += count if logprobs_of is not None else 0
            except RescoreFailed as error:
                mixed, count = self.cache.mix(group)
                events.append(f"cache: solutions for {group.prompt.id} mixed with their cached logprobs: {error}")
            self.counts.entries_retired += self.cache.retired - retired_before
            if count:
                self.counts.cache_hits += 1
                self.counts.solutions_mixed += count
            out.append(mixed)
        return out, events

    def on_search(self, groups: Sequence[Group], *, prompts: int, nodes_expanded: int, tokens: int) -> int:
        """Record one search call's results and offer its trajectories to the cache; returns how many
        solutions were admitted."""
        self.counts.calls += 1
        self.counts.prompts_searched += prompts
        self.counts.prompts_solved += sum(any(c.correct for c in g.completions) for g in groups)
        self.counts.nodes_expanded += nodes_expanded
        self.counts.tokens += tokens
        if self.cache is None:
            return 0
        admitted = 0
        for group in groups:
            admitted += self.cache.offer(group, self.plain_pass_rate.pop(group.prompt.id, 0.0))
        self.counts.solutions_admitted += admitted
        return admitted

    def _track(self, group: Group) -> None:
        """Remember the plain pass rate of an all-fail prompt, and any later one of a prompt remembered."""
        prompt_id = group.prompt.id
        if group.pass_rate == 0 or prompt_id in self.plain_pass_rate:
            self.plain_pass_rate.pop(prompt_id, None)
            self.plain_pass_rate[prompt_id] = group.pass_rate
            while len(self.plain_pass_rate) > self.max_tracked_prompts:
                del self.plain_pass_rate[next(iter(self.plain_pass_rate))]

    def filter_reason(self, group: Group) -> str | None:
        """`tree_filter_reason`, counting what is kept and dropped."""
        reason = tree_filter_reason(group, self.config.learner.tree_advantage)
        if reason is None:
            self.counts.tree_groups_kept += 1
        else:
            self.counts.tree_groups_dropped += 1
        return reason

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = self.counts.as_dict()
        figures["cached_prompts"] = len(self.cache.prompt_ids()) if self.cache is not None else 0
        figures["search_token_share"] = self.counts.tokens / max(1, self.counts.tokens + self.counts.plain_tokens)
        return figures
