"""Reward models served by real Ray actors: a rollout scored by them, their failures, and a run on them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import ray

from orchard.config import ModelConfig, RolloutConfig, config_from_dict
from orchard.rollout.instruct_model import write_reward_model
from orchard.rollout.worker import RolloutWorkerCore
from orchard.services.driver import Driver
from orchard.services.reward_models import RewardModelServers
from orchard.services.run_dir import RunDirectory
from orchard.verifiers.procedural import make_prompt
from orchard.verifiers.reward_model import RewardModelScorer
from tests.integration.test_driver import conservation, small_config
from tests.integration.test_worker_scoring import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    texts = [f"{a}+{b}={a + b}" for a in range(30) for b in range(3)]
    return write_reward_model(tmp_path_factory.mktemp("rm") / "rm", texts, TINY, vocab_size=300)


def judged(prompt, model: str = "rm"):
    return dataclasses.replace(prompt, metadata={**prompt.metadata, "verifier": f"reward_model:{model}"})


def servers(checkpoint, **settings) -> RewardModelServers:
    config = config_from_dict({"reward_models": {"rm": {"path": str(checkpoint), "num_cpus": 0.5, **settings}}})
    return RewardModelServers(config, log=lambda line: None)


def worker(models: RewardModelServers) -> RolloutWorkerCore:
    return RolloutWorkerCore(
        "worker-0",
        ModelConfig(tiny=TINY),
        RolloutConfig(group_size=3, max_new_tokens=4, temperature=1.0),
        seed=5,
        reward_models=models.for_workers(),
    )


PROMPTS = [make_prompt("addition", 1, "12+34=", "46"), make_prompt("addition", 1, "5+6=", "11")]


def test_a_rollout_is_scored_by_the_reward_model_and_its_rule(ray_local, checkpoint):
    models = servers(checkpoint, num_actors=2, batch_size=2, rule="procedural", combine="sum", rule_weight=2.0)
    try:
        result = worker(models).rollout([judged(p) for p in PROMPTS])
        completions = [(g.prompt, c) for g in result.groups for c in g.completions]
        direct = RewardModelScorer(checkpoint).score([(p.text, c.text) for p, c in completions])
        for (prompt, completion), score in zip(completions, direct, strict=True):
            rule = 1.0 if completion.text.strip() == prompt.answer else 0.0
            assert completion.reward == pytest.approx(2.0 * rule + score, abs=1e-5)
            assert completion.correct == (rule == 1.0) and completion.verifier_error is None
        assert result.verifier_errors == []
    finally:
        models.close()


def test_a_failed_or_slow_reward_model_is_an_error_of_its_groups(ray_local, checkpoint):
    slow = servers(checkpoint, timeout_seconds=0.001)
    try:
        result = worker(slow).rollout([judged(PROMPTS[0])])
        (group,) = result.groups
        assert all(
            c.reward == 0.0 and "gave no scores within timeout_seconds=0.001" in c.verifier_error
            for c in group.completions
        )
    finally:
        slow.close()
    dead = servers(checkpoint)
    try:
        rollout_worker = worker(dead)
        ray.kill(dead.actors["rm"][0])
        result = rollout_worker.rollout([judged(PROMPTS[0])])
        errors = {c.verifier_error for c in result.groups[0].completions}
        assert len(errors) == 1 and errors.pop().startswith("reward model 'rm' failed: ")
    finally:
        dead.close()


def test_a_missing_checkpoint_fails_the_set_up_naming_the_model(ray_local, tmp_path):
    with pytest.raises(Exception, match="reward model 'rm' could not be loaded from"):
        servers(tmp_path / "absent")


def test_a_run_trains_on_reward_model_scores(ray_local, tmp_path, warm_cache, checkpoint):
    data = tmp_path / "judged.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(40)))
    source = f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'reward_model:rm'}}]"
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        source,
        f"reward_models={{rm: {{path: '{checkpoint}', num_cpus: 0.5, rule: math, combine: sum}}}}",
    )
    run_dir = RunDirectory(tmp_path, "judged")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["steps"] == 3 and summary["state"] == "finished"
    rewards = [r for m in run_dir.read_metrics() for r in m["reward_by_distribution"].values()]
    assert rewards and all(0.0 < r < 2.0 for r in rewards)  # sigmoid scores, plus the rule's 0 or 1
    assert "reward model 'rm': 1 actor(s) serving" in (run_dir.path / "events.log").read_text()
    conservation(summary)
