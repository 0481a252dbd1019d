"""The whole loop on a real local Ray, with both buffer backends."""

from __future__ import annotations

import json

import pytest

from orchard.config import load_config
from orchard.services.buffer.redis_buffer import RedisBuffer
from orchard.services.compare import PLAIN_GRPO
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.driver import Driver
from orchard.services.redis_server import RedisServer
from orchard.services.run_dir import RunDirectory

SMALL = [
    *PLAIN_GRPO,  # the demo's samplers off: these tests are about the loop
    "max_steps=3",
    "max_minutes=null",
    "warmstart.steps=20",
    "warmstart.batch_size=16",
    "rollout.group_size=4",
    "rollout.prompts_per_call=4",
    "rollout.max_new_tokens=6",
    "learner.groups_per_step=4",
    "learner.dynamic_sampling=false",
    "eval.every_steps=2",
    "eval.num_prompts=10",
    "data.held_out_size=10",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=2",
]


def small_config(tmp_path, warm_cache, *extra):
    """A small run whose rewards are graded (share of digits), so that every step has signal."""
    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i), "distribution": f"d{i % 2}"}) + "\n"
            for i in range(60)
        )
    )
    source = f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'tests.integration.user_verifiers:digit_share'}}]"
    return load_config(None, [*SMALL, source, f"warmstart.cache_dir={warm_cache}", f"runs_dir={tmp_path}", *extra])


def conservation(summary):
    stats = summary["buffer"]
    # every group put is trained on (acked), still ready, or dropped as stale -- nothing vanishes
    assert stats["put"] == stats["acked"] + stats["ready"] + stats["pending"] + stats["stale"]
    assert stats["acked"] == summary["trained_groups"]
    assert stats["pending"] == 0


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_short_run_writes_the_run_directory(ray_local, tmp_path, warm_cache, backend):
    config = small_config(
        tmp_path, warm_cache, f"buffer.backend={backend}", "checkpoint.every_steps=1", "checkpoint.keep_last=2"
    )
    run_dir = RunDirectory(tmp_path, f"run-{backend}")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    # a checkpoint at every step, the older ones pruned
    assert sorted(p.name for p in (run_dir.path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert summary["checkpoints"] == [str(run_dir.path / "checkpoints" / name) for name in ("step-2", "step-3")]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward.png", "events.log"):
        assert (run_dir.path / name).exists(), name
    metrics = run_dir.read_metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[1]["eval_accuracy"] is not None
    assert all(m["staleness_max"] <= config.buffer.max_staleness for m in metrics)
    assert json.loads((run_dir.path / "summary.json").read_text())["steps"] == 3
    assert summary["weight_sync_seconds_mean"] is not None
    conservation(summary)


def test_synchronous_mode_trains_only_on_policy(ray_local, tmp_path, warm_cache):
    config = small_config(tmp_path, warm_cache, "buffer.max_staleness=0", "buffer.backend=memory")
    summary = Driver(config, RunDirectory(tmp_path, "sync"), show_progress=False).run()
    metrics = RunDirectory(tmp_path, "sync").read_metrics()
    assert all(m["staleness_max"] == 0 for m in metrics)
    assert summary["staleness_mean"] == 0
    conservation(summary)


def test_a_stop_condition_ends_the_run_like_a_stop_request(ray_local, tmp_path, warm_cache):
    config = small_config(tmp_path, warm_cache, "buffer.backend=memory", "max_steps=50")

    def enough(throughput) -> str | None:
        return "enough groups" if throughput.generated_groups >= 24 else None

    run_dir = RunDirectory(tmp_path, "stop-when")
    summary = Driver(config, run_dir, show_progress=False, stop_when=enough).run()
    assert summary["state"] == "stopped" and summary["stopped_reason"] == "enough groups"
    assert 24 <= summary["generated_groups"] < 24 + 16 and summary["steps"] < 50
    assert summary["checkpoints"][-1].endswith(f"step-{summary['steps']}")  # the final checkpoint
    conservation(summary)


def test_a_raising_user_verifier_does_not_stop_the_run(ray_local, tmp_path, warm_cache):
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "distribution": "plus"}) + "\n" for i in range(40)
        )
    )
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'tests.integration.user_verifiers:explode'}}]",
        "warmstart.steps=0",
        "max_steps=1",
    )
    run_dir = RunDirectory(tmp_path, "raising")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["steps"] == 1
    assert "verifier error" in (run_dir.path / "events.log").read_text()
    assert "RuntimeError" in (run_dir.path / "events.log").read_text()


def test_bad_prompt_lines_are_skipped_and_reported(ray_local, tmp_path, warm_cache):
    data = tmp_path / "tasks.jsonl"
    good = "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(30))
    data.write_text(good + "{broken\n")
    source = f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'tests.integration.user_verifiers:digit_share'}}]"
    config = load_config(
        None, [*SMALL, source, f"warmstart.cache_dir={warm_cache}", f"runs_dir={tmp_path}", "max_steps=1"]
    )
    run_dir = RunDirectory(tmp_path, "bad-lines")
    assert Driver(config, run_dir, show_progress=False).run()["steps"] == 1
    assert f"skipped prompt line: {data}:31: not valid JSON" in (run_dir.path / "events.log").read_text()


def test_all_curricula_together_in_a_run_with_redis_state(ray_local, tmp_path, warm_cache):
    """UCB scheduler + PCL selection + difficulty filter in one run; their state lands in Redis."""
    server = RedisServer().start()
    try:
        config = small_config(
            tmp_path,
            warm_cache,
            "buffer.backend=redis",
            f"buffer.redis_url={server.url}",
            "buffer.namespace=curricula",
            "curriculum.scheduler=ucb",
            "curriculum.selection=pcl",
            "curriculum.pcl.dimension=256",
            "curriculum.difficulty_filter.enabled=true",
            "curriculum.difficulty_filter.low=0.0",
            "curriculum.difficulty_filter.high=0.99",
        )
        driver = Driver(config, RunDirectory(tmp_path, "curricula"), show_progress=False)
        summary = driver.run()
        conservation(summary)
        records = RunDirectory(tmp_path, "curricula").read_metrics()
        assert len(records) == 3
        last = records[-1]
        assert set(last["scheduler_probabilities"]) == {"d0", "d1"}
        assert sum(last["scheduler_probabilities"].values()) == pytest.approx(1.0)
        assert last["value_model_abs_error"] is not None and 0.0 <= last["value_model_abs_error"] <= 1.0
        assert driver.sampler.candidates_scored >= 4 * driver.throughput.generated_groups
        text = driver.metrics.render().decode()
        assert 'orchard_scheduler_probability{distribution="d0"}' in text
        assert "orchard_value_model_error NaN" not in text
        # a restarted driver finds the curriculum where this one left it
        saved = RedisBuffer(server.url, "curricula").load_state("curriculum")
        sampler = PromptSampler(driver.prompt_pool, config.curriculum)
        sampler.load_bytes(saved)
        assert sampler.probabilities() == pytest.approx(last["scheduler_probabilities"])
    finally:
        server.stop()


def test_a_run_whose_groups_are_all_filtered_says_so(ray_local, tmp_path, warm_cache, capsys):
    """A policy that solves nothing under dynamic sampling gives the learner nothing: the run names the
    cause in its events and on stderr instead of waiting silently."""
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40)))
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'tests.integration.user_verifiers:explode'}}]",
        "warmstart.steps=0",
        "learner.dynamic_sampling=true",
        "learner.groups_per_step=2",
        "max_minutes=0.3",
    )
    run_dir = RunDirectory(tmp_path, "starving")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["steps"] == 0 and summary["stopped_reason"] == "max_minutes"
    notices = [line for line in (run_dir.path / "events.log").read_text().splitlines() if "no learner step for" in line]
    assert notices and "the filters dropped them all (zero_advantage " in notices[0]
    assert "warmstart.steps" in notices[0]
    assert "orchard: no learner step for 20 groups" in capsys.readouterr().err


def test_a_lora_run_samples_with_the_merged_policy_and_checkpoints_the_adapter(ray_local, tmp_path, warm_cache):
    """Synchronous, so every step trains on samples of its own policy version: the workers' logprobs
    agree with the learner's only if the workers run the merged weights (base + adapters)."""
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        "buffer.max_staleness=0",
        "learner.lora={rank: 8, alpha: 16}",
        "learner.lr=0.01",
        "checkpoint.every_steps=3",
    )
    run_dir = RunDirectory(tmp_path, "lora")
    summary = Driver(config, run_dir, show_progress=False).run()
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    metrics = run_dir.read_metrics()
    later = [m for m in metrics if m["step"] > 1]
    assert all(m["mismatch_tokens"] > 0 for m in later)
    assert all(m["mismatch_abs_max"] < 1e-3 for m in later), [m["mismatch_abs_max"] for m in later]
    checkpoint = run_dir.path / "checkpoints" / "step-3"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "model" / "config.json").is_file()
    conservation(summary)


def test_pcl_reads_prompts_through_the_policys_hidden_states(ray_local, tmp_path, warm_cache):
    """`curriculum.pcl.features: policy`: the value model reads each candidate's hidden state from the
    driver's engine, which takes the newest weights every `refresh_steps` learner steps."""
    config = small_config(
        tmp_path,
        warm_cache,
        "buffer.backend=memory",
        "curriculum.selection=pcl",
        "curriculum.pcl.dimension=64",
        "curriculum.pcl.features=policy",
        "curriculum.pcl.refresh_steps=1",
    )
    driver = Driver(config, RunDirectory(tmp_path, "pcl-policy"), show_progress=False)
    summary = driver.run()
    conservation(summary)
    value_model = driver.sampler.value_model
    assert value_model.state_dimension == config.model.tiny.hidden_size and value_model.updates >= 1
    assert driver.held_out.evaluator.policy_version == summary["policy_version"]  # refreshed each step
    last = RunDirectory(tmp_path, "pcl-policy").read_metrics()[-1]
    assert 0.0 <= last["value_model_abs_error"] <= 1.0
