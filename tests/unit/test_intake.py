"""The intake's starvation notice: said when the filters drop a run's groups in a row, not when a
healthy run drops many groups between two learner steps while keeping others."""

from __future__ import annotations

from collections import Counter

from orchard.config import load_config
from orchard.records import Completion, Group, Prompt
from orchard.rollout.worker import RolloutResult
from orchard.services.buffer.memory import MemoryBuffer
from orchard.services.compare import PLAIN_GRPO
from orchard.services.curriculum.sampler import PromptSampler
from orchard.services.metrics import RunMetrics
from orchard.services.rescue.queue import RescueQueue
from orchard.services.run.intake import STARVATION_STEPS, Intake
from orchard.services.run.throughput import Throughput
from orchard.services.run_dir import RunDirectory
from orchard.services.samples import SampleKeeper
from orchard.verifiers.sources import PromptPool

GROUPS_PER_STEP = 4


def result(correct: list[list[bool]], start: int) -> RolloutResult:
    groups = []
    for index, flags in enumerate(correct):
        prompt = Prompt(id=f"p{start + index}", text="1+1=", answer="2", distribution="addition/d1")
        completions = [
            Completion(text="2", token_ids=[5], logprobs=[-0.1], policy_version=0, reward=float(c), correct=c)
            for c in flags
        ]
        groups.append(Group(prompt=prompt, prompt_token_ids=[4], completions=completions, id=f"g{start + index}"))
    return RolloutResult(
        groups=groups, worker="w", policy_version=0, generated_tokens=8, generate_seconds=0.1, verify_seconds=0.0
    )


def intake(tmp_path) -> tuple[Intake, RunDirectory]:
    config = load_config(None, [*PLAIN_GRPO, f"learner.groups_per_step={GROUPS_PER_STEP}", "data.held_out_size=4"])
    run_dir = RunDirectory(tmp_path, "run")
    pool = PromptPool.from_config(config.data)
    sampler = PromptSampler(pool, config.curriculum, dynamic_sampling=True)
    taken = Intake(
        config,
        MemoryBuffer(),
        sampler,
        RescueQueue([]),
        throughput=Throughput(),
        filtered=Counter(),
        metrics=RunMetrics(),
        run_dir=run_dir,
        samples=SampleKeeper(),
    )
    return taken, run_dir


def notices(run_dir: RunDirectory) -> list[str]:
    events = run_dir.path / "events.log"
    return (
        [line for line in events.read_text().splitlines() if "no learner step for" in line] if events.exists() else []
    )


def test_groups_dropped_in_a_row_are_reported_once_per_doubling(tmp_path, capsys):
    taken, run_dir = intake(tmp_path)
    first = STARVATION_STEPS * GROUPS_PER_STEP
    for call in range(2 * first):
        taken.take(result([[True] * 4], start=call))  # all correct: dynamic sampling drops it
    said = notices(run_dir)
    assert len(said) == 2 and f"no learner step for {first} groups" in said[0]
    assert "zero_advantage" in said[0] and "orchard: no learner step" in capsys.readouterr().err


def test_a_healthy_run_that_keeps_groups_between_drops_is_not_called_starving(tmp_path, capsys):
    taken, run_dir = intake(tmp_path)
    first = STARVATION_STEPS * GROUPS_PER_STEP
    for call in range(3 * first):
        kept = call % 20 == 19  # one group in twenty has signal: the learner is fed, slowly
        taken.take(result([[True, False, True, True] if kept else [False] * 4], start=call))
    assert notices(run_dir) == [] and capsys.readouterr().err == ""
    assert taken.filtered["zero_advantage"] > first


def test_groups_a_reward_model_left_unscored_are_dropped_and_named(tmp_path):
    taken, run_dir = intake(tmp_path)
    call = result([[True, False, True, True], [True, False, False, False]], start=0)
    error = "reward model 'rm' gave no scores within timeout_seconds=5"
    for completion in call.groups[1].completions:
        completion.verifier_error, completion.reward, completion.correct = error, 0.0, False
    call.groups[0].completions[0].verifier_error = error  # one unscored completion does not drop a group
    taken.take(call)
    assert taken.buffer.stats()["put"] == 1 and taken.filtered == Counter({"reward_model_error": 1})
    assert taken.throughput.generated_groups == 2  # counted as generated, then filtered: conserved
    assert f"1 groups from w dropped unscored: {error}" in (run_dir.path / "events.log").read_text()
