"""What a run reports, as typed records: a learner step's record (a line of metrics.jsonl and the
trackers' metrics), the run's progress (what `GET /v1/runs/{id}` shows, `RunStatus` extends it, and
the progress bar's figures) and its summary (summary.json, which holds the progress's figures at the
end under the same names, except `steps` for `step` and a run-wide `staleness_mean`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Per-step figures of the learner's algorithm options (`learner.trainer.StepResult`) in the step record.
LEARNER_OPTION_STATS = (
    "completion_length_mean",
    "sft_groups",
    "sft_loss",
    "hinted_sequences",
    "lp_reg_tokens",
    "masked_truncated",
    "tree_sequences",
    "mismatch_k3",
    "mismatch_abs_mean",
    "mismatch_abs_max",
    "mismatch_tokens",
    "tis_weight_mean",
    "padding_share",
    "value_loss",
    "value_clip_fraction",
    "value_explained_variance",
    "critic_grad_norm",
    "critic_skipped",
)


@dataclass
class StepRecord:
    """One learner step: its loss figures, its batch, and the run's counters after it."""

    step: int
    policy_version: int
    elapsed_seconds: float
    loss: float
    kl: float
    entropy: float
    clip_fraction: float
    grad_norm: float
    skipped: bool
    learner_step_seconds: float
    reward_mean: float
    reward_by_distribution: dict[str, float]
    advantage_abs_mean: float
    staleness_mean: float
    staleness_max: int
    buffer: dict[str, int]
    filtered: dict[str, int]
    generated_groups: int
    effective_ratio: float
    trained_signal_ratio: float
    scheduler_probabilities: dict[str, float]
    value_model_abs_error: float | None
    selection_seconds: float
    generated_tokens: int
    rollout_tokens_per_second: float
    learner_idle_fraction: float
    weight_sync_seconds: float | None
    worker_versions: dict[str, int]
    eval_accuracy: float | None = None
    #: Set with `eval_accuracy` on the steps that evaluate.
    eval_by_distribution: dict[str, float] | None = None
    #: `LEARNER_OPTION_STATS` of the step's result (0 when an option is off).
    learner_options: dict[str, float] = field(default_factory=dict)
    #: What the run's rescues add (`Rescue.step_figures`).
    rescue: dict[str, Any] = field(default_factory=dict)
    #: `curriculum.selection: gain`: the mean μ of GAIN-RL's Gaussian after the step, in ranks (0: the prompt
    #: of highest angle concentration); None with another selection.
    gain_center: float | None = None

    def line(self) -> dict[str, Any]:
        """The record as one flat JSON object (metrics.jsonl)."""
        line = asdict(self)
        if line["eval_by_distribution"] is None:
            del line["eval_by_distribution"]
        line.update(line.pop("learner_options"))
        line.update(line.pop("rescue"))
        return line


class RunProgress(BaseModel):
    """A run's figures while it runs."""

    model_config = ConfigDict(ser_json_inf_nan="null")

    step: int = 0
    policy_version: int = 0
    worker_versions: dict[str, int] = Field(default_factory=dict, description="Policy version each worker holds.")
    reward_mean: float | None = None
    reward_by_distribution: dict[str, float] = Field(default_factory=dict)
    eval_accuracy: float | None = Field(None, description="Latest greedy held-out accuracy.")
    staleness_mean: float | None = None
    learner_steps_per_second: float = 0.0
    rollout_tokens_per_second: float = 0.0
    learner_idle_fraction: float | None = None
    buffer: dict[str, int] = Field(default_factory=dict)
    filtered: dict[str, int] = Field(default_factory=dict)
    checkpoints: list[str] = Field(default_factory=list)
    rollout_workers: int = Field(0, description="Rollout workers now.")
    rollout_workers_target: int = Field(0, description="Rollout workers once a change under way is applied.")
    scaling_refused: str | None = Field(None, description="The latest addition of workers refused, and why.")


class RunSummary(BaseModel):
    """A finished (or stopped) run: summary.json. Rescues add their own figures (`Rescue.summary`)."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    state: str
    stopped_reason: str
    checkpoints: list[str]
    resumed_from: str | None
    steps: int
    policy_version: int
    rl_seconds: float
    warm_start: dict[str, Any] | None
    held_out_prompts: int
    held_out_accuracy_initial: float
    held_out_accuracy_final: float
    held_out_accuracy_gain: float
    held_out_by_distribution_initial: dict[str, float]
    held_out_by_distribution_final: dict[str, float]
    learner_steps_per_second: float
    trained_groups_per_second: float
    rollout_tokens_per_second: float
    learner_idle_fraction: float
    generated_groups: int
    generated_tokens: int
    trained_groups: int
    weight_sync_seconds_mean: float | None
    buffer: dict[str, int]
    filtered: dict[str, int]
    effective_ratio: float
    value_model_abs_error: float | None
    max_staleness: int
    #: Over every group trained in the run (the progress's is the latest step's).
    staleness_mean: float
    #: Multi-turn rollouts: tool calls by "tool/outcome" (outcomes of `rollout.tools.TOOL_OUTCOMES`).
    tool_calls: dict[str, int] = {}
    #: Faults the run survived: rollout-worker and learner restarts, steps skipped for non-finite values.
    worker_restarts: int = 0
    learner_restarts: int = 0
    nonfinite_steps: int = 0
    #: Checkpoints that could not be written (kept going under `checkpoint.on_error: keep_previous`).
    checkpoint_failures: int = 0
    #: Prompts given to workers (not counting ones given again after a worker died): with nothing in
    #: flight at the end, one group each was generated.
    issued_prompts: int = 0
    rollout_workers: int = 0
    #: Each change of the number of rollout workers (`ScaleChange`).
    scale_changes: list[dict[str, Any]] = []
