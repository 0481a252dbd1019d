"""reasoning-gym as a prompt source and a verifier: prompts, scoring, msgpack round trips, clear errors."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgpack
import pytest
import reasoning_gym
from hypothesis import given, settings
from hypothesis import strategies as st
from reasoning_gym.dataset import ProceduralDataset
from reasoning_gym.factory import DATASETS
from reasoning_gym.utils import SYSTEM_PROMPTS

from orchard.config import DataConfig, ReasoningGymDataset, ReasoningGymSource
from orchard.records import Completion, Group, Prompt
from orchard.verifiers.datasets import SourceError
from orchard.verifiers.reasoning_gym import (
    ANSWER_INSTRUCTION,
    SYMPY_PARSED,
    NotPlain,
    ReasoningGymVerifier,
    call_with_timeout,
    extract_answer,
    from_plain,
    load_reasoning_gym_prompts,
    refused_math,
    to_plain,
)
from orchard.verifiers.registry import VerifierError, get_verifier
from orchard.verifiers.sources import PromptPool

#: Cheap generators with a single reference answer each (all exist in reasoning-gym 0.1.25).
DATASET_SIZES = {"basic_arithmetic": 6, "leg_counting": 5, "chain_sum": 4, "word_sorting": 5}
VERIFIER = ReasoningGymVerifier()


def source(*datasets: ReasoningGymDataset) -> ReasoningGymSource:
    return ReasoningGymSource(datasets=list(datasets))


@functools.cache
def prompts_of(name: str, size: int = 3, seed: int = 0) -> tuple[Prompt, ...]:
    return tuple(load_reasoning_gym_prompts(source(ReasoningGymDataset(name=name, size=size, seed=seed))))


@functools.cache
def mixed_prompts() -> tuple[Prompt, ...]:
    datasets = [ReasoningGymDataset(name=name, size=size, seed=7) for name, size in DATASET_SIZES.items()]
    return tuple(load_reasoning_gym_prompts(source(*datasets)))


def round_trip(prompt: Prompt) -> Prompt:
    completion = Completion(text="<answer>1</answer>", token_ids=[5, 6], logprobs=[-0.5, -0.25], policy_version=3)
    group = Group(prompt=prompt, prompt_token_ids=[1, 2, 3], completions=[completion])
    restored = Group.from_bytes(group.to_bytes())
    assert restored.completions[0].text == completion.text
    return restored.prompt


# --- prompts ----------------------------------------------------------------------------------------


def test_one_distribution_per_dataset_with_the_configured_counts_and_unique_ids():
    prompts = mixed_prompts()
    assert len(prompts) == sum(DATASET_SIZES.values())
    counts = {name: sum(p.distribution == name for p in prompts) for name in DATASET_SIZES}
    assert counts == DATASET_SIZES
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.id for p in prompts if p.distribution == "leg_counting"} == {f"rg-leg_counting-7-{i}" for i in range(5)}


def test_prompt_text_is_the_question_then_reasoning_gyms_answer_tag_instruction():
    generator = reasoning_gym.create_dataset("chain_sum", size=4, seed=7)
    for index, prompt in enumerate(p for p in mixed_prompts() if p.distribution == "chain_sum"):
        entry = generator[index]
        assert prompt.text == f"{entry['question']}\n\n{ANSWER_INSTRUCTION}"
        assert prompt.answer == entry["answer"]
        assert prompt.solution == f"<answer>{entry['answer']}</answer>"
    assert "<answer>answer here</answer>" in ANSWER_INSTRUCTION
    assert ANSWER_INSTRUCTION in SYSTEM_PROMPTS["default"]  # reasoning-gym's own wording, so its models know it


def test_a_source_instruction_replaces_the_default_and_must_show_the_answer_tags():
    short = "Reply as <answer>...</answer>."
    chain = ReasoningGymDataset(name="chain_sum", size=2, seed=7)
    [first, _] = load_reasoning_gym_prompts(ReasoningGymSource(datasets=[chain], instruction=short))
    assert first.text == f"{reasoning_gym.create_dataset('chain_sum', size=2, seed=7)[0]['question']}\n\n{short}"
    with pytest.raises(ValueError, match="(?s)instruction.*must show the answer format, <answer> and </answer>"):
        ReasoningGymSource(datasets=[chain], instruction="Answer in one word.")


def test_metadata_names_the_verifier_and_what_rescoring_needs_and_is_msgpack_plain():
    for prompt in mixed_prompts():
        metadata = prompt.metadata
        assert metadata["verifier"] == "reasoning_gym" == PromptPool.verifier_for(prompt)
        assert metadata["dataset"] == prompt.distribution
        assert (metadata["size"], metadata["seed"], metadata["config"]) == (
            DATASET_SIZES[prompt.distribution],
            7,
            {},
        )
        assert prompt.id.endswith(f"-{metadata['index']}")
        assert from_plain(metadata["entry"])["answer"] == prompt.answer
        assert msgpack.unpackb(msgpack.packb(metadata), strict_map_key=False) == metadata


def test_ids_are_stable_and_a_config_changes_them_whatever_its_key_order():
    default = prompts_of("basic_arithmetic")
    again = load_reasoning_gym_prompts(source(ReasoningGymDataset(name="basic_arithmetic", size=3)))
    assert [(p.id, p.text, p.answer) for p in default] == [(p.id, p.text, p.answer) for p in again]
    configured = [
        load_reasoning_gym_prompts(source(ReasoningGymDataset(name="basic_arithmetic", size=3, config=config)))
        for config in ({"min_terms": 2, "max_terms": 3}, {"max_terms": 3, "min_terms": 2})
    ]
    assert [p.id for p in configured[0]] == [p.id for p in configured[1]]
    assert not {p.id for p in configured[0]} & {p.id for p in default}
    assert configured[0][0].metadata["config"] == {"min_terms": 2, "max_terms": 3}


def test_generators_without_a_single_reference_answer_get_an_empty_answer_and_no_solution():
    prompt = prompts_of("propositional_logic")[0]
    assert prompt.answer == "" and prompt.solution is None
    result = VERIFIER.verify(prompt, "<answer>P ∨ ¬P</answer>")
    assert 0.0 <= result.reward <= 1.0


def test_the_pool_builds_a_reasoning_gym_source_from_the_data_config():
    datasets = [ReasoningGymDataset(name=name, size=6) for name in ("leg_counting", "chain_sum")]
    pool = PromptPool.from_config(DataConfig(sources=[source(*datasets)], held_out_size=4))
    assert pool.distributions == ["chain_sum", "leg_counting"]
    assert len(pool.held_out) == 4


# --- clear errors -----------------------------------------------------------------------------------


def test_an_unknown_dataset_name_names_the_entry_and_close_names():
    with pytest.raises(
        SourceError, match=r"datasets\[1\].*'basic_arithmatic'.*did you mean basic_arithmetic"
    ) as caught:
        load_reasoning_gym_prompts(
            source(ReasoningGymDataset(name="leg_counting", size=1), ReasoningGymDataset(name="basic_arithmatic"))
        )
    assert isinstance(caught.value, ValueError)
    assert "Traceback" not in str(caught.value)
    with pytest.raises(ValueError, match="no known name is close"):
        load_reasoning_gym_prompts(source(ReasoningGymDataset(name="zzzzzzzz")))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_termz": 3}, r"datasets\[0\].*no config option 'max_termz' \(did you mean 'max_terms'\?\).*min_digits"),
        ({"min_terms": 0}, r"datasets\[0\].*rejected config.*min_terms must be positive"),
        ({"size": 3}, r"size inside config; give them as the entry's own fields \(size: \.\.\.\)"),
        ({"operators": {"+"}}, r"config must hold plain values.*set"),
    ],
)
def test_a_bad_config_is_a_clear_error(config: dict[str, Any], message: str):
    with pytest.raises(SourceError, match=message):
        load_reasoning_gym_prompts(source(ReasoningGymDataset(name="basic_arithmetic", size=2, config=config)))


def test_composite_and_duplicates_are_refused_with_what_to_do_instead():
    with pytest.raises(SourceError, match="list its generators as separate"):
        load_reasoning_gym_prompts(source(ReasoningGymDataset(name="composite")))
    twice = [ReasoningGymDataset(name="leg_counting", size=2), ReasoningGymDataset(name="leg_counting", size=3)]
    with pytest.raises(SourceError, match=r"datasets\[1\].*same generator, seed and config as datasets\[0\]"):
        load_reasoning_gym_prompts(source(*twice))
    other_seed = [twice[0], ReasoningGymDataset(name="leg_counting", size=3, seed=1)]
    assert len(load_reasoning_gym_prompts(source(*other_seed))) == 5


# --- the verifier -----------------------------------------------------------------------------------


def test_the_reference_answer_in_tags_scores_one_for_every_prompt():
    for prompt in mixed_prompts():
        result = VERIFIER.verify(prompt, f"Let me work it out step by step.\n{prompt.solution}")
        assert (result.reward, result.correct, result.error) == (1.0, True, None), prompt.id
        assert result.details["extracted"] == prompt.answer


def test_the_last_answer_tag_is_the_one_scored():
    prompt = prompts_of("leg_counting")[0]
    wrong = str(int(prompt.answer) + 1)
    assert VERIFIER.verify(prompt, f"<answer>{wrong}</answer> no, rather <answer>{prompt.answer}</answer>").correct
    assert not VERIFIER.verify(prompt, f"<answer>{prompt.answer}</answer> no, rather <answer>{wrong}</answer>").correct


def test_a_wrong_answer_scores_below_one():
    for name in ("leg_counting", "basic_arithmetic", "chain_sum"):
        prompt = prompts_of(name)[0]
        result = VERIFIER.verify(prompt, "<answer>definitely not it</answer>")
        assert result.reward < 1.0 and not result.correct and result.error is None, name


def test_partial_credit_is_kept_as_the_reward():
    prompt = prompts_of("word_sorting")[0]
    words = prompt.answer.split(", ")
    assert len(words) >= 3
    swapped = ", ".join([*words[:-2], words[-1], words[-2]])
    result = VERIFIER.verify(prompt, f"<answer>{swapped}</answer>")
    assert result.reward == pytest.approx((len(words) - 2) / len(words))
    assert 0.0 < result.reward < 1.0 and not result.correct


@pytest.mark.parametrize(
    "completion", ["", "500", "the answer is 500", "<answer>500", "500</answer>", "</answer>5<answer>"]
)
def test_no_complete_answer_tag_scores_zero_without_an_error(completion: str):
    prompt = prompts_of("leg_counting")[0]
    result = VERIFIER.verify(prompt, completion.replace("500", prompt.answer))
    assert (result.reward, result.correct, result.error, result.details) == (0.0, False, None, {"extracted": None})


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("<answer> 42 </answer>", "42"),
        ("<answer>\n1, 2\n</answer>", "1, 2"),
        ("<answer>a</answer> and <answer>b</answer>", "b"),
        ("<answer>a</answer> then <answer>unclosed", "a"),
        ("<answer>a</answer> stray </answer>", "a"),
        ("<answer>a <answer>b</answer>", "b"),
        ("<answer></answer>", ""),
        ("no tags", None),
        ("</answer><answer>", None),
    ],
)
def test_extract_answer(completion: str, answer: str | None):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>" * 200_000,
        "<answer>" + "9" * 1_000_000 + "</answer>",
        "<answer>\u2603\U0001f600\x00\ud800</answer>",
        "<answer>" + "\U0001f600" * 5_000 + "</answer>",
        "<answer>[[[{{{(((</answer>",
        "<answer>-</answer>",
        "<answer>NaN</answer>",
        "<answer>1e999999</answer>",
    ],
)
def test_garbage_huge_and_unicode_completions_never_raise(completion: str):
    for prompt in mixed_prompts()[::3]:
        started = time.perf_counter()
        result = VERIFIER.verify(prompt, completion)
        assert 0.0 <= result.reward <= 1.0 and not result.correct
        assert time.perf_counter() - started < 2.0


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200), tagged=st.booleans())
def test_any_text_scores_in_range_without_raising(text: str, tagged: bool):
    completion = f"<answer>{text}</answer>" if tagged else text
    for name in DATASET_SIZES:
        result = VERIFIER.verify(prompts_of(name)[0], completion)
        assert 0.0 <= result.reward <= 1.0
        assert result.correct == (result.reward >= 0.999)


def test_a_scorer_that_raises_gives_an_error_naming_the_dataset():
    prompt = prompts_of("prime_factorization")[0]
    result = VERIFIER.verify(prompt, "<answer>xx</answer>")
    assert (result.reward, result.correct) == (0.0, False)
    assert result.error is not None and "prime_factorization" in result.error and "ValueError" in result.error
    assert VERIFIER.verify(prompt, prompt.solution or "").correct


def test_call_with_timeout_catches_a_swallowed_timer_and_leaves_fast_calls_and_other_threads_alone():
    def swallows() -> float:
        try:
            time.sleep(2)
        except BaseException:  # what a bare `except:` in a scorer does
            return 1.0
        return 0.5

    assert call_with_timeout(swallows, 0.05) == (None, True)
    assert call_with_timeout(lambda: 0.75, 1.0) == (0.75, False)
    in_thread: list[tuple[Any, bool]] = []
    thread = threading.Thread(target=lambda: in_thread.append(call_with_timeout(lambda: 0.25, 0.05)))
    thread.start()
    thread.join()
    assert in_thread == [(0.25, False)]


def test_a_prompt_without_reasoning_gym_metadata_is_an_error_not_an_exception():
    result = VERIFIER.verify(Prompt(id="p", text="2+2?", answer="4", distribution="d"), "<answer>4</answer>")
    assert (result.reward, result.correct) == (0.0, False)
    assert result.error is not None and "load_reasoning_gym_prompts" in result.error


# --- answers that reasoning-gym would run as Python ---------------------------------------------------


def payload(path: Path) -> str:
    return f"__import__('pathlib').Path({str(path)!r}).write_text('ran')"


@pytest.mark.parametrize("name", sorted(SYMPY_PARSED))
def test_code_in_an_answer_for_a_sympy_parsed_generator_is_refused_not_run(name: str, tmp_path: Path):
    prompt = prompts_of(name)[0]
    result = VERIFIER.verify(prompt, f"<answer>{payload(tmp_path / 'ran')}</answer>")
    assert not (tmp_path / "ran").exists()
    assert (result.reward, result.correct, result.error) == (0.0, False, None)
    assert result.details["refused"].startswith("call")
    reference = VERIFIER.verify(prompt, f"<answer>{prompt.answer}</answer>")
    assert (reference.reward, reference.correct) == (1.0, True)


@pytest.mark.parametrize("answer", ["1e999999", "10**10**9", "(10**999)**999", "9**9**9**9", "N(pi, 10**9)"])
def test_answers_that_would_stall_sympy_in_c_code_are_refused_at_once(answer: str):
    prompt = prompts_of("simple_integration")[0]
    started = time.perf_counter()
    result = VERIFIER.verify(prompt, f"<answer>{answer}</answer>")
    assert time.perf_counter() - started < 1.0
    assert result.reward == 0.0 and "refused" in result.details


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("x**(3/2)/3 - 2*x**-2 + sqrt(x) + C", None),
        ("-3*Integral(x**2*sin(x), x) + C", None),
        ("(3 + 5) * 7 - 2", None),
        ("100**1000", None),
        ("x.n(10**9)", "call"),
        ("exec(chr(95))", "call"),
        ("\uff45\uff58\uff45\uff43(1)", "call 'exec(1)'"),  # fullwidth letters: Python reads them as `exec`
        ("S(1)", "call"),
        ("'text'", "constant"),
        ("[1, 2]", "list"),
        ("lambda: 1", "lambda"),
        ("x**1001", "an exponent"),
        ("2**exec", "name 'exec'"),
        ("2**(1/0.001)", "an exponent"),
        ("10**999 * 10**999 * 10**999", "numbers of over 4300 digits"),
        ("(" * 400 + "1" + ")" * 400, "not an arithmetic expression"),
        ("1 +", "not an arithmetic expression"),
    ],
)
def test_refused_math_allows_arithmetic_and_nothing_else(answer: str, reason: str | None):
    refusal = refused_math(answer)
    assert refusal == reason if reason is None else refusal is not None and refusal.startswith(reason)


def test_every_reference_answer_of_the_sympy_parsed_generators_passes_the_guard():
    for name in sorted(SYMPY_PARSED):
        generator = reasoning_gym.create_dataset(name, size=6, seed=5)
        refused = [
            (index, generator[index]["answer"]) for index in range(6) if refused_math(generator[index]["answer"])
        ]
        assert refused == [], name


@pytest.mark.parametrize("name", ["string_insertion", "spiral_matrix", "binary_matrix", "n_queens"])
def test_generators_that_eval_an_answer_read_literals_only(name: str, tmp_path: Path):
    prompt = prompts_of(name)[0]
    result = VERIFIER.verify(prompt, f"<answer>{payload(tmp_path / 'ran')}</answer>")
    assert not (tmp_path / "ran").exists()
    assert (result.reward, result.correct, result.error) == (0.0, False, None)


def test_a_list_literal_still_earns_the_partial_credit_eval_gave():
    prompt = prompts_of("spiral_matrix")[0]
    as_list = "[" + ", ".join(prompt.answer.split()) + "]"
    assert VERIFIER.verify(prompt, f"<answer>{as_list}</answer>").reward == pytest.approx(0.1)


# --- msgpack round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["leg_counting", "word_sorting", "rearc", "knights_knaves"])
def test_a_group_holding_a_prompt_round_trips_and_still_scores(name: str):
    for prompt in prompts_of(name):
        restored = round_trip(prompt)
        assert restored == prompt
        result = VERIFIER.verify(restored, f"<answer>{prompt.answer}</answer>")
        assert (result.reward, result.correct, result.error) == (1.0, True, None)


def test_tuples_are_tagged_because_scorers_compare_them():
    # rearc's scorer compares grids as tuples; plain msgpack turns them into lists and the reference fails
    generator = reasoning_gym.create_dataset("rearc", size=1, seed=0)
    entry = generator[0]
    plainly = msgpack.unpackb(msgpack.packb(entry), strict_map_key=False)
    assert generator.score_answer(entry["answer"], plainly) < 1.0
    assert generator.score_answer(entry["answer"], from_plain(msgpack.unpackb(msgpack.packb(to_plain(entry))))) == 1.0


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4).map(tuple)
        | st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(plain_values)
def test_to_plain_round_trips_through_msgpack_exactly(value: Any):
    packed = msgpack.packb(to_plain(value), use_bin_type=True)
    restored = from_plain(msgpack.unpackb(packed, raw=False, strict_map_key=False))
    assert restored == value
    assert repr(restored) == repr(value)  # tuples stay tuples, lists stay lists, all the way down


@pytest.mark.parametrize("value", [{1, 2}, Fraction(1, 3), 2**64, {(1, 2): "a"}, {"__tuple__": [1]}, [object()]])
def test_values_msgpack_cannot_carry_exactly_are_refused(value: Any):
    with pytest.raises(NotPlain):
        to_plain(value)


# --- entries that cannot be stored are regenerated --------------------------------------------------


@dataclass
class SetsConfig:
    seed: int | None = None
    size: int = 10


class SetsDataset(ProceduralDataset):
    """Entries holding a set (which msgpack cannot carry) and a scorer that checks the set."""

    def __init__(self, config: SetsConfig):
        super().__init__(config=config, seed=config.seed, size=config.size)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        value = (self.seed or 0) * 100 + idx
        return {"question": f"Say {value}.", "answer": str(value), "metadata": {"accepted": {str(value)}}}

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float:
        if answer == "out of range":
            return 2.0
        if answer == "slow":
            try:
                time.sleep(5)
            except:  # noqa: E722 -- a bare except, as in several reasoning-gym scorers, swallows the timer
                return 1.0
        return 1.0 if answer in entry["metadata"]["accepted"] else 0.0


@pytest.fixture
def sets_dataset(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(DATASETS, "orchard_test_sets", (SetsDataset, SetsConfig))
    return "orchard_test_sets"


def test_an_entry_msgpack_cannot_carry_is_regenerated_from_its_index(sets_dataset: str):
    prompts = load_reasoning_gym_prompts(source(ReasoningGymDataset(name=sets_dataset, size=3, seed=4)))
    for prompt in prompts:
        assert "entry" not in prompt.metadata
        restored = round_trip(prompt)
        assert VERIFIER.verify(restored, f"<answer>{prompt.answer}</answer>").correct
        assert VERIFIER.verify(restored, "<answer>7</answer>").reward == 0.0


def test_a_regenerated_entry_that_differs_from_the_prompt_is_an_error(sets_dataset: str):
    prompt = load_reasoning_gym_prompts(source(ReasoningGymDataset(name=sets_dataset, size=1)))[0]
    moved = replace(prompt, answer="something else")
    result = VERIFIER.verify(moved, "<answer>0</answer>")
    assert result.reward == 0.0 and result.error is not None and "regenerated" in result.error


def test_a_score_outside_zero_to_one_is_an_error(sets_dataset: str):
    prompt = load_reasoning_gym_prompts(source(ReasoningGymDataset(name=sets_dataset, size=1)))[0]
    result = VERIFIER.verify(prompt, "<answer>out of range</answer>")
    assert (result.reward, result.correct) == (0.0, False)
    assert result.error is not None and "outside [0, 1]" in result.error


def test_a_slow_scorer_is_stopped_and_counted_wrong_even_if_it_swallows_the_timer(sets_dataset: str):
    prompt = load_reasoning_gym_prompts(source(ReasoningGymDataset(name=sets_dataset, size=1)))[0]
    started = time.perf_counter()
    result = ReasoningGymVerifier(timeout_seconds=0.2).verify(prompt, "<answer>slow</answer>")
    assert time.perf_counter() - started < 2.0
    assert (result.reward, result.correct) == (0.0, False)
    assert result.error is not None and sets_dataset in result.error and "took over 0.2s" in result.error


def test_the_verifier_is_stateless_between_prompts_of_different_datasets():
    leg, chain = prompts_of("leg_counting")[0], prompts_of("chain_sum")[0]
    assert VERIFIER.verify(leg, f"<answer>{leg.answer}</answer>").correct
    assert VERIFIER.verify(chain, f"<answer>{chain.answer}</answer>").correct
    assert not VERIFIER.verify(chain, f"<answer>{leg.answer}1</answer>").correct


# --- registry ---------------------------------------------------------------------------------------


def test_the_verifier_is_a_builtin_of_the_registry():
    verifier = get_verifier("reasoning_gym")
    assert isinstance(verifier, ReasoningGymVerifier)
    prompt = prompts_of("leg_counting")[0]
    assert verifier.verify(prompt, f"<answer>{prompt.answer}</answer>").correct
    with pytest.raises(VerifierError, match="reasoning_gym"):
        get_verifier("no_such_verifier")
