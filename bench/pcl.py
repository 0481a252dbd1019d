"""PCL's two targets, measured side by side: the value model's error against well-estimated pass rates,
and what finding an intermediate-difficulty group costs against rollout filtering.

Runs (the mix and warm start of `bench/curriculum.py`, plain GRPO without dynamic sampling, the
same seeds and step budget):
- `filter`: balanced online difficulty filtering alone (pass rate in [0.2, 0.8]): every group it
  drops was generated for nothing;
- `pcl`: PCL's value-model selection from 4·B candidates (the default `pool_factor`), then the same
  filter; `pcl-k8`: from 8·B; `pcl-k8-policy`: from 8·B, the value model also reading the policy's
  hidden state at each prompt's last token (`curriculum.pcl.features: policy`);
- `pcl+ucb`: PCL from 4·B with DUMP's scheduler choosing the distributions.

At the end of each PCL run, a probe set (`--probe-per-distribution` fresh training prompts of each
distribution, never trained on) is rolled out `--probe-samples` times by the final policy; those
pass rates are the reference. Printed:
- the value model's mean absolute error against them (target <= 0.15), overall and on the probe
  prompts it would select; beside it the error a single group of `rollout.group_size` samples makes
  against the same reference (sampling noise alone, which the error the run logs includes), and the
  error of predicting each distribution's mean pass rate (what the distribution alone tells);
- the seconds spent per group kept at effective ratio 1.0 (every trained group in the band):
  generation of dropped groups plus the value model's own time, and the ratio filter / PCL (target
  >= 5x), with each run's keep rate (groups kept / generated).

Run: `python bench/pcl.py [--seeds 1 2] [--steps 100] [--methods filter pcl pcl+ucb] [--set KEY=VALUE]`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curriculum import measure, run_driver  # noqa: E402

from orchard.services.driver import Driver  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "pcl"
FILTER = "curriculum.difficulty_filter.enabled=true"
PCL = [FILTER, "curriculum.selection=pcl"]
METHODS: dict[str, list[str]] = {
    "filter": [FILTER],
    "pcl": PCL,
    "pcl-k8": [*PCL, "curriculum.pcl.pool_factor=8"],
    "pcl-k8-policy": [*PCL, "curriculum.pcl.pool_factor=8", "curriculum.pcl.features=policy"],
    "pcl+ucb": [*PCL, "curriculum.scheduler=ucb"],
}


def mean_abs(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b, strict=True))


def probe(driver: Driver, per_distribution: int, samples: int, seed: int) -> dict[str, Any]:
    """The value model's predictions against pass rates of `samples` rollouts each, by the final policy."""
    rng = random.Random(10_000 + seed)
    pool = driver.prompt_pool
    prompts = [pool.sample_from(d, rng) for d in pool.distributions for _ in range(per_distribution)]
    evaluator = driver.held_out.evaluator  # holds the final weights after the run's last evaluation
    group_size = driver.config.rollout.group_size
    truth, first_group = [], []
    for start in range(0, len(prompts), 16):
        for group in evaluator.rollout(prompts[start : start + 16], group_size=samples).groups:
            rewards = [c.correct for c in group.completions]
            truth.append(statistics.fmean(rewards))
            first_group.append(statistics.fmean(rewards[:group_size]))
    value_model = driver.sampler.value_model
    started = time.perf_counter()
    states = driver.sampler.prompt_states(prompts) if value_model.state_dimension else None
    predicted = value_model.predict(prompts, states).tolist()
    predict_seconds = time.perf_counter() - started
    by_distribution: dict[str, list[float]] = {}
    for prompt, rate in zip(prompts, truth, strict=True):
        by_distribution.setdefault(prompt.distribution, []).append(rate)
    distribution_mean = [statistics.fmean(by_distribution[p.distribution]) for p in prompts]
    target = driver.config.curriculum.pcl.target
    ranked = sorted(range(len(prompts)), key=lambda i: abs(predicted[i] - target))
    selected = ranked[: len(prompts) // driver.config.curriculum.pcl.pool_factor]
    return {
        "probe_prompts": len(prompts),
        "probe_samples": samples,
        "value_mae": mean_abs(predicted, truth),
        "value_mae_selected": mean_abs([predicted[i] for i in selected], [truth[i] for i in selected]),
        "group_noise_mae": mean_abs(first_group, truth),
        "distribution_mean_mae": mean_abs(distribution_mean, truth),
        "value_mae_by_distribution": {
            d: mean_abs(
                [predicted[i] for i, p in enumerate(prompts) if p.distribution == d],
                [truth[i] for i, p in enumerate(prompts) if p.distribution == d],
            )
            for d in sorted(by_distribution)
        },
        "truth_by_distribution": {d: statistics.fmean(v) for d, v in sorted(by_distribution.items())},
        "predict_ms_per_prompt": predict_seconds / len(prompts) * 1e3,
    }


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    driver = run_driver(OUT, method, METHODS[method], seed, args)
    config = driver.config
    result = measure(method, seed, driver.run_dir, args)
    result["keep_rate"] = 1 - result["dropped_groups"] / max(1, result["generated_groups"])
    if config.curriculum.selection == "pcl":
        result.update(probe(driver, args.probe_per_distribution, args.probe_samples, seed))
    result["wall_seconds"] = time.perf_counter() - started
    print(f"  {method:<8} seed {seed}: {json.dumps({k: v for k, v in result.items() if 'by_' not in k})}", flush=True)
    return result


def report(results: list[dict[str, Any]]) -> None:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    print(
        f"\n{'method':<9}{'keep rate':>10}{'find ms/group':>15}{'value MAE':>11}{'(selected)':>11}"
        f"{'8-sample noise':>16}{'distribution mean':>19}{'final acc':>10}"
    )
    for method, rows in by_method.items():

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> str:
            values = [r[key] for r in rows if r.get(key) is not None]
            return f"{statistics.fmean(values):.3f}" if values else "-"

        find = statistics.fmean(r["finding_seconds_per_kept_group"] for r in rows) * 1e3
        print(
            f"{method:<9}{mean('keep_rate'):>10}{find:>15.1f}{mean('value_mae'):>11}{mean('value_mae_selected'):>11}"
            f"{mean('group_noise_mae'):>16}{mean('distribution_mean_mae'):>19}{mean('final_accuracy'):>10}"
        )
    if "filter" in by_method:
        filtering = statistics.fmean(r["finding_seconds_per_kept_group"] for r in by_method["filter"])
        for method in METHODS:
            if method != "filter" and method in by_method:
                cost = statistics.fmean(r["finding_seconds_per_kept_group"] for r in by_method[method])
                print(
                    f"finding an intermediate group: filter {filtering * 1e3:.1f} ms, {method} {cost * 1e3:.1f} ms: "
                    f"{filtering / max(cost, 1e-12):.1f}x cheaper (target >= 5x)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--probe-per-distribution", type=int, default=40)
    parser.add_argument("--probe-samples", type=int, default=64)
    parser.add_argument(
        "--methods", nargs="+", default=["filter", "pcl", "pcl-k8", "pcl-k8-policy"], choices=list(METHODS)
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    args.target, args.gain = 1.0, None  # `measure` asks; steps to a target are not this bench's question
    started = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    results = [run_one(method, seed, args) for seed in args.seeds for method in args.methods]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\n{len(results)} runs in {(time.perf_counter() - started) / 60:.1f} min; run directories in {OUT}")


if __name__ == "__main__":
    main()
