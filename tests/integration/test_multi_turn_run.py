"""A whole multi-turn run on a real local Ray: rollout workers call the sandboxed `python` tool mid-answer,
the trajectories go through the Redis buffer to the DeepSpeed learner, the run checkpoints and resumes."""

from __future__ import annotations

import json
import subprocess
import sys

from orchard.config import load_config
from orchard.services.compare import PLAIN_GRPO
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory

SETTINGS = [
    *PLAIN_GRPO,
    "max_minutes=null",
    "data.sources=[{kind: procedural, families: [big_multiplication], difficulties: [1]}]",
    "data.held_out_size=8",
    "warmstart.steps=120",
    "warmstart.batch_size=32",
    "rollout.group_size=4",
    "rollout.prompts_per_call=4",
    "rollout.max_new_tokens=48",
    "rollout.multi_turn={enabled: true, max_turns: 3, max_tool_calls: 2, tool_seconds: 2}",
    "learner.groups_per_step=4",
    "learner.dynamic_sampling=false",
    "eval.every_steps=2",
    "eval.num_prompts=8",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_layers=2",
    "buffer.backend=redis",
    "checkpoint.every_steps=2",
]


def test_a_multi_turn_run_trains_on_tool_trajectories_and_resumes(ray_local, tmp_path, warm_cache):
    config = load_config(None, [*SETTINGS, "max_steps=2", f"warmstart.cache_dir={warm_cache}", f"runs_dir={tmp_path}"])
    run_dir = RunDirectory(tmp_path, "tools")
    driver = Driver(config, run_dir, show_progress=False)
    summary = driver.run()
    assert summary["steps"] == 2 and summary["state"] == "finished"
    calls = summary["tool_calls"]
    assert sum(calls.values()) > 0 and set(calls) <= {f"python/{o}" for o in ("ok", "error", "limit")}, calls
    assert summary["buffer"]["acked"] == summary["trained_groups"] > 0

    resumed = subprocess.run(
        [sys.executable, "-m", "orchard", "run", "--resume", str(run_dir.path), "--set", "max_steps=3", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads((run_dir.path / "summary.json").read_text())
    assert again["steps"] == 3 and again["tool_calls"]
