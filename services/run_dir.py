"""The run directory: `runs/<run-id>/` with the resolved config, metrics, events, summary and plots."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from orchard.config import RunConfig, dump_config


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"


def _jsonable(value: Any) -> Any:
    """Non-finite floats become null, so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file written by a run (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: The run directory's lock file: held (flock) by the process running the run, holding its pid.
LOCK_FILE = ".lock"


class RunDirectoryLocked(RuntimeError):
    """Another process holds the run directory's lock, so a run of it is in progress there."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid is not recorded yet"
        super().__init__(
            f"run directory {path} is in use by another orchard process ({holder}); "
            "wait for that run to end (or stop it) before running or resuming this directory"
        )


class RunLock:
    """An exclusive `flock` on a run directory's lock file, held until `release` or until the process ends.

    The kernel drops the lock when its process dies, however it dies (SIGKILL included), so a
    killed run can be resumed at once and a stale lock file never blocks anything: only a live
    holder does. The file is never deleted: removing it would let two processes lock different
    files of the same name.
    """

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor releases the lock
            self._descriptor = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _recorded_pid(descriptor: int) -> int | None:
    """The pid the holder wrote into the lock file (None while it has not written it yet)."""
    text = os.pread(descriptor, 64, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _try_flock(descriptor: int, operation: int) -> bool:
    try:
        fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return False
        raise
    return True


def lock_run_directory(path: Path) -> RunLock:
    """Take `path`'s lock for this process, or raise `RunDirectoryLocked` naming the holder's pid.

    A failed attempt changes nothing in the directory: the lock file is only written (the new
    holder's pid) once the lock is held.
    """
    lock_path = path / LOCK_FILE
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try_flock(descriptor, fcntl.LOCK_EX):
            raise RunDirectoryLocked(path, _recorded_pid(descriptor))
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(descriptor)
        raise
    return RunLock(lock_path, descriptor)


def ensure_unlocked(path: str | Path) -> None:
    """Raise `RunDirectoryLocked` when a process holds `path`'s lock; return when none does.

    Creates and writes nothing, so a command can refuse a directory in use before it touches
    anything (or binds its port). The probe holds a shared lock for an instant; `lock_run_directory`
    remains the check that counts.
    """
    lock_path = Path(path) / LOCK_FILE
    try:
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not _try_flock(descriptor, fcntl.LOCK_SH):
            raise RunDirectoryLocked(Path(path), _recorded_pid(descriptor))
    finally:
        os.close(descriptor)  # also drops the probe's shared lock


class RunDirectory:
    def __init__(self, root: str | Path, run_id: str) -> None:
        self.run_id = run_id
        self.path = Path(root) / run_id
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)

    def lock(self) -> RunLock:
        """Hold this directory for this process's run (see `RunLock`); raises `RunDirectoryLocked`.

        Not taken by `__init__`: one process may open the same directory several times (a run and
        the tools that read it), and only the process that runs the run should hold it.
        """
        return lock_run_directory(self.path)

    def write_config(self, config: RunConfig) -> None:
        (self.path / "config.yaml").write_text(dump_config(config))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "metrics.jsonl")

    def append_samples(self, records: list[dict[str, Any]]) -> None:
        with (self.path / "samples.jsonl").open("a") as handle:
            handle.writelines(json.dumps(_jsonable(record), sort_keys=True) + "\n" for record in records)

    def read_samples(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "samples.jsonl")

    def truncate_metrics(self, last_step: int) -> int:
        """Keep only the records (and samples) of steps up to `last_step` (a resumed run repeats the
        later ones); returns the metric records kept."""
        kept = 0
        for name in ("metrics.jsonl", "samples.jsonl"):
            records = [record for record in read_jsonl(self.path / name) if record.get("step", 0) <= last_step]
            temporary = self.path / f"{name}.tmp"
            temporary.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
            temporary.replace(self.path / name)
            kept = len(records) if name == "metrics.jsonl" else kept
        return kept

    def event(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with (self.path / "events.log").open("a") as handle:
            handle.write(f"{stamp} {message}\n")

    def write_json(self, path: str | Path, data: dict[str, Any]) -> None:
        """`data` as indented JSON at `path` (inside the run directory or a checkpoint of it)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")

    def plot_rewards(self, *, reward_window: int = 25, eval_window: int = 3) -> Path | None:
        """`reward.png`: batch reward per distribution (moving average over `reward_window` steps),
        held-out accuracy overall and per distribution (over `eval_window` evaluations) and, when
        recorded, the scheduler's sampling probability per distribution, against learner step. One
        colour per task family, a line style per difficulty."""
        metrics = self.read_metrics()
        if not metrics:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from orchard.services.plotting import distribution_styles, smooth

        scheduled = [m for m in metrics if m.get("scheduler_probabilities")]
        if scheduled and all(
            m["scheduler_probabilities"] == scheduled[0]["scheduler_probabilities"] for m in scheduled
        ):
            scheduled = []  # fixed weights (no scheduler): nothing to show
        panels = 3 if scheduled else 2
        figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.4))
        reward_axis, eval_axis = axes[0], axes[1]
        distributions = sorted({d for m in metrics for d in m.get("reward_by_distribution", {})})
        evaluated = [m for m in metrics if m.get("eval_accuracy") is not None]
        distributions = sorted({*distributions, *(d for m in evaluated for d in m.get("eval_by_distribution", {}))})
        styles = distribution_styles(distributions)

        def draw(axis, records, values, window, **style) -> None:
            points = [(m["step"], value) for m in records if (value := values(m)) is not None]
            if points:
                steps, ys = zip(*points, strict=True)
                axis.plot(steps, smooth(ys, min(window, 2 * ((len(ys) - 1) // 2) + 1)), **style)

        for distribution in distributions:
            draw(
                reward_axis,
                metrics,
                lambda m, d=distribution: m.get("reward_by_distribution", {}).get(d),
                reward_window,
                label=distribution,
                linewidth=1.2,
                **styles[distribution],
            )
        reward_axis.set(
            title=f"batch reward per distribution (mean of {reward_window} steps)",
            xlabel="learner step",
            ylabel="mean reward",
        )
        if evaluated:
            draw(eval_axis, evaluated, lambda m: m["eval_accuracy"], eval_window, color="k", linewidth=2.5, label="all")
            for distribution in distributions:
                draw(
                    eval_axis,
                    evaluated,
                    lambda m, d=distribution: m.get("eval_by_distribution", {}).get(d),
                    eval_window,
                    linewidth=1,
                    alpha=0.8,
                    **styles[distribution],
                )
        eval_axis.set(
            title=f"held-out greedy accuracy (mean of {eval_window} evaluations)",
            xlabel="learner step",
            ylabel="accuracy",
            ylim=(-0.02, 1.02),
        )
        if scheduled:
            schedule_axis = axes[2]
            for distribution in sorted({d for m in scheduled for d in m["scheduler_probabilities"]}):
                draw(
                    schedule_axis,
                    scheduled,
                    lambda m, d=distribution: m["scheduler_probabilities"].get(d),
                    1,
                    linewidth=1.2,
                    **styles.get(distribution, {}),
                )
            schedule_axis.set(
                title="sampling probability per distribution", xlabel="learner step", ylabel="probability", ylim=(0, 1)
            )
        for axis in axes:
            axis.grid(alpha=0.3)
        if distributions:  # one legend for all panels, beside them
            handles, labels = reward_axis.get_legend_handles_labels()
            if evaluated:
                handles.insert(0, eval_axis.get_lines()[0])
                labels.insert(0, "held-out, all")
            figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
            figure.tight_layout(rect=(0, 0, 0.86, 1))
        else:
            figure.tight_layout()
        path = self.path / "reward.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
