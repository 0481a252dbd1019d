"""The run directory's lock: one process runs a directory at a time, and a dead holder frees it at once.

`flock` locks belong to an open file, not to a process, so two `lock()` calls in this one process
conflict exactly as two processes would; the subprocess cases check what only a second process
shows (the pid in the message, the kernel releasing the lock of a killed holder).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchard.config import load_config
from orchard.services.cli import launch_holding_lock
from orchard.services.control.run_control import ControlConflict, RunState
from orchard.services.control.service import RunHandle
from orchard.services.run_dir import LOCK_FILE, RunDirectory, RunDirectoryLocked, ensure_unlocked

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from orchard.services.run_dir import RunDirectory
lock = RunDirectory(sys.argv[1], sys.argv[2]).lock()
print("locked", flush=True)
time.sleep(600)
"""


def digest(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory`: its content's hash and its modification time."""
    return {
        str(path.relative_to(directory)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def holder(tmp_path):
    """A second process holding `tmp_path/held`'s lock until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "held"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        process.kill()
        process.wait(30)


def test_opening_a_run_directory_takes_no_lock(tmp_path):
    first, second = RunDirectory(tmp_path, "run"), RunDirectory(tmp_path, "run")
    assert not (first.path / LOCK_FILE).exists()
    with first.lock():
        pass
    with second.lock():
        pass


def test_the_lock_records_the_pid_and_refuses_a_second_holder(tmp_path):
    run_dir = RunDirectory(tmp_path, "run")
    with run_dir.lock() as lock:
        assert lock.held
        assert (run_dir.path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunDirectoryLocked) as refused:
            RunDirectory(tmp_path, "run").lock()
        assert refused.value.pid == os.getpid() and refused.value.path == run_dir.path
        assert str(run_dir.path) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    assert not lock.held
    with RunDirectory(tmp_path, "run").lock():  # released: free for the next run
        pass


def test_a_refused_attempt_changes_no_file(tmp_path, holder):
    run_path = tmp_path / "held"
    (run_path / "config.yaml").write_text("max_steps: 3\n")
    before = digest(run_path)
    with pytest.raises(RunDirectoryLocked) as refused:
        RunDirectory(tmp_path, "held").lock()
    with pytest.raises(RunDirectoryLocked):
        ensure_unlocked(run_path)
    assert refused.value.pid == holder.pid and f"pid {holder.pid}" in str(refused.value)
    assert digest(run_path) == before


def test_a_killed_holder_frees_the_directory_at_once(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    ensure_unlocked(tmp_path / "held")
    with RunDirectory(tmp_path, "held").lock():
        assert (tmp_path / "held" / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the stale pid is replaced


def test_ensure_unlocked_creates_nothing(tmp_path):
    ensure_unlocked(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    run_dir = RunDirectory(tmp_path, "run")
    ensure_unlocked(run_dir.path)
    assert not (run_dir.path / LOCK_FILE).exists()
    with run_dir.lock():
        with pytest.raises(RunDirectoryLocked):
            ensure_unlocked(run_dir.path)
    ensure_unlocked(run_dir.path)  # a lock file left behind blocks nothing


def fake_launch(release: threading.Event):
    """A launcher whose run thread lasts until `release` is set."""

    def launch(handle: RunHandle) -> None:
        handle.thread = threading.Thread(target=release.wait, daemon=True)
        handle.thread.start()

    return launch


def test_a_run_launched_over_rest_holds_its_directory_until_its_thread_ends(tmp_path):
    handle = RunHandle(load_config(None), RunDirectory(tmp_path, "served"))
    release = threading.Event()
    launch_holding_lock(handle, fake_launch(release))
    with pytest.raises(RunDirectoryLocked):
        ensure_unlocked(handle.run_dir.path)
    release.set()
    handle.thread.join(10)
    for _ in range(200):  # the releasing thread joins the run's thread, then releases
        try:
            ensure_unlocked(handle.run_dir.path)
            break
        except RunDirectoryLocked:
            time.sleep(0.05)
    else:
        pytest.fail("the lock outlived the run's thread")


def test_a_run_over_rest_whose_directory_is_held_fails_as_a_conflict(tmp_path):
    handle = RunHandle(load_config(None), RunDirectory(tmp_path, "taken"))
    launched: list[RunHandle] = []
    with handle.run_dir.lock():
        with pytest.raises(ControlConflict, match="in use by another orchard process"):
            launch_holding_lock(handle, launched.append)
    assert launched == [] and handle.control.state is RunState.FAILED
    assert "in use" in (handle.control.reason or "")
