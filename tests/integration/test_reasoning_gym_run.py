"""reasoning-gym end to end: a run of an HF-format instruct model on three reasoning-gym generators,
one distribution of the UCB scheduler each, scored by reasoning-gym's own scorers in the rollout
worker; and the CPU recipe `configs/recipes/reasoning-gym-cpu.yaml` checks and trains a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchard.config import TinyModelConfig, load_config
from orchard.rollout.instruct_model import corpus_of, write_instruct_model
from orchard.services.cli import main as orchard
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from orchard.verifiers.reasoning_gym import ANSWER_INSTRUCTION

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "reasoning-gym-cpu.yaml"
# positions for reasoning-gym's own ~70-word instruction, which the recipe's tokenizer was not trained on
TINY = TinyModelConfig(
    hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, max_position_embeddings=512
)
GENERATORS = ["basic_arithmetic", "leg_counting", "spell_backward"]
SMALL = [
    *PLAIN_GRPO,
    "max_minutes=null",
    "warmstart.steps=10",
    "warmstart.batch_size=8",
    "rollout.group_size=4",
    "rollout.prompts_per_call=6",
    "learner.groups_per_step=6",
    "learner.dynamic_sampling=false",  # an untrained model solves nothing: train on the all-fail groups anyway
    "eval.num_prompts=6",
    "eval.samples=3",
    "data.held_out_size=6",
    "buffer.backend=memory",
    "checkpoint.every_steps=100",
]


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory):
    """The recipe's model as its header builds it (tokenizer trained on the recipe's prompts), smaller."""
    return write_instruct_model(tmp_path_factory.mktemp("rg-model"), corpus_of(str(RECIPE), prompts=400), TINY)


def test_a_reasoning_gym_run_trains_with_one_distribution_per_generator(ray_local, tmp_path, recipe_model):
    datasets = ", ".join(f"{{name: {name}, size: 30, seed: {seed}}}" for seed, name in enumerate(GENERATORS))
    config = load_config(
        str(RECIPE),
        [
            *SMALL,
            "max_steps=3",
            "eval.every_steps=3",
            "curriculum.scheduler=ucb",
            f"data.sources=[{{kind: reasoning_gym, datasets: [{datasets}]}}]",
            f"model.path={recipe_model}",
            f"warmstart.cache_dir={tmp_path / 'warm'}",
        ],
    )
    run_dir = RunDirectory(tmp_path, "rg")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["state"] == "finished" and summary["steps"] == 3
    assert summary["held_out_by_distribution_final"].keys() <= set(GENERATORS)

    records = run_dir.read_metrics()
    trained = set().union(*(record["reward_by_distribution"] for record in records))
    assert trained <= set(GENERATORS) and len(trained) >= 2
    for record in records:
        assert record["scheduler_probabilities"].keys() == set(GENERATORS)
        assert all(0.0 <= reward <= 1.0 for reward in record["reward_by_distribution"].values())

    samples = run_dir.read_samples()
    assert len(samples) == 3
    for sample in samples:
        assert sample["distribution"] in GENERATORS
        assert sample["prompt"].startswith("<|im_start|>system\nYou are a careful assistant.<|im_end|>")
        assert ANSWER_INSTRUCTION in sample["prompt"]
        assert sample["prompt"].endswith("<|im_start|>assistant\n")


def test_the_cpu_recipe_checks_and_trains_a_step(ray_local, tmp_path, recipe_model, capsys):
    assert orchard(["check", str(RECIPE)]) == 0
    assert "reasoning_gym" in capsys.readouterr().out
    config = load_config(
        str(RECIPE),
        [*SMALL, "max_steps=1", "eval.every_steps=1", f"model.path={recipe_model}", "warmstart.steps=0"],
    )
    assert [d.name for d in config.data.sources[0].datasets] == [
        "basic_arithmetic",
        "chain_sum",
        "leg_counting",
    ]
    summary = Driver(config, RunDirectory(tmp_path, "recipe"), show_progress=False).run()
    assert summary["state"] == "finished" and summary["steps"] == 1
