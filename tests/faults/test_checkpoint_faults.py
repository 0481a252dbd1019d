"""Checkpoints under real faults: a run killed while writing one, a damaged checkpoint found at resume, a
read-only checkpoint directory and a disk that fills up (real local Ray, real DeepSpeed, real mounts).

The mounts need root with CAP_SYS_ADMIN; where mounting is refused those tests are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from orchard.services.control.run_control import RunState
from orchard.services.driver import Driver
from orchard.services.redis_server import find_redis_server
from orchard.services.run.checkpoints import MANIFEST, CheckpointFailed, verify
from orchard.services.run_dir import RunDirectory
from tests.e2e.tiny_run import TINY
from tests.faults.test_worker_death import run_in_thread
from tests.integration.test_driver import conservation, small_config
from tests.processes import ORCHARD, REPO, overrides, read_control_url, start_orchard

GROUPS_PER_STEP = 4  # learner.groups_per_step of TINY and of small_config


def complete_checkpoints(run_path: Path) -> list[Path]:
    found = [path for path in (run_path / "checkpoints").glob("step-*") if (path / MANIFEST).exists()]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step-")))


def unfinished(run_path: Path) -> list[Path]:
    return sorted((run_path / "checkpoints").glob(".step-*.tmp-*"))


@pytest.mark.skipif(find_redis_server() is None, reason="needs redis-server (apt-get install redis-server)")
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    """SIGKILL to the whole `orchard run` process group while a checkpoint is being written (its temporary
    directory exists): the previous checkpoint verifies and `--resume` continues from it, the leftover is
    removed, steps are contiguous and every group is acknowledged exactly once."""
    run_path = tmp_path / "runs" / "killed"
    settings = [*TINY, "buffer.backend=redis", "checkpoint.every_steps=1", f"warmstart.cache_dir={tmp_path / 'cache'}"]
    process = start_orchard("run", "--quiet", "--run-dir", str(run_path), *overrides(*settings, "max_steps=1000000"))
    try:
        read_control_url(process)
        leftover = freeze_while_writing(process, run_path)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    writing = int(leftover.name.split(".")[1].removeprefix("step-"))
    assert unfinished(run_path) == [leftover] and not (run_path / "checkpoints" / f"step-{writing}").exists()
    previous = complete_checkpoints(run_path)[-1]
    assert verify(previous) is None and int(previous.name.removeprefix("step-")) == writing - 1
    killed_at = max(json.loads(line)["step"] for line in (run_path / "metrics.jsonl").read_text().splitlines())

    total_steps = killed_at + 2
    resumed = subprocess.run(
        [*ORCHARD, "run", "--quiet", "--resume", str(run_path), *overrides(f"max_steps={total_steps}")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["resumed_from"] == str(previous)
    steps = [json.loads(line)["step"] for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total_steps + 1)), "the resumed curve repeats or skips steps"
    buffer = summary["buffer"]
    assert buffer["pending"] == 0 and buffer["acked"] == GROUPS_PER_STEP * total_steps
    events = (run_path / "events.log").read_text()
    assert f"removed {leftover}" in events and unfinished(run_path) == []
    assert f"resumed from {previous}" in events


def freeze_while_writing(process: subprocess.Popen, run_path: Path, timeout: float = 240.0) -> Path:
    """Stop (SIGSTOP) the run's process group the moment a checkpoint after the first is being written;
    returns its temporary directory. A checkpoint takes a fraction of a second: when the stop came too
    late (the checkpoint was renamed into place meanwhile) the run goes on and the next one is caught."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        writing = unfinished(run_path) if complete_checkpoints(run_path) else []
        if not writing:
            time.sleep(0.001)
            continue
        os.killpg(process.pid, signal.SIGSTOP)
        time.sleep(0.05)  # a system call under way when the signal came completes
        if unfinished(run_path) == writing:
            return writing[0]
        os.killpg(process.pid, signal.SIGCONT)
    raise AssertionError("no checkpoint was caught while being written")


def flip_a_byte(file: Path) -> None:
    """Damage that loading would not notice: one byte of the tensor data (past the safetensors header)."""
    data = bytearray(file.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    file.write_bytes(bytes(data))


def test_resume_skips_a_damaged_newest_checkpoint_and_falls_back_to_the_previous(ray_local, tmp_path, warm_cache):
    config = small_config(tmp_path, warm_cache, "max_steps=4", "buffer.backend=memory", "checkpoint.every_steps=2")
    run_dir = RunDirectory(tmp_path, "damaged")
    first = Driver(config, run_dir, show_progress=False).run()
    checkpoints = run_dir.path / "checkpoints"
    assert first["checkpoints"] == [str(checkpoints / "step-2"), str(checkpoints / "step-4")]
    flip_a_byte(checkpoints / "step-4" / "model" / "model.safetensors")

    resumed_config = small_config(
        tmp_path, warm_cache, "max_steps=5", "buffer.backend=memory", "checkpoint.every_steps=2"
    )
    summary = Driver(resumed_config, run_dir, show_progress=False, resume=True).run()
    assert summary["state"] == "finished" and summary["resumed_from"] == str(checkpoints / "step-2")
    assert [record["step"] for record in run_dir.read_metrics()] == [1, 2, 3, 4, 5]
    events = (run_dir.path / "events.log").read_text()
    assert f"checkpoint {checkpoints / 'step-4'} skipped: model/model.safetensors checksum mismatch (sha256" in events
    assert f"falling back to the previous complete checkpoint {checkpoints / 'step-2'}" in events
    assert [path.name for path in checkpoints.glob(".step-4.damaged-*")] != []  # kept for inspection
    assert verify(checkpoints / "step-4") is None and verify(checkpoints / "step-5") is None  # written anew
    conservation(summary)


# ------------------------------------------------------------------------------------------------ storage


def mount(*arguments: str) -> None:
    subprocess.run(["mount", *arguments], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("mount-probe")
    if shutil.which("mount") is None:
        pytest.skip("needs mount(8)")
    try:
        mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe))
    except subprocess.CalledProcessError as error:
        pytest.skip(f"needs to mount file systems (root with CAP_SYS_ADMIN): {error.stderr.strip()}")
    subprocess.run(["umount", str(probe)], check=True)


@contextmanager
def mounted(directory: Path, *steps: tuple[str, ...]) -> Iterator[Path]:
    """`directory` with the mounts `steps` on it (each a `mount` command line; one starting with "-o" is a
    remount, which adds no mount), all undone afterwards so that the test's files can be removed."""
    layers = 0
    try:
        for arguments in steps:
            mount(*arguments)
            layers += arguments[0] != "-o"
        yield directory
    finally:
        for _ in range(layers):
            subprocess.run(["umount", "-l", str(directory)], check=False)


def read_only(directory: Path) -> AbstractContextManager[Path]:
    """`directory` bind-mounted read-only onto itself: every write under it fails with EROFS, root's too."""
    return mounted(directory, ("--bind", str(directory), str(directory)), ("-o", "remount,bind,ro", str(directory)))


def test_a_read_only_checkpoint_directory_fails_the_run_with_the_reason(ray_local, tmp_path, warm_cache, can_mount):
    config = small_config(tmp_path, warm_cache, "max_steps=6", "buffer.backend=memory", "checkpoint.every_steps=2")
    run_dir = RunDirectory(tmp_path, "read-only")
    checkpoints = run_dir.path / "checkpoints"
    driver = Driver(config, run_dir, show_progress=False)
    with read_only(checkpoints):
        thread, outcome = run_in_thread(driver)
        thread.join(300)
    error = outcome.get("error")
    assert isinstance(error, CheckpointFailed), outcome
    message = str(error)
    assert f"checkpoint (periodic) at step 2 could not be written to {checkpoints / 'step-2'}" in message
    assert "[Errno 30] Read-only file system" in message and "no previous checkpoint is intact" in message
    assert driver.control.state is RunState.FAILED and "Read-only file system" in driver.control.reason
    events = (run_dir.path / "events.log").read_text()
    assert "run failed: CheckpointFailed: checkpoint (periodic) at step 2" in events
    assert list(checkpoints.iterdir()) == [] and not (run_dir.path / "summary.json").exists()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def checkpoint_while_paused(driver: Driver, after_step: int) -> None:
    """Pause the run past `after_step`, ask for a checkpoint and wait until it was taken or failed."""
    control = driver.control
    wait_for(lambda: driver.step > after_step, f"step {after_step + 1}")
    before = (len(driver.checkpoints), driver._checkpoints.failures)
    control.request_pause()
    wait_for(lambda: control.state is RunState.PAUSED, "the pause")
    control.request_checkpoint()
    wait_for(lambda: (len(driver.checkpoints), driver._checkpoints.failures) != before, "the checkpoint")


def test_a_full_disk_with_keep_previous_keeps_the_last_checkpoint_and_the_run_goes_on(
    ray_local, tmp_path, warm_cache, can_mount
):
    """The checkpoints' file system fills up after the first checkpoint (a tmpfs shrunk to what it holds):
    the next ones fail with ENOSPC, are logged and counted, the first stays whole, the run finishes, and
    the groups trained since the first stay pending (a resume trains them again), none lost."""
    config = small_config(
        tmp_path,
        warm_cache,
        "max_steps=8",
        "buffer.backend=memory",
        "checkpoint.every_steps=0",
        "checkpoint.on_error=keep_previous",
    )
    run_dir = RunDirectory(tmp_path, "disk-full")
    checkpoints = run_dir.path / "checkpoints"
    driver = Driver(config, run_dir, show_progress=False)
    with mounted(checkpoints, ("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(checkpoints))):
        thread, outcome = run_in_thread(driver)
        checkpoint_while_paused(driver, after_step=1)
        [kept] = map(Path, driver.checkpoints)
        full = shutil.disk_usage(checkpoints).used + 64 * 1024  # no room for a second checkpoint
        mount("-o", f"remount,size={full}", str(checkpoints))
        driver.control.request_resume()
        checkpoint_while_paused(driver, after_step=driver.step)  # fails; the run goes on when resumed
        assert driver._checkpoints.failures == 1
        driver.control.request_resume()
        thread.join(300)  # ... to its end, where the final checkpoint fails too
        assert "error" not in outcome, outcome.get("error")
        assert verify(kept) is None and [path.name for path in checkpoints.iterdir()] == [kept.name]
    summary = outcome["summary"]
    assert summary["state"] == "finished" and summary["steps"] == 8
    assert summary["checkpoints"] == [str(kept)]
    assert driver._checkpoints.failures == 2
    assert "orchard_checkpoint_failures_total 2.0" in driver.metrics.render().decode()
    events = (run_dir.path / "events.log").read_text()
    assert events.count("No space left on device") == 2 and events.count("(checkpoint.on_error=keep_previous") == 2
    assert f"kept the previous checkpoint {kept}" in events
    stats = summary["buffer"]
    acknowledged = GROUPS_PER_STEP * int(kept.name.removeprefix("step-"))
    assert stats["put"] == stats["acked"] + stats["ready"] + stats["pending"] + stats["stale"]
    assert stats["acked"] == acknowledged  # only the checkpoint that was written acknowledged its groups
    assert stats["pending"] == summary["trained_groups"] - acknowledged
