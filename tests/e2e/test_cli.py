"""The `orchard` command as a user runs it: a subprocess, exit codes, files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.tiny_run import TINY

REPO = Path(__file__).resolve().parents[2]
ORCHARD = [sys.executable, "-m", "orchard"]


def orchard(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*ORCHARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def overrides(*pairs: str) -> list[str]:
    return [item for pair in pairs for item in ("--set", pair)]


def test_demo_run_end_to_end(tmp_path):
    run_path = tmp_path / "runs" / "demo-e2e"
    result = orchard(
        "run", "--quiet", "--run-dir", str(run_path), *overrides(*TINY, f"warmstart.cache_dir={tmp_path / 'cache'}")
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
