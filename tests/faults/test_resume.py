"""Kill a run for real (SIGKILL to its whole process group), resume it, and check nothing was lost.

Conservation law: every group generated is either acknowledged exactly once (trained on, and
committed by a checkpoint) or still in the buffer; the resumed run's metrics continue the same
curve with the same step numbering, with no step repeated or skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from orchard.services.redis_server import find_redis_server
from tests.e2e.tiny_run import TINY
from tests.processes import ORCHARD, REPO, overrides, read_control_url, start_orchard

GROUPS_PER_STEP = 4  # TINY's learner.groups_per_step


def redis_servers_in(directory: Path) -> list[int]:
    """Pids of redis-server processes working in `directory` (redis rewrites its command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() == "redis-server" and Path(os.readlink(proc / "cwd")) == directory:
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(find_redis_server() is None, reason="needs redis-server (apt-get install redis-server)")
def test_a_killed_run_resumes_from_its_checkpoint_losing_and_repeating_nothing(tmp_path):
    run_path = tmp_path / "runs" / "killed"
    settings = [*TINY, "buffer.backend=redis", "checkpoint.every_steps=0", f"warmstart.cache_dir={tmp_path / 'cache'}"]
    process = start_orchard("run", "--quiet", "--run-dir", str(run_path), *overrides(*settings, "max_steps=1000000"))
    try:
        url = read_control_url(process)

        def status() -> dict:
            runs = httpx.get(f"{url}/v1/runs", timeout=10).json()
            return runs[0] if runs else {"step": 0, "checkpoints": []}

        deadline = time.monotonic() + 240
        while status()["step"] < 3:
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        run_id = status()["id"]
        assert httpx.post(f"{url}/v1/runs/{run_id}/checkpoint", timeout=10).status_code == 202
        while not status()["checkpoints"]:
            assert time.monotonic() < deadline, "the checkpoint was not taken"
            time.sleep(0.05)
        checkpointed = int(Path(status()["checkpoints"][-1]).name.removeprefix("step-"))
        while status()["step"] < checkpointed + 2:  # trained groups the checkpoint does not cover
            assert time.monotonic() < deadline, "the run stopped advancing"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    killed_at = max(json.loads(line)["step"] for line in (run_path / "metrics.jsonl").read_text().splitlines())
    assert not (run_path / "summary.json").exists()

    total_steps = killed_at + 3
    resumed = subprocess.run(
        [*ORCHARD, "run", "--quiet", "--resume", str(run_path), *overrides(f"max_steps={total_steps}")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]

    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_path / "checkpoints" / f"step-{checkpointed}")
    steps = [json.loads(line)["step"] for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total_steps + 1)), "the resumed curve repeats or skips steps"
    assert summary["steps"] == total_steps

    buffer = summary["buffer"]
    assert (
        buffer["put"] - buffer["duplicates"] == buffer["ready"] + buffer["pending"] + buffer["acked"] + buffer["stale"]
    )
    assert buffer["pending"] == 0
    assert buffer["acked"] == GROUPS_PER_STEP * total_steps, "a group was lost or trained twice after acknowledgement"
    # the steps trained after the checkpoint, and perhaps one the learner had taken when killed
    assert (
        GROUPS_PER_STEP * (killed_at - checkpointed)
        <= buffer["requeued"]
        <= GROUPS_PER_STEP * (killed_at - checkpointed + 1)
    )
    events = (run_path / "events.log").read_text()
    assert f"resumed from {summary['resumed_from']}" in events
    # the killed run's private redis-server was stopped before its data was reopened; none is left
    assert redis_servers_in(run_path / "redis") == [], "a redis-server of the run is still running"


def test_resuming_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    run_path = tmp_path / "never-checkpointed"
    run_path.mkdir()
    (run_path / "config.yaml").write_text("max_steps: 3\n")
    result = subprocess.run(
        [*ORCHARD, "run", "--quiet", "--resume", str(run_path), *overrides(*TINY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "has no checkpoint" in result.stderr and str(run_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_needs_a_run_directory(tmp_path):
    result = subprocess.run([*ORCHARD, "run", "--resume", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a run directory" in result.stderr
