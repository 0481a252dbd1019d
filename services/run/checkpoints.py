"""A run's checkpoints: where they live, which of them count, writing one atomically and verifying it.

A checkpoint is `runs/<id>/checkpoints/step-N/`: the learner's DeepSpeed state and Hugging Face model,
`driver.json` (the driver's counters, RNG and curriculum state) and `manifest.json` (every other file's
size and SHA-256). It is written under `checkpoints/.step-N.tmp-<pid>-<token>/`, every file and directory
fsynced, the manifest written last, then renamed to `step-N/` and the parent directory fsynced: a
`step-N/` is therefore complete or absent, whatever kills the process or fills the disk, and a leftover
`.step-N.tmp-*` (a process killed while writing) is removed at the next start or prune.

Resuming verifies before it trusts: the newest checkpoint whose files still match its manifest is used;
a newer one that does not (a truncated, altered or missing file) is logged with the reason and set aside
as `.step-N.damaged-<time>/` (kept for inspection, never resumed from nor counted by pruning). A `step-N/`
with `driver.json` and no manifest was written before checkpoints had one: under that layout `driver.json`
came last and marked the checkpoint complete, so it is still resumed from, with a logged warning that it
is unverified, rather than stranding runs started before manifests.

Committing a checkpoint also acknowledges, in the buffer, the groups trained since the previous one
(`Checkpoints`), only once the checkpoint is durably in place: until then they stay pending, so a run
resumed from a checkpoint gets back exactly the groups trained after it, and a learner restarted from it
trains them again. A checkpoint that cannot be written ends the run or is skipped (`checkpoint.on_error`);
its groups then stay pending.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchard.protocols import Buffer
from orchard.services.run.loop import DriverError, LearnerDied
from orchard.services.run_dir import RunDirectory

DRIVER_STATE = "driver.json"
MANIFEST = "manifest.json"
#: Version of `manifest.json`'s layout.
MANIFEST_FORMAT = 1
#: Read size when hashing a checkpoint's files.
_CHUNK = 1 << 20

OnError = Literal["fail", "keep_previous"]


class CheckpointWriteError(OSError):
    """The learner could not write its part of a checkpoint (disk full, read-only or unwritable directory...).

    Raised by the learner actor for any failure of its checkpoint writes, since some of them report a full
    disk as something else than an `OSError` (torch's writer raises a `RuntimeError`); the message keeps
    the original error and the space left on the filesystem."""


class CheckpointFailed(DriverError):
    """A checkpoint could not be written and `checkpoint.on_error` is `fail`: the run ends with the reason."""


# ------------------------------------------------------------------------------------------------ layout


def checkpoint_path(run_dir: RunDirectory, step: int) -> Path:
    return run_dir.path / "checkpoints" / f"step-{step}"


def temporary_path(run_dir: RunDirectory, step: int) -> Path:
    """Where step `step`'s checkpoint is written before it is renamed into place (not created here: the
    learner creates it as it writes). Unique, so a leftover of a killed run is never written into again."""
    return run_dir.path / "checkpoints" / f".step-{step}.tmp-{os.getpid()}-{secrets.token_hex(3)}"


def leftover_directories(run_dir: RunDirectory) -> list[Path]:
    """Checkpoints a process was writing when it stopped (`.step-N.tmp-*`): never complete."""
    return sorted((run_dir.path / "checkpoints").glob(".step-*.tmp-*"))


def remove_leftovers(run_dir: RunDirectory) -> list[Path]:
    """Delete every `.step-N.tmp-*`; returns those removed (call with no checkpoint being written)."""
    removed = []
    for leftover in leftover_directories(run_dir):
        shutil.rmtree(leftover, ignore_errors=True)
        if not leftover.exists():
            removed.append(leftover)
    return removed


def checkpoint_directories(run_dir: RunDirectory) -> list[tuple[int, Path]]:
    """`(step, directory)` of every `checkpoints/step-N/` of the run, oldest first."""
    found = []
    for path in (run_dir.path / "checkpoints").glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def is_legacy(checkpoint: Path) -> bool:
    """Written before checkpoints had a manifest: complete by its `driver.json`, written last back then."""
    return not (checkpoint / MANIFEST).exists() and (checkpoint / DRIVER_STATE).exists()


def is_complete(checkpoint: Path) -> bool:
    """A `step-N/` with a manifest (renamed into place only once whole) or a legacy one (`is_legacy`).

    Says nothing of whether its files are still intact: `verify` does."""
    return (checkpoint / MANIFEST).exists() or is_legacy(checkpoint)


def latest_checkpoint(run_dir: RunDirectory) -> Path | None:
    """The complete checkpoint of the highest step, or None (unverified: see `select_checkpoint`)."""
    complete = [path for _, path in checkpoint_directories(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def prune_checkpoints(run_dir: RunDirectory, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and incomplete older ones); 0 keeps all.
    Leftovers of unfinished writes go too.

    Returns the directories removed.
    """
    removed = remove_leftovers(run_dir)
    directories = checkpoint_directories(run_dir)
    complete = [step for step, path in directories if is_complete(path)]
    if not keep or len(complete) <= keep:
        return removed
    oldest_kept = complete[-keep]
    for step, directory in directories:
        if step < oldest_kept:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


# ------------------------------------------------------------------------------------------------ manifest


@dataclass(frozen=True)
class Manifest:
    """What `write_manifest` recorded: the files and their total size, and the seconds spent reading,
    hashing and fsyncing them (the price of verifiability, logged with each checkpoint)."""

    files: dict[str, dict[str, Any]]
    seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files.values())


def _digest(file: Path, *, sync: bool) -> tuple[int, str]:
    """Size and SHA-256 of `file`, read once; with `sync`, its data is fsynced too (Linux syncs the file,
    not the descriptor, so this makes durable what the learner's process wrote)."""
    sha256, size = hashlib.sha256(), 0
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(handle.fileno())
    return size, sha256.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make `directory`'s entries (files created, renamed into it) durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _files(directory: Path) -> list[Path]:
    """Every file under `directory` but its own manifest."""
    return sorted(path for path in directory.rglob("*") if path.is_file() and path != directory / MANIFEST)


def write_manifest(directory: Path, step: int) -> Manifest:
    """Fsync every file and directory under `directory`, then write `manifest.json` (each file's relative
    path, size and SHA-256) and fsync it: once it exists, all it names is on disk."""
    started = time.perf_counter()
    files = {}
    for file in _files(directory):
        size, sha256 = _digest(file, sync=True)
        files[file.relative_to(directory).as_posix()] = {"size": size, "sha256": sha256}
    for sub in sorted((path for path in directory.rglob("*") if path.is_dir()), key=lambda p: -len(p.parts)):
        fsync_directory(sub)
    manifest = Manifest(files, time.perf_counter() - started)
    document = {"format": MANIFEST_FORMAT, "step": step, "total_bytes": manifest.total_bytes, "files": files}
    with (directory / MANIFEST).open("w") as handle:
        handle.write(json.dumps(document, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(directory)
    return manifest


def verify(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be trusted (the first file missing, of the wrong size or checksum, or the
    manifest itself), or None when every file it lists matches. Files it does not list are not checked."""
    try:
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
        expected = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in listed.items()}
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{MANIFEST} unreadable ({type(error).__name__}: {error})"
    if DRIVER_STATE not in expected:
        return f"{MANIFEST} does not list {DRIVER_STATE}"
    for name, (size, _) in expected.items():  # sizes first: cheap, and most damage shows there
        try:
            actual = (checkpoint / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as error:
            return f"{name} unreadable ({error})"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    for name, (_, sha256) in expected.items():
        try:
            _, actual_sha256 = _digest(checkpoint / name, sync=False)
        except OSError as error:
            return f"{name} unreadable ({error})"
        if actual_sha256 != sha256:
            return f"{name} checksum mismatch (sha256 {actual_sha256[:12]}…, the manifest says {sha256[:12]}…)"
    return None


def publish(temporary: Path, final: Path) -> None:
    """Rename the finished checkpoint `temporary` to `final` and make the rename durable.

    A `final` already there can only be one that was never resumed from (cut short under the old layout,
    or set aside and recreated): it is replaced. Should the parent's fsync fail, the rename is undone so
    that no checkpoint is in place whose groups were not acknowledged."""
    parent = final.parent
    replaced = None
    if final.exists():
        replaced = parent / f".{final.name}.tmp-replaced-{secrets.token_hex(3)}"
        final.rename(replaced)
    temporary.rename(final)
    try:
        fsync_directory(parent)
    except OSError:
        final.rename(temporary)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ choosing


@dataclass(frozen=True)
class Selection:
    """The checkpoint to restore (None: none usable) and the newer ones skipped, with the reason."""

    checkpoint: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the `step-N` namespace, so that it is neither resumed from, nor
    counted when pruning (which would delete good checkpoints to keep it), nor in the way of writing step
    N again. Kept for inspection; returns where (the original path when it cannot be moved)."""
    aside = checkpoint.with_name(f".{checkpoint.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        checkpoint.rename(aside)
    except OSError:
        return checkpoint
    return aside


def select_checkpoint(run_dir: RunDirectory, log: Callable[[str], None]) -> Selection:
    """The newest checkpoint that verifies; each newer one that does not is logged with the reason and
    set aside. A legacy checkpoint (no manifest) is taken unverified, with a logged warning."""
    skipped: list[tuple[Path, str]] = []
    for _, directory in reversed(checkpoint_directories(run_dir)):
        if not is_complete(directory):
            continue  # cut short under the old layout: never a checkpoint
        if is_legacy(directory):
            log(
                f"warning: checkpoint {directory} has no {MANIFEST} (written before checkpoints had one): "
                "its files cannot be verified; using it as it is"
            )
            return Selection(directory, skipped)
        problem = verify(directory)
        if problem is None:
            if skipped:
                log(
                    f"falling back to the previous complete checkpoint {directory}; the groups acknowledged by "
                    f"the {len(skipped)} skipped are not trained again"
                )
            return Selection(directory, skipped)
        aside = set_aside(directory)
        where = f"moved to {aside.name}" if aside != directory else "could not be moved aside"
        log(f"checkpoint {directory} skipped: {problem}; {where}")
        skipped.append((directory, problem))
    return Selection(None, skipped)


def resume_checkpoint(run_dir: RunDirectory, log: Callable[[str], None]) -> Path:
    """The checkpoint `orchard run --resume` continues from (`select_checkpoint`); raises `DriverError`
    saying why when there is none."""
    selection = select_checkpoint(run_dir, log)
    if selection.checkpoint is not None:
        return selection.checkpoint
    if not selection.skipped:
        raise DriverError(
            f"cannot resume {run_dir.path}: it has no checkpoint (checkpoints/step-N/ with {DRIVER_STATE})"
        )
    reasons = "; ".join(f"{path.name}: {problem}" for path, problem in selection.skipped)
    raise DriverError(f"cannot resume {run_dir.path}: none of its checkpoints verifies ({reasons})")


# ------------------------------------------------------------------------------------------------ failures


def _causes(error: BaseException) -> Iterable[BaseException]:
    """`error` and what caused it, a Ray task error's remote exception included."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        remote = getattr(current, "cause", None)  # RayTaskError: the exception raised in the actor
        if isinstance(remote, BaseException) and remote is not current:
            current = remote
        else:
            current = current.__cause__ or current.__context__


def write_failure(error: BaseException) -> OSError | None:
    """The storage error behind a failed checkpoint write, or None when `error` is something else (a
    learner that died, which the run loop restarts; a bug), which must not be taken for a full disk."""
    if isinstance(error, LearnerDied):
        return None
    for cause in _causes(error):
        if isinstance(getattr(cause, "cause", None), BaseException):
            continue  # a Ray task error, an `OSError` too when the remote one was: that one comes next
        if isinstance(cause, OSError) and not isinstance(cause, ConnectionError | TimeoutError):
            return cause
    return None


def as_write_error(error: BaseException, path: str | Path) -> CheckpointWriteError:
    """`error`, raised while writing a checkpoint into `path`, as a `CheckpointWriteError`: the errno of
    the `OSError` behind it; without one, ENOSPC when the file system is (nearly) full, since that is what
    torch's `RuntimeError` then hides, else EIO. The message keeps the original and the free space."""
    free = _free_bytes(Path(path))
    where = "free space unknown" if free is None else f"{free / 2**20:.1f} MiB free there"
    found = next((cause for cause in _causes(error) if isinstance(cause, OSError) and cause.errno), None)
    if found is not None:
        return CheckpointWriteError(found.errno, f"{found.strerror} ({where})", str(found.filename or path))
    original = f"{type(error).__name__}: {error}"
    if free is not None and free < FULL_BELOW_BYTES:
        return CheckpointWriteError(errno.ENOSPC, f"No space left on device ({where}; {original})", str(path))
    return CheckpointWriteError(errno.EIO, f"{original} ({where})", str(path))


#: A file system with less free space than this, after a write failed on it, is taken to be full.
FULL_BELOW_BYTES = 1 << 20


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ driver state


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


# ------------------------------------------------------------------------------------------------ committing


class Checkpoints:
    """Commits the run at step boundaries and acknowledges trained groups only there.

    `save_learner(path)` writes the learner's state into `path` (it raises when the learner died);
    `keep_last` complete checkpoints are kept (0: all); `on_error` says what a checkpoint that cannot be
    written does (`checkpoint.on_error`), `on_failure` is called for each one skipped (a metric).
    Leftovers of a process killed while writing are removed here, at the run's start.
    """

    def __init__(
        self,
        run_dir: RunDirectory,
        buffer: Buffer,
        save_learner: Callable[[Path], None],
        *,
        keep_last: int,
        on_error: OnError = "fail",
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.run_dir, self.buffer, self.save_learner, self.keep_last = run_dir, buffer, save_learner, keep_last
        self.on_error, self.on_failure = on_error, on_failure
        self.paths: list[str] = []  # this run's complete checkpoints, oldest first
        self.unacknowledged: list[str] = []  # groups trained since the last checkpoint
        self.failures = 0  # checkpoints that could not be written (on_error=keep_previous)
        for leftover in remove_leftovers(run_dir):
            run_dir.event(f"removed {leftover}: a checkpoint left unfinished by a process stopped while writing it")

    def trained(self, group_ids: Iterable[str]) -> None:
        """Groups the learner has stepped on; the next checkpoint acknowledges them."""
        self.unacknowledged.extend(group_ids)

    def forget_trained(self) -> None:
        """The learner went back to the last checkpoint: what it trained since is trained again."""
        self.unacknowledged = []

    def resumed(self, checkpoint: Path) -> None:
        self.paths = [str(checkpoint)]

    def restorable(self) -> Path | None:
        """The checkpoint a restarted learner starts from: the newest that verifies (`select_checkpoint`,
        damaged ones logged and set aside); None before the first (the warm start). Raises
        `CheckpointFailed` when there were checkpoints and none verifies: rewinding to the warm start would
        silently drop every acknowledged step."""
        selection = select_checkpoint(self.run_dir, self.run_dir.event)
        skipped = {str(path) for path, _ in selection.skipped}
        self.paths = [path for path in self.paths if path not in skipped]
        if selection.checkpoint is None and selection.skipped:
            reasons = "; ".join(f"{path.name}: {problem}" for path, problem in selection.skipped)
            raise CheckpointFailed(f"the learner must restart and none of the run's checkpoints verifies ({reasons})")
        return selection.checkpoint

    def commit(self, state: DriverState, why: str) -> str | None:
        """Write the checkpoint (`_write`), then acknowledge; returns its path, or None when it could not
        be written and `on_error` is `keep_previous`.

        A second commit at the same step returns the first's path and writes nothing."""
        path = checkpoint_path(self.run_dir, state.step)
        if str(path) in self.paths:
            return str(path)
        started = time.perf_counter()
        try:
            manifest = self._write(state, path)
        except Exception as error:
            failure = write_failure(error)
            if failure is None:
                raise
            self._failed(state.step, why, path, failure, error)
            return None
        self.buffer.ack(self.unacknowledged)
        acknowledged, self.unacknowledged = len(self.unacknowledged), []
        self.paths.append(str(path))
        for directory in prune_checkpoints(self.run_dir, self.keep_last):
            if str(directory) in self.paths:
                self.paths.remove(str(directory))
        self.run_dir.event(
            f"checkpoint ({why}) at step {state.step}: {path} in {time.perf_counter() - started:.1f} s "
            f"({len(manifest.files)} files, {manifest.total_bytes / 2**20:.1f} MiB, checksummed and synced in "
            f"{manifest.seconds:.2f} s), {acknowledged} trained groups acknowledged"
        )
        return str(path)

    def _write(self, state: DriverState, path: Path) -> Manifest:
        """The learner's state, `driver.json` and the manifest into a temporary directory, then renamed to
        `path`; the temporary directory is removed if anything fails."""
        temporary = temporary_path(self.run_dir, state.step)
        try:
            self.save_learner(temporary)
            state.write(self.run_dir, temporary)
            manifest = write_manifest(temporary, state.step)
            publish(temporary, path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return manifest

    def _failed(self, step: int, why: str, path: Path, failure: OSError, error: BaseException) -> None:
        """A checkpoint could not be written: raise `CheckpointFailed` (on_error=fail), or log and count it,
        leaving the trained groups unacknowledged (on_error=keep_previous)."""
        previous = f"the previous checkpoint {self.paths[-1]}" if self.paths else "no previous checkpoint"
        message = f"checkpoint ({why}) at step {step} could not be written to {path}: {failure}"
        if self.on_error == "fail":
            raise CheckpointFailed(f"{message}; {previous} is intact (checkpoint.on_error=fail)") from error
        self.failures += 1
        if self.on_failure is not None:
            self.on_failure()
        self.run_dir.event(
            f"{message}; kept {previous}, the {len(self.unacknowledged)} groups trained since stay unacknowledged "
            f"(checkpoint.on_error=keep_previous; {self.failures} failed so far)"
        )
