"""The solution cache: admission, lookup and retirement rules as pure functions, then the class."""

from __future__ import annotations

import pytest

from orchard.config import SolutionCacheConfig
from orchard.records import Completion, Group, Prompt, RecordError
from orchard.services.rescue.solution_cache import (
    CachedSolution,
    MemorySolutionStore,
    SolutionCache,
    admit,
    decode_solutions,
    encode_solutions,
    fresh,
    mix_into_group,
    should_retire,
)

PROMPT = Prompt(id="addition-d1:12+34=", text="12+34=", answer="46", distribution="addition/d1")


def solution(tokens: tuple[int, ...] = (4, 6, 0), version: int = 1) -> CachedSolution:
    return CachedSolution(token_ids=tokens, logprobs=tuple(-0.5 for _ in tokens), text="46", policy_version=version)


def offer(entries, candidate, *, correct=True, pass_rate=0.0, threshold=0.25, limit=3):
    return admit(
        entries,
        candidate,
        correct=correct,
        plain_pass_rate=pass_rate,
        register_threshold=threshold,
        max_per_prompt=limit,
    )


def test_admission_needs_a_correct_solution_of_a_prompt_the_policy_does_not_solve():
    assert offer([], solution()) == [solution()]
    assert offer([], solution(), correct=False) == []
    assert offer([], solution(), pass_rate=0.25) == [solution()]  # at the threshold: still admitted
    assert offer([], solution(), pass_rate=0.3) == []  # the policy solves it on its own


def test_admission_replaces_duplicates_and_keeps_the_newest_versions():
    entries = offer([], solution((1,), version=1))
    entries = offer(entries, solution((1,), version=3))
    assert entries == [solution((1,), version=3)]  # same tokens: the newer version replaces the older
    for tokens, version in [((2,), 2), ((3,), 5), ((4,), 4)]:
        entries = offer(entries, solution(tokens, version))
    assert sorted(e.policy_version for e in entries) == [3, 4, 5]  # version 2 left first
    assert len(offer(entries, solution((9,), 0))) == 3
    assert solution((9,), 0) not in offer(entries, solution((9,), 0))  # older than every entry: not kept


def test_retirement_and_freshness():
    assert should_retire(0.5, 0.25)
    assert not should_retire(0.25, 0.25)
    assert not should_retire(0.0, 0.25)
    entries = [solution((1,), 1), solution((2,), 5)]
    assert fresh(entries, 6, None) == entries
    assert fresh(entries, 6, 2) == [solution((2,), 5)]


def test_serialisation_round_trip_and_refusal():
    entries = [solution((1, 2), 1), solution((3,), 7)]
    assert decode_solutions(encode_solutions(entries)) == entries
    assert decode_solutions(None) == []
    with pytest.raises(RecordError):
        CachedSolution(token_ids=(1, 2), logprobs=(-0.1,), text="x", policy_version=0)


def group_of(correct: list[bool], version: int = 4) -> Group:
    completions = [
        Completion(
            text="46" if ok else "47", token_ids=[4, 6], logprobs=[-1.0, -1.0], policy_version=version, correct=ok
        )
        for ok in correct
    ]
    return Group(prompt=PROMPT, prompt_token_ids=[1, 2, 3], completions=completions)


def test_mixing_replaces_wrong_completions_only():
    group = group_of([False, True, False])
    mixed, count = mix_into_group(group, [solution(version=1), solution((7,), version=2)], 1)
    assert count == 1
    assert [c.correct for c in mixed.completions] == [False, True, True]  # the last wrong one
    assert mixed.completions[2].token_ids == [7]  # the newest entry first
    assert mixed.completions[2].policy_version == 2
    assert mixed.policy_version == 2  # an old entry makes the group older
    rescored, _ = mix_into_group(group, [solution()], 5, logprobs_of=lambda prompt, ids: [-0.25] * len(ids))
    assert [c.correct for c in rescored.completions] == [False, True, True]  # only one entry to mix
    assert rescored.completions[2].logprobs == [-0.25] * 3
    assert rescored.policy_version == 4  # re-scored by the current policy: the group's own version
    assert mix_into_group(group_of([True]), [solution()], 1)[1] == 0


def test_cache_admits_serves_and_retires():
    cache = SolutionCache(MemorySolutionStore(), SolutionCacheConfig(max_per_prompt=2, max_version_lag=3))
    found = group_of([True, False, True], version=2)
    found.completions[2].token_ids = [4, 6, 0]
    found.completions[2].logprobs = [-0.1, -0.1, -0.1]
    assert cache.offer(found, plain_pass_rate=0.0) == 2  # the two correct ones
    assert cache.prompt_ids() == [PROMPT.id]
    assert len(cache.lookup(PROMPT.id, policy_version=4)) == 2
    mixed, count = cache.mix(group_of([False] * 4, version=4))
    assert count == 1 and sum(c.correct for c in mixed.completions) == 1
    assert not cache.observe(PROMPT.id, plain_pass_rate=0.25)
    assert cache.lookup(PROMPT.id, policy_version=6) == []  # three versions behind: dropped
    assert cache.retired == 2 and cache.prompt_ids() == []
    assert cache.offer(found, plain_pass_rate=0.0) == 2
    assert cache.observe(PROMPT.id, plain_pass_rate=0.5)  # the policy solves it: its entries retire
    assert cache.lookup(PROMPT.id, policy_version=2) == [] and cache.retired == 4
    assert cache.offer(found, plain_pass_rate=0.75) == 0  # nothing admitted for a solved prompt


def test_disabled_cache_does_nothing():
    cache = SolutionCache(MemorySolutionStore(), SolutionCacheConfig(enabled=False))
    assert cache.offer(group_of([True]), plain_pass_rate=0.0) == 0
    assert cache.mix(group_of([False]))[1] == 0
