"""A whole run on vLLM's CPU engine (`rollout.engine: vllm`): local Ray, the driver, the DeepSpeed
learner, weights pushed into the engine after every learner step, held-out evaluation by the worker,
DeepSearch's tree search and the re-scoring of cached solutions on vLLM."""

from __future__ import annotations

from orchard.services.driver import Driver
from orchard.services.run_dir import RunDirectory
from orchard.services.weights.sync import WeightSync
from tests.integration.test_deepsearch_run import hard_tail_config

#: vLLM's CPU attention runs head sizes of 32 and up: the tiny model of the DeepSearch run, 64 wide, 2 heads.
VLLM = [
    "rollout.engine=vllm",
    "model.tiny.hidden_size=64",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=1",
    "rollout.vllm.max_logprobs=100",
    "rollout.vllm.enforce_eager=true",
    "eval.every_steps=3",
    "eval.num_prompts=2",
]


def test_a_run_on_vllm_trains_searches_and_rescores_with_the_learners_weights(
    ray_local, tmp_path, warm_cache, monkeypatch
):
    confirmed: list[tuple[str, int]] = []
    original = WeightSync.confirm

    def spy(self, worker, version):
        confirmed.append((worker, version))
        return original(self, worker, version)

    monkeypatch.setattr(WeightSync, "confirm", spy)
    config = hard_tail_config(tmp_path, warm_cache, "buffer.backend=memory", "max_steps=8", *VLLM)
    run_dir = RunDirectory(tmp_path, "vllm-run")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["state"] == "finished" and summary["steps"] == 8
    records = run_dir.read_metrics()

    # the versions the learner published reached the engine as it trained (replies to successive loads
    # may arrive out of order, and a shared-memory load may skip ahead to a newer version), the newest
    # before the run ended
    versions = {version for worker, version in confirmed if worker == "worker-0"}
    assert len(versions) >= 6 and max(versions) >= records[-1]["policy_version"] - 1

    # the engine sampled with the learner's weights: on the tokens of the learner's own version its
    # logprobs agree with the learner's forward (float32 both)
    compared = [r for r in records if r["mismatch_tokens"] > 0]
    assert len(compared) >= 4
    assert max(r["mismatch_abs_max"] for r in compared) < 1e-3

    # held-out evaluation ran on the vLLM worker
    assert [r["step"] for r in records if r.get("eval_accuracy") is not None] == [3, 6]

    # DeepSearch on vLLM: searched, solved, cached and re-scored solutions mixed into groups
    found = summary["deepsearch"]
    assert found["prompts_searched"] > 0 and found["nodes_expanded"] > 0
    assert found["solutions_admitted"] > 0
    assert found["solutions_mixed"] > 0 and found["solutions_rescored"] == found["solutions_mixed"]
