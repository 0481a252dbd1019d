"""Where a run's checkpoints live and which of them count.

A checkpoint is `runs/<id>/checkpoints/step-N/`: the learner's DeepSpeed state and Hugging Face model,
then `driver.json` (the driver's counters, RNG and curriculum state), written last. A directory
without `driver.json` was cut short and is never resumed from.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.run_dir import RunDirectory

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
