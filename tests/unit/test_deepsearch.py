"""DeepSearch in a run: routing to tree search, the tree-group filter, and the solution cache's replay."""

from __future__ import annotations

import pytest

from orchard.config import config_from_dict
from orchard.records import Completion, Group, Prompt
from orchard.services.buffer.memory import MemoryBuffer
from orchard.services.rescue.deepsearch import RescoreFailed, SearchRescue, is_tree_group, tree_filter_reason
from orchard.services.rescue.queue import build_rescues
from orchard.services.rescue.solution_cache import MemorySolutionStore

PROMPT = Prompt(id="addition-d1:12+34=", text="12+34=", answer="46", distribution="addition/d1")


def completion(correct: bool, *, version: int = 0, values: list[float] | None = None, tokens=(4, 6)) -> Completion:
    return Completion(
        text="46" if correct else "99",
        token_ids=list(tokens),
        logprobs=[-0.5] * len(tokens),
        policy_version=version,
        reward=float(correct),
        correct=correct,
        source="tree" if values is not None else "sample",
        token_values=values,
    )


def plain(correct: list[bool], version: int = 0, prompt: Prompt = PROMPT) -> Group:
    completions = [completion(c, version=version, tokens=(9, 9)) for c in correct]
    return Group(prompt=prompt, prompt_token_ids=[1, 2], completions=completions)


def tree(finals: list[float], correct: list[bool] | None = None, version: int = 0) -> Group:
    correct = correct if correct is not None else [f > 0 for f in finals]
    completions = [
        completion(ok, version=version, values=[0.3, final], tokens=(4 + i, 6))
        for i, (final, ok) in enumerate(zip(finals, correct, strict=True))
    ]
    return Group(prompt=PROMPT, prompt_token_ids=[1, 2], completions=completions)


def rescue(**mcts) -> SearchRescue:
    config = config_from_dict({"rollout": {"strategy": "mcts", "mcts": mcts}})
    [search] = build_rescues(config)
    assert isinstance(search, SearchRescue) and search.name == "search"
    search.open_cache(MemoryBuffer())
    return search


def test_only_the_mcts_strategy_builds_the_search_rescue():
    assert build_rescues(config_from_dict({})) == []
    assert isinstance(rescue().cache.store, MemorySolutionStore)


def test_tree_groups_are_dropped_when_they_hold_no_contrast():
    assert is_tree_group(tree([1.0, -1.0])) and not is_tree_group(plain([False, False]))
    # prefix credit and outcome advantages come from the rewards: dropped when they are all equal
    for mode in ("prefix_credit", "outcome"):
        assert tree_filter_reason(tree([1.0, -1.0]), mode) is None
        assert tree_filter_reason(tree([-1.0, -1.0]), mode) == "zero_advantage"
        assert tree_filter_reason(tree([-1.0, -0.5], correct=[False, False]), mode) == "zero_advantage"
    # node values: dropped only when the final scores are all equal (their std is 0)
    assert tree_filter_reason(tree([1.0, -1.0]), "node_values") is None
    assert tree_filter_reason(tree([-1.0, -1.0]), "node_values") == "zero_advantage"
    assert tree_filter_reason(tree([1.0, 1.0]), "node_values") == "zero_advantage"
    assert tree_filter_reason(tree([-1.0]), "node_values") is None  # one trajectory: its values as they are
    # a wrong answer (−1) and an incomplete path (−0.5) both have reward 0, yet differ in value: kept
    assert tree_filter_reason(tree([-1.0, -0.5], correct=[False, False]), "node_values") is None
    search = rescue()
    search.filter_reason(tree([1.0, -1.0]))
    search.filter_reason(tree([-1.0, -1.0]))
    assert (search.counts.tree_groups_kept, search.counts.tree_groups_dropped) == (1, 1)


def test_search_takes_prompts_only_within_its_share_of_generated_tokens():
    search = rescue(search_token_share=0.5)
    assert search.wants(plain([False]))  # nothing generated yet
    search.on_search([], prompts=2, nodes_expanded=5, tokens=300)
    assert not search.wants(plain([False]))  # all tokens so far were the search's
    search.replay([plain([False])], generated_tokens=300)
    assert search.wants(plain([False]))  # 300 of 600
    search.replay([plain([False])], generated_tokens=1)
    search.on_search([], prompts=1, nodes_expanded=1, tokens=2)
    assert not search.wants(plain([False]))  # 302 of 603


def test_found_solutions_are_cached_mixed_into_later_groups_and_retired_once_solved():
    search = rescue()
    assert search.replay([plain([False] * 4)], generated_tokens=8)[0][0].pass_rate == 0  # nothing cached yet
    found = tree([1.0, -1.0], version=2)
    assert search.on_search([found], prompts=1, nodes_expanded=3, tokens=40) == 1
    assert (search.counts.prompts_searched, search.counts.prompts_solved, search.counts.nodes_expanded) == (1, 1, 3)
    assert search.figures()["cached_prompts"] == 1

    # a later all-fail group of the prompt gets the cached solution, re-scored by the current policy
    seen = []

    def logprobs_of(prompt_ids, token_ids):
        seen.append((list(prompt_ids), list(token_ids)))
        return [-0.25] * len(token_ids)

    [mixed], events = search.replay([plain([False] * 4, version=5)], generated_tokens=8, logprobs_of=logprobs_of)
    assert not events
    [cached] = [c for c in mixed.completions if c.source == "cache"]
    assert cached.correct and cached.token_ids == [4, 6] and cached.token_values is None
    assert cached.logprobs == [-0.25, -0.25] and cached.policy_version == 5
    assert seen == [([1, 2], [4, 6])]
    assert mixed.pass_rate == 0.25 and mixed.has_signal  # no longer all-fail: not searched again
    assert (search.counts.cache_hits, search.counts.solutions_mixed, search.counts.solutions_rescored) == (1, 1, 1)

    # a worker that cannot re-score: the solution keeps its cached logprobs and version
    def unreachable(prompt_ids, token_ids):
        raise RescoreFailed("worker-0: RayActorError")

    [mixed], events = search.replay([plain([False] * 4, version=5)], generated_tokens=8, logprobs_of=unreachable)
    [cached] = [c for c in mixed.completions if c.source == "cache"]
    assert cached.logprobs == [-0.5, -0.5] and cached.policy_version == 2 and mixed.policy_version == 2
    assert "cached logprobs" in events[0]

    # the policy now solves the prompt on its own: its entries retire, nothing is mixed in
    [solved], events = search.replay([plain([True, True, False, False])], generated_tokens=8)
    assert not any(c.source == "cache" for c in solved.completions)
    assert search.counts.entries_retired == 1 and "retired" in events[0]
    assert search.cache.prompt_ids() == [] and search.figures()["cached_prompts"] == 0


def test_admission_uses_the_prompts_latest_plain_pass_rate():
    search = rescue()
    other = Prompt(id="addition-d1:50+7=", text="50+7=", answer="57", distribution="addition/d1")
    search.replay([plain([False] * 4), plain([False] * 4, prompt=other)], generated_tokens=16)
    # the prompt was solved by a plain group while it waited for its search: nothing is admitted
    search.replay([plain([True, True, True, False])], generated_tokens=8)
    assert search.on_search([tree([1.0, -1.0])], prompts=1, nodes_expanded=1, tokens=10) == 0
    assert search.cache.prompt_ids() == []
    # a disabled cache admits nothing and mixes nothing
    off = rescue(cache={"enabled": False})
    assert off.on_search([tree([1.0, -1.0])], prompts=1, nodes_expanded=1, tokens=10) == 0
    [group], _ = off.replay([plain([False] * 4)], generated_tokens=8)
    assert group.pass_rate == 0


@pytest.mark.parametrize("tracked", [1, 3])
def test_tracked_pass_rates_are_bounded(tracked):
    search = rescue()
    search.max_tracked_prompts = tracked
    prompts = [Prompt(id=f"p{i}", text=f"{i}=", answer="1", distribution="d") for i in range(5)]
    search.replay([plain([False], prompt=p) for p in prompts], generated_tokens=5)
    assert list(search.plain_pass_rate) == [p.id for p in prompts[-tracked:]]


def test_the_data_path_hooks_score_cached_solutions_in_the_sampling_call():
    """`to_score` names the cached solutions a plain call should score; `on_plain` mixes them in with the
    logprobs that call returned, and falls back to the cached ones for a solution it did not score."""
    from orchard.rollout.worker import RolloutResult
    from orchard.services.rescue.queue import RescueQueue

    search = rescue()
    queue = RescueQueue([search])
    log: list[str] = []
    search.log = log.append
    assert queue.to_score([PROMPT], policy_version=0) == {}  # nothing cached yet
    search.replay([plain([False] * 4)], generated_tokens=8)
    queue.rescues[0].on_result(
        RolloutResult(
            groups=[tree([1.0, -1.0], version=2)],
            worker="w",
            policy_version=2,
            generated_tokens=40,
            generate_seconds=0.1,
            verify_seconds=0.0,
            strategy="mcts",
            nodes_expanded=3,
        )
    )
    assert "tree search on w at policy version 2: 1 prompts, 1 solved" in log[-1]
    assert queue.to_score([PROMPT], policy_version=5) == {PROMPT.id: [[4, 6]]}

    def plain_result(scored):
        return RolloutResult(
            groups=[plain([False] * 4, version=5)],
            worker="w",
            policy_version=5,
            generated_tokens=8,
            generate_seconds=0.1,
            verify_seconds=0.0,
            solution_logprobs=scored,
        )

    [mixed] = queue.on_plain(plain_result({((1, 2), (4, 6)): [-0.125, -0.25]}))
    [cached] = [c for c in mixed.completions if c.source == "cache"]
    assert cached.logprobs == [-0.125, -0.25] and cached.policy_version == 5
    # the same tokens scored for another prompt's context are not this prompt's logprobs
    [mixed] = queue.on_plain(plain_result({((7, 7), (4, 6)): [-0.125, -0.25]}))
    [cached] = [c for c in mixed.completions if c.source == "cache"]
    assert cached.logprobs == [-0.5, -0.5] and cached.policy_version == 2
    assert "was not asked to score it" in log[-1]


def test_the_queue_routes_filters_and_reports_through_the_rescue_that_claims_a_group():
    from orchard.services.rescue.queue import RescueQueue

    config = config_from_dict({"rollout": {"strategy": "mcts"}, "learner": {"hints": {"enabled": True}}})
    queue = RescueQueue(build_rescues(config))
    queue.open(MemoryBuffer(), log=lambda message: None, metrics=None)
    search, hints = queue.rescues
    assert queue.owner(tree([1.0, -1.0])) is search and queue.owner(plain([False, True])) is None
    assert queue.owner(tree([1.0, 1.0])).filter_reason(tree([1.0, 1.0])) is not None  # no contrast
    figures = queue.step_figures([tree([1.0, -1.0]), plain([True, False])])
    assert figures["tree_groups_trained"] == 1 and figures["deepsearch"]["tree_groups_dropped"] == 1
    assert set(queue.summary()) == {"deepsearch"}  # the hint rescue adds nothing to the summary
    assert hints.to_score([PROMPT], 0) == {} and hints.on_plain(None, [plain([False])])[0].pass_rate == 0
