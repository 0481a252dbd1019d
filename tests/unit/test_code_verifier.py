"""The code verifier: extracting the program, reading test specifications, scoring (through the real
sandbox, which takes a fraction of a second per test)."""

from __future__ import annotations

import json
import re

import pytest

from orchard.records import Prompt
from orchard.verifiers.code import CodeVerifier, extract_code, parse_tests
from orchard.verifiers.registry import get_verifier, safe_verify
from orchard.verifiers.sandbox import SandboxLimits

LIMITS = SandboxLimits(wall_seconds=2, cpu_seconds=1, memory_bytes=256 * 2**20, output_bytes=4096)
VERIFIER = CodeVerifier(limits=LIMITS)

ADD_TESTS = {
    "tests": [
        {"stdin": "1 2\n", "expected_stdout": "3\n"},
        {"stdin": "10 -4\n", "expected_stdout": "6"},
        {"stdin": "0 0\n", "expected_stdout": "0\n"},
        {"stdin": "2 2\n", "expected_stdout": "4\n"},
    ]
}


def code_prompt(tests: object, *, in_metadata: bool = False) -> Prompt:
    if in_metadata:
        return Prompt(id="p", text="Add two numbers.", answer="", distribution="code", metadata={"tests": tests})
    answer = tests if isinstance(tests, str) else json.dumps(tests)
    return Prompt(id="p", text="Add two numbers.", answer=answer, distribution="code")


def fenced(code: str, label: str = "python") -> str:
    return f"Here is my solution:\n```{label}\n{code}\n```\nIt reads two numbers."


ADD = "a, b = map(int, input().split())\nprint(a + b)"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (fenced("print(1)"), "print(1)\n"),
        ("```py\nprint(1)\n```", "print(1)\n"),
        ("```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```", "print(2)\n"),
        ("```text\nnot code\n```\n```\nprint(3)\n```", "print(3)\n"),
        ("```python\nprint(4)\n```\n```bash\necho no\n```", "print(4)\n"),
        ("print(5)", "print(5)"),
        ("Sure.\n```python\nprint(6)\nprint(7)", "print(6)\nprint(7)"),
    ],
    ids=[
        "python block",
        "py block",
        "last python block",
        "unlabelled block",
        "python over bash",
        "no fence",
        "cut off",
    ],
)
def test_the_program_is_extracted_from_the_completion(completion, expected):
    assert extract_code(completion) == expected


def test_tests_come_from_the_answer_or_the_metadata_in_either_form():
    as_object = parse_tests(code_prompt(ADD_TESTS))
    assert parse_tests(code_prompt(ADD_TESTS["tests"])) == as_object
    assert parse_tests(code_prompt(ADD_TESTS["tests"], in_metadata=True)) == as_object
    assert as_object[0].stdin == "1 2\n" and as_object[0].expected_stdout == "3\n"
    assertion = parse_tests(code_prompt([{"assert": "assert add(1, 2) == 3"}]))[0]
    assert assertion.assertion == "assert add(1, 2) == 3" and assertion.expected_stdout is None


def test_a_correct_program_scores_one():
    result = VERIFIER.verify(code_prompt(ADD_TESTS), fenced(ADD))
    assert result.correct and result.reward == 1.0 and result.error is None
    assert result.details["passed"] == result.details["total"] == 4


def test_a_partly_right_program_scores_the_share_of_tests_passed():
    almost = "a, b = map(int, input().split())\nprint(a + b if a else 99)"
    result = VERIFIER.verify(code_prompt(ADD_TESTS), fenced(almost))
    assert not result.correct and result.reward == 0.75 and result.error is None
    assert result.details["failures"][0]["test"] == 2 and result.details["failures"][0]["reason"] == "wrong output"
    strict = CodeVerifier(limits=LIMITS, all_or_nothing=True).verify(code_prompt(ADD_TESTS), fenced(almost))
    assert strict.reward == 0.0 and not strict.correct


def test_output_is_compared_without_trailing_whitespace():
    spaced = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()\nprint()"
    assert VERIFIER.verify(code_prompt(ADD_TESTS), fenced(spaced)).correct


def test_assert_tests_run_after_the_program():
    tests = [
        {"assert": "assert add(1, 2) == 3"},
        {"assert": "assert add(-1, 1) == 0"},
        {"assert": "assert add(2, 2) == 5"},
    ]
    result = VERIFIER.verify(code_prompt(tests), fenced("def add(a, b):\n    return a + b"))
    assert result.reward == pytest.approx(2 / 3) and not result.correct
    assert result.details["failures"][0]["reason"] == "exit status 1"
    assert "AssertionError" in result.details["failures"][0]["stderr"]


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        ("raise SystemExit(2)", "exit status 2"),
        ("while True:\n    pass", "limit: "),
        ("x = bytearray(2**40)", "limit: memory"),
        ("while True:\n    print('y' * 1000)", "limit: output"),
        ("import os\nos.kill(os.getpid(), 9)", "killed by SIGKILL"),
        ("this is not python", "exit status 1"),
    ],
)
def test_failing_programs_score_zero_with_the_reason(program, reason):
    result = VERIFIER.verify(code_prompt(ADD_TESTS["tests"][:1]), fenced(program))
    assert result.reward == 0.0 and not result.correct and result.error is None
    assert result.details["failures"][0]["reason"].startswith(reason)


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ("3", "must be a list of tests, not int"),
        ("not json", "prompt.answer is not JSON test cases"),
        ([], "holds no tests"),
        ({"cases": []}, re.escape("""must be {"tests": [...]} or a list; it has keys ['cases']""")),
        (["print(1)"], r"\[0\] must be an object, not str"),
        ([{"stdin": "1"}], r"needs exactly one of 'expected_stdout' and 'assert'"),
        ([{"expected_stdout": "1", "assert": "assert True"}], "needs exactly one of"),
        ([{"expected_stdout": 3}], r"\.expected_stdout must be a string, not int"),
        ([{"expected_stdout": "3", "timeout": 5}], r"unknown keys \['timeout'\]"),
        ([{"assert": "assert True", "stdin": "x"}], "an assert test takes no stdin"),
        ([{"assert": "assert True"}] * 65, "holds 65 tests; at most 64"),
    ],
)
def test_a_malformed_test_specification_scores_zero_with_the_problem_named(tests, message):
    result = VERIFIER.verify(code_prompt(tests), fenced(ADD))
    assert result.reward == 0.0 and not result.correct
    assert result.error is not None and result.error.startswith("code: ")
    assert re.search(message, result.error), result.error


def test_malformed_metadata_tests_are_named_by_their_place():
    result = VERIFIER.verify(code_prompt([{"stdin": 1, "expected_stdout": ""}], in_metadata=True), ADD)
    assert result.error == "code: prompt.metadata['tests'][0].stdin must be a string, not int"


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "```",
        "```python\n",
        "\x00\x00",
        "\ud800 surrogate",
        "```python\nimport sys\nsys.stdout.buffer.write(b'\\xff')\n```",
    ],
    ids=["empty", "lone fence", "empty block", "null bytes", "surrogate", "invalid utf-8 output"],
)
def test_odd_completions_never_raise(completion):
    result = VERIFIER.verify(code_prompt(ADD_TESTS["tests"][:1]), completion)
    assert result.reward == 0.0 and not result.correct and result.error is None


def test_an_overlong_program_is_not_run():
    verifier = CodeVerifier(limits=LIMITS, max_code_chars=10)
    result = verifier.verify(code_prompt(ADD_TESTS), fenced(ADD))
    assert result.reward == 0.0 and "not run" in result.details["reason"]


def test_the_code_verifier_is_registered_by_name():
    verifier = get_verifier("code")
    assert isinstance(verifier, CodeVerifier) and verifier.name == "code"
    result = safe_verify(verifier, code_prompt(ADD_TESTS["tests"][:2]), fenced(ADD))
    assert result.correct and result.reward == 1.0
