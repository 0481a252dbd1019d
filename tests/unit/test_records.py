import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchard.records import Completion, Group, Prompt, RecordError


def make_group(rewards=(1.0, 0.0), version=3):
    prompt = Prompt(id="addition/1/1+2=", text="1+2=", answer="3", distribution="addition", metadata={"difficulty": 1})
    completions = [
        Completion(text="3", token_ids=[10, 2], logprobs=[-0.1, -0.2], policy_version=version, reward=r, correct=r > 0)
        for r in rewards
    ]
    return Group(prompt=prompt, prompt_token_ids=[1, 5, 6, 7, 8], completions=completions, worker="w0")


def test_group_round_trips_through_bytes():
    group = make_group()
    assert Group.from_bytes(group.to_bytes()) == group


@given(
    rewards=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=8),
    text=st.text(max_size=20),
)
def test_round_trip_any_rewards_and_text(rewards, text):
    group = make_group(rewards)
    group.completions[0].text = text
    assert Group.from_bytes(group.to_bytes()) == group


def test_derived_properties():
    group = make_group((1.0, 0.0, 0.0, 1.0))
    assert group.pass_rate == 0.5 and group.has_signal and group.policy_version == 3
    assert not make_group((1.0, 1.0)).has_signal
    assert group.num_tokens == 8  # four completions of two tokens


def test_mismatched_logprobs_are_refused():
    with pytest.raises(RecordError, match="2 token ids but 1 logprobs"):
        Completion(text="x", token_ids=[1, 2], logprobs=[-0.5], policy_version=0)


def test_unknown_schema_and_garbage_are_refused():
    payload = msgpack.unpackb(make_group().to_bytes())
    payload["schema"] = 99
    with pytest.raises(RecordError, match="schema version 99"):
        Group.from_bytes(msgpack.packb(payload))
    with pytest.raises(RecordError, match="not valid msgpack"):
        Group.from_bytes(b"\xc1\xff")
    with pytest.raises(RecordError, match="must be a map"):
        Group.from_bytes(msgpack.packb([1, 2]))
    del payload["prompt"]
    payload["schema"] = 1
    with pytest.raises(RecordError, match="malformed"):
        Group.from_bytes(msgpack.packb(payload))


def test_hints_solution_source_and_token_values_round_trip():
    group = make_group()
    prompt = Prompt(id="p", text="1+2=", answer="3", distribution="addition", solution="3", hints=("add", "1+2 is 3"))
    group.prompt = prompt
    group.completions[0].source = "tree"
    group.completions[0].token_values = [0.5, 1.0]
    assert Group.from_bytes(group.to_bytes()) == group


def test_schema_1_records_still_read_with_defaults():
    payload = msgpack.unpackb(make_group().to_bytes())
    payload["schema"] = 1
    for name in ("solution", "hints"):
        del payload["prompt"][name]
    for completion in payload["completions"]:
        del completion["source"], completion["token_values"]
    group = Group.from_bytes(msgpack.packb(payload))
    assert group.prompt.hints == () and group.prompt.solution is None
    assert all(c.source == "sample" and c.token_values is None for c in group.completions)


def test_bad_source_and_token_values_are_refused():
    with pytest.raises(RecordError, match="source 'guess'"):
        Completion(text="x", token_ids=[1], logprobs=[-0.5], policy_version=0, source="guess")
    with pytest.raises(RecordError, match="1 token ids but 2 token values"):
        Completion(text="x", token_ids=[1], logprobs=[-0.5], policy_version=0, token_values=[0.1, 0.2])
