"""The `orchard` command as a user runs it: a subprocess, exit codes, files on disk."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from orchard.services.run_dir import RunDirectory
from tests.e2e.tiny_run import TINY, TINY_DEMO
from tests.processes import ORCHARD, REPO, overrides, read_control_url, start_orchard


def orchard(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*ORCHARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_demo_run_end_to_end(tmp_path):
    """The demo as it is (UCB scheduler, DeepSearch), shrunk to seconds."""
    run_path = tmp_path / "runs" / "demo-e2e"
    result = orchard(
        "run",
        "--quiet",
        "--run-dir",
        str(run_path),
        *overrides(*TINY_DEMO, f"warmstart.cache_dir={tmp_path / 'cache'}"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out accuracy" in result.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward.png"):
        assert (run_path / name).exists(), name
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["steps"] == 2
    assert {"held_out_accuracy_initial", "held_out_accuracy_final"} <= set(summary)


def test_bad_config_exits_2_naming_fields(tmp_path):
    result = orchard("run", *overrides("learner.lr=fast", "rollout.bogus=1"))
    assert result.returncode == 2
    assert "learner.lr" in result.stderr and "rollout.bogus" in result.stderr


def test_unreachable_redis_is_a_clear_error_and_non_zero_exit(tmp_path):
    result = orchard(
        "run",
        "--quiet",
        "--run-dir",
        str(tmp_path / "run"),
        *overrides(
            *TINY, "buffer.backend=redis", "buffer.redis_url=redis://127.0.0.1:1/0", "buffer.reconnect_seconds=2"
        ),
        timeout=300,
    )
    assert result.returncode == 1
    assert "redis://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def digest(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory`: its content's hash and its modification time."""
    return {
        str(path.relative_to(directory)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def wait_for(condition: Callable[[], object], what: str, timeout: float = 240.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_a_directory_in_use_is_refused_and_a_killed_run_resumes_at_once(tmp_path):
    """A second `orchard run` of a directory another one runs exits 1 naming the directory and the
    pid, and changes no file of it; SIGKILL frees the directory, so the run resumes straight away."""
    run_path = tmp_path / "runs" / "held"
    settings = [*TINY, f"warmstart.cache_dir={tmp_path / 'cache'}"]
    first = start_orchard("run", "--quiet", "--paused", "--run-dir", str(run_path), *overrides(*settings))
    try:
        http = httpx.Client(base_url=read_control_url(first), timeout=30)
        wait_for(lambda: http.get("/v1/runs").json()[0]["state"] == "paused", "the run to settle paused")
        assert http.post("/v1/runs/held/checkpoint").status_code == 202  # taken while paused: something to resume
        wait_for(lambda: http.get("/v1/runs/held").json()["checkpoints"], "the checkpoint")
        time.sleep(1)  # the checkpoint's last writes
        before = digest(run_path)
        for second in (
            orchard("run", "--quiet", "--resume", str(run_path), timeout=120),
            orchard("run", "--quiet", "--run-dir", str(run_path), *overrides(*settings), timeout=120),
        ):
            assert second.returncode == 1, second.stdout + second.stderr
            assert f"run directory {run_path} is in use" in second.stderr and f"pid {first.pid}" in second.stderr
            assert "Traceback" not in second.stderr
            assert digest(run_path) == before, "a refused run changed the directory"
        assert http.get("/v1/runs/held").json()["state"] == "paused"  # the first run did not notice
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    resumed = orchard("run", "--quiet", "--resume", str(run_path), *overrides("max_steps=1"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_path / "checkpoints" / "step-0") and summary["steps"] == 1


def test_a_busy_control_port_is_named_and_the_run_directory_left_untouched(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fresh = tmp_path / "runs" / "fresh"
        result = orchard("run", "--quiet", "--run-dir", str(fresh), *overrides(f"control.port={port}"), timeout=120)
        assert result.returncode == 2, result.stderr
        assert f"127.0.0.1:{port}: another process is already listening there" in result.stderr
        assert "Traceback" not in result.stderr
        assert not fresh.exists()
        existing = tmp_path / "runs" / "existing"  # resuming: the directory exists, and stays as it was
        (existing / "checkpoints").mkdir(parents=True)
        (existing / "config.yaml").write_text(f"control:\n  port: {port}\n")
        before = digest(existing)
        result = orchard("run", "--quiet", "--resume", str(existing), timeout=120)
        assert result.returncode == 2 and f"127.0.0.1:{port}" in result.stderr
        assert digest(existing) == before
        with RunDirectory(existing.parent, existing.name).lock():  # a run holds it (and its port is busy)
            before = digest(existing)
            result = orchard("run", "--quiet", "--resume", str(existing), timeout=120)
            assert result.returncode == 1, result.stderr  # the directory is the conflict to report
            assert f"run directory {existing} is in use" in result.stderr and f"pid {os.getpid()}" in result.stderr
            assert digest(existing) == before


def test_compare_runs_plain_grpo_and_the_config_per_seed_and_draws_them(tmp_path):
    out = tmp_path / "compare"
    settings = overrides(*TINY, "eval.every_steps=1", f"warmstart.cache_dir={tmp_path / 'cache'}")
    settings += overrides("curriculum.scheduler=ucb", "curriculum.difficulty_filter.enabled=true")
    result = orchard("compare", "--seeds", "0", "--minutes", "2", "--out", str(out), *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "compare.json").read_text())
    assert set(table["arms"]) == {"grpo", "config"} and table["difference"]["seeds"] == 1
    plain = yaml.safe_load((out / "grpo-seed0" / "config.yaml").read_text())
    ours = yaml.safe_load((out / "config-seed0" / "config.yaml").read_text())
    assert plain["curriculum"]["scheduler"] == "uniform" and not plain["curriculum"]["difficulty_filter"]["enabled"]
    assert ours["curriculum"]["scheduler"] == "ucb" and ours["curriculum"]["difficulty_filter"]["enabled"]
    assert plain["max_minutes"] == ours["max_minutes"] == 2
    assert (out / "compare.png").stat().st_size > 10_000
    assert "config − grpo" in result.stdout
    # redrawn from the directories alone; a directory without runs is named
    assert orchard("compare", "--report-only", "--out", str(out)).returncode == 0
    empty = orchard("compare", "--report-only", "--out", str(tmp_path / "none"))
    assert empty.returncode == 1 and "no finished compared runs" in empty.stderr
    # a plain GRPO config compared with itself is refused before anything runs
    (tmp_path / "plain.yaml").write_text("name: plain\nmax_minutes: 1\n")
    same = orchard("compare", str(tmp_path / "plain.yaml"), "--out", str(tmp_path / "same"))
    assert same.returncode == 2 and "plain GRPO already" in same.stderr and not (tmp_path / "same").exists()
