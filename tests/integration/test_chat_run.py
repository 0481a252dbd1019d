"""A run as a newcomer from verl brings it: an instruct model whose tokenizer carries a chat template
(built here: byte-level BPE, ChatML, Qwen2), prompts in verl's preprocessed Parquet layout, a system
prompt and a prompt template; the samples show the template, and the final checkpoint reloads with
the Auto classes, template included, and starts a new run."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchard.config import TinyModelConfig, load_config
from orchard.rollout.instruct_model import CHATML_TEMPLATE, write_instruct_model
from orchard.services.cli import main as orchard
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory

SETTINGS = [
    *PLAIN_GRPO,
    "max_steps=4",
    "max_minutes=null",
    "warmstart.steps=20",
    "warmstart.batch_size=8",
    "rollout.group_size=4",
    "rollout.prompts_per_call=4",
    "rollout.max_new_tokens=8",
    "learner.groups_per_step=4",
    "learner.dynamic_sampling=false",
    "eval.every_steps=2",
    "eval.num_prompts=4",
    "eval.samples=3",
    "data.held_out_size=4",
    "data.system_prompt='Answer with digits only.'",
    "data.prompt_template='{prompt} The answer is'",
    "buffer.backend=memory",
    "checkpoint.every_steps=100",
]


def verl_rows(count: int) -> list[dict]:
    return [
        {
            "data_source": f"sums/{i % 2}",
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"index": i},
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory):
    corpus = [f"What is {i} plus {i}? The answer is {2 * i}" for i in range(40)] + ["Answer with digits only."]
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
    return write_instruct_model(tmp_path_factory.mktemp("instruct-model"), corpus, tiny, vocab_size=300)


def test_a_chat_model_on_verl_parquet_trains_shows_its_template_and_round_trips(
    ray_local, tmp_path, instruct_model, capsys
):
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(40)), data)
    source = (
        f"data.sources=[{{kind: parquet, path: '{data}', verifier: 'tests.integration.user_verifiers:digit_share'}}]"
    )
    model = ["model.kind=hf", f"model.path={instruct_model}"]
    trackers = ["logging.tensorboard.enabled=true", "logging.mlflow.enabled=true"]
    config = load_config(None, [*SETTINGS, *model, *trackers, source, f"warmstart.cache_dir={tmp_path / 'warm'}"])
    run_dir = RunDirectory(tmp_path, "chat")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["state"] == "finished" and summary["steps"] == 4
    assert summary["held_out_by_distribution_final"].keys() == {"sums/0", "sums/1"}

    # what the model saw: the ChatML template with the system prompt and the prompt template
    samples = run_dir.read_samples()
    assert [record["step"] for record in samples] == [2, 2, 2, 4, 4, 4]
    for record in samples:
        assert record["prompt"].startswith("<|im_start|>system\nAnswer with digits only.<|im_end|>\n<|im_start|>user\n")
        assert record["prompt"].endswith(" The answer is<|im_end|>\n<|im_start|>assistant\n")
        assert record["distribution"] in {"sums/0", "sums/1"} and 0.0 <= record["reward"] <= 1.0
        assert "<|im_start|>" not in record["completion"]
    assert orchard(["samples", str(run_dir.path), "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("--- step 4") == 2 and "[prompt]\n<|im_start|>system" in shown

    # the experiment trackers got every step and the samples, read back with their own readers
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir.path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [event.step for event in events.Scalars("eval_accuracy")] == [2, 4]
    client = MlflowClient(f"file://{run_dir.path / 'mlruns'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("orchard").experiment_id])
    assert [metric.step for metric in client.get_metric_history(mlflow_run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert mlflow_run.data.params["data.system_prompt"] == "Answer with digits only."

    # the final checkpoint is a Hugging Face checkpoint with the tokenizer and its template
    final = run_dir.path / "checkpoints" / "step-4" / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    reloaded = AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True)
    assert reloaded.config.vocab_size == len(tokenizer)
    assert json.loads((final / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]

    # ... and starts a new run as `model.path`
    again = load_config(
        None, [*SETTINGS, "max_steps=1", "warmstart.steps=0", "model.kind=hf", f"model.path={final}", source]
    )
    second = Driver(again, RunDirectory(tmp_path, "from-checkpoint"), show_progress=False).run()
    assert second["state"] == "finished" and second["steps"] == 1


def test_orchard_samples_names_what_is_missing(tmp_path, capsys):
    assert orchard(["samples", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert orchard(["samples", str(tmp_path)]) == 1
    assert "holds no samples yet" in capsys.readouterr().err
