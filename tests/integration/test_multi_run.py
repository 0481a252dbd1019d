"""Two runs trained at once by one control plane, on a real local Ray (4 CPUs) and one real Redis.

Each run reserves its own placement groups (a learner and a worker: 2 CPUs each), keeps its groups
under its own buffer namespace and writes its own run directory; pausing one and stopping the other
leave each other's state as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis

from orchard.services.control.run_control import RunState
from orchard.services.control.service import ControlService, RunHandle
from tests.integration.test_driver import conservation, small_config


def wait_for(condition: Callable[[], object], what: str, timeout: float = 180.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def keys_of(client: redis.Redis, run: RunHandle) -> set[bytes]:
    return set(client.keys(f"orchard:{run.id}:*"))


def test_two_runs_side_by_side_one_paused_one_stopped(ray_local, redis_server, tmp_path, warm_cache):
    service = ControlService(max_active_runs=2)
    shared = [
        "buffer.backend=redis",
        f"buffer.redis_url={redis_server.url}",
        "cluster.placement_groups=true",
        "max_steps=100000",
        "eval.every_steps=1000",
    ]
    alpha = service.create_run(small_config(tmp_path, warm_cache, *shared, "name=alpha", "seed=1"))
    beta = service.create_run(small_config(tmp_path, warm_cache, *shared, "name=beta", "seed=2"))
    assert alpha.id != beta.id
    wait_for(lambda: alpha.status().step >= 2 and beta.status().step >= 2, "two steps of each run")

    service.pause(alpha.id)
    wait_for(lambda: alpha.control.state is RunState.PAUSED, "alpha to settle into paused")
    paused = alpha.status()
    client = redis.Redis.from_url(redis_server.url)
    alpha_keys = keys_of(client, alpha)
    assert alpha_keys and not alpha_keys & keys_of(client, beta)
    beta_at_pause = beta.status().step
    wait_for(lambda: beta.status().step >= beta_at_pause + 3, "beta to train on while alpha is paused")
    assert alpha.status().step == paused.step and alpha.status().buffer == paused.buffer

    exposition = service.render_metrics().decode()
    assert f'orchard_run_state{{run="{alpha.id}",state="paused"}} 1.0' in exposition
    assert f'orchard_run_state{{run="{beta.id}",state="running"}} 1.0' in exposition

    service.stop(beta.id)
    beta.thread.join(180)
    assert beta.control.state is RunState.STOPPED
    # stopping beta touched nothing of alpha: its state, buffer and keys are as they were
    assert alpha.control.state is RunState.PAUSED
    assert alpha.status().step == paused.step and alpha.status().buffer == paused.buffer
    assert keys_of(client, alpha) == alpha_keys

    service.resume(alpha.id)
    wait_for(lambda: alpha.status().step >= paused.step + 2, "alpha to train again after resume")
    service.stop(alpha.id)
    alpha.thread.join(180)
    assert alpha.control.state is RunState.STOPPED

    summaries = {}
    for run in (alpha, beta):
        summary = json.loads((run.run_dir.path / "summary.json").read_text())
        assert summary["run_id"] == run.id and summary["state"] == "stopped"
        conservation(summary)
        summaries[run.id] = summary
    assert summaries[alpha.id]["steps"] >= paused.step + 2 and summaries[beta.id]["steps"] >= beta_at_pause + 3
    assert alpha.run_dir.path != beta.run_dir.path
