"""A run's checkpoints: where they live, which of them count, and committing one.

A checkpoint is `runs/<id>/checkpoints/step-N/`: the learner's DeepSpeed state and Hugging Face model,
then `driver.json` (the driver's counters, RNG and curriculum state), written last. A directory
without `driver.json` was cut short and is never resumed from.

Committing a checkpoint also acknowledges, in the buffer, the groups trained since the previous one
(`Checkpoints`): until then they stay pending, so a run resumed from a checkpoint gets back exactly the
groups trained after it, and a learner restarted from it trains them again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchard.protocols import Buffer
from orchard.services.run_dir import RunDirectory

DRIVER_STATE = "driver.json"


def checkpoint_path(run_dir: RunDirectory, step: int) -> Path:
    return run_dir.path / "checkpoints" / f"step-{step}"


def checkpoint_directories(run_dir: RunDirectory) -> list[tuple[int, Path]]:
    """`(step, directory)` of every `checkpoints/step-N/` of the run, oldest first."""
    found = []
    for path in (run_dir.path / "checkpoints").glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    """`driver.json` is written last: a checkpoint without it was cut short and is never resumed from."""
    return (checkpoint / DRIVER_STATE).exists()


def latest_checkpoint(run_dir: RunDirectory) -> Path | None:
    """The complete checkpoint of the highest step, or None."""
    complete = [path for _, path in checkpoint_directories(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def prune_checkpoints(run_dir: RunDirectory, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and incomplete older ones); 0 keeps all.

    Returns the directories removed.
    """
    directories = checkpoint_directories(run_dir)
    complete = [step for step, path in directories if is_complete(path)]
    if not keep or len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    removed = []
    for step, directory in directories:
        if step < oldest_kept:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


@dataclass
class DriverState:
    """What the driver writes to `driver.json`: enough to continue the run from this step boundary."""

    step: int
    policy_version: int
    filtered: Counter[str]
    rng_state: tuple
    initial_eval: tuple[float, dict[str, float]]
    warm_start: dict[str, Any] = field(default_factory=dict)
    curriculum: dict[str, Any] = field(default_factory=dict)
    #: State of the run's other step-boundary components (e.g. the solution cache), by name.
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, run_dir: RunDirectory, checkpoint: Path) -> None:
        run_dir.write_json(
            checkpoint / DRIVER_STATE,
            {
                "step": self.step,
                "policy_version": self.policy_version,
                "filtered": dict(self.filtered),
                "rng_state": self.rng_state,
                "initial_eval": list(self.initial_eval),
                "warm_start": self.warm_start,
                "curriculum": self.curriculum,
                "extra": self.extra,
            },
        )

    @classmethod
    def read(cls, checkpoint: Path) -> DriverState:
        saved = json.loads((checkpoint / DRIVER_STATE).read_text())
        version, internal, gauss = saved["rng_state"]
        accuracy, by_distribution = saved["initial_eval"]
        return cls(
            step=int(saved["step"]),
            policy_version=int(saved["policy_version"]),
            filtered=Counter(saved["filtered"]),
            rng_state=(version, tuple(internal), gauss),
            initial_eval=(accuracy, by_distribution),
            warm_start=saved.get("warm_start") or {},
            curriculum=saved["curriculum"],
            extra=saved.get("extra") or {},
        )


def read_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / DRIVER_STATE).read_text())["step"])


class Checkpoints:
    """Commits the run at step boundaries and acknowledges trained groups only there.

    `save_learner(path)` writes the learner's state into `path` (it raises when the learner died);
    `keep_last` complete checkpoints are kept (0: all).
    """

    def __init__(
        self, run_dir: RunDirectory, buffer: Buffer, save_learner: Callable[[Path], None], *, keep_last: int
    ) -> None:
        self.run_dir, self.buffer, self.save_learner, self.keep_last = run_dir, buffer, save_learner, keep_last
        self.paths: list[str] = []  # this run's complete checkpoints, oldest first
        self.unacknowledged: list[str] = []  # groups trained since the last checkpoint

    def trained(self, group_ids: Iterable[str]) -> None:
        """Groups the learner has stepped on; the next checkpoint acknowledges them."""
        self.unacknowledged.extend(group_ids)

    def forget_trained(self) -> None:
        """The learner went back to the last checkpoint: what it trained since is trained again."""
        self.unacknowledged = []

    def resumed(self, checkpoint: Path) -> None:
        self.paths = [str(checkpoint)]

    def commit(self, state: DriverState, why: str) -> str:
        """Write the learner's state, then `driver.json`, then acknowledge; returns the checkpoint's path.

        A second commit at the same step returns the first's path and writes nothing."""
        path = checkpoint_path(self.run_dir, state.step)
        if str(path) in self.paths:
            return str(path)
        started = time.perf_counter()
        self.save_learner(path)
        state.write(self.run_dir, path)
        self.buffer.ack(self.unacknowledged)
        acknowledged, self.unacknowledged = len(self.unacknowledged), []
        self.paths.append(str(path))
        for directory in prune_checkpoints(self.run_dir, self.keep_last):
            if str(directory) in self.paths:
                self.paths.remove(str(directory))
        self.run_dir.event(
            f"checkpoint ({why}) at step {state.step}: {path} in {time.perf_counter() - started:.1f} s, "
            f"{acknowledged} trained groups acknowledged"
        )
        return str(path)
