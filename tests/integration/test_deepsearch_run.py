"""DeepSearch in a real run (local Ray, the driver, the learner): all-fail prompts are tree-searched, the
tree's trajectories reach the learner with their token values, found solutions are cached and mixed
into later groups, and the cache in Redis outlives the driver into a resumed run."""

from __future__ import annotations

import json
import re

from orchard.config import load_config
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.rescue.solution_cache import RedisSolutionStore
from orchard.services.run_dir import RunDirectory

SETTINGS = [
    *PLAIN_GRPO,  # strategy mcts is set where a test searches
    "max_minutes=null",
    "warmstart.steps=10",
    "warmstart.batch_size=8",
    "rollout.strategy=mcts",
    "rollout.group_size=4",
    "rollout.prompts_per_call=4",
    "rollout.max_new_tokens=4",
    "rollout.mcts.expansion_width=4",
    "rollout.mcts.terminate_num=24",
    "rollout.mcts.budget_tokens=300",
    "rollout.mcts.search_token_share=0.6",
    "learner.groups_per_step=4",
    "learner.dynamic_sampling=false",
    "eval.every_steps=100",
    "eval.num_prompts=2",
    "data.held_out_size=2",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=2",
]


def hard_tail_config(tmp_path, warm_cache, *extra):
    """A few prompts, each answered by one digit that the model must put first: most plain groups of
    four all fail, and a tree that tries several first steps finds it. Prompts repeat, so a prompt
    searched once comes back to be served from the cache."""
    data = tmp_path / "hard.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}=", "answer": str((3 * i) % 10), "distribution": "hard"}) + "\n"
            for i in range(8)
        )
    )
    source = (
        f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'tests.integration.user_verifiers:first_character'}}]"
    )
    return load_config(None, [*SETTINGS, source, f"warmstart.cache_dir={warm_cache}", f"runs_dir={tmp_path}", *extra])


def test_all_fail_prompts_are_searched_and_their_solutions_trained_on_and_replayed(ray_local, tmp_path, warm_cache):
    config = hard_tail_config(tmp_path, warm_cache, "buffer.backend=memory", "max_steps=10")
    run_dir = RunDirectory(tmp_path, "deepsearch")
    driver = Driver(config, run_dir, show_progress=False)
    trained = []  # every group the learner was given
    on_learner_step = driver._on_learner_step

    def spy(result, groups, weights_ref):
        trained.extend(groups)
        return on_learner_step(result, groups, weights_ref)

    driver._on_learner_step = spy
    summary = driver.run()
    found = summary["deepsearch"]
    assert found["prompts_searched"] > 0 and found["calls"] > 0
    assert found["prompts_solved"] > 0 and found["solutions_admitted"] > 0
    assert found["cache_hits"] > 0 and found["solutions_mixed"] >= found["cache_hits"]
    assert found["solutions_rescored"] == found["solutions_mixed"]
    assert 0 < found["search_token_share"] <= 0.75
    events = (run_dir.path / "events.log").read_text()
    assert re.search(r"tree search on worker-0 at policy version \d+: \d+ prompts, \d+ solved", events)

    # tree groups reached the learner, each completion with one value per token; cached solutions too
    trees = [g for g in trained if any(c.source == "tree" for c in g.completions)]
    assert trees and sum(r["tree_groups_trained"] for r in run_dir.read_metrics()) == len(trees)
    for group in trees:
        for completion in group.completions:
            assert completion.source == "tree"
            assert len(completion.token_values) == len(completion.token_ids) == len(completion.logprobs)
        finals = {c.token_values[-1] for c in group.completions}
        assert len(group.completions) == 1 or len(finals) > 1  # equal final scores never reach the learner
    assert any(c.source == "cache" and c.correct for g in trained for c in g.completions)

    records = run_dir.read_metrics()
    assert 0 < records[-1]["deepsearch"]["nodes_expanded"] <= found["nodes_expanded"]  # searches may end after it
    text = driver.metrics.render().decode()
    nodes = float(re.search(r"^orchard_mcts_nodes_expanded_total (\S+)$", text, re.M).group(1))
    assert nodes == found["nodes_expanded"]
    tokens = float(re.search(r"^orchard_mcts_tokens_total (\S+)$", text, re.M).group(1))
    assert tokens == found["tokens"] > 0
    served = re.search(r'^orchard_solution_cache_solutions_total\{event="served"\} (\S+)$', text, re.M)
    assert float(served.group(1)) == found["solutions_mixed"]


def test_the_solution_cache_in_redis_survives_a_resumed_run(ray_local, tmp_path, warm_cache, start_redis_server):
    server = start_redis_server()
    settings = [
        "buffer.backend=redis",
        f"buffer.redis_url={server.url}",
        "buffer.namespace=cached",
        "checkpoint.every_steps=2",
    ]
    config = hard_tail_config(tmp_path, warm_cache, *settings, "max_steps=6")
    run_dir = RunDirectory(tmp_path, "resumed")
    first = Driver(config, run_dir, show_progress=False).run()
    store = RedisSolutionStore(server.url, "cached")
    cached = store.prompt_ids()
    assert first["deepsearch"]["solutions_admitted"] > 0 and cached
    assert first["deepsearch"]["cached_prompts"] == len(cached)

    resumed_config = hard_tail_config(tmp_path, warm_cache, *settings, "max_steps=9")
    second = Driver(resumed_config, run_dir, show_progress=False, resume=True).run()
    assert second["resumed_from"] is not None and second["steps"] == 9
    events = (run_dir.path / "events.log").read_text()
    # the resumed driver found the first run's solutions in Redis before it searched anything
    assert f"solution cache in RedisSolutionStore ({len(cached)} prompts cached)" in events.split("resumed from")[1]
    assert second["deepsearch"]["cache_hits"] + second["deepsearch"]["entries_retired"] > 0
    store.close()
