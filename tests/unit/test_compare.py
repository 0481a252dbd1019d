"""`orchard compare`'s pure parts: curves from run records, the time grid, smoothing, the table."""

from __future__ import annotations

import json

import pytest

from orchard.services import compare
from orchard.services.plotting import distribution_styles, smooth


def summary(initial: float, final: float, seconds: float, by_initial: dict, by_final: dict, steps: int = 30) -> dict:
    return {
        "held_out_accuracy_initial": initial,
        "held_out_accuracy_final": final,
        "held_out_by_distribution_initial": by_initial,
        "held_out_by_distribution_final": by_final,
        "rl_seconds": seconds,
        "steps": steps,
    }


METRICS = [
    {"step": 1, "elapsed_seconds": 1.0},
    {"step": 2, "elapsed_seconds": 2.0, "eval_accuracy": 0.3, "eval_by_distribution": {"a/d1": 0.4, "b/d1": 0.2}},
    {"step": 3, "elapsed_seconds": 3.0},
    {"step": 4, "elapsed_seconds": 4.0, "eval_accuracy": 0.5, "eval_by_distribution": {"a/d1": 0.6, "b/d1": 0.4}},
]


def test_a_run_curve_starts_before_rl_and_ends_with_the_final_evaluation():
    curve = compare.run_curve(METRICS, summary(0.1, 0.6, 5.0, {"a/d1": 0.2, "b/d1": 0.0}, {"a/d1": 0.8, "b/d1": 0.4}))
    assert curve.seconds == [0.0, 2.0, 4.0, 5.0]
    assert curve.accuracy == [0.1, 0.3, 0.5, 0.6]
    assert curve.by_distribution == {"a/d1": [0.2, 0.4, 0.6, 0.8], "b/d1": [0.0, 0.2, 0.4, 0.4]}


def test_the_final_evaluation_is_not_doubled_when_the_last_step_evaluated():
    curve = compare.run_curve(METRICS, summary(0.1, 0.5, 4.0, {"a/d1": 0.2, "b/d1": 0.0}, {"a/d1": 0.6, "b/d1": 0.4}))
    assert curve.seconds == [0.0, 2.0, 4.0]


def test_on_grid_holds_each_measurement_until_the_next():
    assert compare.on_grid([0.0, 2.0, 4.0], [0.1, 0.3, 0.5], [0.0, 1.0, 2.0, 3.9, 4.0, 9.0]) == [
        0.1,
        0.1,
        0.3,
        0.3,
        0.5,
        0.5,
    ]
    with pytest.raises(ValueError, match="2 times for 1 values"):
        compare.on_grid([0.0, 1.0], [0.1], [0.0])


def test_smooth_is_a_centred_moving_average_shrunk_at_the_ends():
    assert smooth([0.0, 3.0, 6.0, 9.0], 3) == pytest.approx([1.5, 3.0, 6.0, 7.5])
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
    with pytest.raises(ValueError, match="odd"):
        smooth([1.0], 2)


def test_mean_band_takes_mean_lowest_and_highest_over_runs():
    mean, low, high = compare.mean_band([([0.0, 1.0], [0.0, 1.0]), ([0.0, 1.0], [0.2, 0.6])], [0.0, 1.0], 1)
    assert mean == pytest.approx([0.1, 0.8]) and low == [0.0, 0.6] and high == [0.2, 1.0]


def figures(arm: str, seed: int, initial: float, final: float) -> compare.RunFigures:
    curve = compare.Curve([0.0, 1.0], [initial, final], {"a/d1": [initial, final]})
    return compare.RunFigures(
        arm, seed, f"/runs/{arm}-{seed}", 10 * (seed + 1), 60.0, initial, final, {"a/d1": final}, curve
    )


RUNS = [
    figures("grpo", 0, 0.2, 0.40),
    figures("config", 0, 0.2, 0.50),
    figures("grpo", 1, 0.3, 0.45),
    figures("config", 1, 0.3, 0.43),
]


def test_the_table_gives_each_arm_and_the_difference_per_seed():
    table = compare.comparison_table(RUNS)
    assert table["arms"]["grpo"]["final"] == [0.40, 0.45]
    assert table["arms"]["config"]["final_mean"] == pytest.approx(0.465)
    assert table["arms"]["config"]["gain_mean"] == pytest.approx(0.215)
    assert table["arms"]["grpo"]["steps"] == [10, 20]
    assert table["difference"]["mean"] == pytest.approx(0.465 - 0.425)
    assert table["difference"]["per_seed"] == pytest.approx({0: 0.10, 1: -0.02})
    assert (table["difference"]["seeds_ahead"], table["difference"]["seeds"]) == (1, 2)
    text = compare.markdown(table, 6)
    assert "6 min of RL per run" in text and "**+0.040** (mean)" in text and "ahead on 1 of 2 seeds" in text
    assert "| a/d1 | 0.425 | 0.465 |" in text


def test_runs_alternate_which_arm_goes_first():
    assert compare.schedule([0, 1]) == [("grpo", 0), ("config", 0), ("config", 1), ("grpo", 1)]


def test_the_plain_arm_switches_every_sampler_off_and_the_budget_decides():
    plain = compare.arm_overrides("grpo", 3, 6.0, ["curriculum.scheduler=ucb"])
    assert plain[:4] == ["seed=3", "control.port=0", "max_minutes=6", f"max_steps={compare.UNCAPPED_STEPS}"]
    assert plain[4:] == ["curriculum.scheduler=ucb", *compare.PLAIN_GRPO]  # the plain arm's settings win
    ours = compare.arm_overrides("config", 3, 6.0, ["curriculum.scheduler=ucb"])
    assert ours[4:] == ["curriculum.scheduler=ucb"]


def test_the_plain_arm_is_a_valid_config_of_the_demo_with_samplers_off():
    from orchard.config import load_config

    plain = load_config(None, [*compare.arm_overrides("grpo", 0, 1.0), "curriculum.scheduler=ucb", *compare.PLAIN_GRPO])
    assert plain.curriculum.scheduler == "uniform" and not plain.curriculum.difficulty_filter.enabled
    assert plain.rollout.strategy == "sample" and not plain.learner.hints.enabled


def test_report_writes_table_json_and_figure_from_run_directories(tmp_path):
    for arm, seed, final in [("grpo", 0, 0.4), ("config", 0, 0.5)]:
        run = compare.run_directory(tmp_path, arm, seed)
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(summary(0.2, final, 5.0, {"a/d1": 0.2}, {"a/d1": final})))
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (tmp_path / "grpo-seedX").mkdir()  # not a compared run: ignored
    runs = compare.collect(tmp_path)
    assert [(r.arm, r.seed) for r in runs] == [("grpo", 0), ("config", 0)]
    table = compare.report(runs, tmp_path, 5.0)
    assert table["difference"]["mean"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "compare.json").read_text())["difference"]["seeds"] == 1
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert "config − grpo" in (tmp_path / "compare.md").read_text()


def test_an_unfinished_or_empty_comparison_is_named(tmp_path):
    (tmp_path / "grpo-seed0").mkdir()
    with pytest.raises(ValueError, match="no finished compared runs"):
        compare.collect(tmp_path)
    with pytest.raises(ValueError, match="no summary.json"):
        compare.read_run("grpo", 0, tmp_path / "grpo-seed0")


def test_distribution_styles_give_a_colour_per_family_and_a_line_style_per_level():
    styles = distribution_styles(["addition/d1", "addition/d2", "sorting/d1"])
    assert styles["addition/d1"]["color"] == styles["addition/d2"]["color"] != styles["sorting/d1"]["color"]
    assert styles["addition/d1"]["linestyle"] != styles["addition/d2"]["linestyle"]


def test_a_kept_run_of_another_budget_is_refused_before_anything_runs(tmp_path):
    run = compare.run_directory(tmp_path, "grpo", 0)
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary(0.2, 0.4, 5.0, {"a/d1": 0.2}, {"a/d1": 0.4})))
    (run / "config.yaml").write_text("name: demo\nmax_minutes: 3.0\n")
    with pytest.raises(ValueError, match="max_minutes 3.0, this comparison has 5: give another --out"):
        compare.execute(None, [], [0], 5.0, tmp_path)
