"""The run loop with the GPU path's settings on CPUs: weights by broadcast (transport 'nccl', which is
gloo here), a learner of two ZeRO-3 ranks, and the actors in placement groups."""

from __future__ import annotations

from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config


def test_short_run_with_broadcast_weights_in_placement_groups(ray_local, tmp_path, warm_cache):
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        "rollout.num_workers=2",
        "rollout.num_cpus_per_worker=0.5",
        "learner.num_cpus=0.5",
        "weight_sync.transport=nccl",
        "weight_sync.bucket_mb=0.05",
        "weight_sync.timeout_seconds=120",
        "cluster.placement_groups=true",
        "cluster.learner_ranks=2",
        "learner.zero_stage=3",
    )
    run_dir = RunDirectory(tmp_path, "broadcast")
    driver = Driver(config, run_dir, show_progress=False)
    summary = driver.run()
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    events = (run_dir.path / "events.log").read_text()
    assert "weight broadcast group formed: 3 ranks over gloo" in events
    assert len(driver.learners.peers) == 1
    # versions after the first arrived by broadcast, and every worker confirmed some
    assert driver.weight_sync.latest.transport == "broadcast"
    assert summary["weight_sync_seconds_mean"] is not None
    assert min(driver.weight_sync.worker_versions.values()) >= 2
    metrics = run_dir.read_metrics()
    assert metrics[1]["eval_accuracy"] is not None  # the evaluator got the weights as a copy
    conservation(summary)
    import ray

    reserved = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert not reserved, "the run's placement groups outlived it"


def test_vllm_runs_evaluate_on_a_rollout_worker(ray_local):
    """With engine 'vllm' the driver has no engine: held-out prompts go to a worker, which answers
    with the version it holds (here a torch worker stands in for the vLLM one)."""
    import ray

    from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
    from orchard.learner.weights import state_dict_to_numpy
    from orchard.records import Prompt
    from orchard.rollout.model import build_model
    from orchard.rollout.tokenizer import load_tokenizer
    from orchard.rollout.worker import RolloutWorker
    from orchard.services.evaluation import WorkerEvaluator, evaluate_by_distribution

    model = ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2))
    worker = RolloutWorker.options(num_cpus=0.5).remote("worker-0", model, RolloutConfig(max_new_tokens=4))
    try:
        weights = state_dict_to_numpy(build_model(model, load_tokenizer(model)).state_dict())
        ray.get(worker.load_weights.remote(4, weights))
        evaluator = WorkerEvaluator(lambda: worker)
        assert evaluator.load_weights(5, None).skipped
        prompts = [Prompt(id=f"p{i}", text=f"{i}+1=", answer=str(i + 1), distribution=f"d{i % 2}") for i in range(4)]
        accuracy, by_distribution = evaluate_by_distribution(evaluator, prompts)
        assert 0.0 <= accuracy <= 1.0 and set(by_distribution) == {"d0", "d1"}
        assert evaluator.policy_version == 4
    finally:
        ray.kill(worker)
