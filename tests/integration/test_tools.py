"""The `python` tool on the real sandbox: hostile calls come back as error observations, never as a
stopped rollout; and the torch engine continues a trajectory after its observation without computing
the turns before it again."""

from __future__ import annotations

import random

import pytest
import torch

from orchard.config import ModelConfig, MultiTurnConfig
from orchard.protocols import GenerationOutput, SamplingParams
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import build_model
from orchard.rollout.multi_turn import TurnLoop
from orchard.rollout.tokenizer import CharTokenizer
from orchard.rollout.tools import call_tool, load_tools

TOKENIZER = CharTokenizer()
CONFIG = MultiTurnConfig(enabled=True, tool_seconds=2.0, tool_memory_mb=256, tool_output_chars=64)


@pytest.fixture(scope="module")
def python_tool():
    return load_tools(CONFIG)["python"]


def test_a_correct_call_observes_its_output(python_tool):
    output = call_tool(python_tool, "print(482*937)", max_chars=64)
    assert (output.text, output.outcome) == ("451634", "ok")


@pytest.mark.parametrize(
    ("code", "outcome", "observed"),
    [
        ("1/0", "error", "error: ZeroDivisionError: division by zero"),
        ("print(", "error", "error: SyntaxError"),
        ("import sys; sys.exit(3)", "error", "error: exit status 3"),
        ("while True: pass", "limit", "error: stopped by the "),  # the CPU or the wall-clock limit, whichever first
        ("import time; time.sleep(60)", "limit", "error: stopped by the time limit"),
        ("while True: print('x' * 10000)", "limit", "error: stopped by the output limit"),
        ("x = 'a' * (2**30)", "limit", "error: stopped by the memory limit"),
        ("import os\nwhile True: os.fork()", "limit", "error: stopped by the process limit"),
        (
            "import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)",
            "error",
            "error: PermissionError: sandbox: socket",
        ),
        ("open('/etc/orchard-owned', 'w').write('x')", "error", "error: PermissionError: sandbox: writing"),
    ],
    ids=["crash", "syntax", "exit", "loop", "sleep", "flood", "memory", "fork-bomb", "network", "write"],
)
def test_a_hostile_call_is_an_error_observation(python_tool, code, outcome, observed):
    output = call_tool(python_tool, code, max_chars=CONFIG.tool_output_chars)
    assert output.outcome == outcome and output.text.startswith(observed), output


def test_a_hostile_trajectory_goes_on_to_its_answer():
    """Inside the turn loop: the failing call is observed and the next turn runs."""
    loop = TurnLoop(CONFIG, load_tools(CONFIG), TOKENIZER)
    turns = iter(["<python>1/0</python>", "4\n"])

    def policy(prompts, params):
        text = next(turns)
        tokens = TOKENIZER.encode(text)
        return [GenerationOutput(tokens, [-1.0] * len(tokens), "stop", text.removesuffix("\n"))]

    try:
        [trajectory] = loop.run(policy, [TOKENIZER.encode("q:")], SamplingParams(max_new_tokens=96, stop=("\n",)))
    finally:
        loop.close()
    assert [call.outcome for call in trajectory.calls] == ["error"]
    assert "<output>error: ZeroDivisionError: division by zero</output>" in TOKENIZER.decode(trajectory.token_ids)
    assert trajectory.answer == "4" and trajectory.turns == 2


def test_a_fenced_python_block_runs_in_the_sandbox():
    config = MultiTurnConfig(
        enabled=True, call_open="```{tool}\n", call_close="```", observation="```output\n{output}\n```\n"
    )
    loop = TurnLoop(config, load_tools(config), TOKENIZER)
    turns = iter(["Compute it.\n```", "python\nprint(482*937)\n```", "451634\n\n"])

    def policy(prompts, params):
        text = next(turns)
        tokens = TOKENIZER.encode(text)
        stop = next(s for s in params.stop if text.endswith(s))
        return [GenerationOutput(tokens, [-1.0] * len(tokens), "stop", text.removesuffix(stop))]

    try:
        [trajectory] = loop.run(policy, [TOKENIZER.encode("q:")], SamplingParams(max_new_tokens=96, stop=("\n\n",)))
    finally:
        loop.close()
    assert [call.outcome for call in trajectory.calls] == ["ok"]
    assert "```output\n451634\n```\n" in TOKENIZER.decode(trajectory.token_ids)
    assert trajectory.answer == "451634" and trajectory.turns == 2


@pytest.mark.parametrize("fused_kernel", [True, False], ids=["compiled", "torch"])
def test_the_torch_engine_continues_a_trajectory_from_the_keys_it_kept(fused_kernel):
    """Turn 2 of a batch whose turn 1 ended on a stop string: the continuing engine runs only the new
    tokens (the observation) through the model, and samples what an engine computing everything samples."""
    continuing = TorchEngine(build_model(ModelConfig(tiny={"num_layers": 2}), TOKENIZER, seed=1), TOKENIZER)
    fresh = TorchEngine(build_model(ModelConfig(tiny={"num_layers": 2}), TOKENIZER, seed=1), TOKENIZER)
    if not fused_kernel:
        continuing._kernel = fresh._kernel = None
    # caches start as whatever memory held: make that NaN, so a read of a slot never written shows
    continuing._new_cache = lambda batch, slots: torch.full(  # type: ignore[method-assign]
        (continuing.num_layers, 2, batch, continuing.num_kv_heads, slots, continuing.head_dim), float("nan")
    )
    rng = random.Random(0)
    prompts = [[1, *TOKENIZER.encode(f"mul:{rng.randrange(100, 999)}*{rng.randrange(10, 99)}=")] for _ in range(6)]
    prompts.append(prompts[0])  # a repeated prompt, as in a group
    stops = tuple("qwxz")  # rare characters: turns of different lengths
    first = continuing.generate(prompts, SamplingParams(max_new_tokens=40, stop=stops, seed=3, resumable=True))
    stopped = [i for i, output in enumerate(first) if output.finish_reason == "stop"]
    assert len(stopped) >= 3, [o.finish_reason for o in first]
    follow = [prompts[i] + first[i].token_ids + TOKENIZER.encode(f"<output>{i * 37}</output>") for i in stopped]
    before = continuing.prefilled_tokens
    params = SamplingParams(max_new_tokens=12, seed=5)
    continued = continuing.generate(follow, params)
    computed = continuing.prefilled_tokens - before
    recomputed = fresh.generate(follow, params)
    assert computed < sum(map(len, follow)) / 2, (computed, sum(map(len, follow)))
    for a, b in zip(continued, recomputed, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    # kept keys live for one call, and never across a weight change
    assert len(continuing._kept) == 0
    continuing.generate(prompts, SamplingParams(max_new_tokens=40, stop=stops, seed=3, resumable=True))
    assert len(continuing._kept) > 0
    continuing.refresh()
    assert len(continuing._kept) == 0


def test_the_learner_scores_the_policy_tokens_of_a_trajectory_as_the_engine_sampled_them():
    """Trajectories sampled by the torch engine over several turns (continued from kept keys), stacked for
    the learner: on every token the policy sampled, the learner's logprob of it is the engine's; the
    observation tokens are masked."""
    from orchard.learner.batching import build_training_tensors, sequence_logprobs
    from orchard.records import Completion, Group, Prompt
    from tests.unit.test_multi_turn import ONE_CHARACTER_CALLS

    model = build_model(ModelConfig(tiny={"num_layers": 2}), TOKENIZER, seed=2)
    engine = TorchEngine(model, TOKENIZER)
    loop = TurnLoop(ONE_CHARACTER_CALLS, load_tools(ONE_CHARACTER_CALLS), TOKENIZER)
    prompts = [[1, *TOKENIZER.encode(f"q{i}:")] for i in range(48)]
    try:
        trajectories = loop.run(engine.generate, prompts, SamplingParams(max_new_tokens=96, seed=4))
    finally:
        loop.close()
    assert sum(t.turns > 1 for t in trajectories) >= 3, [t.turns for t in trajectories]
    groups = [
        Group(
            prompt=Prompt(id=f"p{i}", text="q", answer="", distribution="d"),
            prompt_token_ids=prompt,
            completions=[
                Completion(
                    text="",
                    token_ids=t.token_ids,
                    logprobs=t.logprobs,
                    policy_version=0,
                    observation_spans=t.observation_spans,
                )
            ],
        )
        for i, (prompt, t) in enumerate(zip(prompts, trajectories, strict=True))
    ]
    tensors = build_training_tensors(groups, TOKENIZER.pad_id)
    with torch.no_grad():
        learner, _ = sequence_logprobs(model, tensors.input_ids, tensors.attention_mask, 1.0)
    mask = tensors.completion_mask.bool()
    assert int(mask.sum()) == sum(t.policy_tokens for t in trajectories)
    difference = (learner - tensors.old_logprobs).abs()[mask]
    assert float(difference.max()) < 1e-4
    observed = tensors.attention_mask.bool() & ~mask
    observed[:, : max(len(p) for p in prompts)] = False  # prompts aside
    assert int(observed.sum()) > 0 and float(tensors.old_logprobs[observed].abs().max()) == 0.0
