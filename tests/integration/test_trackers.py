"""The experiment trackers write what a run logs, read back with each tracker's own reader.

TensorBoard is read with its `EventAccumulator`, MLflow with `MlflowClient`; W&B is not an Orchard
dependency, so only its missing-install error always runs. The pure helpers (flattening, MLflow
keys, the samples' markdown) are tested here too, next to the adapters that use them.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name, _validate_param_name

from orchard.config import DEMO_CONFIG, ConfigError, LoggingConfig, load_config
from orchard.services.trackers import (
    MLFLOW_MAX_PARAM_LENGTH,
    Trackers,
    flatten_metrics,
    flatten_params,
    mlflow_key,
    samples_markdown,
)

RUN_ID = "demo-20260101-000000-000"

# Three metrics.jsonl lines as the driver writes them: nested dicts, None, NaN, infinities, strings,
# booleans, a distribution name MLflow refuses as a key ("@"). Values are exact in float32, since
# TensorBoard stores scalars as float32.
RECORDS: list[dict[str, Any]] = [
    {
        "step": 1,
        "loss": 0.5,
        "kl": None,
        "grad_norm": float("nan"),
        "skipped": False,
        "phase": "warmup",
        "eval_accuracy": None,
        "reward_by_distribution": {"addition/d1": 0.25, "gsm8k@hard": 0.75},
        "buffer": {"groups": 12, "oldest": float("inf")},
    },
    {
        "step": 2,
        "loss": 0.25,
        "kl": 0.125,
        "grad_norm": 2.0,
        "skipped": True,
        "phase": "rl",
        "eval_accuracy": 0.5,
        "reward_by_distribution": {"addition/d1": 0.5, "gsm8k@hard": 1.0},
        "eval_by_distribution": {"addition/d1": 0.75},
        "deepsearch": {"expansions": 7, "tree": {"depth": 3}},
        "buffer": {"groups": 8, "oldest": 1},
    },
    {
        "step": 3,
        "loss": -1.5,
        "kl": float("-inf"),
        "skipped": False,
        "reward_by_distribution": {"addition/d1": 0.0, "gsm8k@hard": 0.5},
        "buffer": {"groups": 4, "oldest": 2},
    },
]

# What every tracker must hold per series, by step; series absent here must be absent there.
EXPECTED_SERIES: dict[str, dict[int, float]] = {
    "loss": {1: 0.5, 2: 0.25, 3: -1.5},
    "kl": {2: 0.125},
    "grad_norm": {2: 2.0},
    "skipped": {1: 0.0, 2: 1.0, 3: 0.0},
    "eval_accuracy": {2: 0.5},
    "reward_by_distribution/addition/d1": {1: 0.25, 2: 0.5, 3: 0.0},
    "reward_by_distribution/gsm8k@hard": {1: 0.75, 2: 1.0, 3: 0.5},
    "eval_by_distribution/addition/d1": {2: 0.75},
    "deepsearch/expansions": {2: 7.0},
    "deepsearch/tree/depth": {2: 3.0},
    "buffer/groups": {1: 12.0, 2: 8.0, 3: 4.0},
    "buffer/oldest": {2: 1.0, 3: 2.0},
}

# A chat-template prompt with the characters markdown and tables trip over: newlines, pipes, tags,
# a fenced code block of its own, asterisks and underscores.
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a careful solver | think step by step.<|im_end|>\n"
    "<|im_start|>user\nFix this:\n```python\nprint(2 ** 3)\n```\n*Answer* in __bold__.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def samples_at(step: int) -> list[dict[str, Any]]:
    return [
        {
            "step": step,
            "policy_version": step - 1,
            "distribution": "addition/d1",
            "prompt_id": f"addition-{step}",
            "prompt": f"What is {step} + {step}?\nAnswer:",
            "completion": f" {2 * step}",
            "reward": 1.0,
            "correct": True,
            "finish_reason": "stop",
        },
        {
            "step": step,
            "policy_version": step - 1,
            "distribution": "gsm8k@hard",
            "prompt_id": f"gsm8k-{step}",
            "prompt": CHAT_PROMPT,
            "completion": "It prints 8 ```` and | pipes\n\nso: 8",
            "reward": 0.0,
            "correct": False,
            "finish_reason": "length",
        },
    ]


SAMPLE_STEPS = (2, 3)


def resolved_config() -> dict[str, Any]:
    return load_config(DEMO_CONFIG).model_dump(mode="json", exclude={"control": {"token"}})


def logging_config(**sections: dict[str, Any]) -> LoggingConfig:
    return LoggingConfig.model_validate(sections)


def write_run(trackers: Trackers) -> None:
    for record in RECORDS:
        trackers.log_metrics(record["step"], record)
        if record["step"] in SAMPLE_STEPS:
            trackers.log_samples(record["step"], samples_at(record["step"]))


@pytest.fixture(autouse=True)
def _restore_file_store_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trackers.open sets MLFLOW_ALLOW_FILE_STORE for the process; start each test without it (so the
    opt-in is tested) and remove it afterwards (setenv records the prior state for the teardown)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset by the fixture")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


# --- pure helpers -------------------------------------------------------------------------------


def test_flatten_metrics_keeps_finite_numbers_and_joins_nested_keys_with_slashes() -> None:
    assert flatten_metrics(RECORDS[0]) == {
        "step": 1.0,
        "loss": 0.5,
        "skipped": 0.0,
        "reward_by_distribution/addition/d1": 0.25,
        "reward_by_distribution/gsm8k@hard": 0.75,
        "buffer/groups": 12.0,
    }
    assert flatten_metrics({"a": {"b": {"c": True}}, "list": [1, 2], "empty": {}}) == {"a/b/c": 1.0}


leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
key = st.text(alphabet=st.characters(blacklist_characters="/"), min_size=1, max_size=6)
record_strategy = st.recursive(leaf, lambda children: st.dictionaries(key, children, max_size=4), max_leaves=20)


@given(st.dictionaries(key, record_strategy, max_size=5))
def test_flatten_metrics_maps_every_finite_number_leaf_to_its_path(record: dict[str, Any]) -> None:
    def number_leaves(value: Any, path: tuple[str, ...]) -> dict[str, float]:
        if isinstance(value, dict):
            found: dict[str, float] = {}
            for child_key, child in value.items():
                found.update(number_leaves(child, (*path, child_key)))
            return found
        is_number = isinstance(value, bool | int | float) and math.isfinite(value)
        return {"/".join(path): float(value)} if is_number else {}

    assert flatten_metrics(record) == number_leaves(record, ())


def test_flatten_params_uses_dotted_keys_json_values_and_mlflow_length_limit() -> None:
    config = {
        "name": "demo",
        "learner": {"lr": 1e-6, "advantage": "grpo", "kl": {"beta": 0.0}},
        "data": {"sources": [{"kind": "procedural", "weight": 1.0}]},
        "eval": {"samples": None, "enabled": True},
        "tags": {},
        "notes": "x" * (MLFLOW_MAX_PARAM_LENGTH + 10),
    }
    assert flatten_params(config) == {
        "name": "demo",
        "learner.lr": "1e-06",
        "learner.advantage": "grpo",
        "learner.kl.beta": "0.0",
        "data.sources": '[{"kind": "procedural", "weight": 1.0}]',
        "eval.samples": "null",
        "eval.enabled": "true",
        "tags": "{}",
        "notes": "x" * (MLFLOW_MAX_PARAM_LENGTH - 1) + "…",
    }


def test_mlflow_key_rewrites_what_mlflow_refuses() -> None:
    assert mlflow_key("reward_by_distribution/addition/d1") == "reward_by_distribution/addition/d1"
    assert mlflow_key("reward_by_distribution/gsm8k@hard") == "reward_by_distribution/gsm8k_hard"
    assert mlflow_key("/a//b/./c/../d/") == "a/b/_/c/__/d"
    assert mlflow_key("") == "_"
    assert len(mlflow_key("k" * 400)) == 250


@given(st.text(max_size=300))
def test_mlflow_accepts_every_key_mlflow_key_makes(name: str) -> None:
    key = mlflow_key(name)
    _validate_metric_name(key)
    _validate_param_name(key)
    assert len(key) <= 250


def test_samples_markdown_renders_prompts_verbatim_in_tensorboard() -> None:
    from tensorboard.plugin_util import markdown_to_safe_html

    markdown = samples_markdown(samples_at(2))
    assert "### Sample 1 of 2" in markdown and "### Sample 2 of 2" in markdown
    assert "- distribution: gsm8k@hard" in markdown and "- finish_reason: length" in markdown
    rendered = markdown_to_safe_html(markdown)
    for sample in samples_at(2):
        # python-markdown escapes &, <, > and " inside code blocks, nothing else
        escaped = html.escape(sample["prompt"], quote=False).replace('"', "&quot;")
        assert f"<code>{escaped}\n</code>" in rendered


# --- no tracker ---------------------------------------------------------------------------------


def test_no_tracker_enabled_opens_nothing_and_writes_nothing(tmp_path: Path) -> None:
    messages: list[str] = []
    trackers = Trackers.open(logging_config(), tmp_path, RUN_ID, resolved_config(), log=messages.append)
    assert trackers.names == []
    write_run(trackers)
    trackers.close()
    trackers.close()
    assert list(tmp_path.iterdir()) == [] and messages == []
    with pytest.raises(RuntimeError, match="after close"):
        trackers.log_metrics(4, {"loss": 1.0})


# --- TensorBoard --------------------------------------------------------------------------------


def read_tensorboard(directory: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size_guidance 0: keep every event (the default samples scalars and keeps 10 tensors)
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def tensorboard_series(accumulator: Any) -> dict[str, dict[int, float]]:
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_holds_every_metric_and_the_samples_text(tmp_path: Path) -> None:
    trackers = Trackers.open(logging_config(tensorboard={"enabled": True}), tmp_path, RUN_ID, resolved_config())
    assert trackers.names == ["tensorboard"]
    write_run(trackers)
    trackers.close()
    trackers.close()

    accumulator = read_tensorboard(tmp_path / "tensorboard")
    assert tensorboard_series(accumulator) == EXPECTED_SERIES
    texts = accumulator.Tensors("samples/text_summary")
    assert [event.step for event in texts] == list(SAMPLE_STEPS)
    for event in texts:
        text = event.tensor_proto.string_val[0].decode("utf-8")
        assert text == samples_markdown(samples_at(event.step))
        for sample in samples_at(event.step):
            assert f"\n{sample['prompt']}\n" in text and f"\n{sample['completion']}\n" in text


def test_tensorboard_directory_option_is_used(tmp_path: Path) -> None:
    directory = tmp_path / "elsewhere" / "events"
    config = logging_config(tensorboard={"enabled": True, "directory": str(directory)})
    trackers = Trackers.open(config, tmp_path / "run", RUN_ID, resolved_config())
    trackers.log_metrics(5, {"loss": 0.5})
    trackers.close()
    assert tensorboard_series(read_tensorboard(directory)) == {"loss": {5: 0.5}}


def test_tensorboard_directory_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = logging_config(tensorboard={"enabled": True, "directory": str(blocker)})
    with pytest.raises(ConfigError, match="logging.tensorboard.directory") as caught:
        Trackers.open(config, tmp_path, RUN_ID, resolved_config())
    assert str(blocker) in str(caught.value)


# --- MLflow -------------------------------------------------------------------------------------


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(client: Any, experiment: str) -> Any:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_mlflow_default_file_store_holds_metrics_params_config_and_samples(tmp_path: Path) -> None:
    config = resolved_config()
    trackers = Trackers.open(logging_config(mlflow={"enabled": True}), tmp_path, RUN_ID, config)
    assert trackers.names == ["mlflow"]
    write_run(trackers)
    trackers.close()
    trackers.close()

    client = mlflow_client((tmp_path / "mlruns").resolve().as_uri())
    run = only_run(client, "orchard")
    run_id = run.info.run_id
    assert (run.info.run_name, run.info.status) == (RUN_ID, "FINISHED")

    expected_series = {mlflow_key(name): series for name, series in EXPECTED_SERIES.items()}
    assert set(run.data.metrics) == set(expected_series)
    for name, series in expected_series.items():
        history = client.get_metric_history(run_id, name)
        assert {metric.step: metric.value for metric in history} == series, name
    assert run.data.metrics["reward_by_distribution/gsm8k_hard"] == 0.5

    params = run.data.params
    assert len(params) == len(flatten_params(config)) > 100  # more than one log_batch of params
    assert params["name"] == "demo" and params["model.kind"] == "tiny"
    assert params["data.sources"] == json.dumps(config["data"]["sources"], sort_keys=True)

    assert sorted(artifact.path for artifact in client.list_artifacts(run_id)) == ["config.json", "samples"]
    assert [artifact.path for artifact in client.list_artifacts(run_id, "samples")] == [
        f"samples/step-{step:06d}.json" for step in SAMPLE_STEPS
    ]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    config_copy = client.download_artifacts(run_id, "config.json", str(downloads))
    assert json.loads(Path(config_copy).read_text()) == config

    for step in SAMPLE_STEPS:
        table = client.load_table(run.info.experiment_id, f"samples/step-{step:06d}.json", run_ids=[run_id])
        expected = samples_at(step)
        assert table["prompt"].tolist() == [sample["prompt"] for sample in expected]
        assert table["completion"].tolist() == [sample["completion"] for sample in expected]
        assert table["reward"].tolist() == [sample["reward"] for sample in expected]
        assert table["correct"].tolist() == [sample["correct"] for sample in expected]
        assert table["distribution"].tolist() == [sample["distribution"] for sample in expected]
        assert table["step"].tolist() == [step, step]
        assert table["finish_reason"].tolist() == ["stop", "length"]


def test_mlflow_reuses_an_existing_experiment_by_name(tmp_path: Path) -> None:
    uri = (tmp_path / "store").resolve().as_uri()
    config = logging_config(mlflow={"enabled": True, "tracking_uri": uri, "experiment": "sweep"})
    for run_id in ("first", "second"):
        trackers = Trackers.open(config, tmp_path, run_id, {"seed": 0})
        trackers.close()
    client = mlflow_client(uri)
    experiment_id = client.get_experiment_by_name("sweep").experiment_id
    runs = client.search_runs([experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["first", "second"]
    assert {run.info.status for run in runs} == {"FINISHED"}


def test_mlflow_deleted_experiment_is_a_config_error_naming_the_experiment(tmp_path: Path) -> None:
    uri = (tmp_path / "store").resolve().as_uri()
    config = logging_config(mlflow={"enabled": True, "tracking_uri": uri, "experiment": "old"})
    Trackers.open(config, tmp_path, "first", {}).close()
    client = mlflow_client(uri)
    client.delete_experiment(client.get_experiment_by_name("old").experiment_id)
    with pytest.raises(ConfigError, match="logging.mlflow.experiment: 'old' is deleted"):
        Trackers.open(config, tmp_path, "second", {})


def http_settings() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_HTTP_REQUEST_")}


def test_mlflow_unreachable_server_is_a_prompt_config_error(tmp_path: Path) -> None:
    uri = "http://127.0.0.1:1"
    http_settings_before = http_settings()
    started = time.monotonic()
    with pytest.raises(ConfigError, match="logging.mlflow.tracking_uri") as caught:
        Trackers.open(logging_config(mlflow={"enabled": True, "tracking_uri": uri}), tmp_path, RUN_ID, {})
    assert repr(uri) in str(caught.value)
    assert time.monotonic() - started < 15  # no retries at open; MLflow's defaults would take minutes
    assert http_settings() == http_settings_before  # the bounds applied only during the check


def test_mlflow_file_store_on_a_regular_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "mlruns-file"
    blocker.write_text("")
    uri = blocker.as_uri()
    with pytest.raises(ConfigError, match="logging.mlflow.tracking_uri") as caught:
        Trackers.open(logging_config(mlflow={"enabled": True, "tracking_uri": uri}), tmp_path, RUN_ID, {})
    assert repr(uri) in str(caught.value)


def event_writer_threads() -> int:
    """TensorBoard event writers alive: each open writer runs one `_AsyncWriterThread`."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    return sum(isinstance(thread, _AsyncWriterThread) for thread in threading.enumerate())


def test_a_failed_open_closes_the_trackers_already_open(tmp_path: Path) -> None:
    config = logging_config(tensorboard={"enabled": True}, mlflow={"enabled": True, "tracking_uri": "bogus://x"})
    writers_before = event_writer_threads()
    with pytest.raises(ConfigError, match="logging.mlflow.tracking_uri"):
        Trackers.open(config, tmp_path, RUN_ID, {})
    assert (tmp_path / "tensorboard").is_dir()  # it was opened first ...
    assert event_writer_threads() == writers_before  # ... and closed again


# --- a tracker failing mid-run ------------------------------------------------------------------


def block_with_directory(path: Path) -> None:
    """A directory where MLflow writes a metric file: the write fails, the run stays readable."""
    path.mkdir(parents=True)


def block_with_file(path: Path) -> None:
    """A regular file where MLflow makes an artifact folder."""
    path.write_text("")


@pytest.mark.parametrize(
    ("blocked", "block", "action", "error"),
    [
        ("metrics/loss", block_with_directory, "log metrics", "Is a directory"),
        ("artifacts/samples", block_with_file, "log samples", "Not a directory"),
    ],
    ids=["metric-write-fails", "artifact-write-fails"],
)
def test_a_tracker_failing_mid_run_is_reported_once_and_dropped(
    tmp_path: Path, blocked: str, block: Callable[[Path], None], action: str, error: str
) -> None:
    messages: list[str] = []
    config = logging_config(tensorboard={"enabled": True}, mlflow={"enabled": True})
    trackers = Trackers.open(config, tmp_path, RUN_ID, {"seed": 0}, log=messages.append)
    assert trackers.names == ["tensorboard", "mlflow"]

    # break MLflow's own storage under the open run
    client = mlflow_client((tmp_path / "mlruns").resolve().as_uri())
    run = only_run(client, "orchard")
    block(Path(urlparse(run.info.artifact_uri).path).parent / blocked)

    write_run(trackers)
    trackers.close()

    assert trackers.names == []
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"tracker mlflow failed to {action} (")
    assert (
        error in messages[0]
        and "closing it failed" not in messages[0]
        and "disabled for the rest of the run" in messages[0]
    )
    assert client.get_run(run.info.run_id).info.status == "FAILED"

    # TensorBoard kept everything, before and after MLflow failed
    accumulator = read_tensorboard(tmp_path / "tensorboard")
    assert tensorboard_series(accumulator) == EXPECTED_SERIES
    assert [event.step for event in accumulator.Tensors("samples/text_summary")] == list(SAMPLE_STEPS)


# --- Weights & Biases ---------------------------------------------------------------------------


def test_wandb_enabled_without_wandb_installed_names_the_field_and_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were absent
    config = logging_config(tensorboard={"enabled": True}, wandb={"enabled": True})
    with pytest.raises(ConfigError, match="logging.wandb.enabled") as caught:
        Trackers.open(config, tmp_path, RUN_ID, {})
    assert "pip install wandb" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # checked before any other tracker opened


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_writes_the_run_under_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers.open(logging_config(wandb={"enabled": True}), tmp_path, RUN_ID, {"seed": 0})
    assert trackers.names == ["wandb"]
    write_run(trackers)
    trackers.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("run-*.wandb"))  # metrics and config, for `wandb sync`
    for step in SAMPLE_STEPS:
        # the logged tables, as wandb writes them for upload: one JSON file per logged table
        (table_file,) = (offline_runs[0] / "files" / "media" / "table").glob(f"samples_{step}_*.table.json")
        table = json.loads(table_file.read_text())
        rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
        expected = samples_at(step)
        assert [row["prompt"] for row in rows] == [sample["prompt"] for sample in expected]
        assert [(row["completion"], row["reward"], row["correct"]) for row in rows] == [
            (sample["completion"], sample["reward"], sample["correct"]) for sample in expected
        ]
