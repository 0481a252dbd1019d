"""Chaos over one run: rollout workers, the learner and redis-server fail at random moments, several
times each, while an operator asks for checkpoints and pauses, and the run still finishes with
every group accounted for (`tests/faults/chaos.py`).

`make test` runs one seeded round of a few hundred steps; `make chaos` runs rounds of the size asked
(`CHAOS_STEPS`, `CHAOS_FAULTS` of each kind, from `CHAOS_SEED`) for `CHAOS_MINUTES`.
"""

from __future__ import annotations

import os
import time

from orchard.services.driver import Driver
from orchard.services.redis_server import RedisServer
from orchard.services.run_dir import RunDirectory
from tests.faults.chaos import AckLedger, Chaos, Fault, FaultKind, group_ledger, plan, redis_servers_on, running
from tests.faults.test_worker_death import run_in_thread
from tests.integration.test_driver import small_config

STEPS = int(os.environ.get("ORCHARD_CHAOS_STEPS", "300"))
FAULTS_EACH = int(os.environ.get("ORCHARD_CHAOS_FAULTS", "3"))
SEED = int(os.environ.get("ORCHARD_CHAOS_SEED", "0"))
MINUTES = float(os.environ.get("ORCHARD_CHAOS_MINUTES", "0"))  # 0: one round
WORKERS = 2
GROUPS_PER_STEP = 4  # small_config's learner.groups_per_step


def test_a_run_survives_workers_the_learner_and_redis_failing_again_and_again(ray_local, tmp_path, warm_cache, capsys):
    deadline = time.monotonic() + 60 * MINUTES
    seed = SEED
    while True:
        server = RedisServer(appendonly=True, directory=tmp_path / f"redis-{seed}").start()
        try:
            report = chaos_round(tmp_path, warm_cache, server, seed)
        finally:
            server.stop()
        with capsys.disabled():
            print(f"\nchaos seed {seed}: {report}")
        seed += 1
        if time.monotonic() > deadline:
            break


def chaos_round(tmp_path, warm_cache, server: RedisServer, seed: int) -> str:
    config = small_config(
        tmp_path,
        warm_cache,
        f"max_steps={STEPS}",
        "buffer.backend=redis",
        f"buffer.redis_url={server.url}",
        f"rollout.num_workers={WORKERS}",
        "checkpoint.every_steps=10",
        "eval.every_steps=100",
        "supervision.max_worker_restarts=1000",
        "supervision.max_learner_restarts=1000",
    )
    run_dir = RunDirectory(tmp_path, f"chaos-{seed}")
    driver = Driver(config, run_dir, show_progress=False)
    faults = plan(seed, STEPS, FAULTS_EACH, workers=WORKERS)
    with AckLedger().observing() as acks:
        chaos = Chaos(driver, server, faults, log=run_dir.event).start()
        thread, outcome = run_in_thread(driver)
        thread.join(60 * (10 + STEPS / 20))
        chaos.stop()
    assert chaos.error is None, f"the injector failed: {chaos.error!r}"
    assert not thread.is_alive(), f"the run did not finish; events:\n{(run_dir.path / 'events.log').read_text()}"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]

    # every planned fault was injected, and each kill was noticed and repaired
    assert chaos.remaining == 0, f"{chaos.remaining} faults were not injected before the run ended"
    assert summary["state"] == "finished" and summary["steps"] == STEPS
    assert summary["worker_restarts"] == chaos.injected["worker"]
    assert summary["learner_restarts"] == chaos.injected["learner"]
    steps = [record["step"] for record in run_dir.read_metrics()]
    assert steps == list(range(1, STEPS + 1)), "the steps repeat or skip"
    versions = [record["policy_version"] for record in run_dir.read_metrics()]
    assert versions == sorted(versions), "policy versions went back"

    # the conservation law, group by group; each trained step's groups acknowledged exactly once
    ledger = group_ledger(server.url, run_dir.run_id, acks.ids)
    assert ledger.pending == 0
    assert ledger.acknowledged == GROUPS_PER_STEP * STEPS

    # nothing left behind: every actor process the run had, and the redis-server once stopped
    left = running(chaos.pids)
    for _ in range(100):
        if not left:
            break
        time.sleep(0.3)
        left = running(chaos.pids)
    assert not left, f"processes of the run still running: {left}"
    server.stop()
    assert not redis_servers_on(server.port)
    return (
        f"{STEPS} steps finished; survived {chaos.injected['worker']} worker kills, "
        f"{chaos.injected['learner']} learner kills, {chaos.injected['redis']} redis-server restarts, "
        f"{chaos.injected['control']} checkpoint or pause requests "
        f"({driver.buffer.retries} buffer calls retried); groups: {ledger.stored} stored = "
        f"{ledger.acknowledged} acknowledged once + {ledger.ready} ready + {ledger.dropped} stale; "
        f"{len(chaos.pids)} actor processes, none left; {summary['rl_seconds']:.0f} s of RL"
    )


def test_a_learner_killed_again_while_it_is_being_restored_is_replaced_again(ray_local, tmp_path, warm_cache):
    """The second kill finds the new learner as soon as it answers, that is while the driver restores it
    from the checkpoint (or just after): either way the run goes on, one restart per kill."""
    with RedisServer(appendonly=True, directory=tmp_path / "redis") as server:
        config = small_config(
            tmp_path,
            warm_cache,
            "max_steps=30",
            "buffer.backend=redis",
            f"buffer.redis_url={server.url}",
            "checkpoint.every_steps=5",
        )
        run_dir = RunDirectory(tmp_path, "killed-twice")
        driver = Driver(config, run_dir, show_progress=False)
        twice = [Fault(FaultKind.LEARNER, 12, 0.0), Fault(FaultKind.LEARNER, 12, 0.0)]
        chaos = Chaos(driver, server, twice, log=run_dir.event).start()
        thread, outcome = run_in_thread(driver)
        thread.join(600)
        chaos.stop()
    assert chaos.error is None and chaos.remaining == 0
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["steps"] == 30 and outcome["summary"]["learner_restarts"] == 2
    assert [record["step"] for record in run_dir.read_metrics()] == list(range(1, 31))
