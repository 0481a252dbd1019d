"""Does the tool help the policy learn? The same run with and without the `python` tool, side by side.

Both arms run `configs/recipes/tools-cpu.yaml` (3-digit × 3-digit multiplication, the demo's tiny model,
CPU) with the same warm start length, learner and RL budget (`--steps` learner steps, at most
`--minutes` of RL):

- tool: multi-turn rollouts; the warm start shows the call format (`<python>print(a*b)</python>`, the
  observation, the answer) and RL does the rest;
- no tool: `rollout.multi_turn.enabled=false`; the warm start shows the bare answers.

Printed per arm: held-out accuracy (greedy, 200 prompts) after the warm start and after RL, the gain,
learner steps, RL seconds, and the tool calls by outcome.

Run: `python bench/tools.py [--steps 400] [--minutes 8] [--warm-start 260] [--set key=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "recipes" / "tools-cpu.yaml"


def run_arm(name: str, runs_dir: Path, overrides: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "orchard",
        "run",
        str(RECIPE),
        "--set",
        f"runs_dir={runs_dir}",
        "--set",
        f"name={name}",
    ]
    for override in overrides:
        command += ["--set", override]
    print(f"\n$ {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    [summary] = runs_dir.glob(f"{name}-*/summary.json")
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--warm-start", type=int, default=1000, help="supervised steps before RL (both arms)")
    parser.add_argument("--set", action="append", default=[], help="more overrides for both arms")
    args = parser.parse_args()
    common = [f"max_steps={args.steps}", f"max_minutes={args.minutes}", f"warmstart.steps={args.warm_start}", *args.set]
    results = {}
    with tempfile.TemporaryDirectory(prefix="orchard-bench-tools-") as scratch:
        results["tool"] = run_arm("tool", Path(scratch), common)
        results["no tool"] = run_arm("no-tool", Path(scratch), [*common, "rollout.multi_turn.enabled=false"])
    print(
        f"\n{'arm':<9}{'held-out after warm start':>27}{'after RL':>10}{'gain':>8}{'steps':>7}{'RL s':>7}  tool calls"
    )
    for arm, summary in results.items():
        print(
            f"{arm:<9}{summary['held_out_accuracy_initial']:>27.3f}{summary['held_out_accuracy_final']:>10.3f}"
            f"{summary['held_out_accuracy_gain']:>+8.3f}{summary['steps']:>7}{summary['rl_seconds']:>7.0f}"
            f"  {summary.get('tool_calls') or '-'}"
        )
    tool, bare = results["tool"], results["no tool"]
    print(
        f"RL gain with the tool: {100 * tool['held_out_accuracy_gain']:+.1f} points (target >= +20);"
        f" final accuracy with / without the tool: {tool['held_out_accuracy_final']:.3f} / {bare['held_out_accuracy_final']:.3f}"
    )


if __name__ == "__main__":
    main()
