"""The run's typed records: a step's metrics.jsonl line, and status and summary sharing the progress's
figures under the same names."""

from orchard.services.control.service import RunStatus
from orchard.services.run.report import RunProgress, RunSummary, StepRecord


def record(**changes) -> StepRecord:
    figures = dict(
        step=3,
        policy_version=3,
        elapsed_seconds=1.5,
        loss=0.1,
        kl=0.0,
        entropy=1.2,
        clip_fraction=0.0,
        grad_norm=0.5,
        skipped=False,
        learner_step_seconds=0.2,
        reward_mean=0.5,
        reward_by_distribution={"a": 0.5},
        advantage_abs_mean=0.4,
        staleness_mean=1.0,
        staleness_max=2,
        buffer={"ready": 1},
        filtered={},
        generated_groups=9,
        effective_ratio=0.5,
        trained_signal_ratio=1.0,
        scheduler_probabilities={"a": 1.0},
        value_model_abs_error=None,
        selection_seconds=0.0,
        generated_tokens=100,
        rollout_tokens_per_second=66.7,
        learner_idle_fraction=0.1,
        weight_sync_seconds=None,
        worker_versions={"worker-0": 3},
    )
    return StepRecord(**{**figures, **changes})


def test_a_step_line_is_flat_and_names_evaluation_only_when_the_step_evaluated():
    line = record(learner_options={"sft_groups": 0}, rescue={"tree_groups_trained": 1}).line()
    assert line["sft_groups"] == 0 and line["tree_groups_trained"] == 1
    assert "learner_options" not in line and "rescue" not in line
    assert line["eval_accuracy"] is None and "eval_by_distribution" not in line
    evaluated = record(eval_accuracy=0.25, eval_by_distribution={"a": 0.25}).line()
    assert evaluated["eval_by_distribution"] == {"a": 0.25}


def test_status_is_the_progress_with_the_runs_identity():
    progress = set(RunProgress.model_fields)
    assert progress < set(RunStatus.model_fields)
    assert set(RunStatus.model_fields) - progress == {
        "id",
        "state",
        "reason",
        "run_dir",
        "created_at",
        "max_steps",
        "weights",
    }


def test_the_summary_names_the_progress_figures_alike():
    shared = set(RunProgress.model_fields) & set(RunSummary.model_fields)
    assert shared == {
        "policy_version",
        "learner_steps_per_second",
        "rollout_tokens_per_second",
        "learner_idle_fraction",
        "buffer",
        "filtered",
        "checkpoints",
        "staleness_mean",
        "rollout_workers",
    }
    # a rescue's figures ride along (extra fields)
    fields = {name: None for name in RunSummary.model_fields}
    summary = RunSummary.model_construct(**fields, deepsearch={"calls": 1})
    assert summary.model_dump()["deepsearch"] == {"calls": 1}
