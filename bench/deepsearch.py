"""DeepSearch tree search against plain sampling, at the same token budget, on prompts the policy fails.

With the demo's warm-started policy (the run config of `orchard run`, no RL):
1. prompts: the held-out prompts of the distributions the warm start is weak on (`addition/d1`,
   `multiplication/d1` by default), topped up with fresh prompts of those distributions;
2. 16 plain samples per prompt; the prompts where all 16 fail (pass@16 = 0) are kept;
3. on each kept prompt, 64 fresh plain samples (pass@64) and the tokens they generated;
4. on each kept prompt, tree search (`rollout.strategies.mcts`, the config's `rollout.mcts` unless
   overridden) with a budget of exactly those tokens; solved = a correct trajectory was found.

Printed: one row per distribution and in total: prompts kept, share solved by 64 plain samples, share
solved by tree search, generated tokens of each, tree nodes expanded, wall time; then the share
solved by either and by tree search only. `--sweep` adds rows with the entropy term λ2·H(s) on, with
the reference's constant width, with 1-token steps, and without merging duplicate steps or widening.
Tokens are generated tokens (prompt and prefix tokens the engine prefills are not counted).
Each repeat draws fresh plain samples (and so a fresh budget) and a fresh search for every prompt.
Run: `python bench/deepsearch.py [--seed 0] [--prompts 40] [--repeats 3] [--sweep]`.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from orchard.config import load_config
from orchard.records import Prompt
from rollout.strategies.mcts import SearchSettings, TreeSearch, run_searches
from rollout.worker import RolloutWorkerCore, encode_prompt
from services.warmstart import warm_start
from verifiers.procedural import generate_prompt
from verifiers.registry import safe_verify
from verifiers.sources import PromptPool

PLAIN_FILTER = 16
PLAIN_BUDGET = 64


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
            )
        )
    started = time.perf_counter()
    results = run_searches(trees, worker.engine.generate, worker._params(greedy=False))
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
        f"{'prompts (pass@16 = 0)':<34} {'n':>4} {'plain@64':>9} {'tree':>7} {'either':>7} {'tree only':>9}"
        f" {'plain tok':>10} {'tree tok':>9} {'nodes':>6} {'tree s':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.name:<34} {row.prompts:>4} {share(row.plain_solved, row.prompts):>9}"
            f" {share(row.tree_solved, row.prompts):>7} {share(row.either, row.prompts):>7}"
            f" {share(row.tree_only, row.prompts):>9} {row.plain_tokens:>10,} {row.tree_tokens:>9,}"
            f" {row.nodes:>6,} {'' if row.seconds != row.seconds else f'{row.seconds:.1f}':>7}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=40, help="Candidate prompts per distribution.")
    parser.add_argument("--distributions", nargs="+", default=["addition/d1", "multiplication/d1"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="Fresh plain samples and searches per prompt.")
    parser.add_argument("--sweep", action="store_true", help="Also the entropy term, other widths and step sizes.")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    config = load_config(None)
    pool = PromptPool.from_config(config.data)
    state_dict, info = warm_start(config, pool, log=lambda message: None)
    rollout = config.rollout.model_copy(update={"torch_threads": args.threads})
    worker = RolloutWorkerCore("bench", config.model, rollout, seed=args.seed)
    worker.load_weights(0, state_dict)
    mcts = config.rollout.mcts
    print(
        f"warm-started policy ({'cached' if info.get('cached') else 'trained'}), temperature"
        f" {rollout.temperature}, max_new_tokens {rollout.max_new_tokens}; tree: {mcts.chunk_tokens}-token steps,"
        f" width {mcts.expansion_width} (decay {mcts.width_decay}, min {mcts.min_width}), λ_puct {mcts.lambda_puct},"
        f" λ1..λ4 {mcts.lambda_parent_value}/{mcts.lambda_entropy}/{mcts.lambda_depth}/{mcts.lambda_value}"
        f" (entropy term {'on' if mcts.entropy_bonus else 'off'}), depth bonus {mcts.depth_bonus},"
        f" merge duplicates {mcts.merge_duplicates}, widen {mcts.widen_when_exhausted}"
    )
    candidates, hard = hard_prompts(worker, pool, args.distributions, args.prompts, args.seed)
    print(
        f"{len(candidates)} candidate prompts, {len(hard)} with pass@16 = 0; budget per prompt = the tokens of"
        f" its {PLAIN_BUDGET} plain samples; {args.repeats} repeats (n counts prompt × repeat)"
    )
    variants = {"": {}}
    if args.sweep:
        variants.update(
            {
                " entropy term on": {"entropy_bonus": True},
                " constant width": {"width_decay": 0, "min_width": 1},
                " 1-token steps": {"chunk_tokens": 1},
                " no merge/widen": {"merge_duplicates": False, "widen_when_exhausted": False},
            }
        )
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
