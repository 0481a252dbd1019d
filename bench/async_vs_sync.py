"""Asynchronous against synchronous learner throughput on the demo, measured in one run.

Runs the embedded demo config twice per repeat, alternating: `buffer.max_staleness: 0` (synchronous:
rollouts wait for the learner and the learner waits for rollouts) and `max_staleness: 1`
(asynchronous: rollouts of policy v overlap the learner's step v -> v+1). Same seed, same number of
learner steps, same resources. Prints learner steps/s, trained groups/s, the learner's idle fraction
the share of generated groups that went stale in the buffer unused, and the ratio (target: async >=
1.3x sync).
Run: `python bench/async_vs_sync.py [--steps 30] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from orchard.config import load_config
from orchard.services.cluster import connect_ray
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()

    base = [
        *PLAIN_GRPO,
        f"max_steps={args.steps}",
        "max_minutes=null",
        "eval.every_steps=100000",
        "eval.num_prompts=20",
    ]
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for mode, staleness in (("sync", 0), ("async", 1)):
                config = load_config(None, [*base, f"buffer.max_staleness={staleness}", *args.overrides])
                connect_ray(config)
                summary = Driver(config, RunDirectory(root, f"{mode}-{repeat}"), show_progress=False).run()
                results[mode].append(summary)
                print(
                    f"  {mode:<5} repeat {repeat}: {summary['learner_steps_per_second']:.3f} steps/s, "
                    f"learner idle {summary['learner_idle_fraction']:.0%}, "
                    f"mean staleness {summary['staleness_mean']:.2f}, "
                    f"groups gone stale {summary['buffer'].get('stale', 0)} of {summary['buffer'].get('put', 0)}",
                    flush=True,
                )

    def median(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in results[mode])

    def stale_share(mode: str) -> float:
        return statistics.median(s["buffer"].get("stale", 0) / max(1, s["buffer"].get("put", 0)) for s in results[mode])

    print(f"\n{'mode':<8}{'steps/s':>10}{'groups/s':>10}{'rollout tok/s':>15}{'learner idle':>14}{'gone stale':>12}")
    for mode in ("sync", "async"):
        print(
            f"{mode:<8}{median(mode, 'learner_steps_per_second'):>10.3f}{median(mode, 'trained_groups_per_second'):>10.2f}"
            f"{median(mode, 'rollout_tokens_per_second'):>15.0f}{median(mode, 'learner_idle_fraction'):>14.0%}"
            f"{stale_share(mode):>12.0%}"
        )
    ratio = median("async", "learner_steps_per_second") / median("sync", "learner_steps_per_second")
    print(f"ratio async/sync learner throughput: {ratio:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
