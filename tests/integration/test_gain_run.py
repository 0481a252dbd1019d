"""GAIN-RL in a real run: the driver ranks the pool with the starting weights, samples from the ranking,
moves the Gaussian's mean after each learner step, and keeps the curriculum state in Redis."""

from __future__ import annotations

import pytest

from orchard.services.buffer.redis_buffer import RedisBuffer
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config


def test_a_short_run_with_gain_selection(ray_local, tmp_path, warm_cache, redis_server):
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=redis",
        f"buffer.redis_url={redis_server.url}",
        "buffer.namespace=gain",
        "curriculum.selection=gain",
        "curriculum.gain.step=0.2",
        "curriculum.gain.adj_max=0.4",
    )
    run_dir = RunDirectory(tmp_path, "gain")
    driver = Driver(config, run_dir, show_progress=False)
    summary = driver.run()
    conservation(summary)
    events = (run_dir.path / "events.log").read_text()
    # 60 prompts, 10 held out: the rest ranked, once, before the learner started
    assert "GAIN-RL ranking: 50 prompts" in events and " s on cpu" in events
    assert events.index("GAIN-RL ranking") < events.index("run running")
    gain = driver.sampler.gain
    assert len(gain.ranked) == 50 and gain.concentrations == sorted(gain.concentrations, reverse=True)
    records = run_dir.read_metrics()
    centers = [record["gain_center"] for record in records]
    assert len(centers) == 3 and all(0.0 <= center <= 49.0 for center in centers)
    assert centers == sorted(centers)  # adj_min 0: the mean never moves back
    assert sum(records[-1]["scheduler_probabilities"].values()) == pytest.approx(1.0)
    # a restarted driver finds the ranking and the mean where this one left them
    saved = RedisBuffer(redis_server.url, "gain").load_state("curriculum")
    restored = PromptSampler(driver.prompt_pool, config.curriculum, seed=config.seed)
    restored.load_bytes(saved)
    assert restored.gain.ranked == gain.ranked and restored.gain.mean == centers[-1]
