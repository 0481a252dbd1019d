"""The GPU cluster recipe and its settings: `orchard check` accepts it, the GPU options are what it
says, and the example dataset is in the format the JSONL source reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchard.config import ConfigError, load_config
from orchard.services.cli import main
from orchard.verifiers.sources import load_jsonl_prompts

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "recipes" / "math-1.5b.yaml"
EXAMPLE = REPO / "configs" / "data" / "math-example.jsonl"


def test_the_math_recipe_passes_orchard_check(capsys):
    assert main(["check", str(RECIPE)]) == 0
    assert "engine: vllm" in capsys.readouterr().out


def test_the_math_recipe_asks_for_the_gpu_path():
    config = load_config(RECIPE)
    assert (config.model.kind, config.model.dtype) == ("hf", "bfloat16")
    assert config.rollout.engine == "vllm" and config.rollout.stop == []
    assert config.learner.zero_stage == 3
    assert config.weight_sync.transport == "nccl" and config.weight_sync.bucket_bytes == 512 << 20
    assert config.cluster.placement_groups
    assert config.cluster.rollout_gpus_per_worker == config.rollout.vllm.tensor_parallel_size == 1
    assert config.warmstart.steps == 0
    # bf16 engines: the learner's own old logprobs, the engine's samples weighed by truncated importance sampling
    assert config.learner.recompute_old_logprobs and config.learner.tis_cap == 2.0


def test_the_example_dataset_reads_with_several_distributions():
    prompts, problems = load_jsonl_prompts(EXAMPLE, verifier="math", on_bad_line="error")
    assert not problems and len(prompts) == 8
    assert len({prompt.distribution for prompt in prompts}) == 5
    assert sum(bool(prompt.messages) for prompt in prompts) == 4  # half in verl's layout, as chat messages


def test_the_math_recipe_asks_for_boxed_answers_through_the_chat_template():
    config = load_config(RECIPE)
    assert config.data.chat_template == "auto"
    assert config.data.system_prompt.endswith("put your final answer within \\boxed{}.")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["rollout.vllm.kv_cache_bytes=1000"], "rollout.vllm.kv_cache_bytes"),
        (["learner.recompute_old_logprobs=false"], "learner.tis_cap: truncated importance sampling"),
        (["rollout.vllm.tensor_parallel_size=2"], "must equal rollout.vllm.tensor_parallel_size"),
        (["weight_sync.transport=ucx"], "weight_sync.transport"),
        (["cluster.learner_gpus=2"], "cluster.learner_gpus"),
    ],
)
def test_gpu_settings_that_disagree_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(RECIPE, overrides)
