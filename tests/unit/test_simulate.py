"""bench/simulate.py: the event simulation against pipelines whose throughput and staleness are known
in closed form, and the GPU-scale cost model's shape."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "simulate.py"
spec = importlib.util.spec_from_file_location("orchard_bench_simulate", PATH)
simulate_module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = simulate_module
spec.loader.exec_module(simulate_module)

PipelineCosts = simulate_module.PipelineCosts
simulate = simulate_module.simulate

B, G, L = 8, 4, 100  # groups per step, completions per group, tokens per completion
TOKEN_SECONDS = 0.01  # one decode step
GENERATION = L * TOKEN_SECONDS  # one batch, when the engine holds all of it


def pipeline(**changes) -> PipelineCosts:
    """One engine holding exactly one step's groups; constant lengths; no verifier, Redis or sync cost."""
    costs = PipelineCosts(
        engines=1,
        slots_per_engine=B * G,
        step_seconds=TOKEN_SECONDS,
        step_seconds_per_sequence=0.0,
        groups_per_step=B,
        group_size=G,
        max_staleness=0,
        learner_step_seconds=0.4,
        publish_seconds=0.0,
        arrival_seconds=0.0,
        engine_pause_seconds=0.0,
        mean_response_tokens=L,
    )
    return replace(costs, **changes)


def test_synchronous_step_is_generation_then_learner_then_weight_sync():
    costs = pipeline(publish_seconds=0.02, arrival_seconds=0.05, engine_pause_seconds=0.03)
    result = simulate(costs, steps=6, warmup=2)
    assert result.step_seconds == pytest.approx(GENERATION + 0.4 + 0.05 + 0.03)
    assert result.mean_staleness == 0
    assert result.learner_busy == pytest.approx(0.4 / (GENERATION + 0.48))


def test_asynchronous_generation_bound_pipeline_runs_at_generation_speed_one_version_behind():
    result = simulate(pipeline(max_staleness=1, learner_step_seconds=0.4), steps=6, warmup=2)
    assert result.step_seconds == pytest.approx(GENERATION)
    assert result.mean_staleness == pytest.approx(1.0)
    assert result.rollout_utilisation == pytest.approx(1.0)
    assert result.learner_busy == pytest.approx(0.4 / GENERATION)
    assert result.bottleneck == "rollout"


@pytest.mark.parametrize("max_staleness", [1, 2, 3])
def test_asynchronous_learner_bound_pipeline_runs_at_learner_speed_with_staleness_at_its_bound(max_staleness):
    result = simulate(pipeline(max_staleness=max_staleness, learner_step_seconds=2.5), steps=6, warmup=4)
    assert result.step_seconds == pytest.approx(2.5)
    assert result.mean_staleness == pytest.approx(max_staleness)
    assert result.learner_busy == pytest.approx(1.0)
    assert result.rollout_utilisation == pytest.approx(GENERATION / 2.5)
    assert result.bottleneck == "learner"


def test_async_over_sync_speedup_is_the_overlap():
    sync = simulate(pipeline(max_staleness=0, learner_step_seconds=0.8), steps=6, warmup=2)
    asynchronous = simulate(pipeline(max_staleness=1, learner_step_seconds=0.8), steps=6, warmup=2)
    assert sync.step_seconds / asynchronous.step_seconds == pytest.approx((GENERATION + 0.8) / GENERATION)


def test_decode_step_grows_with_the_sequences_held():
    # One group alone: every step reads the weights once and each of the G sequences' caches.
    per_sequence = 0.002
    costs = pipeline(groups_per_step=1, slots_per_engine=G, step_seconds_per_sequence=per_sequence)
    result = simulate(costs, steps=4, warmup=1)
    assert result.step_seconds == pytest.approx(L * (TOKEN_SECONDS + G * per_sequence) + 0.4)


def test_engine_pauses_for_new_weights_delay_the_work_in_flight():
    # Each version pauses the engine mid-batch; the batch ends that much later.
    costs = pipeline(max_staleness=1, learner_step_seconds=0.2, engine_pause_seconds=0.15)
    result = simulate(costs, steps=6, warmup=2)
    assert result.step_seconds == pytest.approx(GENERATION + 0.15)
    assert result.engine_pause_share == pytest.approx(0.15 / (GENERATION + 0.15))


def test_redis_saturates_when_every_group_costs_three_operations():
    # put, then take and acknowledge: three operations a group on one Redis server.
    operation = 0.02
    costs = pipeline(
        max_staleness=4,
        learner_step_seconds=0.01,
        step_seconds=1e-5,
        redis_seconds_per_group_op=operation,
        slots_per_engine=10 * B * G,
    )
    result = simulate(costs, steps=8, warmup=4)
    assert result.step_seconds == pytest.approx(3 * B * operation, rel=0.02)
    assert result.redis_busy == pytest.approx(1.0, abs=0.02)
    assert result.bottleneck == "redis"


def test_verifier_pool_is_a_queue_of_servers():
    # 2 servers, each group takes G × 0.05 s: B groups need B/2 × 0.2 s once generated together.
    costs = pipeline(verifier_servers=2, verify_seconds_per_completion=0.05, learner_step_seconds=0.01)
    result = simulate(costs, steps=4, warmup=1)
    assert result.step_seconds == pytest.approx(GENERATION + B / 2 * G * 0.05 + 0.01)


def test_spread_lengths_make_a_synchronous_step_wait_for_the_longest_completion():
    spread = pipeline(response_sigma=0.8, max_response_tokens=4 * L)
    fixed = simulate(pipeline(), steps=5, warmup=1)
    tail = simulate(spread, steps=5, warmup=1)
    assert tail.step_seconds > fixed.step_seconds + 0.5 * GENERATION
    assert tail.rollout_utilisation < 0.8 * fixed.rollout_utilisation


def test_gpu_cost_model_shape():
    calibration, workload = simulate_module.Calibration(), simulate_module.Workload()
    step = simulate_module.learner_step_seconds
    assert step(calibration, workload, 64) < step(calibration, workload, 8) / 4
    sync_seconds = simulate_module.weight_sync_seconds
    few, many = (simulate_module.Layout(gpus, 16, transport="object_store") for gpus in (16, 512))
    # Every rollout node pulls each version from the sender: the object store's cost grows with them ...
    assert sync_seconds(calibration, workload, many)[1] > 2 * sync_seconds(calibration, workload, few)[1]
    # ... while a pipelined NCCL broadcast costs about one model's bytes over one link.
    assert sync_seconds(calibration, workload, simulate_module.Layout(512, 16))[1] < 1.0
    for gpus in simulate_module.SCALES:
        rollout, learner = simulate_module.balanced_split(calibration, workload, gpus)
        assert rollout + learner == gpus and rollout > 0 and learner > 0
    slots, base, per_sequence = simulate_module.engine_slots_and_step(calibration, workload)
    full_speed = slots / (base + slots * per_sequence)
    # The roofline lands near the ~12.5k tok/s published for vLLM serving an 8B model on one H100.
    assert 9_000 < full_speed < 16_000
    with pytest.raises(ValueError, match="colocated"):
        simulate_module.gpu_costs(calibration, workload, simulate_module.Layout(8, 8, max_staleness=2, colocated=True))


def test_a_small_gpu_run_finishes_quickly_and_async_beats_colocated_sync():
    calibration, workload = simulate_module.Calibration(), simulate_module.Workload()
    results = {}
    for layout in simulate_module.layouts_for(calibration, workload, 64):
        results[layout.label] = simulate(simulate_module.gpu_costs(calibration, workload, layout), steps=3, warmup=3)
    assert results["async s=4, nccl"].trained_tokens_per_second > results["sync, colocated"].trained_tokens_per_second
    assert results["async s=4, nccl"].mean_staleness <= 4
