"""DeepSearch's adaptive replay: correct solutions found by tree search, cached per prompt (docs/algorithms.md §8).

Reference: smiles724/DeepSearch, `deepsearch/register_replay_buffer.py` (a prompt's correct responses are
registered when `0 < acc ≤ buffer_register_threshold`, default 0.25) and
`deepsearch/rollout/sglang_mcts_wrapper.py` (a registered prompt is sampled plainly and cached
solutions replace the first of its responses, instead of being searched again). Orchard does this
online, per prompt, with these rules (pure functions below, `SolutionCache` applies them to a store):

- **Admission** (`admit`): a tree-found trajectory enters the prompt's entries when it is correct and
  the policy's own plain pass rate on the prompt is at most `register_threshold` (the routed prompts
  failed every plain sample, so their rate is 0; the reference's `0 < acc` holds through the found
  solution itself). An entry with the same tokens is replaced by the newer one; past
  `max_per_prompt`, the entries of the oldest policy versions leave first.
- **Lookup** (`fresh`): entries older than `max_version_lag` policy versions are not served (and are
  dropped); None keeps them all.
- **Retirement** (`should_retire`): once a plain group of the prompt passes above
  `register_threshold`, the policy solves it on its own and every entry of the prompt retires.
- **Mixing** (`mix_into_group`): up to `mix_per_group` wrong completions of a later group are replaced
  by cached solutions. A cached solution keeps the behaviour logprobs and policy version it was
  found with unless the caller re-scores it with the current policy (`logprobs_of`), which is what the
  reference effectively does (verl recomputes old logprobs with the current actor); a group's policy
  version is its oldest completion's, so an unscored old entry makes the group older for staleness.

Storage: `MemorySolutionStore` (in process) or `RedisSolutionStore` (its own keys
`orchard:{namespace}:solutions:{prompt id}`, one msgpack list per prompt updated in a WATCH/MULTI
transaction, and the set `orchard:{namespace}:solution_prompts`), beside the replay buffer's keys.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import msgpack

from orchard.config import SolutionCacheConfig
from orchard.records import Completion, Group, RecordError

#: Bumped when the stored layout of `CachedSolution` changes.
SOLUTION_SCHEMA = 1


@dataclass(frozen=True)
class CachedSolution:
    """A correct completion of one prompt with the behaviour logprobs of the policy version that found it."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    policy_version: int
    reward: float = 1.0
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise RecordError(f"cached solution has {len(self.token_ids)} tokens but {len(self.logprobs)} logprobs")

    @classmethod
    def from_completion(cls, completion: Completion) -> CachedSolution:
        return cls(
            token_ids=tuple(completion.token_ids),
            logprobs=tuple(completion.logprobs),
            text=completion.text,
            policy_version=completion.policy_version,
            reward=completion.reward,
            finish_reason=completion.finish_reason,
        )

    def to_completion(self) -> Completion:
        return Completion(
            text=self.text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs),
            policy_version=self.policy_version,
            finish_reason=self.finish_reason,
            reward=self.reward,
            correct=True,
            source="cache",
        )


def encode_solutions(solutions: Sequence[CachedSolution]) -> bytes:
    return msgpack.packb(
        {
            "schema": SOLUTION_SCHEMA,
            "solutions": [
                [list(s.token_ids), list(s.logprobs), s.text, s.policy_version, s.reward, s.finish_reason]
                for s in solutions
            ],
        },
        use_bin_type=True,
    )


def decode_solutions(data: bytes | None) -> list[CachedSolution]:
    if not data:
        return []
    payload = msgpack.unpackb(data, raw=False)
    if not isinstance(payload, dict) or payload.get("schema") != SOLUTION_SCHEMA:
        raise RecordError(f"cached solutions of schema {payload!r:.60} are not readable by this build")
    return [
        CachedSolution(tuple(ids), tuple(logprobs), text, version, reward, finish)
        for ids, logprobs, text, version, reward, finish in payload["solutions"]
    ]


# ------------------------------------------------------------------------------------------ pure rules


def admit(
    entries: Sequence[CachedSolution],
    candidate: CachedSolution,
    *,
    correct: bool,
    plain_pass_rate: float,
    register_threshold: float,
    max_per_prompt: int,
) -> list[CachedSolution]:
    """The prompt's entries after offering `candidate` (see the module's admission rule)."""
    kept = list(entries)
    if not correct or plain_pass_rate > register_threshold:
        return kept
    kept = [entry for entry in kept if entry.token_ids != candidate.token_ids] + [candidate]
    if len(kept) > max_per_prompt:
        # Newest versions first; among equal versions, the latest admitted first (stable sort).
        order = sorted(range(len(kept)), key=lambda i: (kept[i].policy_version, i), reverse=True)
        keep = set(order[:max_per_prompt])
        kept = [entry for i, entry in enumerate(kept) if i in keep]
    return kept


def should_retire(plain_pass_rate: float, register_threshold: float) -> bool:
    """True once the policy's own pass rate on the prompt is above the registration threshold."""
    return plain_pass_rate > register_threshold


def fresh(entries: Sequence[CachedSolution], policy_version: int, max_version_lag: int | None) -> list[CachedSolution]:
    """The entries at most `max_version_lag` versions behind `policy_version` (all when None)."""
    if max_version_lag is None:
        return list(entries)
    return [entry for entry in entries if policy_version - entry.policy_version <= max_version_lag]


def newest(solutions: Sequence[CachedSolution], count: int) -> list[CachedSolution]:
    """The `count` solutions of the newest policy versions (the order mixing uses)."""
    return sorted(solutions, key=lambda s: s.policy_version, reverse=True)[:count]


def mix_into_group(
    group: Group,
    solutions: Sequence[CachedSolution],
    count: int,
    *,
    logprobs_of: Callable[[Sequence[int], Sequence[int]], list[float]] | None = None,
) -> tuple[Group, int]:
    """`group` with up to `count` of its wrong completions (last first) replaced by cached solutions
    (newest versions first), and how many were replaced. With `logprobs_of(prompt ids, completion ids)`
    the solutions are re-scored by the current policy and stamped with the group's version."""
    wrong = [i for i, c in enumerate(group.completions) if not c.correct][::-1]
    chosen = newest(solutions, min(count, len(wrong)))
    if not chosen:
        return group, 0
    completions = list(group.completions)
    version = group.policy_version
    for index, solution in zip(wrong, chosen, strict=False):
        completion = solution.to_completion()
        if logprobs_of is not None:
            completion.logprobs = list(logprobs_of(group.prompt_token_ids, solution.token_ids))
            completion.policy_version = version
            if len(completion.logprobs) != len(completion.token_ids):
                raise ValueError("logprobs_of must return one logprob per completion token")
        completions[index] = completion
    return replace(group, completions=completions), len(chosen)


# ---------------------------------------------------------------------------------------------- stores


class SolutionStore(Protocol):
    """Per-prompt lists of cached solutions with an atomic read-modify-write."""

    def get(self, prompt_id: str) -> list[CachedSolution]: ...

    def update(
        self, prompt_id: str, change: Callable[[list[CachedSolution]], list[CachedSolution]]
    ) -> list[CachedSolution]: ...

    def prompt_ids(self) -> list[str]: ...


class MemorySolutionStore:
    def __init__(self) -> None:
        self._entries: dict[str, list[CachedSolution]] = {}
        self._lock = threading.Lock()

    def get(self, prompt_id: str) -> list[CachedSolution]:
        with self._lock:
            return list(self._entries.get(prompt_id, []))

    def update(
        self, prompt_id: str, change: Callable[[list[CachedSolution]], list[CachedSolution]]
    ) -> list[CachedSolution]:
        with self._lock:
            new = list(change(list(self._entries.get(prompt_id, []))))
            if new:
                self._entries[prompt_id] = new
            else:
                self._entries.pop(prompt_id, None)
            return list(new)

    def prompt_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)


class RedisSolutionStore:
    """Keys `orchard:{namespace}:solutions:{prompt id}` (msgpack list) and `…:solution_prompts` (set)."""

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url)
        self._prefix = f"orchard:{namespace}:"
        self._prompts = self._prefix + "solution_prompts"

    def _key(self, prompt_id: str) -> str:
        return self._prefix + f"solutions:{prompt_id}"

    def get(self, prompt_id: str) -> list[CachedSolution]:
        return decode_solutions(self._client.get(self._key(prompt_id)))

    def update(
        self, prompt_id: str, change: Callable[[list[CachedSolution]], list[CachedSolution]]
    ) -> list[CachedSolution]:
        key = self._key(prompt_id)
        result: list[CachedSolution] = []

        def apply(pipe) -> None:  # runs again if another client changed the key meanwhile
            nonlocal result
            result = list(change(decode_solutions(pipe.get(key))))
            pipe.multi()
            if result:
                pipe.set(key, encode_solutions(result))
                pipe.sadd(self._prompts, prompt_id)
            else:
                pipe.delete(key)
                pipe.srem(self._prompts, prompt_id)

        self._client.transaction(apply, key)
        return result

    def prompt_ids(self) -> list[str]:
        return sorted(member.decode() for member in self._client.smembers(self._prompts))

    def close(self) -> None:
        self._client.close()


class SolutionCache:
    """The rules of the module applied to a store; counts what it admitted, served and retired."""

    def __init__(self, store: SolutionStore, config: SolutionCacheConfig) -> None:
        self.store = store
        self.config = config
        self.admitted = 0
        self.retired = 0

    def offer(self, group: Group, plain_pass_rate: float) -> int:
        """Offer every completion of a tree-search group; returns how many entered the cache."""
        if not self.config.enabled:
            return 0
        admitted = 0

        def change(entries: list[CachedSolution]) -> list[CachedSolution]:
            nonlocal admitted
            admitted = 0
            for completion in group.completions:
                before = entries
                entries = admit(
                    entries,
                    CachedSolution.from_completion(completion),
                    correct=completion.correct,
                    plain_pass_rate=plain_pass_rate,
                    register_threshold=self.config.register_threshold,
                    max_per_prompt=self.config.max_per_prompt,
                )
                admitted += entries != before
            return entries

        self.store.update(group.prompt.id, change)
        self.admitted += admitted
        return admitted

    def observe(self, prompt_id: str, plain_pass_rate: float) -> bool:
        """A plain group's pass rate on the prompt; retires its entries when the policy solves it (True)."""
        if not should_retire(plain_pass_rate, self.config.register_threshold):
            return False
        removed = 0

        def change(entries: list[CachedSolution]) -> list[CachedSolution]:
            nonlocal removed
            removed = len(entries)
            return []

        self.store.update(prompt_id, change)
        self.retired += removed
        return removed > 0

    def lookup(self, prompt_id: str, policy_version: int) -> list[CachedSolution]:
        """The prompt's servable entries; those past `max_version_lag` are dropped from the store."""
        entries = self.store.get(prompt_id)
        kept = fresh(entries, policy_version, self.config.max_version_lag)
        if len(kept) != len(entries):
            self.store.update(prompt_id, lambda current: fresh(current, policy_version, self.config.max_version_lag))
            self.retired += len(entries) - len(kept)
        return kept

    def mix(
        self,
        group: Group,
        *,
        logprobs_of: Callable[[Sequence[int], Sequence[int]], list[float]] | None = None,
    ) -> tuple[Group, int]:
        """`group` with cached solutions of its prompt mixed in (`mix_into_group`, `mix_per_group`)."""
        if not self.config.enabled or self.config.mix_per_group == 0:
            return group, 0
        solutions = self.lookup(group.prompt.id, group.policy_version)
        return mix_into_group(group, solutions, self.config.mix_per_group, logprobs_of=logprobs_of)

    def prompt_ids(self) -> list[str]:
        return self.store.prompt_ids()
