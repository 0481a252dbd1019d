"""A short real run (local Ray, the driver, rollout workers, the DeepSpeed learner) with several learner
options at once: DAPO overlong shaping, Lp-Reg, HPT and hinted rollouts of all-fail prompts. (Masking
truncated completions is left to tests/integration/test_trainer_options.py: this briefly warmed-up
model runs out of tokens in most completions, so masking would leave Lp-Reg little to act on.)"""

from __future__ import annotations

import json
import math

from orchard.config import load_config
from orchard.rollout.tokenizer import CharTokenizer
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import small_config

SETTINGS = [
    *PLAIN_GRPO,
    "max_minutes=null",
    "max_steps=6",
    "warmstart.steps=80",
    "warmstart.batch_size=8",
    "rollout.group_size=4",
    "rollout.prompts_per_call=4",
    "rollout.max_new_tokens=6",
    "learner.groups_per_step=4",
    "learner.dynamic_sampling=true",
    "learner.overlong={enabled: true}",
    # Lp-Reg regularises a negative token only where the proxy cuts something (else π_proxy = π) and
    # keeps that token: the warm start is long enough for peaked distributions, and every negative
    # token is a candidate
    "learner.lp_reg={enabled: true, min_p: 0.5, low_fraction: 1.0}",
    "learner.hpt={enabled: true, mix: true}",
    "learner.hints={enabled: true}",
    "eval.every_steps=100",
    "eval.num_prompts=4",
    "data.held_out_size=4",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=2",
    "buffer.backend=memory",
]


def test_overlong_lp_reg_hpt_and_hints_together(ray_local, tmp_path, warm_cache):
    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"{i}+{i}=",
                    "answer": str(2 * i),
                    "solution": str(2 * i),
                    "hints": [f"len {len(str(2 * i))}", f"starts {str(2 * i)[0]}"],
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    verifier = "tests.integration.algorithm_verifiers:digits_then_exact"
    source = f"data.sources=[{{kind: jsonl, path: '{data}', verifier: '{verifier}'}}]"
    config = load_config(None, [*SETTINGS, source, f"warmstart.cache_dir={warm_cache}", f"runs_dir={tmp_path}"])
    run_dir = RunDirectory(tmp_path, "algorithms")
    driver = Driver(config, run_dir, show_progress=False)
    results, trained = [], []
    on_learner_step = driver._on_learner_step

    def spy(step, groups, weights_ref):
        results.append(step.result)
        trained.extend(groups)
        return on_learner_step(step, groups, weights_ref)

    driver._on_learner_step = spy
    summary = driver.run()

    assert summary["steps"] == 6
    assert all(math.isfinite(result.loss) for result in results)
    assert sum(not result.skipped for result in results) >= 5
    # HPT: all-fail groups reached the learner despite dynamic sampling and trained on their solution
    assert sum(result.sft_groups for result in results) > 0
    assert any(result.sft_loss > 0 for result in results)
    # hints: hinted groups were sampled and trained against the bare prompt
    hinted = [g for g in trained if any(c.source == "hint" for c in g.completions)]
    assert hinted and sum(result.hinted_sequences for result in results) > 0
    tokenizer = CharTokenizer()
    for group in hinted:
        assert tokenizer.decode(group.prompt_token_ids) == group.prompt.text  # the bare prompt, no hint
    # Lp-Reg regularised some low-probability negative tokens
    assert sum(result.lp_reg_tokens for result in results) > 0
    records = run_dir.read_metrics()
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert sum(record["sft_groups"] for record in records) == sum(result.sft_groups for result in results)


def test_ppo_with_a_critic_trains_checkpoints_and_resumes(ray_local, tmp_path, warm_cache):
    """PPO through the whole loop: the learner actor's trainer holds the critic, its figures reach
    metrics.jsonl, and a run resumes from a checkpoint holding the critic (a PPO learner refuses one
    without it). Graded rewards (the share of digits), so that every step has signal."""
    settings = ["learner.advantage=gae", "learner.critic={lr: 1.0e-3}", "checkpoint.every_steps=2"]
    run_dir = RunDirectory(tmp_path, "ppo")
    first = Driver(small_config(tmp_path, warm_cache, *settings, "max_steps=4"), run_dir, show_progress=False).run()
    assert first["steps"] == 4
    assert list((run_dir.path / "checkpoints" / "step-4").rglob("critic/latest"))
    resumed = Driver(
        small_config(tmp_path, warm_cache, *settings, "max_steps=6"), run_dir, show_progress=False, resume=True
    )
    second = resumed.run()
    assert second["resumed_from"] is not None and second["steps"] == 6
    records = run_dir.read_metrics()
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert not any(record["skipped"] for record in records)
    assert all(record["value_loss"] > 0 and record["critic_grad_norm"] > 0 for record in records)
    assert all(record["critic_skipped"] == 0 for record in records)
    gauge = resumed.metrics.critic  # what Prometheus and the dashboard's "PPO critic" panel read
    assert gauge.labels(statistic="value_loss")._value.get() == records[-1]["value_loss"]
    assert gauge.labels(statistic="explained_variance")._value.get() == records[-1]["value_explained_variance"]
    # that the critic's weights and optimizer come back exactly is tests/integration/test_trainer_options.py's
