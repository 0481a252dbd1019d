"""Procedural families, the math verifier and the registry, as pure functions."""

from __future__ import annotations

import random

import pytest

from orchard.protocols import VerifierResult
from orchard.records import Prompt
from orchard.verifiers.math_answer import MathVerifier
from orchard.verifiers.procedural import DIFFICULTIES, FAMILIES, ProceduralVerifier, generate_prompt
from orchard.verifiers.registry import VerifierError, get_verifier, safe_verify


def always_right(prompt: Prompt, completion: str) -> bool:
    return True


def explodes(prompt: Prompt, completion: str) -> float:
    raise RuntimeError("boom")


def not_a_number(prompt: Prompt, completion: str) -> float:
    return float("nan")


class LengthVerifier:
    name = "length"

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        return VerifierResult(reward=float(len(completion)), correct=True)


NOT_A_VERIFIER = 42


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_every_family_checks_its_own_answer_exactly(family, difficulty):
    rng = random.Random(difficulty)
    verifier = ProceduralVerifier()
    for _ in range(50):
        prompt = generate_prompt(family, difficulty, rng)
        assert prompt.distribution == f"{family}/d{difficulty}"
        assert prompt.text.isascii() and prompt.text.endswith("=")
        assert verifier.verify(prompt, prompt.answer).correct
        assert verifier.verify(prompt, f" {prompt.answer}\n").reward == 1.0
        assert not verifier.verify(prompt, prompt.answer + "0").correct
        assert verifier.verify(prompt, "\ufffd\ufffd").reward == 0.0


def test_answers_are_right():
    assert (generate_prompt("addition", 1, random.Random(0)).answer) == str(
        sum(int(x) for x in generate_prompt("addition", 1, random.Random(0)).text[:-1].split("+"))
    )
    rng = random.Random(3)
    prompt = generate_prompt("multiplication", 3, rng)
    a, b = prompt.text[:-1].split("*")
    assert prompt.answer == str(int(a) * int(b))
    prompt = generate_prompt("counting", 2, rng)
    target, text = prompt.text[len("count ") : -1].split(":")
    assert prompt.answer == str(text.count(target))


def test_generation_is_deterministic_and_ids_follow_text():
    first = [generate_prompt("sorting", 2, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert first[0].id == f"sorting-d2:{first[0].text}"


def test_unknown_family_or_difficulty_is_named():
    with pytest.raises(ValueError, match="unknown procedural family 'division'"):
        generate_prompt("division", 1, random.Random(0))
    with pytest.raises(ValueError, match="difficulty 9"):
        generate_prompt("addition", 9, random.Random(0))


@pytest.mark.parametrize(
    ("answer", "completion", "correct"),
    [
        ("0.5", "1/2", True),
        ("0.5", "The answer is \\boxed{\\frac{1}{2}}", True),
        ("3", "x = 3", True),
        ("3", "4", False),
        ("\\frac{2}{3}", "\\boxed{\\frac{4}{6}}", True),
        ("3", "}{}{\\\\\\frac{", False),
        ("3", "", False),
    ],
)
def test_math_verifier(answer, completion, correct):
    prompt = Prompt(id="m", text="?", answer=answer, distribution="math")
    result = MathVerifier().verify(prompt, completion)
    assert result.correct is correct
    assert result.reward == float(correct)


def test_math_verifier_works_outside_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    prompt = Prompt(id="m", text="?", answer="0.5", distribution="math")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: MathVerifier().verify(prompt, c).correct, ["1/2", "2"]))
    assert results == [True, False]


def test_registry_builtins_and_dotted_paths():
    assert isinstance(get_verifier("procedural"), ProceduralVerifier)
    assert isinstance(get_verifier("math"), MathVerifier)
    prompt = Prompt(id="p", text="1+1=", answer="2", distribution="d")
    assert get_verifier("tests.unit.test_verifiers:always_right").verify(prompt, "x").correct
    assert get_verifier("tests.unit.test_verifiers.LengthVerifier").verify(prompt, "abc").reward == 3.0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nonsense", "not a built-in"),
        ("no_such_module:thing", "cannot import 'no_such_module'"),
        ("tests.unit.test_verifiers:missing", "has no attribute 'missing'"),
        ("tests.unit.test_verifiers:NOT_A_VERIFIER", "is a int, not a verifier"),
    ],
)
def test_registry_errors_name_the_problem(name, message):
    with pytest.raises(VerifierError, match=message):
        get_verifier(name)


def test_safe_verify_contains_raising_and_non_finite_verifiers():
    prompt = Prompt(id="p", text="1+1=", answer="2", distribution="d")
    raised = safe_verify(get_verifier("tests.unit.test_verifiers:explodes"), prompt, "2")
    assert (raised.reward, raised.correct) == (0.0, False)
    assert "RuntimeError: boom" in raised.error
    nan = safe_verify(get_verifier("tests.unit.test_verifiers:not_a_number"), prompt, "2")
    assert nan.reward == 0.0 and "non-finite reward" in nan.error
    fine = safe_verify(get_verifier("procedural"), prompt, "2")
    assert fine.correct and fine.error is None


def test_big_multiplication_carries_its_tool_call_and_gives_partial_credit():
    import random

    from orchard.verifiers.procedural import position_share

    prompt = generate_prompt("big_multiplication", 1, random.Random(0))
    a, b = prompt.text.removeprefix("mul:").removesuffix("=").split("*")
    assert len(a) == len(b) == 3 and prompt.answer == str(int(a) * int(b))
    assert prompt.metadata["tool_call"] == {"tool": "python", "call": f"print({a}*{b})", "output": prompt.answer}
    verifier = ProceduralVerifier()
    exact = verifier.verify(prompt, f" {prompt.answer}\n")
    assert (exact.reward, exact.correct) == (1.0, True)
    one_off = prompt.answer[:-1] + str((int(prompt.answer[-1]) + 1) % 10)
    near = verifier.verify(prompt, one_off)
    assert near.correct is False and near.reward == pytest.approx((len(prompt.answer) - 1) / len(prompt.answer))
    assert position_share("12", "1234") == 0.5 and position_share("123456", "12") == pytest.approx(2 / 6)
    assert verifier.verify(prompt, "").reward == 0.0
    # other families stay exact-match only
    other = generate_prompt("addition", 1, random.Random(0))
    assert verifier.verify(other, other.answer[:-1] + "x").reward == 0.0
