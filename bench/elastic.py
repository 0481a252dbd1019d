"""Elastic rollout capacity and several runs on one cluster, measured side by side in one process.

1. Workers added during a run: one run of the demo's model starts with 1 rollout worker and is
   scaled to 2, then 3 (`RunControl.request_workers`, as `orchard scale` asks); learner steps/s and
   rollout tokens/s are measured over each phase once its workers are in. The learning rate is
   negligible and every group is trained, so the phases differ only in their workers (a policy that
   learned between phases would answer in other lengths). It runs twice: as the
   workers are (CPU-bound generation: on a 2-core machine three workers and the learner share two
   cores), and with 1 s added to every rollout call (`faults.rollout_delay_seconds`), as workers
   whose engine is remote or busy would take: there the capacity, not the cores, limits.
2. Two runs at once: runs A and B (same config, other seeds) each alone for a phase, then both
   together under one `ControlService` (placement groups each); steps/s of each together against alone.

`bench/simulate.py` extends (1) to GPU clusters: its scaling table adds rollout engines per learner.

Run: `python bench/elastic.py [--phase-seconds 45]`; writes bench-results/elastic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("ORCHARD_FAULT_INJECTION", "1")  # the latency-bound case adds a delay per call

import ray  # noqa: E402

from orchard.config import RunConfig, load_config  # noqa: E402
from orchard.services.compare import PLAIN_GRPO  # noqa: E402
from orchard.services.control.run_control import RunControl, RunState  # noqa: E402
from orchard.services.control.service import ControlService, RunHandle  # noqa: E402
from orchard.services.driver import Driver  # noqa: E402
from orchard.services.run_dir import RunDirectory  # noqa: E402

SETTINGS = [
    *PLAIN_GRPO,
    "max_steps=10000000",
    "max_minutes=null",
    "eval.every_steps=1000000",
    "buffer.backend=memory",
    "learner.dynamic_sampling=false",  # every group is trained: steps/s follows generation, not the policy's pass rate
    "learner.lr=1.0e-12",  # the policy stays as warm-started, so every phase generates the same kind of answers
    "rollout.prompts_per_call=4",
    "learner.groups_per_step=8",
    "buffer.max_staleness=2",  # room for 24 groups in flight: six calls, so three workers can all generate
    "buffer.capacity_groups=64",
    "warmstart.steps=100",
]
SETTLE_SECONDS = 8.0


def config(out: Path, *extra: str) -> RunConfig:
    return load_config(None, [*SETTINGS, f"runs_dir={out}", f"warmstart.cache_dir={out / 'cache'}", *extra])


def counters(driver: Driver) -> tuple[float, int, int]:
    return time.perf_counter(), driver.step, driver.throughput.generated_tokens


def rates(start: tuple[float, int, int], end: tuple[float, int, int]) -> dict[str, float]:
    seconds = end[0] - start[0]
    return {"steps_per_second": (end[1] - start[1]) / seconds, "tokens_per_second": (end[2] - start[2]) / seconds}


def wait_until(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def scaling(out: Path, name: str, phase: float, *extra: str) -> list[dict[str, Any]]:
    """One run through 1, 2 and 3 workers; the rates of each phase."""
    control = RunControl()
    driver = Driver(config(out, *extra), RunDirectory(out, name), show_progress=False, control=control)
    thread = threading.Thread(target=driver.run, daemon=True)
    thread.start()
    wait_until(lambda: control.state is RunState.RUNNING and driver.step >= 2, "the run's first steps")
    phases = []
    for workers in (1, 2, 3):
        control.request_workers(workers)
        wait_until(lambda workers=workers: len(driver.pool.actors) == workers, f"{workers} workers")
        time.sleep(SETTLE_SECONDS)
        start = counters(driver)
        time.sleep(phase)
        phases.append({"workers": workers, **rates(start, counters(driver))})
        print(
            f"  {name:<14} {workers} workers: {phases[-1]['steps_per_second']:.2f} steps/s, "
            f"{phases[-1]['tokens_per_second']:,.0f} tok/s",
            flush=True,
        )
    control.request_stop("bench phase over")
    thread.join(300)
    return phases


def alone_and_together(out: Path, phase: float) -> dict[str, Any]:
    service = ControlService(max_active_runs=2)
    placed = ["cluster.placement_groups=true"]

    def measure(runs: list[RunHandle]) -> dict[str, dict[str, float]]:
        for run in runs:
            wait_until(lambda run=run: run.driver is not None and run.driver.step >= 2, f"{run.id}'s first steps")
        time.sleep(SETTLE_SECONDS)
        starts = {run.id: counters(run.driver) for run in runs}
        time.sleep(phase)
        return {run.id: rates(starts[run.id], counters(run.driver)) for run in runs}

    def stop(runs: list[RunHandle]) -> None:
        for run in runs:
            service.stop(run.id)
        for run in runs:
            run.thread.join(300)

    alone = {}
    for name, seed in (("a", 1), ("b", 2)):
        run = service.create_run(config(out, *placed, f"name=alone-{name}", f"seed={seed}"))
        alone[name] = measure([run])[run.id]
        stop([run])
        print(f"  run {name} alone:    {alone[name]['steps_per_second']:.2f} steps/s", flush=True)
    runs = [
        service.create_run(config(out, *placed, f"name=together-{name}", f"seed={seed}"))
        for name, seed in (("a", 1), ("b", 2))
    ]
    measured = measure(runs)
    stop(runs)
    together = {name: measured[run.id] for name, run in zip(("a", "b"), runs, strict=True)}
    for name in ("a", "b"):
        ratio = together[name]["steps_per_second"] / alone[name]["steps_per_second"]
        print(
            f"  run {name} together: {together[name]['steps_per_second']:.2f} steps/s ({ratio:.2f}x alone)", flush=True
        )
    both = sum(rate["steps_per_second"] for rate in together.values())
    each = sum(rate["steps_per_second"] for rate in alone.values()) / 2
    print(f"  both runs together: {both:.2f} steps/s in all, {both / each:.2f}x one run alone", flush=True)
    return {"alone": alone, "together": together, "together_over_one_alone": both / each}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=45.0, help="measured time of each phase")
    parser.add_argument("--out", type=Path, default=Path("bench-results/elastic.json"))
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        print(f"1. one run scaled 1 -> 2 -> 3 rollout workers ({args.phase_seconds:.0f} s per phase)", flush=True)
        cpu_bound = scaling(out, "cpu-bound", args.phase_seconds)
        latency_bound = scaling(out, "latency-bound", args.phase_seconds, "faults.rollout_delay_seconds=1.0")
        print(f"2. two runs, each alone and then together ({args.phase_seconds:.0f} s each)", flush=True)
        concurrent = alone_and_together(out, args.phase_seconds)
    results = {"cpu_bound": cpu_bound, "latency_bound": latency_bound, "two_runs": concurrent}
    print("\nsummary (ratios to the first phase / to alone, measured in this one process):")
    for name, phases in (("cpu-bound", cpu_bound), ("latency-bound", latency_bound)):
        base = phases[0]["steps_per_second"]
        print(
            f"  {name:<14} " + ", ".join(f"{p['workers']} workers {p['steps_per_second'] / base:.2f}x" for p in phases)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
