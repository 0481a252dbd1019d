"""Atomic, verified checkpoints on plain files: the manifest, verification, falling back past a damaged
checkpoint, leftovers of an unfinished write, and what a write that fails does to the buffer."""

from __future__ import annotations

import errno
import json
from collections import Counter
from pathlib import Path

import pytest
import ray

from orchard.records import Completion, Group, Prompt
from orchard.services.buffer.memory import MemoryBuffer
from orchard.services.run.checkpoints import (
    DRIVER_STATE,
    MANIFEST,
    CheckpointFailed,
    Checkpoints,
    CheckpointWriteError,
    DriverState,
    as_write_error,
    checkpoint_path,
    latest_checkpoint,
    leftover_directories,
    prune_checkpoints,
    read_step,
    resume_checkpoint,
    select_checkpoint,
    verify,
    write_failure,
)
from orchard.services.run.learners import LearnerDied
from orchard.services.run.loop import DriverError
from orchard.services.run_dir import RunDirectory

WEIGHTS = "model/model.safetensors"


def learner_files(path: Path, step: int) -> None:
    """What the learner's part of a checkpoint looks like, in small: nested files of a few KiB."""
    (path / "model").mkdir(parents=True)
    (path / WEIGHTS).write_bytes(bytes(range(256)) * 16 * (step + 1))
    (path / "step1").mkdir()
    (path / "step1" / "optim_states.pt").write_bytes(b"optimizer" * 100 * (step + 1))
    (path / "latest").write_text(f"step{step}")


def state(step: int) -> DriverState:
    return DriverState(step, step, Counter(), (3, (0,), None), (0.0, {}))


def trained_group(index: int) -> Group:
    completions = [
        Completion(text="2", token_ids=[5], logprobs=[-0.5], policy_version=0, reward=r, correct=bool(r))
        for r in (0.0, 1.0)
    ]
    prompt = Prompt(id=f"p{index}", text=f"{index}+{index}=", answer=str(2 * index), distribution="d")
    return Group(prompt=prompt, prompt_token_ids=[1, 2], completions=completions, worker="worker-0")


class Run:
    """A run's checkpoints with a buffer whose taken groups the checkpoints acknowledge."""

    def __init__(self, tmp_path: Path, *, on_error: str = "fail", fail_with: BaseException | None = None) -> None:
        self.run_dir = RunDirectory(tmp_path, "run")
        self.buffer = MemoryBuffer()
        self.fail_with = fail_with
        self.counted = 0
        self.checkpoints = Checkpoints(
            self.run_dir,
            self.buffer,
            self.save_learner,
            keep_last=0,
            on_error=on_error,
            on_failure=self.count,
        )
        self.step = 0

    def count(self) -> None:
        self.counted += 1

    def save_learner(self, path: Path) -> None:
        learner_files(path, self.step)
        if self.fail_with is not None:
            raise self.fail_with

    def train(self, steps: int) -> list[str]:
        """`steps` steps of two groups each, through the buffer."""
        ids = []
        for _ in range(steps):
            self.step += 1
            groups = [trained_group(self.step * 10 + i) for i in range(2)]
            self.buffer.put_many(groups)
            taken = self.buffer.take(2, min_policy_version=0)
            self.checkpoints.trained(g.id for g in taken)
            ids.extend(g.id for g in taken)
        return ids

    def commit(self) -> str | None:
        return self.checkpoints.commit(state(self.step), "periodic")

    def events(self) -> str:
        return (self.run_dir.path / "events.log").read_text()


def test_a_commit_renames_a_whole_checkpoint_into_place_with_its_manifest(tmp_path):
    run = Run(tmp_path)
    run.train(2)
    path = Path(run.commit())
    assert path == checkpoint_path(run.run_dir, 2) and read_step(path) == 2
    manifest = json.loads((path / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted([DRIVER_STATE, WEIGHTS, "latest", "step1/optim_states.pt"])
    assert manifest["files"][WEIGHTS]["size"] == (path / WEIGHTS).stat().st_size
    assert verify(path) is None
    assert leftover_directories(run.run_dir) == []
    assert run.buffer.stats()["acked"] == 4 and run.buffer.pending_count() == 0
    assert "checksummed and synced in" in run.events()


def flip_a_byte(checkpoint: Path) -> str:
    data = bytearray((checkpoint / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / WEIGHTS).write_bytes(bytes(data))
    return "checksum mismatch"


def truncate(checkpoint: Path) -> str:
    data = (checkpoint / WEIGHTS).read_bytes()
    (checkpoint / WEIGHTS).write_bytes(data[:100])
    return f"has 100 bytes, the manifest says {len(data)}"


def remove(checkpoint: Path) -> str:
    (checkpoint / WEIGHTS).unlink()
    return "is missing"


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, remove], ids=["flipped-byte", "truncated", "missing"])
def test_resuming_skips_a_damaged_newest_checkpoint_with_the_reason_and_falls_back(tmp_path, damage):
    run = Run(tmp_path)
    run.train(2)
    previous = Path(run.commit())
    run.train(2)
    newest = Path(run.commit())
    reason = damage(newest)
    assert verify(newest) is not None and reason in verify(newest)
    assert latest_checkpoint(run.run_dir) == newest  # complete, but not intact: only verification tells

    logged: list[str] = []
    assert resume_checkpoint(run.run_dir, logged.append) == previous
    assert logged[0].startswith(f"checkpoint {newest} skipped: {WEIGHTS}") and reason in logged[0]
    assert "falling back to the previous complete checkpoint" in logged[1] and str(previous) in logged[1]
    # set aside: not resumed from again, not counted by pruning, and step 4 can be written again
    assert not newest.exists() and latest_checkpoint(run.run_dir) == previous
    [aside] = (run.run_dir.path / "checkpoints").glob(".step-4.damaged-*")
    assert (aside / WEIGHTS).exists() or damage is remove


def test_a_checkpoint_with_an_unreadable_manifest_is_skipped(tmp_path):
    run = Run(tmp_path)
    run.train(1)
    previous = Path(run.commit())
    run.train(1)
    newest = Path(run.commit())
    (newest / MANIFEST).write_text('{"files": ')
    logged: list[str] = []
    assert select_checkpoint(run.run_dir, logged.append).checkpoint == previous
    assert f"{MANIFEST} unreadable" in logged[0]


def test_when_no_checkpoint_verifies_resuming_is_refused_with_every_reason(tmp_path):
    run = Run(tmp_path)
    run.train(1)
    first = Path(run.commit())
    run.train(1)
    second = Path(run.commit())
    remove(first), truncate(second)
    with pytest.raises(DriverError, match="none of its checkpoints verifies") as raised:
        resume_checkpoint(run.run_dir, lambda _: None)
    assert f"step-2: {WEIGHTS} has 100 bytes" in str(raised.value) and f"step-1: {WEIGHTS} is missing" in str(
        raised.value
    )
    with pytest.raises(DriverError, match="has no checkpoint"):
        resume_checkpoint(RunDirectory(tmp_path, "empty"), lambda _: None)


def test_a_leftover_of_an_unfinished_write_is_never_a_checkpoint_and_is_removed(tmp_path):
    run = Run(tmp_path)
    run.train(2)
    previous = Path(run.commit())
    # a process killed while writing step 4: the learner's files are there, the manifest is not
    leftover = run.run_dir.path / "checkpoints" / ".step-4.tmp-4242-abcdef"
    learner_files(leftover, 4)
    state(4).write(run.run_dir, leftover)
    assert latest_checkpoint(run.run_dir) == previous
    assert resume_checkpoint(run.run_dir, lambda _: None) == previous
    assert leftover_directories(run.run_dir) == [leftover]

    restarted = Run(tmp_path)  # the next start removes it, and says so
    assert leftover_directories(run.run_dir) == [] and not leftover.exists()
    assert f"removed {leftover}" in restarted.events()
    learner_files(leftover, 4)
    assert leftover in prune_checkpoints(run.run_dir, keep=0) and not leftover.exists()


def test_a_checkpoint_from_before_manifests_is_used_unverified_with_a_warning(tmp_path):
    run_dir = RunDirectory(tmp_path, "old")
    legacy = checkpoint_path(run_dir, 3)
    learner_files(legacy, 3)
    state(3).write(run_dir, legacy)
    cut_short = checkpoint_path(run_dir, 6)  # old layout, killed before driver.json: never a checkpoint
    learner_files(cut_short, 6)
    logged: list[str] = []
    assert resume_checkpoint(run_dir, logged.append) == legacy
    assert logged == [
        f"warning: checkpoint {legacy} has no {MANIFEST} (written before checkpoints had one): its files cannot "
        "be verified; using it as it is"
    ]


def test_a_cut_short_old_layout_directory_is_replaced_when_its_step_is_written_again(tmp_path):
    run = Run(tmp_path)
    cut_short = checkpoint_path(run.run_dir, 2)
    learner_files(cut_short, 99)
    run.train(2)
    assert run.commit() == str(cut_short)
    assert verify(cut_short) is None and read_step(cut_short) == 2
    assert (cut_short / "latest").read_text() == "step2"
    assert leftover_directories(run.run_dir) == []  # the replaced directory included


def test_a_checkpoint_that_cannot_be_written_fails_the_run_by_default(tmp_path):
    run = Run(tmp_path)
    run.train(2)
    previous = run.commit()
    run.train(1)
    run.fail_with = OSError(errno.ENOSPC, "No space left on device", "model.safetensors")
    with pytest.raises(CheckpointFailed) as raised:
        run.commit()
    message = str(raised.value)
    assert str(checkpoint_path(run.run_dir, 3)) in message and "[Errno 28] No space left on device" in message
    assert f"the previous checkpoint {previous} is intact (checkpoint.on_error=fail)" in message
    assert isinstance(raised.value, DriverError)  # the CLI reports it without a traceback
    assert not checkpoint_path(run.run_dir, 3).exists() and leftover_directories(run.run_dir) == []
    assert run.buffer.pending_count() == 2 and run.buffer.stats()["acked"] == 4


def test_keep_previous_skips_a_checkpoint_that_cannot_be_written_and_acknowledges_nothing(tmp_path):
    run = Run(tmp_path, on_error="keep_previous")
    run.train(2)
    previous = run.commit()
    run.train(1)
    run.fail_with = PermissionError(errno.EACCES, "Permission denied", "checkpoints")
    assert run.commit() is None
    assert run.counted == 1 and run.checkpoints.failures == 1
    assert run.checkpoints.paths == [previous] and latest_checkpoint(run.run_dir) == Path(previous)
    assert leftover_directories(run.run_dir) == [] and not checkpoint_path(run.run_dir, 3).exists()
    assert run.buffer.pending_count() == 2 and run.buffer.stats()["acked"] == 4  # a resume trains them again
    events = run.events()
    assert "checkpoint (periodic) at step 3 could not be written" in events and "Permission denied" in events
    assert f"kept the previous checkpoint {previous}, the 2 groups trained since stay unacknowledged" in events
    # the next checkpoint that can be written acknowledges them with its own
    run.fail_with = None
    run.train(1)
    assert run.commit() == str(checkpoint_path(run.run_dir, 4))
    assert run.buffer.pending_count() == 0 and run.buffer.stats()["acked"] == 8


def test_a_learner_that_dies_while_writing_is_not_a_write_failure(tmp_path):
    run = Run(tmp_path, on_error="keep_previous")
    run.train(1)
    run.fail_with = LearnerDied("the learner died while checkpointing step 1")
    with pytest.raises(LearnerDied):
        run.commit()
    assert run.checkpoints.failures == 0 and leftover_directories(run.run_dir) == []
    assert latest_checkpoint(run.run_dir) is None


def test_an_error_that_is_not_about_storage_is_not_swallowed(tmp_path):
    run = Run(tmp_path, on_error="keep_previous")
    run.train(1)
    run.fail_with = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        run.commit()
    assert leftover_directories(run.run_dir) == []


def test_the_learners_write_error_is_found_through_the_ray_and_driver_errors(tmp_path):
    """What the driver receives: `LearnerGroup.save_checkpoint`'s DriverError, caused by Ray's task error,
    which carries the learner's CheckpointWriteError (itself made of torch's RuntimeError on a full disk)."""
    target = tmp_path / ".step-3.tmp-1-abc"
    remote = as_write_error(RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"), target)
    assert isinstance(remote, CheckpointWriteError) and remote.errno == errno.EIO
    assert "RuntimeError: [enforce fail" in str(remote) and "MiB free there" in str(remote)
    task_error = ray.exceptions.RayTaskError("save_checkpoint", "Traceback ...", remote).as_instanceof_cause()
    try:
        raise DriverError(f"learner checkpoint failed: {task_error}") from task_error
    except DriverError as error:
        assert write_failure(error) is remote
    # another learner rank's failure reaches the driver through rank 0's call: one task error inside another
    nested = ray.exceptions.RayTaskError("save_checkpoint", "Traceback ...", task_error).as_instanceof_cause()
    assert write_failure(nested) is remote
    kept = as_write_error(OSError(errno.EROFS, "Read-only file system", str(target / "model")), target)
    assert kept.errno == errno.EROFS and kept.filename == str(target / "model")
    assert str(kept).startswith("[Errno 30] Read-only file system (")


def test_a_restarted_learner_skips_a_damaged_checkpoint_of_the_run(tmp_path):
    run = Run(tmp_path)
    run.train(1)
    first = run.commit()
    run.train(1)
    second = run.commit()
    flip_a_byte(Path(second))
    assert run.checkpoints.restorable() == Path(first)
    assert run.checkpoints.paths == [first]
    assert f"checkpoint {second} skipped: {WEIGHTS} checksum mismatch" in run.events()
    flip_a_byte(Path(first))
    with pytest.raises(CheckpointFailed, match="none of the run's checkpoints verifies"):
        run.checkpoints.restorable()
