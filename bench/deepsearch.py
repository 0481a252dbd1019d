"""DeepSearch tree search against plain sampling, at the same token budget, on prompts the policy fails.

With the demo's warm-started policy (the run config of `orchard run`, no RL):
1. prompts: the held-out prompts of the distributions the warm start is weak on (`addition/d1`,
   `multiplication/d1` by default), topped up with fresh prompts of those distributions;
2. 16 plain samples per prompt; the prompts where all 16 fail (pass@16 = 0) are kept;
3. on each kept prompt, 64 fresh plain samples (pass@64) and the tokens they generated;
4. on each kept prompt, tree search (`rollout.strategies.tree_search`, the config's `rollout.mcts`,
   `--set` overrides applied) with a budget of exactly those tokens; solved = a correct trajectory
   was found.

Printed: one row per distribution and in total: prompts kept, share solved by 64 plain samples, share
solved by tree search, generated tokens of each, tree nodes expanded, wall time; then the share
solved by either and by tree search only. `--sweep` adds rows (`SWEEP`): the 'prior' expansion without
the confidence term, with the entropy term, with 2 children per expansion or at most 8 a node; and the
reference's 'sample' expansion with its priority, with the confidence term, with 1-token steps, and
without merging duplicate steps or widening.
Tokens are generated tokens (prompt and prefix tokens the engine prefills are not counted).
Each repeat draws fresh plain samples (and so a fresh budget) and a fresh search for every prompt.

Training comparison (`--train`): GRPO (the demo's learner: GRPO with DAPO's clip-higher and dynamic
sampling) against the same plus DeepSearch (`rollout.strategy: mcts`: all-fail prompts tree-searched
within a share of the generated tokens, found solutions cached and mixed into later groups, tree
trajectories trained with prefix credit), on a mix with a hard tail, the same seeds and
the same budget of generated tokens (the search's tokens count; a run stops at the first rollout
that reaches the budget, so each overshoots by at most one call, and the tokens each run generated
are printed). Printed per arm and seed: greedy held-out accuracy on the hard tail and overall at the
end; the hard tail's sampled pass rate (`--samples` completions per held-out prompt at the run's
temperature) of the warm start and of the final checkpoint, finer where greedy accuracy is near 0;
learner steps, tree-search figures; then the mean over seeds. Ablation arms (`--arms`) train the tree
trajectories on the reference's node values (`grpo+deepsearch-node-values`) or on outcome advantages
only (`grpo+deepsearch-outcome`). Run directories go to `bench/out/deepsearch/`.

Learnability (`--learnability`): the hard tail's held-out greedy accuracy after supervised steps on N
correct answers of fresh prompts of each tail distribution, from each seed's warm start: the most that
finding N solutions could teach this model, whatever finds them.

Run: `python bench/deepsearch.py [--seed 0] [--prompts 40] [--repeats 3] [--sweep]` (tree search
against plain sampling), `python bench/deepsearch.py --train [--seeds 1 2 3] [--tokens 500000]` or
`python bench/deepsearch.py --learnability [--solutions 0 640 2560]`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchard.config import load_config
from orchard.records import Prompt
from orchard.rollout.prompts import encode_prompt
from orchard.rollout.strategies.tree_search import SearchSettings, TreeSearch, run_searches
from orchard.rollout.worker import RolloutWorkerCore
from orchard.services.cluster import connect_ray
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run.throughput import Throughput
from orchard.services.run_dir import RunDirectory
from orchard.services.warmstart import warm_start
from orchard.verifiers.procedural import generate_prompt
from orchard.verifiers.registry import safe_verify
from orchard.verifiers.sources import PromptPool

PLAIN_FILTER = 16
PLAIN_BUDGET = 64
OUT = Path(__file__).resolve().parent / "out" / "deepsearch"
#: The training mix: learnable distributions, and a hard tail the warm start almost never solves.
EASY = [("reversal", 1), ("sorting", 1), ("counting", 1)]
HARD_TAIL = [("addition", 1), ("multiplication", 1)]
ARMS: dict[str, list[str]] = {
    "grpo": [],
    "grpo+deepsearch": ["rollout.strategy=mcts"],
    # ablations of the tree trajectories' advantages: the reference's step values, outcome advantages only
    "grpo+deepsearch-node-values": ["rollout.strategy=mcts", "learner.tree_advantage=node_values"],
    "grpo+deepsearch-outcome": ["rollout.strategy=mcts", "learner.tree_advantage=outcome"],
}
MAIN_ARMS = ["grpo", "grpo+deepsearch"]
#: The reference's expansion (W sampled children a node), with the step length and width decay this
#: project used for it before the 'prior' expansion, and the reference's frontier priority (λc = 0).
REFERENCE_SAMPLE = {
    "expansion": "sample",
    "chunk_tokens": 2,
    "expansion_width": 8,
    "width_decay": 4,
    "min_width": 2,
    "lambda_confidence": 0.0,
}
#: `--sweep`: rows beside the config's search (suffix -> `rollout.mcts` overrides).
SWEEP: dict[str, dict[str, Any]] = {
    " λc = 0 (reference priority)": {"lambda_confidence": 0.0},
    " entropy term on": {"entropy_bonus": True},
    " 2 children per expansion": {"children_per_expansion": 2},
    " 8 children per node": {"expansion_width": 8},
    " sample (reference)": REFERENCE_SAMPLE,
    " sample, λc = 1": {**REFERENCE_SAMPLE, "lambda_confidence": 1.0},
    " sample, 1-token steps": {**REFERENCE_SAMPLE, "chunk_tokens": 1},
    " sample, no merge/widen": {**REFERENCE_SAMPLE, "merge_duplicates": False, "widen_when_exhausted": False},
}


@dataclass
class Row:
    name: str
    prompts: int
    plain_solved: int
    tree_solved: int
    either: int
    tree_only: int
    plain_tokens: int
    tree_tokens: int
    nodes: int
    seconds: float


def hard_prompts(worker: RolloutWorkerCore, pool: PromptPool, distributions: list[str], count: int, seed: int):
    """`count` prompts per distribution (held-out first) and which of them fail all 16 plain samples."""
    rng = random.Random(seed)
    chosen: list[Prompt] = []
    for distribution in distributions:
        family, difficulty = distribution.split("/d")
        mine = [p for p in pool.held_out if p.distribution == distribution][:count]
        seen = {p.text for p in mine}
        while len(mine) < count:
            prompt = generate_prompt(family, int(difficulty), rng)
            if prompt.text not in seen:
                seen.add(prompt.text)
                mine.append(prompt)
        chosen += mine
    result = worker.rollout(chosen, group_size=PLAIN_FILTER)
    return chosen, [g.prompt for g in result.groups if g.pass_rate == 0]


def search_all(worker, config, prompts, plain_groups, overrides):
    """Tree search on every prompt in lockstep, each with the tokens of its 64 plain samples."""
    mcts = config.rollout.mcts.model_copy(update=overrides)
    trees = []
    for prompt, group in zip(prompts, plain_groups, strict=True):
        settings = SearchSettings.from_config(
            mcts,
            max_new_tokens=config.rollout.max_new_tokens,
            group_size=config.rollout.group_size,
            budget_tokens=group.num_tokens,  # exactly what the 64 plain samples generated
            terminate_num=10**6,  # search until the budget is spent
        )
        verifier = worker._verifier(prompt)
        trees.append(
            TreeSearch(
                encode_prompt(worker.tokenizer, prompt.text),
                lambda text, p=prompt, v=verifier: safe_verify(v, p, text),
                settings,
                decode=worker.tokenizer.decode,
                eos_token_ids=worker.engine.eos_token_ids,
                stop=config.rollout.stop,
            )
        )
    started = time.perf_counter()
    results = run_searches(
        trees, worker.engine.generate, worker._params(greedy=False), next_tokens=worker.engine.next_token_logprobs
    )
    for result, group in zip(results, plain_groups, strict=True):
        assert result.tokens_generated <= group.num_tokens, "tree search overspent its budget"
    return results, time.perf_counter() - started


def row(name, pairs, seconds) -> Row:
    """Counts over (plain group, search result) pairs."""
    plain = [group.pass_rate > 0 for group, _ in pairs]
    tree = [result.solved for _, result in pairs]
    return Row(
        name=name,
        prompts=len(pairs),
        plain_solved=sum(plain),
        tree_solved=sum(tree),
        either=sum(a or b for a, b in zip(plain, tree, strict=True)),
        tree_only=sum(b and not a for a, b in zip(plain, tree, strict=True)),
        plain_tokens=sum(group.num_tokens for group, _ in pairs),
        tree_tokens=sum(result.tokens_generated for _, result in pairs),
        nodes=sum(result.nodes_expanded for _, result in pairs),
        seconds=seconds,
    )


def share(count: int, total: int) -> str:
    return f"{count / total:6.1%}" if total else "     -"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'prompts (pass@16 = 0)':<48} {'n':>4} {'plain@64':>9} {'tree':>7} {'either':>7} {'tree only':>9}"
        f" {'plain tok':>10} {'tree tok':>9} {'nodes':>6} {'tree s':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<48} {row.prompts:>4} {share(row.plain_solved, row.prompts):>9}"
            f" {share(row.tree_solved, row.prompts):>7} {share(row.either, row.prompts):>7}"
            f" {share(row.tree_only, row.prompts):>9} {row.plain_tokens:>10,} {row.tree_tokens:>9,}"
            f" {row.nodes:>6,} {'' if row.seconds != row.seconds else f'{row.seconds:.1f}':>7}"
        )


# ------------------------------------------------------------------------------ training comparison


def token_budget(budget: int):
    """A `Driver` stop condition: the run stops once its rollouts (plain and tree search together)
    generated `budget` tokens."""

    def reached(throughput: Throughput) -> str | None:
        return f"token budget {budget:,} reached" if throughput.generated_tokens >= budget else None

    return reached


def sampled_pass_rates(run_dir: RunDirectory, samples: int) -> tuple[float, float]:
    """Mean pass rate of `samples` sampled completions (the run's temperature) per held-out hard-tail
    prompt, for the warm start and for the run's final checkpoint: a finer measure than greedy
    accuracy where that is near 0. Same prompts, seed and sampling for every arm."""
    from safetensors.torch import load_file

    config = load_config(run_dir.path / "config.yaml")
    pool = PromptPool.from_config(config.data)
    hard = {f"{family}/d{level}" for family, level in HARD_TAIL}
    prompts = [p for p in pool.held_out[: config.eval.num_prompts] if p.distribution in hard]
    final = sorted((run_dir.path / "checkpoints").glob("step-*"), key=lambda d: int(d.name.removeprefix("step-")))[-1]
    rates = []
    for weights in (
        warm_start(config, pool, log=lambda message: None)[0],
        load_file(str(final / "model" / "model.safetensors")),
    ):
        worker = RolloutWorkerCore("bench", config.model, config.rollout, seed=config.seed)
        worker.load_weights(0, weights)
        rates.append(statistics.fmean(g.pass_rate for g in worker.rollout(prompts, group_size=samples).groups))
    return rates[0], rates[1]


def train_overrides(args: argparse.Namespace) -> list[str]:
    cells = EASY + HARD_TAIL
    sources = ", ".join(
        f"{{kind: procedural, families: [{family}], difficulties: [{level}]}}" for family, level in cells
    )
    return [
        *PLAIN_GRPO,  # the arms turn on the tree search
        f"data.sources=[{sources}]",
        f"data.held_out_size={args.held_out}",
        f"eval.num_prompts={args.held_out}",
        "eval.every_steps=1000000",
        "max_steps=1000000",
        "max_minutes=null",
        f"rollout.mcts.terminate_num={args.terminate_num}",
        "checkpoint.every_steps=0",
        *([f"warmstart.seed={args.warmstart_seed}"] if args.warmstart_seed is not None else []),
    ]


def train_one(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(None, [*train_overrides(args), f"seed={seed}", *ARMS[arm], *args.overrides])
    connect_ray(config)
    run_dir = RunDirectory(OUT, f"{arm}-seed{seed}")
    if run_dir.path.exists():
        shutil.rmtree(run_dir.path)
    run_dir = RunDirectory(OUT, f"{arm}-seed{seed}")
    started = time.perf_counter()
    summary = Driver(config, run_dir, show_progress=False, stop_when=token_budget(args.tokens)).run()
    hard = [f"{family}/d{level}" for family, level in HARD_TAIL]
    by_distribution = summary["held_out_by_distribution_final"]
    initial = summary["held_out_by_distribution_initial"]
    search = summary.get("deepsearch") or {}
    result = {
        "arm": arm,
        "seed": seed,
        "steps": summary["steps"],
        "generated_tokens": summary["generated_tokens"],
        "overall_initial": summary["held_out_accuracy_initial"],
        "overall": summary["held_out_accuracy_final"],
        # the held-out split is even across distributions, so the tail's accuracy is their plain mean
        "hard_initial": statistics.fmean(initial[d] for d in hard),
        "hard": statistics.fmean(by_distribution[d] for d in hard),
        "by_distribution": by_distribution,
        "searched": search.get("prompts_searched", 0),
        "solved": search.get("prompts_solved", 0),
        "cache_hits": search.get("cache_hits", 0),
        "search_share": search.get("search_token_share", 0.0),
        "tree_groups_kept": search.get("tree_groups_kept", 0),
        "seconds": time.perf_counter() - started,
    }
    result["hard_sampled_initial"], result["hard_sampled"] = sampled_pass_rates(run_dir, args.samples)
    (run_dir.path / "bench.json").write_text(json.dumps(result, indent=2))
    print(
        f"  {arm:<24} seed {seed}: {result['steps']} steps, {result['generated_tokens']:,} tokens,"
        f" hard tail {result['hard_initial']:.3f} -> {result['hard']:.3f},"
        f" overall {result['overall_initial']:.3f} -> {result['overall']:.3f},"
        f" hard tail sampled pass rate {result['hard_sampled_initial']:.3f} -> {result['hard_sampled']:.3f}"
        + (
            f", searched {result['searched']} (solved {result['solved']}), cache hits {result['cache_hits']},"
            f" search share {result['search_share']:.2f}"
            if arm != "grpo"
            else ""
        )
        + f", {result['seconds']:.0f} s",
        flush=True,
    )
    return result


def per_seed(results: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{result[key]:.3f}" for result in results)


def report_training(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = (
        f"{'arm':<24} {'hard tail (per seed)':<30} {'hard sampled (per seed)':<30} {'overall (per seed)':<30}"
        f" {'steps':>6} {'tokens':>10}"
        f" {'searched':>9} {'solved':>7} {'cache hits':>10} {'search share':>12}"
    )
    print("\n" + header)
    print("-" * len(header))
    means = {}
    for arm in ARMS:
        mine = [r for r in results if r["arm"] == arm]
        if not mine:
            continue
        hard = statistics.fmean(r["hard"] for r in mine)
        overall = statistics.fmean(r["overall"] for r in mine)
        means[arm] = hard
        hard_cell = f"{hard:.3f} ({per_seed(mine, 'hard')})"
        overall_cell = f"{overall:.3f} ({per_seed(mine, 'overall')})"
        sampled = statistics.fmean(r["hard_sampled"] for r in mine)
        sampled_cell = f"{sampled:.3f} ({per_seed(mine, 'hard_sampled')})"
        print(
            f"{arm:<24} {hard_cell:<30} {sampled_cell:<30} {overall_cell:<30} {statistics.fmean(r['steps'] for r in mine):>6.0f}"
            f" {statistics.fmean(r['generated_tokens'] for r in mine):>10,.0f}"
            f" {statistics.fmean(r['searched'] for r in mine):>9.0f} {statistics.fmean(r['solved'] for r in mine):>7.0f}"
            f" {statistics.fmean(r['cache_hits'] for r in mine):>10.0f}"
            f" {statistics.fmean(r['search_share'] for r in mine):>12.2f}"
        )
    initial = statistics.fmean(r["hard_initial"] for r in results)
    sampled_initial = statistics.fmean(r["hard_sampled_initial"] for r in results)
    print(
        f"\nwarm start (mean over seeds): hard-tail greedy accuracy {initial:.3f}, sampled pass rate"
        f" {sampled_initial:.3f} ({args.samples} samples per prompt); hard tail = {HARD_TAIL}"
    )
    if "grpo" in means and "grpo+deepsearch" in means:
        difference = means["grpo+deepsearch"] - means["grpo"]
        sampled = {
            arm: statistics.fmean(r["hard_sampled"] for r in results if r["arm"] == arm)
            for arm in ("grpo", "grpo+deepsearch")
        }
        print(
            f"GRPO + DeepSearch minus GRPO on the hard tail, mean of seeds {args.seeds}: {difference:+.3f} greedy"
            f" accuracy, {sampled['grpo+deepsearch'] - sampled['grpo']:+.3f} sampled pass rate, at {args.tokens:,}"
            " generated tokens per run"
        )


def learnability_main(args: argparse.Namespace) -> None:
    """How much any finder of solutions could teach: the held-out greedy accuracy of each hard-tail
    distribution after supervised steps on N correct answers of fresh training prompts of it, from
    each seed's warm start of the training mix (batch 16, N/16 steps, the learner's learning rate)."""
    from orchard.learner.sft import sft_train
    from orchard.rollout.model import build_model
    from orchard.services.evaluation import evaluate_by_distribution

    started = time.perf_counter()
    counts = sorted(set(args.solutions))
    print(
        f"learnability of the hard tail {HARD_TAIL}: held-out greedy accuracy after SFT on N solutions,"
        f" N = {counts}; seeds {args.seeds}"
    )
    tail: dict[int, list[float]] = {count: [] for count in counts}
    for seed in args.seeds:
        config = load_config(None, [*train_overrides(args), f"seed={seed}", *args.overrides])
        pool = PromptPool.from_config(config.data)
        state_dict, _ = warm_start(config, pool, log=lambda message: None)
        worker = RolloutWorkerCore("bench", config.model, config.rollout, seed=seed)
        held_out_texts = {p.text for p in pool.held_out}
        for family, level in HARD_TAIL:
            distribution = f"{family}/d{level}"
            held_out = [p for p in pool.held_out[: config.eval.num_prompts] if p.distribution == distribution]
            rng = random.Random(seed)
            solutions = []
            while len(solutions) < max(counts):
                prompt = generate_prompt(family, level, rng)
                if prompt.text not in held_out_texts:
                    answer = worker.tokenizer.encode(prompt.answer) + [worker.tokenizer.eos_id]
                    solutions.append((encode_prompt(worker.tokenizer, prompt.text), answer))
            cells = []
            for count in counts:
                model = build_model(config.model, worker.tokenizer)
                model.load_state_dict(state_dict)
                steps = count // 16
                if steps:
                    sft_train(model, solutions[:count], steps=steps, batch_size=16, lr=config.learner.lr, seed=seed, log_every=10**9)  # fmt: skip
                worker.load_weights(worker.policy_version + 1, {k: v.detach() for k, v in model.state_dict().items()})
                accuracy, _ = evaluate_by_distribution(worker, held_out)
                tail[count].append(accuracy)
                cells.append(f"N={count}: {accuracy:.3f}")
            print(f"  seed {seed} {distribution:<18} " + "  ".join(cells), flush=True)
    means = "  ".join(f"N={count}: {statistics.fmean(values):.3f}" for count, values in tail.items())
    print(f"hard tail, mean over its distributions and the seeds: {means}")
    print(f"{time.perf_counter() - started:.0f} s in all")


def train_main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    print(
        f"training comparison: {', '.join(args.arms)}; seeds {args.seeds}; {args.tokens:,} generated tokens per run;"
        f" mix {EASY + HARD_TAIL}, hard tail {HARD_TAIL}; {args.held_out} held-out prompts",
        flush=True,
    )
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            path = OUT / f"{arm}-seed{seed}" / "bench.json"
            if args.report_only:
                if not path.exists():
                    continue
                result = json.loads(path.read_text())
                if "hard_sampled" not in result:  # measured after the run, from its final checkpoint
                    run_dir = RunDirectory(OUT, f"{arm}-seed{seed}")
                    result["hard_sampled_initial"], result["hard_sampled"] = sampled_pass_rates(run_dir, args.samples)
                    path.write_text(json.dumps(result, indent=2))
                results.append(result)
            else:
                results.append(train_one(arm, seed, args))
    report_training(results, args)
    print(f"{time.perf_counter() - started:.0f} s in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=40, help="Candidate prompts per distribution.")
    parser.add_argument("--distributions", nargs="+", default=["addition/d1", "multiplication/d1"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="Fresh plain samples and searches per prompt.")
    parser.add_argument("--sweep", action="store_true", help="Also the entropy term, other widths and step sizes.")
    parser.add_argument("--train", action="store_true", help="The training comparison instead of the search one.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Training: seeds of both arms.")
    parser.add_argument("--tokens", type=int, default=500_000, help="Training: generated tokens per run.")
    parser.add_argument("--held-out", type=int, default=500, help="Training: held-out prompts (evenly split).")
    parser.add_argument(
        "--warmstart-seed",
        type=int,
        default=None,
        help="Training: one warm start (this SFT seed) for every seed; default: each seed its own warm start.",
    )
    parser.add_argument("--terminate-num", type=int, default=16, help="Training: trajectories per tree search.")
    parser.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=list(ARMS))
    parser.add_argument(
        "--samples", type=int, default=16, help="Training: samples per hard held-out prompt at the end."
    )
    parser.add_argument(
        "--report-only", action="store_true", help="Training: the table from the run directories' bench.json files."
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--learnability",
        action="store_true",
        help="Held-out accuracy of the hard tail after SFT on N solutions (what finding solutions could teach).",
    )
    parser.add_argument("--solutions", type=int, nargs="+", default=[0, 640, 2560], help="Learnability: N.")
    args = parser.parse_args()
    if args.learnability:
        learnability_main(args)
        return
    if args.train:
        train_main(args)
        return
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    config = load_config(None, args.overrides)
    pool = PromptPool.from_config(config.data)
    state_dict, info = warm_start(config, pool, log=lambda message: None)
    rollout = config.rollout.model_copy(update={"torch_threads": args.threads})
    worker = RolloutWorkerCore("bench", config.model, rollout, seed=args.seed)
    worker.load_weights(0, state_dict)
    mcts = config.rollout.mcts
    print(
        f"warm-started policy ({'cached' if info.get('cached') else 'trained'}), temperature"
        f" {rollout.temperature}, max_new_tokens {rollout.max_new_tokens}; tree: expansion {mcts.expansion}"
        f" ({mcts.children_per_expansion} per expansion, top {mcts.prior_top_k} next tokens),"
        f" {mcts.chunk_tokens}-token steps, width {mcts.expansion_width} (decay {mcts.width_decay}, min"
        f" {mcts.min_width}), λ_puct {mcts.lambda_puct}, λ1..λ4 {mcts.lambda_parent_value}/{mcts.lambda_entropy}/"
        f"{mcts.lambda_depth}/{mcts.lambda_value} (entropy term {'on' if mcts.entropy_bonus else 'off'}), λc"
        f" {mcts.lambda_confidence}, depth bonus {mcts.depth_bonus}, merge duplicates {mcts.merge_duplicates},"
        f" widen {mcts.widen_when_exhausted}"
    )
    candidates, hard = hard_prompts(worker, pool, args.distributions, args.prompts, args.seed)
    print(
        f"{len(candidates)} candidate prompts, {len(hard)} with pass@16 = 0; budget per prompt = the tokens of"
        f" its {PLAIN_BUDGET} plain samples; {args.repeats} repeats (n counts prompt × repeat)"
    )
    variants = {"": {}}
    if args.sweep:
        variants.update(SWEEP)
    # Per variant, (plain group, search result) of every prompt in every repeat.
    pairs: dict[str, list] = {suffix: [] for suffix in variants}
    seconds: dict[str, float] = {suffix: 0.0 for suffix in variants}
    for _ in range(args.repeats):
        plain_groups = worker.rollout(hard, group_size=PLAIN_BUDGET).groups
        for suffix, overrides in variants.items():
            results, elapsed = search_all(worker, config, hard, plain_groups, overrides)
            pairs[suffix] += list(zip(plain_groups, results, strict=True))
            seconds[suffix] += elapsed
    rows, totals = [], []
    for suffix in variants:
        every = pairs[suffix]
        for distribution in args.distributions:
            mine = [(g, r) for g, r in every if g.prompt.distribution == distribution]
            rows.append(row(distribution + suffix, mine, float("nan")))
        totals.append(row("all" + suffix, every, seconds[suffix]))
        rows.append(totals[-1])
    print_table(rows)
    total = totals[0]
    print(
        f"\ntree search solves {share(total.tree_solved, total.prompts).strip()} of the prompts on which"
        f" {PLAIN_FILTER} plain samples all fail, within the tokens of {PLAIN_BUDGET} plain samples"
        f" (plain pass@{PLAIN_BUDGET}: {share(total.plain_solved, total.prompts).strip()});"
        f" {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
