"""The turn loop's rules, driven by a scripted policy (the engines are tested in tests/integration): when
a trajectory calls a tool, what it observes, where it ends, and what the learner will see of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orchard.config import ConfigError, MultiTurnConfig, RunConfig, config_from_dict
from orchard.learner.batching import build_training_tensors
from orchard.protocols import GenerationOutput, SamplingParams
from orchard.records import Completion, Group, Prompt, RecordError
from orchard.rollout.multi_turn import TurnLoop, demonstration
from orchard.rollout.tokenizer import CharTokenizer
from orchard.rollout.tools import FunctionTool, ToolError, ToolOutput, call_tool, load_tools

TOKENIZER = CharTokenizer()
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=64, stop=("\n",))


def echo(call: str) -> str:
    """A user's tool: the call's text reversed."""
    return call[::-1]


#: One-character call marks around `echo`: an untrained model writes them often (the engine tests' calls).
ONE_CHARACTER_CALLS = MultiTurnConfig(
    enabled=True,
    tools=["tests.unit.test_multi_turn:echo"],
    call_open="a",
    call_close="b",
    observation="[{output}]",
    max_turns=4,
)


def broken(call: str) -> str:
    raise RuntimeError("the tool's backend is down")


class ScriptedPolicy:
    """Writes the given turns in order (one list per prompt), ending each as an engine would: a turn that
    closes a call or ends with a newline stops there ("stop"); the last logprob is -0.5 per token."""

    def __init__(self, turns: list[list[str]]) -> None:
        self.turns = [list(t) for t in turns]
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def __call__(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        self.calls.append((prompts, params))
        outputs = []
        for prompt in prompts:
            index = next(i for i, turns in enumerate(self.turns) if prompt[: len(self.prompts[i])] == self.prompts[i])
            text = self.turns[index].pop(0)
            tokens = TOKENIZER.encode(text)[: params.max_new_tokens]
            stopped = next((s for s in params.stop if TOKENIZER.decode(tokens).endswith(s)), None)
            outputs.append(
                GenerationOutput(
                    token_ids=tokens,
                    logprobs=[-0.5] * len(tokens),
                    finish_reason="stop" if stopped else "length",
                    text=TOKENIZER.decode(tokens).removesuffix(stopped or ""),
                )
            )
        return outputs


def run(turns: list[list[str]], config: MultiTurnConfig | None = None, params: SamplingParams = PARAMS, tools=None):
    config = config or MultiTurnConfig(enabled=True, tools=["tests.unit.test_multi_turn:echo"])
    loop = TurnLoop(config, tools or load_tools(config), TOKENIZER)
    policy = ScriptedPolicy(turns)
    policy.prompts = [TOKENIZER.encode(f"p{i}:") for i in range(len(turns))]
    try:
        return loop.run(policy, policy.prompts, params), policy
    finally:
        loop.close()


def test_a_call_is_run_observed_and_the_answer_after_it_is_what_the_verifier_reads():
    [trajectory], policy = run([["<echo>abc</echo>", "cba\n"]])
    text = TOKENIZER.decode(trajectory.token_ids)
    assert text == "<echo>abc</echo><output>cba</output>cba\n"
    assert trajectory.answer == "cba" and trajectory.finish_reason == "stop" and trajectory.turns == 2
    [(start, end)] = trajectory.observation_spans
    assert TOKENIZER.decode(trajectory.token_ids[start:end]) == "<output>cba</output>"
    assert trajectory.logprobs[start:end] == [0.0] * (end - start)  # the policy did not sample them
    assert all(lp == -0.5 for i, lp in enumerate(trajectory.logprobs) if not start <= i < end)
    assert trajectory.policy_tokens == len(trajectory.token_ids) - (end - start)
    assert [(c.tool, c.outcome) for c in trajectory.calls] == [("echo", "ok")]
    # the second turn continues the whole sequence, and every turn may stop at the call's close
    second_prompt = policy.calls[1][0][0]
    assert second_prompt == policy.prompts[0] + trajectory.token_ids[:end]
    assert "</echo>" in policy.calls[0][1].stop and policy.calls[0][1].resumable


def test_an_answer_without_a_call_is_a_single_turn():
    [trajectory], _ = run([["42\n"]])
    assert trajectory.turns == 1 and not trajectory.calls and not trajectory.observation_spans
    assert trajectory.answer == "42" and trajectory.finish_reason == "stop"


def test_trajectories_of_a_batch_advance_together_and_end_on_their_own_turns():
    params = dataclasses.replace(PARAMS, max_new_tokens=128)
    trajectories, policy = run([["7\n"], ["<echo>xy</echo>", "<echo>z</echo>", "yxz\n"]], params=params)
    assert [t.turns for t in trajectories] == [1, 3]
    assert [len(prompts) for prompts, _ in policy.calls] == [2, 1, 1]


def test_the_budget_counts_observations_and_cuts_the_one_that_does_not_fit():
    params = dataclasses.replace(PARAMS, max_new_tokens=20)
    [trajectory], _ = run([["<echo>abcdef</echo>"]], params=params)
    assert len(trajectory.token_ids) == 20 and trajectory.finish_reason == "length"
    [(start, end)] = trajectory.observation_spans
    assert (start, end) == (len("<echo>abcdef</echo>"), 20)
    assert trajectory.answer == ""


def test_a_turn_cut_by_the_budget_ends_the_trajectory_without_running_its_call():
    params = dataclasses.replace(PARAMS, max_new_tokens=10)
    [trajectory], _ = run([["<echo>abcdefghij</echo>"]], params=params)
    assert trajectory.finish_reason == "length" and not trajectory.calls and len(trajectory.token_ids) == 10


def test_calls_past_max_tool_calls_or_in_the_last_turn_are_not_run():
    config = MultiTurnConfig(enabled=True, tools=["tests.unit.test_multi_turn:echo"], max_tool_calls=1)
    [trajectory], _ = run([["<echo>a</echo>", "<echo>b</echo>"]], config)
    assert len(trajectory.calls) == 1 and trajectory.turns == 2 and trajectory.finish_reason == "length"
    config = MultiTurnConfig(enabled=True, tools=["tests.unit.test_multi_turn:echo"], max_turns=2)
    [trajectory], _ = run([["<echo>a</echo>", "<echo>b</echo>"]], config)
    assert len(trajectory.calls) == 1 and trajectory.turns == 2 and trajectory.finish_reason == "length"


def test_a_fenced_python_block_is_a_call_although_its_fence_also_opens_it():
    """``` both opens and closes a fenced block: generation stops at the opening fence too, and the turn
    goes on until the block is closed; then the call runs."""
    config = MultiTurnConfig(
        enabled=True,
        tools=["tests.unit.test_multi_turn:echo"],
        call_open="```{tool}\n",
        call_close="```",
        observation="```output\n{output}\n```\n",
    )
    [trajectory], policy = run([["Reverse it.\n```", "echo\nabc\n```", "cba\n"]], config)
    assert [(c.tool, c.outcome) for c in trajectory.calls] == [("echo", "ok")]
    assert trajectory.turns == 2 and len(policy.calls) == 3
    text = TOKENIZER.decode(trajectory.token_ids)
    assert text == "Reverse it.\n```echo\nabc\n``````output\n\ncba\n```\ncba\n"
    assert trajectory.answer == "cba" and trajectory.finish_reason == "stop"
    # a fence that opens no tool's block is text: the turn goes on to its answer
    [plain], _ = run([["See:\n```", "text\nx\n```", "done\n"]], config)
    assert not plain.calls and plain.turns == 1 and plain.answer == "See:\n```text\nx\n```done"


def test_a_close_without_an_opening_is_an_answer_not_a_call():
    [trajectory], _ = run([["abc</echo>"]])
    assert not trajectory.calls and trajectory.turns == 1 and trajectory.answer == "abc"


def test_a_tool_that_raises_is_observed_as_a_failure_and_reported():
    config = MultiTurnConfig(enabled=True, tools=["tests.unit.test_multi_turn:broken"])
    [trajectory], _ = run([["<broken>x</broken>", "no\n"]], config)
    [call] = trajectory.calls
    assert call.outcome == "raised" and call.error == "RuntimeError: the tool's backend is down"
    assert "<output>error: the tool failed</output>" in TOKENIZER.decode(trajectory.token_ids)
    assert trajectory.answer == "no"


def test_long_output_is_cut_and_flagged():
    tool = FunctionTool(lambda call: "x" * 100, "many")
    output = call_tool(tool, "", max_chars=10)
    assert output.text == "x" * 10 + "\n[output cut at 10 of 100 characters]" and output.outcome == "ok"
    assert call_tool(tool, "", max_chars=100) == ToolOutput("x" * 100)


def test_a_user_tool_returning_no_text_is_reported_as_raised():
    output = call_tool(FunctionTool(lambda call: 3, "number"), "", max_chars=10)  # type: ignore[arg-type,return-value]
    assert output.outcome == "raised" and "returned int" in output.error


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        (["no_such_module_for_orchard:tool"], "cannot load 'no_such_module_for_orchard:tool': ModuleNotFoundError"),
        (["tests.unit.test_multi_turn:TOKENIZER_MISSING"], "AttributeError"),
        (["tests.unit.test_multi_turn:PARAMS"], "is a SamplingParams, not a function"),
        (["calculator"], "neither 'python' nor a dotted path"),
    ],
)
def test_tools_that_cannot_be_loaded_are_named(tools, message):
    with pytest.raises(ToolError, match=message):
        load_tools(MultiTurnConfig(enabled=True, tools=tools))


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        (
            {"stop": ["\n"], "multi_turn": {"call_open": "```{tool}\n"}},
            "stop string '\\\\n' occurs in multi_turn.call_open",
        ),
        ({"strategy": "mcts"}, "multi_turn works with strategy 'sample'"),
        ({"multi_turn": {"observation": "result"}}, "must contain '\\{output\\}'"),
        ({"multi_turn": {"tools": ["python", "my.tools:python"]}}, "name one tool twice"),
        ({"hints": True}, "rollout.multi_turn and learner.hints cannot be combined"),
    ],
)
def test_multi_turn_settings_that_cannot_work_are_refused(rollout, message):
    hints = rollout.pop("hints", False)
    rollout = {**rollout, "multi_turn": {"enabled": True, **rollout.get("multi_turn", {})}}
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"rollout": rollout, "learner": {"hints": {"enabled": hints}}})
    assert RunConfig(rollout={"multi_turn": {"enabled": True}}).rollout.multi_turn.close_marks() == {
        "python": "</python>"
    }


def test_a_demonstration_is_a_whole_trajectory_in_the_configured_format():
    call = {"tool": "python", "call": "print(12*34)", "output": "408"}
    parts = demonstration(MultiTurnConfig(enabled=True), call, "408")
    assert parts == ("<python>print(12*34)</python>", "<output>408</output>", "408")


# ------------------------------------------------------------------------------------------ records


def multi_turn_completion() -> Completion:
    tokens = TOKENIZER.encode("<echo>ab</echo><output>ba</output>ba")
    return Completion(
        text=TOKENIZER.decode(tokens),
        token_ids=tokens,
        logprobs=[-0.5] * 15 + [0.0] * 19 + [-0.5, -0.5],
        policy_version=2,
        reward=1.0,
        observation_spans=[(15, 34)],
    )


def test_observation_spans_round_trip_and_bad_spans_are_refused():
    group = Group(
        prompt=Prompt(id="p", text="q", answer="ba", distribution="d"),
        prompt_token_ids=TOKENIZER.encode("q"),
        completions=[multi_turn_completion()],
    )
    again = Group.from_bytes(group.to_bytes())
    assert again.completions[0].observation_spans == [(15, 34)]
    assert again.completions[0].policy_token_count == 17
    for spans in ([(15, 40)], [(20, 10)], [(0, 5), (3, 8)], [(1,)]):
        with pytest.raises(RecordError, match="observation span"):
            dataclasses.replace(multi_turn_completion(), observation_spans=spans)


def test_observation_tokens_are_context_but_not_trained_on():
    completion = multi_turn_completion()
    group = Group(
        prompt=Prompt(id="p", text="q", answer="ba", distribution="d"),
        prompt_token_ids=TOKENIZER.encode("q:"),
        completions=[completion],
    )
    tensors = build_training_tensors([group], TOKENIZER.pad_id)
    mask = tensors.completion_mask[0]
    prompt = 2
    assert tensors.input_ids[0, prompt : prompt + 36].tolist() == completion.token_ids  # all in the sequence
    assert mask[prompt : prompt + 15].eq(1).all() and mask[prompt + 34 : prompt + 36].eq(1).all()
    assert mask[prompt + 15 : prompt + 34].eq(0).all()
    assert tensors.num_tokens == 17 and tensors.lengths.tolist() == [17]
    assert torch.equal(tensors.old_logprobs[0] * mask, tensors.old_logprobs[0])


def test_the_warm_start_demonstrates_the_call_only_with_multi_turn_rollouts():
    import random

    from orchard.learner.sft import IGNORE_INDEX, pad_supervised_batch
    from orchard.rollout.prompts import PromptRenderer
    from orchard.services.warmstart import warm_start_example
    from orchard.verifiers.procedural import generate_prompt

    prompt = generate_prompt("big_multiplication", 1, random.Random(3))
    a, b = prompt.text.removeprefix("mul:").removesuffix("=").split("*")
    renderer = PromptRenderer(TOKENIZER)
    with_tool = RunConfig(rollout={"multi_turn": {"enabled": True}})
    question, target, [(start, end)] = warm_start_example(with_tool, renderer, prompt)
    expected = f"<python>print({a}*{b})</python><output>{prompt.answer}</output>{prompt.answer}"
    assert target == renderer.encode_answer(expected) and question == renderer.encode(prompt)
    assert TOKENIZER.decode(target[start:end]) == f"<output>{prompt.answer}</output>"
    # the observation is context: shown, never a label
    _, _, labels = pad_supervised_batch([(question, target, [(start, end)])], TOKENIZER.pad_id)
    offset = len(question)
    assert labels[0, offset + start : offset + end].eq(IGNORE_INDEX).all()
    assert labels[0, offset : offset + start].ne(IGNORE_INDEX).all()
    assert labels[0, offset + end : offset + len(target)].ne(IGNORE_INDEX).all()
    bare = renderer.encode_answer(prompt.answer)
    assert warm_start_example(with_tool, renderer, prompt, call=False)[1:] == (bare, [])
    assert warm_start_example(RunConfig(), renderer, prompt)[1:] == (bare, [])
    other = generate_prompt("addition", 1, random.Random(3))
    assert warm_start_example(with_tool, renderer, other)[1:] == (renderer.encode_answer(other.answer), [])
