"""BLEU as the reward (BLEUBERI) against exact match, on word-level tasks with one reference each.

Tasks (written to `bench/out/bleu/words.jsonl`, a JSONL source as users bring one): put 3 or 5 words
in reverse order (`words-rev/d1`, `/d2`) or in alphabetical order (`words-sort/d1`, `/d2`), words
from a list of twelve. Partly right answers exist (some words in place), which BLEU rewards and
exact match does not.

Two runs from the same warm start (the demo's model, supervised on the references first), the same
seed and wall-clock budget, plain GRPO otherwise:
- `exact`: the `procedural` verifier (reward 1 for the exact reference, else 0);
- `bleu`: the `bleu` verifier (sentence BLEU-4 of the completion against the reference).

Both are judged the same way at the start and end, on the same held-out prompts, from the policy's
greedy answers: exact-match accuracy and mean BLEU.

Run: `python bench/bleu.py [--seed 0] [--minutes 3]`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from orchard.config import load_config
from orchard.records import Prompt
from orchard.rollout.worker import RolloutWorkerCore
from orchard.services.cluster import connect_ray
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from orchard.services.warmstart import warm_start
from orchard.verifiers.bleu import sentence_bleu

OUT = Path(__file__).resolve().parent / "out" / "bleu"
WORDS = ["ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "jay", "koi", "owl", "yak"]
ARMS = {"exact": "procedural", "bleu": "bleu"}


def word_tasks(count: int, seed: int) -> list[dict[str, str]]:
    """`count` records of the four distributions in turn."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        family = ("rev", "sort")[index % 2]
        level = 1 + (index // 2) % 2
        words = [rng.choice(WORDS) for _ in range(1 + 2 * level)]
        answer = list(reversed(words)) if family == "rev" else sorted(words)
        records.append(
            {
                "prompt": f"{family}: {' '.join(words)} =",
                "answer": " ".join(answer),
                "distribution": f"words-{family}/d{level}",
            }
        )
    return records


def judge(evaluator: RolloutWorkerCore, prompts: list[Prompt]) -> dict[str, Any]:
    """Exact-match accuracy and mean BLEU of the greedy answers of the policy `evaluator` holds."""
    completions = evaluator.evaluate(prompts).completions
    exact = [c.strip() == p.answer for c, p in zip(completions, prompts, strict=True)]
    bleu = [sentence_bleu(c, [p.answer]) for c, p in zip(completions, prompts, strict=True)]
    return {"exact": statistics.fmean(exact), "bleu": statistics.fmean(bleu), "example": completions[:3]}


def run_arm(arm: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    source = f"{{kind: jsonl, path: {data}, verifier: {ARMS[arm]}}}"
    config = load_config(
        None,
        [
            *PLAIN_GRPO,
            f"data.sources=[{source}]",
            "data.held_out_size=200",
            "eval.num_prompts=200",
            "eval.every_steps=25",
            "rollout.max_new_tokens=24",
            f"seed={args.seed}",
            f"max_minutes={args.minutes}",
            "max_steps=100000",
            "learner.dynamic_sampling=false",
            *args.overrides,
        ],
    )
    connect_ray(config)
    run_dir = RunDirectory(OUT, f"{arm}-seed{args.seed}")
    driver = Driver(config, run_dir, show_progress=False)
    started = time.perf_counter()
    summary = driver.run()
    prompts = driver.held_out.prompts
    final = judge(driver.held_out.evaluator, prompts)  # it holds the final weights
    state_dict, _ = warm_start(config, driver.prompt_pool)  # cached: the run's own starting point
    start_policy = RolloutWorkerCore(
        "start", config.model, config.rollout, seed=args.seed, prompt_format=driver.prompt_format
    )
    start_policy.load_weights(0, state_dict)
    start = judge(start_policy, prompts)
    return {
        "arm": arm,
        "steps": summary["steps"],
        "rl_seconds": summary["rl_seconds"],
        "start": start,
        "final": final,
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    data = OUT / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in word_tasks(4000, seed=1234)))
    results = [run_arm(arm, data, args) for arm in ARMS]
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'reward':<8}{'steps':>7}{'held-out exact match':>24}{'held-out BLEU':>20}")
    for r in results:
        start, final = r["start"], r["final"]
        print(
            f"{r['arm']:<8}{r['steps']:>7}{start['exact']:>12.3f} -> {final['exact']:.3f}"
            f"{start['bleu']:>12.3f} -> {final['bleu']:.3f}"
        )


if __name__ == "__main__":
    main()
