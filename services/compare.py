"""`orchard compare`: a config against plain GRPO, side by side, in the same wall-clock budget.

For each seed, the two arms run one after the other as `orchard run` processes (alternating which
goes first from seed to seed, so a slow spell of the machine falls on both); without a config, the
config is the demo (DUMP's UCB scheduler and DeepSearch). A config that is plain GRPO already is
refused.
- `grpo`: the config with every curriculum, tree search and hint switched off (`PLAIN_GRPO`);
- `config`: the config as it is.

Each run gets the same `max_minutes` of RL and no step cap, its own run directory under the output
directory and a free control port. Afterwards `compare.png` shows held-out greedy accuracy over wall
time, overall and per distribution (mean over seeds on a common time grid, smoothed over
neighbouring evaluations, the band between the seeds' lowest and highest), and `compare.md` /
`compare.json` give the table: final accuracy per seed and its mean, the difference to plain GRPO,
steps taken, per distribution.

The pieces are pure functions over `metrics.jsonl` records, so the figures can be recomputed from
existing run directories (`orchard compare --report-only DIR`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import yaml

from orchard.config import DEMO_CONFIG
from orchard.services.plotting import smooth

#: What turns a config into plain GRPO: every sampler off, plain sampling, no hints, GRPO's objective.
PLAIN_GRPO = (
    "curriculum.scheduler=uniform",
    "curriculum.selection=none",
    "curriculum.difficulty_filter.enabled=false",
    "rollout.strategy=sample",
    "learner.hints.enabled=false",
    "learner.objective=grpo",
)
ARMS = ("grpo", "config")
#: What `orchard compare` runs against plain GRPO when given no config: the demo (UCB and DeepSearch).
DEFAULT_CONFIG = DEMO_CONFIG
#: Step cap of a compared run: the wall-clock budget decides.
UNCAPPED_STEPS = 10_000_000


@dataclass(frozen=True)
class Curve:
    """Held-out accuracy of one run at its evaluations: seconds of RL, overall and per distribution."""

    seconds: list[float]
    accuracy: list[float]
    by_distribution: dict[str, list[float]]


@dataclass
class RunFigures:
    arm: str
    seed: int
    run_dir: str
    steps: int
    rl_seconds: float
    initial: float
    final: float
    final_by_distribution: dict[str, float]
    curve: Curve = field(repr=False)
    #: The run's config name (the figure's label of the config arm).
    name: str = "config"


def run_curve(metrics: Sequence[dict[str, Any]], summary: dict[str, Any]) -> Curve:
    """The evaluations of a run: the one before RL at 0 s, those in `metrics.jsonl`, the final one."""
    seconds = [0.0]
    accuracy = [float(summary["held_out_accuracy_initial"])]
    distributions = sorted(summary["held_out_by_distribution_initial"])
    by_distribution = {d: [float(summary["held_out_by_distribution_initial"][d])] for d in distributions}
    for record in metrics:
        if record.get("eval_accuracy") is None:
            continue
        seconds.append(float(record["elapsed_seconds"]))
        accuracy.append(float(record["eval_accuracy"]))
        for d in distributions:
            by_distribution[d].append(float(record["eval_by_distribution"].get(d, by_distribution[d][-1])))
    final_seconds = float(summary["rl_seconds"])
    if final_seconds > seconds[-1]:
        seconds.append(final_seconds)
        accuracy.append(float(summary["held_out_accuracy_final"]))
        for d in distributions:
            by_distribution[d].append(float(summary["held_out_by_distribution_final"][d]))
    return Curve(seconds, accuracy, by_distribution)


def on_grid(seconds: Sequence[float], values: Sequence[float], grid: Sequence[float]) -> list[float]:
    """`values` measured at `seconds` (ascending), read at each grid time: the latest measurement at or
    before it (an accuracy holds until the next evaluation)."""
    if not seconds or len(seconds) != len(values):
        raise ValueError(f"{len(seconds)} times for {len(values)} values")
    result, index = [], 0
    for time in grid:
        while index + 1 < len(seconds) and seconds[index + 1] <= time:
            index += 1
        result.append(values[index])
    return result


def mean_band(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]], grid: Sequence[float], window: int
) -> tuple[list[float], list[float], list[float]]:
    """Mean, lowest and highest over runs (each `(seconds, values)`) on `grid`, each smoothed."""
    rows = [on_grid(seconds, values, grid) for seconds, values in curves]
    columns = list(zip(*rows, strict=True))
    return (
        smooth([fmean(c) for c in columns], window),
        smooth([min(c) for c in columns], window),
        smooth([max(c) for c in columns], window),
    )


def comparison_table(runs: Sequence[RunFigures]) -> dict[str, Any]:
    """Per arm: final accuracy per seed and mean, mean gain over the start, steps, per distribution; and
    the config's difference to plain GRPO (mean, and per seed where both arms ran it)."""
    table: dict[str, Any] = {"arms": {}}
    for arm in ARMS:
        rows = sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed)
        if not rows:
            continue
        distributions = sorted(rows[0].final_by_distribution)
        table["arms"][arm] = {
            "seeds": [r.seed for r in rows],
            "final": [r.final for r in rows],
            "final_mean": fmean(r.final for r in rows),
            "initial_mean": fmean(r.initial for r in rows),
            "gain_mean": fmean(r.final - r.initial for r in rows),
            "steps": [r.steps for r in rows],
            "rl_seconds": [r.rl_seconds for r in rows],
            "by_distribution": {d: fmean(r.final_by_distribution[d] for r in rows) for d in distributions},
        }
    arms = table["arms"]
    if "grpo" in arms and "config" in arms:
        plain = {r.seed: r.final for r in runs if r.arm == "grpo"}
        ours = {r.seed: r.final for r in runs if r.arm == "config"}
        paired = sorted(set(plain) & set(ours))
        table["difference"] = {
            "mean": arms["config"]["final_mean"] - arms["grpo"]["final_mean"],
            "per_seed": {seed: ours[seed] - plain[seed] for seed in paired},
            "seeds_ahead": sum(ours[s] > plain[s] for s in paired),
            "seeds": len(paired),
        }
    return table


def markdown(table: dict[str, Any], minutes: float | None) -> str:
    """The table as Markdown: one row per arm, then the per-distribution finals."""
    arms = table["arms"]
    budget = f"{minutes:g} min of RL per run" if minutes else "each run's own budget"
    lines = [
        f"Held-out greedy accuracy, {budget}:",
        "",
        "| arm | start | final (mean) | final per seed | gain | steps per seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, row in arms.items():
        finals = ", ".join(f"{v:.3f}" for v in row["final"])
        steps = ", ".join(str(s) for s in row["steps"])
        lines.append(
            f"| {arm} | {row['initial_mean']:.3f} | **{row['final_mean']:.3f}** | {finals} |"
            f" {row['gain_mean']:+.3f} | {steps} |"
        )
    if "difference" in table:
        difference = table["difference"]
        per_seed = ", ".join(f"seed {s}: {v:+.3f}" for s, v in difference["per_seed"].items())
        lines += [
            "",
            f"config − grpo: **{difference['mean']:+.3f}** (mean); {per_seed}; ahead on"
            f" {difference['seeds_ahead']} of {difference['seeds']} seeds.",
        ]
    distributions = sorted({d for row in arms.values() for d in row["by_distribution"]})
    if distributions:
        lines += ["", "| distribution | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
        for d in distributions:
            cells = " | ".join(f"{row['by_distribution'].get(d, float('nan')):.3f}" for row in arms.values())
            lines.append(f"| {d} | {cells} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- runs
def read_run(arm: str, seed: int, run_dir: Path) -> RunFigures:
    """A finished run's figures from its directory (summary.json and metrics.jsonl)."""
    from orchard.services.run_dir import read_jsonl

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{run_dir} has no summary.json: the run did not finish")
    summary = json.loads(summary_path.read_text())
    return RunFigures(
        arm=arm,
        seed=seed,
        run_dir=str(run_dir),
        steps=int(summary["steps"]),
        rl_seconds=float(summary["rl_seconds"]),
        initial=float(summary["held_out_accuracy_initial"]),
        final=float(summary["held_out_accuracy_final"]),
        final_by_distribution={k: float(v) for k, v in summary["held_out_by_distribution_final"].items()},
        curve=run_curve(read_jsonl(run_dir / "metrics.jsonl"), summary),
        name=str((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("name", arm))
        if (run_dir / "config.yaml").is_file()
        else arm,
    )


def run_directory(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-seed{seed}"


def arm_overrides(arm: str, seed: int, minutes: float | None, overrides: Sequence[str] = ()) -> list[str]:
    """`--set` values of one compared run: seed, free port and budget, then the user's `overrides`, then
    for the plain arm `PLAIN_GRPO` (last, so that the user's curriculum settings do not reach it)."""
    values = [f"seed={seed}", "control.port=0"]
    if minutes is not None:
        values += [f"max_minutes={minutes:g}", f"max_steps={UNCAPPED_STEPS}"]
    values += list(overrides)
    if arm == "grpo":
        values += list(PLAIN_GRPO)
    return values


def schedule(seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Which arm runs when: both arms per seed, the first arm alternating from seed to seed."""
    order = []
    for index, seed in enumerate(seeds):
        arms = ARMS if index % 2 == 0 else tuple(reversed(ARMS))
        order += [(arm, seed) for arm in arms]
    return order


def execute(
    config: str | None, overrides: Sequence[str], seeds: Sequence[int], minutes: float | None, out: Path
) -> list[RunFigures]:
    """Run every (arm, seed) not already finished under `out` as an `orchard run` process; their figures."""
    runs = []
    for arm, seed in schedule(seeds):
        run_dir = run_directory(out, arm, seed)
        if (run_dir / "summary.json").is_file():
            kept = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            if minutes is not None and kept.get("max_minutes") != minutes:
                raise ValueError(
                    f"{run_dir} finished earlier with max_minutes {kept.get('max_minutes')}, this comparison has"
                    f" {minutes:g}: give another --out"
                )
            print(f"orchard compare: {run_dir} finished earlier; kept", flush=True)
        else:
            command = [sys.executable, "-m", "orchard", "run", *([config] if config else []), "--quiet"]
            command += ["--run-dir", str(run_dir)]
            for value in arm_overrides(arm, seed, minutes, overrides):
                command += ["--set", value]
            print(f"orchard compare: {arm}, seed {seed} -> {run_dir}", flush=True)
            completed = subprocess.run(command, env=dict(os.environ), check=False)
            if completed.returncode != 0:
                raise RuntimeError(f"the {arm} run of seed {seed} failed (exit {completed.returncode}); see {run_dir}")
        runs.append(read_run(arm, seed, run_dir))
    return runs


def collect(out: Path) -> list[RunFigures]:
    """The figures of every finished `<arm>-seed<N>` run directory under `out`."""
    runs = []
    for arm in ARMS:
        for path in sorted(out.glob(f"{arm}-seed*")):
            seed = path.name.removeprefix(f"{arm}-seed")
            if seed.isdigit() and (path / "summary.json").is_file():
                runs.append(read_run(arm, int(seed), path))
    if not runs:
        raise ValueError(f"{out} holds no finished compared runs (grpo-seedN/ or config-seedN/ with summary.json)")
    return runs


def report(runs: Sequence[RunFigures], out: Path, minutes: float | None, *, points: int = 120, window: int = 5) -> dict:
    """Write compare.json, compare.md and compare.png under `out`; returns the table."""
    table = comparison_table(runs)
    table["runs"] = [{k: v for k, v in asdict(r).items() if k != "curve"} for r in runs]
    table["minutes"] = minutes
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    (out / "compare.md").write_text(markdown(table, minutes))
    plot(runs, out / "compare.png", points=points, window=window)
    return table


COLOURS = {"grpo": "#7f7f7f", "config": "#1f77b4"}


def plot(runs: Sequence[RunFigures], path: Path, *, points: int, window: int) -> None:
    """Overall accuracy over wall time, then one small panel per distribution; mean of seeds, min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = min(max(r.curve.seconds[-1] for r in runs if r.arm == arm) for arm in {r.arm for r in runs})
    grid = [end * i / (points - 1) for i in range(points)]
    distributions = sorted({d for r in runs for d in r.curve.by_distribution})
    columns = 5
    rows = 1 + -(-len(distributions) // columns)
    figure = plt.figure(figsize=(3.2 * columns, 3.6 + 2.4 * (rows - 1)))
    spec = figure.add_gridspec(rows, columns, height_ratios=[1.5] + [1] * (rows - 1))
    overall = figure.add_subplot(spec[0, :])
    seeds = sorted({r.seed for r in runs})
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        if not mine:
            continue
        mean, low, high = mean_band([(r.curve.seconds, r.curve.accuracy) for r in mine], grid, window)
        minutes = [t / 60 for t in grid]
        label = "plain GRPO" if arm == "grpo" else f"{mine[0].name} (the config)"
        final = fmean(r.final for r in mine)
        overall.plot(minutes, mean, color=COLOURS[arm], linewidth=2, label=f"{label}: final {final:.3f} (mean)")
        overall.fill_between(minutes, low, high, color=COLOURS[arm], alpha=0.15)
    overall.set(
        title=f"held-out greedy accuracy (mean of seeds {', '.join(map(str, seeds))}; band: lowest to highest)",
        xlabel="minutes of RL",
        ylabel="accuracy",
    )
    overall.grid(alpha=0.3)
    overall.legend(loc="lower right")
    for index, distribution in enumerate(distributions):
        axis = figure.add_subplot(spec[1 + index // columns, index % columns])
        for arm in ARMS:
            mine = [r for r in runs if r.arm == arm and distribution in r.curve.by_distribution]
            if mine:
                mean, _, _ = mean_band(
                    [(r.curve.seconds, r.curve.by_distribution[distribution]) for r in mine], grid, window
                )
                axis.plot([t / 60 for t in grid], mean, color=COLOURS[arm], linewidth=1.5)
        axis.set_title(distribution, fontsize=9)
        axis.set_ylim(-0.02, 1.02)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
