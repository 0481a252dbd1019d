"""Experiment trackers of a run: TensorBoard, MLflow and Weights & Biases behind one `Trackers` object.

`metrics.jsonl` and `samples.jsonl` in the run directory are the run's record; a tracker is a mirror
of them for people who already watch TensorBoard, MLflow or W&B. So a tracker that fails mid-run is
reported once through `log` and dropped for the rest of the run, and the run goes on: a dashboard
must never cost a training run. A tracker that cannot start fails `Trackers.open` instead, with a
`ConfigError` naming the `logging.*` field to fix, before any training time is spent.

What each tracker writes, and where:

- TensorBoard (`logging.tensorboard`): event files in `directory` (default `<run_dir>/tensorboard`),
  one scalar per metric tag (float32, as TensorBoard stores scalars) and one markdown text summary
  per step, tag `samples/text_summary`, each prompt and completion in a fenced block so the text
  plugin shows it exactly as the model saw it. Events are flushed every two minutes and at close.
- MLflow (`logging.mlflow`): one run named by the run id in experiment `experiment`; the resolved
  config as params (dotted keys, JSON values cut to MLflow's 6000 characters) and whole as the
  artifact `config.json`; every metric with its step; the samples of a step as the table artifact
  `samples/step-000010.json` (`MlflowClient.log_table`, read back with `load_table`). Keys MLflow
  refuses (characters outside ``[/\\w.\\- :]``, `.`/`..` segments) are rewritten by `mlflow_key`.
- Weights & Biases (`logging.wandb`): `wandb.init(dir=run_dir, mode=mode)` (offline: `<run_dir>/wandb`,
  upload later with `wandb sync`), metrics with their step and the samples as a `wandb.Table`.

Metrics are `flatten_metrics(record)` of a `metrics.jsonl` line: nested dicts joined with "/",
finite numbers only, booleans as 0/1 (so `skipped` steps show as spikes); the `step` key is the
x-axis, not a series.

The default MLflow store (`tracking_uri: None`) is the file store `file://<run_dir>/mlruns`. With
mlflow-skinny 3.18 the alternatives were tried: `sqlite:///…` needs SQLAlchemy and Alembic, which
mlflow-skinny does not install (`MlflowClient("sqlite:///…")` fails: "unsupported URI … for model
registry"), while the file store still writes and reads everything used here but refuses to open
unless `MLFLOW_ALLOW_FILE_STORE=true` ("maintenance mode"). Opening a file store therefore sets
that variable for this process, unless it is already set (an explicit `false` is respected and
reported at open). Another process reading the store needs it too, e.g.
`MLFLOW_ALLOW_FILE_STORE=true python -c "from mlflow import MlflowClient; …"`, or a full `mlflow`
install's `mlflow migrate-filestore` to move it to a database.

An HTTP tracking server is checked at open with no retries and a 10 s timeout, so a wrong URI fails
in seconds instead of after MLflow's default minutes of retries; later calls get 2 retries and a
30 s timeout, so a server that goes away stalls the loop for about a minute at most before the
tracker is dropped. The `MLFLOW_HTTP_REQUEST_*` variables are set only around MLflow calls and
only where the user has not set them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol
from urllib.parse import urlparse

from orchard.config import ConfigError, LoggingConfig, MLflowConfig, TensorBoardConfig, WandbConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

#: Columns every sample row starts with; any other keys of the samples follow in first-seen order.
SAMPLE_COLUMNS = ("step", "distribution", "reward", "correct", "prompt", "completion")

#: MLflow's limits (mlflow.utils.validation): key length, param value length, entries per log_batch.
MLFLOW_MAX_KEY_LENGTH = 250
MLFLOW_MAX_PARAM_LENGTH = 6000
MLFLOW_MAX_METRICS_PER_BATCH = 1000
MLFLOW_MAX_PARAMS_PER_BATCH = 100

_MLFLOW_FORBIDDEN_CHARACTERS = re.compile(r"[^/\w.\- :]")


def _config_error(field: str, message: str) -> ConfigError:
    """A ConfigError on one `logging.*` field: the CLI prints it like any other bad config value."""
    return ConfigError([(field, message)])


def flatten_metrics(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number of a `metrics.jsonl` record by its "/"-joined path; booleans as 0.0/1.0.

    None, strings, lists and non-finite numbers are left out: a tracker series holds numbers, and a
    NaN (e.g. an undefined mismatch before any sample) would only break its plot's scale.
    """
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (`learner.lr`, as config errors name fields),
    strings as they are, other values as JSON, each cut to MLflow's param length (the whole config is
    also logged as `config.json`, so a cut value is never the only copy)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            params.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if len(text) > MLFLOW_MAX_PARAM_LENGTH:
            text = text[: MLFLOW_MAX_PARAM_LENGTH - 1] + "…"
        params[mlflow_key(name)] = text
    return params


def mlflow_key(name: str) -> str:
    """`name` as a metric or param key MLflow accepts: forbidden characters become "_", empty, "." and
    ".." path segments are dropped or replaced (MLflow stores keys as file paths), at most 250
    characters. Distribution names come from user data, so any character can occur."""
    cleaned = _MLFLOW_FORBIDDEN_CHARACTERS.sub("_", name)[:MLFLOW_MAX_KEY_LENGTH]
    segments = ["_" * len(segment) if segment in (".", "..") else segment for segment in cleaned.split("/") if segment]
    return "/".join(segments) or "_"


def sample_table(samples: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the samples: `SAMPLE_COLUMNS` first, then every other key, so nothing a
    sample carries is lost; a key a sample lacks is None in its row."""
    columns = list(SAMPLE_COLUMNS)
    for sample in samples:
        columns.extend(key for key in sample if key not in columns)
    return columns, [[sample.get(column) for column in columns] for sample in samples]


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`, so the text cannot close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def samples_markdown(samples: Sequence[Mapping[str, Any]]) -> str:
    """The samples of one step as markdown for TensorBoard's text plugin: per sample its fields as a
    list, then prompt and completion verbatim in fenced blocks (a table cell would reflow newlines
    and turn `|` and `*` of a chat template into markup)."""
    columns, rows = sample_table(samples)
    parts: list[str] = []
    for number, row in enumerate(rows, start=1):
        fields = dict(zip(columns, row, strict=True))
        prompt, completion = str(fields.pop("prompt")), str(fields.pop("completion"))
        parts.append(f"### Sample {number} of {len(rows)}")
        parts.append("\n".join(f"- {key}: {' '.join(str(value).split())}" for key, value in fields.items()))
        for title, text in (("prompt", prompt), ("completion", completion)):
            fence = _fence(text)
            parts.append(f"**{title}**\n\n{fence}\n{text}\n{fence}")
    return "\n\n".join(parts) + "\n"


class Tracker(Protocol):
    """One experiment tracker of a run, opened by its class's `open`."""

    name: ClassVar[str]

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self, succeeded: bool) -> None:
        """Flush and release; `succeeded` False when the tracker is dropped after a failure."""
        ...


@dataclass
class TensorBoardTracker:
    writer: SummaryWriter
    name: ClassVar[str] = "tensorboard"

    @classmethod
    def open(cls, config: TensorBoardConfig, run_dir: Path) -> TensorBoardTracker:
        # imported here: torch's TensorBoard writer costs seconds and is only needed when enabled
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(config.directory) if config.directory is not None else run_dir / "tensorboard"
        try:
            return cls(SummaryWriter(log_dir=str(directory)))
        except Exception as error:
            raise _config_error(
                "logging.tensorboard.directory",
                f"{str(directory)!r} cannot hold TensorBoard event files ({type(error).__name__}: {error});"
                " choose a writable directory",
            ) from error

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        self.writer.add_text("samples", samples_markdown(samples), global_step=step)

    def close(self, succeeded: bool) -> None:
        self.writer.close()


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of MLflow's HTTP calls, applied through its `MLFLOW_HTTP_REQUEST_*` variables."""

    max_retries: int
    backoff_factor: int
    timeout_seconds: int


#: At open: fail fast, a wrong or unreachable URI is far likelier than a blip while the user waits.
OPEN_HTTP_LIMITS = HttpLimits(max_retries=0, backoff_factor=0, timeout_seconds=10)
#: While logging: ride out a blip, but never stall the training loop for more than about a minute.
LOGGING_HTTP_LIMITS = HttpLimits(max_retries=2, backoff_factor=1, timeout_seconds=30)


@contextmanager
def _bounded_http(limits: HttpLimits) -> Iterator[None]:
    """Set MLflow's HTTP retry and timeout variables for the calls inside (those the user has not
    set), and restore the environment afterwards."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(limits.max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(limits.backoff_factor),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(limits.timeout_seconds),
    }
    added = [name for name in wanted if name not in os.environ]
    os.environ.update({name: wanted[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def mlflow_tracking_uri(config: MLflowConfig, run_dir: Path) -> str:
    """The tracking URI in force: the configured one, else the file store `<run_dir>/mlruns`."""
    if config.tracking_uri is not None:
        return config.tracking_uri
    return (run_dir / "mlruns").resolve().as_uri()


@dataclass
class MLflowTracker:
    client: MlflowClient
    run_id: str
    name: ClassVar[str] = "mlflow"

    @classmethod
    def open(
        cls, config: MLflowConfig, run_dir: Path, run_name: str, resolved_config: Mapping[str, Any]
    ) -> MLflowTracker:
        from mlflow import MlflowClient

        uri = mlflow_tracking_uri(config, run_dir)
        if urlparse(uri).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
        try:
            with _bounded_http(OPEN_HTTP_LIMITS):
                client = MlflowClient(tracking_uri=uri)
                experiment = client.get_experiment_by_name(config.experiment)
                if experiment is not None and experiment.lifecycle_stage == "deleted":
                    raise _config_error(
                        "logging.mlflow.experiment",
                        f"{config.experiment!r} is deleted in {uri!r}; restore it"
                        " (`mlflow experiments restore`) or choose another name",
                    )
                experiment_id = (
                    experiment.experiment_id if experiment is not None else client.create_experiment(config.experiment)
                )
                run = client.create_run(experiment_id, run_name=run_name, tags={"orchard.run_id": run_name})
                tracker = cls(client, run.info.run_id)
                with ExitStack() as cleanup:
                    cleanup.callback(client.set_terminated, tracker.run_id, "FAILED")
                    tracker._log_config(resolved_config)
                    cleanup.pop_all()
                return tracker
        except ConfigError:
            raise
        except Exception as error:
            shown = repr(uri) if config.tracking_uri is not None else f"None (default {uri!r})"
            raise _config_error(
                "logging.mlflow.tracking_uri",
                f"{shown} cannot be used ({type(error).__name__}: {error}); point it at a reachable"
                " tracking server or a writable directory, or set logging.mlflow.enabled=false",
            ) from error

    def _log_config(self, resolved_config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten_params(resolved_config).items()]
        for start in range(0, len(params), MLFLOW_MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_MAX_PARAMS_PER_BATCH])
        self.client.log_text(self.run_id, json.dumps(resolved_config, indent=2, default=str), "config.json")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        keyed = {mlflow_key(name): value for name, value in metrics.items()}
        batch = [Metric(key, value, timestamp, step) for key, value in keyed.items()]
        with _bounded_http(LOGGING_HTTP_LIMITS):
            for start in range(0, len(batch), MLFLOW_MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=batch[start : start + MLFLOW_MAX_METRICS_PER_BATCH])

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        columns, rows = sample_table(samples)
        table = {column: [row[index] for row in rows] for index, column in enumerate(columns)}
        with _bounded_http(LOGGING_HTTP_LIMITS):
            self.client.log_table(self.run_id, table, f"samples/step-{step:06d}.json")

    def close(self, succeeded: bool) -> None:
        with _bounded_http(LOGGING_HTTP_LIMITS):
            self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")


def _import_wandb() -> Any:
    """The wandb module, or a ConfigError saying how to get it (it is not an Orchard dependency)."""
    try:
        import wandb
    except ImportError as error:
        raise _config_error(
            "logging.wandb.enabled",
            "is true but the wandb package is not installed; `pip install wandb`, or set logging.wandb.enabled=false",
        ) from error
    return wandb


@dataclass
class WandbTracker:
    wandb: Any  # the wandb module, passed in so a missing install is found before any tracker opens
    run: Any
    name: ClassVar[str] = "wandb"

    @classmethod
    def open(
        cls, wandb: Any, config: WandbConfig, run_dir: Path, run_name: str, resolved_config: Mapping[str, Any]
    ) -> WandbTracker:
        try:
            run = wandb.init(
                project=config.project, name=run_name, dir=str(run_dir), mode=config.mode, config=dict(resolved_config)
            )
        except Exception as error:
            raise _config_error(
                "logging.wandb.mode",
                f"wandb.init failed in mode {config.mode!r} ({type(error).__name__}: {error}); for 'online'"
                " run `wandb login` first, or use mode 'offline'",
            ) from error
        return cls(wandb, run)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        columns, rows = sample_table(samples)
        self.run.log({"samples": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self, succeeded: bool) -> None:
        self.run.finish(exit_code=0 if succeeded else 1)


class Trackers:
    """The trackers of one run. The driver calls `log_metrics` with each `metrics.jsonl` record and
    `log_samples` with each step's samples, then `close` once (more calls do nothing)."""

    def __init__(self, trackers: Sequence[Tracker], log: Callable[[str], None] = print) -> None:
        self._active: list[Tracker] = list(trackers)
        self._log = log
        self._closed = False

    @classmethod
    def open(
        cls,
        config: LoggingConfig,
        run_dir: Path,
        run_id: str,
        resolved_config: Mapping[str, Any],
        log: Callable[[str], None] = print,
    ) -> Trackers:
        """Open every enabled tracker, or raise a `ConfigError` naming the field to fix and close
        those already opened. `resolved_config` must already be free of secrets (`dump_config`'s)."""
        run_dir = Path(run_dir)
        wandb = _import_wandb() if config.wandb.enabled else None
        with ExitStack() as cleanup:
            opened: list[Tracker] = []
            if config.tensorboard.enabled:
                opened.append(TensorBoardTracker.open(config.tensorboard, run_dir))
                cleanup.callback(opened[-1].close, False)
            if config.mlflow.enabled:
                opened.append(MLflowTracker.open(config.mlflow, run_dir, run_id, resolved_config))
                cleanup.callback(opened[-1].close, False)
            if wandb is not None:
                opened.append(WandbTracker.open(wandb, config.wandb, run_dir, run_id, resolved_config))
                cleanup.callback(opened[-1].close, False)
            cleanup.pop_all()
        return cls(opened, log)

    @property
    def names(self) -> list[str]:
        """The trackers still active, in opening order (a failed one is gone)."""
        return [tracker.name for tracker in self._active]

    def log_metrics(self, step: int, record: Mapping[str, Any]) -> None:
        """Send `flatten_metrics(record)` at `step`; the record's own `step` is the axis, not a series."""
        self._check_open("log_metrics")
        if not self._active:
            return
        metrics = flatten_metrics(record)
        metrics.pop("step", None)
        self._each("log metrics", lambda tracker: tracker.log_metrics(step, metrics))

    def log_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        self._check_open("log_samples")
        if samples:
            self._each("log samples", lambda tracker: tracker.log_samples(step, samples))

    def close(self) -> None:
        """Flush and end every tracker (the MLflow run as FINISHED). A tracker that fails to close is
        reported and the others are still closed."""
        if self._closed:
            return
        self._closed = True
        closing, self._active = self._active, []
        for tracker in closing:
            try:
                tracker.close(True)
            except Exception as error:
                self._log(f"tracker {tracker.name} failed to close ({type(error).__name__}: {error})")

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise RuntimeError(f"Trackers.{method} called after close(); close only when the run has ended")

    def _each(self, action: str, call: Callable[[Tracker], None]) -> None:
        """`call` on every active tracker; one that raises is reported once and dropped, so the run
        and the other trackers go on (metrics.jsonl keeps everything regardless)."""
        for tracker in list(self._active):
            try:
                call(tracker)
            except Exception as error:
                self._active.remove(tracker)
                message = (
                    f"tracker {tracker.name} failed to {action} ({type(error).__name__}: {error}); it is disabled"
                    " for the rest of the run (metrics.jsonl and samples.jsonl still have everything)"
                )
                try:
                    tracker.close(False)
                except Exception as close_error:
                    message += f"; closing it failed too ({type(close_error).__name__}: {close_error})"
                self._log(message)
