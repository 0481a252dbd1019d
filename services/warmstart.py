"""Warm start: a short supervised stage on reference answers, cached so a demo never repeats it."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from orchard.config import RunConfig
from orchard.records import Prompt
from orchard.rollout.model import build_model
from orchard.rollout.multi_turn import demonstration
from orchard.rollout.prompts import PromptFormat, PromptRenderer
from orchard.rollout.tokenizer import load_tokenizer
from orchard.verifiers.sources import PromptPool

#: Bumped when the SFT recipe changes in a way the cache key cannot see.
WARM_START_FORMAT = 2


def cache_root(config: RunConfig) -> Path:
    if config.warmstart.cache_dir:
        return Path(config.warmstart.cache_dir)
    return Path(os.environ.get("ORCHARD_CACHE", Path.home() / ".cache" / "orchard")) / "warmstart"


def warm_start_key(config: RunConfig) -> dict[str, Any]:
    """Everything that changes the warm-started weights."""
    return {
        "format": WARM_START_FORMAT,
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "warmstart": config.warmstart.model_dump(mode="json", exclude={"cache_dir", "seed"}),
        "seed": warm_start_seed(config),
        # tool-call demonstrations are written in the configured call format
        "multi_turn": config.rollout.multi_turn.model_dump(mode="json") if config.rollout.multi_turn.enabled else None,
    }


def warm_start_seed(config: RunConfig) -> int:
    """The supervised stage's seed: `warmstart.seed`, else the run's."""
    return config.warmstart.seed if config.warmstart.seed is not None else config.seed


def warm_start(config: RunConfig, pool: PromptPool, log=print) -> tuple[dict[str, Any], dict[str, Any]]:
    """The initial policy's state dict, and what it cost (`cached`, `seconds`, final loss)."""
    from orchard.learner.sft import cached_warm_start, sft_train

    tokenizer = load_tokenizer(config.model)
    started = time.perf_counter()
    if config.warmstart.steps == 0:
        model = build_model(config.model, tokenizer)
        return model.state_dict(), {"cached": False, "seconds": 0.0, "steps": 0}

    losses: list[float] = []

    def train(model) -> None:
        rng = random.Random(config.data.seed + 1)
        prompts = pool.train_examples(config.warmstart.steps * config.warmstart.batch_size, rng)
        renderer = PromptRenderer(tokenizer, PromptFormat.from_config(config.data))
        chooser = random.Random(config.data.seed + 2)
        share = config.warmstart.tool_demonstrations
        examples = [warm_start_example(config, renderer, p, chooser.random() < share) for p in prompts]
        log(f"warm start: {config.warmstart.steps} supervised steps on {len(examples)} reference answers")
        with _all_cores():
            losses.extend(
                sft_train(
                    model,
                    examples,
                    steps=config.warmstart.steps,
                    batch_size=config.warmstart.batch_size,
                    lr=config.warmstart.lr,
                    seed=warm_start_seed(config),
                    log_every=max(1, config.warmstart.steps // 5),
                    log=log,
                )
            )

    model, cached = cached_warm_start(
        cache_root(config), warm_start_key(config), lambda: build_model(config.model, tokenizer), train
    )
    info = {
        "cached": cached,
        "seconds": time.perf_counter() - started,
        "steps": config.warmstart.steps,
        "final_loss": losses[-1] if losses else None,
    }
    return model.state_dict(), info


def warm_start_example(
    config: RunConfig, renderer: PromptRenderer, prompt: Prompt, call: bool = True
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """What the warm start teaches for `prompt`, as `(prompt ids, target ids, context-only ranges)`: with
    `rollout.multi_turn` and `call`, the tool call that solves it when it carries one
    (`metadata["tool_call"]`), its observation (shown, not trained on, as in RL) and the answer; else
    the reference solution when it has one (written as the model should write it, e.g. in the answer
    format the prompt asks for), else the bare answer."""
    tool_call = prompt.metadata.get("tool_call")
    if call and config.rollout.multi_turn.enabled and isinstance(tool_call, dict):
        written, observation, answer = demonstration(config.rollout.multi_turn, tool_call, prompt.answer)
        head, seen = renderer.tokenizer.encode(written), renderer.tokenizer.encode(observation)
        target = head + seen + renderer.encode_answer(answer)
        return renderer.encode(prompt), target, [(len(head), len(head) + len(seen))]
    return renderer.encode(prompt), renderer.encode_answer(prompt.solution or prompt.answer), []


@contextmanager
def _all_cores() -> Iterator[None]:
    """Every core for torch while the warm start trains: it runs before any worker or learner starts (the
    driver otherwise keeps one thread, leaving the cores to them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(before)
