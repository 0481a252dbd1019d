"""Supervised warm start: cross-entropy on reference answers, and a cache so it runs once per recipe.

`sft_train` is a plain torch loop (no DeepSpeed: it runs once, before RL, on the driver).
`cached_warm_start` keys the trained weights by a hash of everything that determines them, so a
second run with the same recipe loads them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_model, save_model

logger = logging.getLogger(__name__)

#: Label value that `torch.nn.functional.cross_entropy` ignores (prompt tokens and padding).
IGNORE_INDEX = -100
WEIGHTS_FILE = "model.safetensors"
KEY_FILE = "key.json"

ModelT = TypeVar("ModelT", bound=torch.nn.Module)


#: `(prompt ids, target ids)`, optionally with `[start, end)` ranges of the target that are context only
#: (a demonstrated tool call's observation: shown, never predicted).
SupervisedExample = tuple[Sequence[int], Sequence[int]] | tuple[Sequence[int], Sequence[int], Sequence[tuple[int, int]]]


def pad_supervised_batch(
    examples: Sequence[SupervisedExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and next-token `labels` (target tokens only, but for
    an example's context-only ranges)."""
    width = max(len(example[0]) + len(example[1]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        prompt, target = example[0], example[1]
        ids = list(prompt) + list(target)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = torch.tensor(target, dtype=torch.long)
        for start, end in example[2] if len(example) > 2 else ():
            labels[row, len(prompt) + start : len(prompt) + end] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def sft_train(
    model: torch.nn.Module,
    examples: Sequence[SupervisedExample],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int,
    log: Callable[[str], Any] | None = None,
    pad_id: int = 0,
) -> list[float]:
    """Train `model` on `(prompt_ids, target_ids[, context-only ranges])` examples; returns the loss of
    every step.

    Each step draws `batch_size` examples (reshuffled epochs, seeded by `seed`) and minimises the
    mean cross-entropy of the target tokens given everything before them; prompt tokens, padding and
    a target's context-only ranges are masked out of the loss. Plain `torch.optim.AdamW` at `lr`. The model is left in
    the mode it arrived in. `pad_id` only fills the padding (it is never attended to or trained on).
    """
    if steps < 0 or batch_size < 1 or log_every < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1, log_every >= 1; got {steps}, {batch_size}, {log_every}")
    if steps and not examples:
        raise ValueError("sft_train needs at least one example to train on")
    for index, example in enumerate(examples):
        prompt, target = example[0], example[1]
        if not prompt or not target:
            raise ValueError(
                f"example {index} has {len(prompt)} prompt and {len(target)} target tokens; both must be non-empty"
                " (the first target token is predicted from the prompt)"
            )
    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    was_training = model.training
    model.train()
    order: list[int] = []
    losses: list[float] = []
    try:
        for step in range(1, steps + 1):
            batch = []
            while len(batch) < batch_size:
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch.append(examples[order.pop()])
            input_ids, attention_mask, labels = (t.to(device) for t in pad_supervised_batch(batch, pad_id))
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            # logits at position t predict token t+1
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if log is not None and (step % log_every == 0 or step == steps):
                log(f"sft step {step}/{steps}: loss {losses[-1]:.4f}")
    finally:
        model.train(was_training)
    return losses


def cache_key_digest(key: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `key` (sorted keys, no whitespace)."""
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cached_warm_start(
    cache_dir: Path, key: dict[str, Any], build: Callable[[], ModelT], train: Callable[[ModelT], None]
) -> tuple[ModelT, bool]:
    """`(model, cached)`: the trained model for `key`, loaded from `cache_dir` when it is there.

    The entry lives in `cache_dir/<sha256 of key>/` (`model.safetensors` and `key.json`). It is
    written into a temporary directory that is renamed into place, so a directory under the
    final name is always complete. An entry that does not load (corrupt file, different key,
    shapes that do not fit `build()`) is reported with a warning, removed, and trained again.
    The model is returned in eval mode.
    """
    cache_dir = Path(cache_dir)
    digest = cache_key_digest(key)
    entry = cache_dir / digest
    if entry.exists():
        model = build()
        try:
            _load_entry(entry, key, model)
            model.eval()
            return model, True
        except Exception as error:  # any failure to load means: train again, never crash
            message = f"warm-start cache entry {entry} is unusable ({type(error).__name__}: {error}); training again"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            _remove(entry)
    model = build()
    train(model)
    model.eval()
    _save_entry(cache_dir, entry, key, model)
    return model, False


def _load_entry(entry: Path, key: dict[str, Any], model: torch.nn.Module) -> None:
    stored_key = json.loads((entry / KEY_FILE).read_text())
    if cache_key_digest(stored_key) != cache_key_digest(key):
        raise ValueError("its key.json describes a different warm start")
    load_model(model, str(entry / WEIGHTS_FILE), strict=True)


def _save_entry(cache_dir: Path, entry: Path, key: dict[str, Any], model: torch.nn.Module) -> None:
    temporary = cache_dir / f".tmp-{entry.name}-{uuid.uuid4().hex}"
    try:
        temporary.mkdir(parents=True)
        # save_model (not save_file) because tied embeddings share storage under two names
        save_model(model, str(temporary / WEIGHTS_FILE))
        (temporary / KEY_FILE).write_text(json.dumps(key, sort_keys=True, indent=1))
        temporary.rename(entry)
    except OSError as error:
        # A read-only cache, or another process filled the entry meanwhile: the run goes on uncached.
        logger.warning("could not store warm-start cache entry %s: %s", entry, error)
        _remove(temporary)


def _remove(path: Path) -> None:
    """Move `path` out of the way, then delete it (the rename is atomic even if the delete is not)."""
    doomed = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex}")
    try:
        path.rename(doomed)
    except OSError:
        doomed = path
    if doomed.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)
