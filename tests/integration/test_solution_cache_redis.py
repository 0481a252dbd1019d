"""The solution cache over a real redis-server: per-prompt entries survive a new client, updates are atomic."""

from __future__ import annotations

import threading

from orchard.config import SolutionCacheConfig
from orchard.records import Completion, Group, Prompt
from orchard.services.rescue.solution_cache import CachedSolution, RedisSolutionStore, SolutionCache, admit

PROMPT = Prompt(id="multiplication-d1:53*8=", text="53*8=", answer="424", distribution="multiplication/d1")


def found_group(version: int) -> Group:
    completions = [
        Completion(text="424", token_ids=[7, 5, 7, 2], logprobs=[-0.2] * 4, policy_version=version, correct=True),
        Completion(text="400", token_ids=[7, 3, 3, 2], logprobs=[-0.1] * 4, policy_version=version, correct=False),
    ]
    return Group(prompt=PROMPT, prompt_token_ids=[1, 2], completions=completions)


def test_redis_store_keeps_entries_across_clients_and_retires_them(redis_server):
    config = SolutionCacheConfig(max_per_prompt=3)
    cache = SolutionCache(RedisSolutionStore(redis_server.url, "cache-a"), config)
    assert cache.offer(found_group(version=2), plain_pass_rate=0.0) == 1
    again = SolutionCache(RedisSolutionStore(redis_server.url, "cache-a"), config)
    [entry] = again.lookup(PROMPT.id, policy_version=3)
    assert entry.token_ids == (7, 5, 7, 2) and entry.policy_version == 2
    assert again.prompt_ids() == [PROMPT.id]
    assert SolutionCache(RedisSolutionStore(redis_server.url, "cache-b"), config).prompt_ids() == []
    assert again.observe(PROMPT.id, plain_pass_rate=1.0)
    assert cache.lookup(PROMPT.id, policy_version=3) == [] and cache.prompt_ids() == []


def test_concurrent_admissions_lose_nothing(redis_server):
    store_url, limit = redis_server.url, 64

    def admit_many(worker: int) -> None:
        store = RedisSolutionStore(store_url, "cache-race")
        for index in range(8):
            candidate = CachedSolution((worker, index), (-0.1, -0.1), f"{worker}{index}", policy_version=index)
            store.update(
                PROMPT.id,
                lambda entries, c=candidate: admit(
                    entries, c, correct=True, plain_pass_rate=0.0, register_threshold=0.25, max_per_prompt=limit
                ),
            )

    threads = [threading.Thread(target=admit_many, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(RedisSolutionStore(store_url, "cache-race").get(PROMPT.id)) == 32
