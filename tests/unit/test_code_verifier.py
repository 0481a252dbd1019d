"""The code verifier: extracting the program, reading test specifications, splitting asserts into what
the program evaluates and what only the parent knows, the strict serialiser of reported values and
its decoder, scoring (through the real sandbox, which takes a fraction of a second per test). The
attacks on assert tests are in tests/integration/test_code_reward_hacking.py."""

from __future__ import annotations

import collections
import enum
import json
import math
import re
from collections import Counter, OrderedDict, defaultdict

import pytest

from orchard.records import Prompt
from orchard.verifiers import code as code_module
from orchard.verifiers.code import (
    CodeVerifier,
    Outcome,
    ResultError,
    decode_results,
    decode_value,
    extract_code,
    harness_program,
    parse_assertion,
    parse_tests,
)
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


def test_assert_tests_are_judged_on_the_values_the_program_reports():
    tests = [
        {"assert": "assert add(1, 2) == 3"},
        {"assert": "assert add(-1, 1) == 0"},
        {"assert": "assert add(2, 2) == 5"},
    ]
    result = VERIFIER.verify(code_prompt(tests), fenced("def add(a, b):\n    return a + b"))
    assert result.reward == pytest.approx(2 / 3) and not result.correct
    assert result.details["failures"][0]["reason"] == "assert add(2, 2) == 5: the value was 4"


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


# ---- assert tests: the parsing into expression and hidden expectation ----


@pytest.mark.parametrize(
    ("assertion", "expression", "fields"),
    [
        ("assert add(1, 2) == 3", "add(1, 2)", {"relation": "==", "expected": 3}),
        ("assert 3 == add(1, 2)", "add(1, 2)", {"relation": "==", "expected": 3, "expected_first": True}),
        ("assert f('a') != 'b', 'message'", "f('a')", {"relation": "!=", "expected": "b"}),
        ("assert sorted(f([3, 1])) <= [1, 3]", "sorted(f([3, 1]))", {"relation": "<=", "expected": [1, 3]}),
        ("assert 2 in f(x=-1)", "f(x=-1)", {"relation": "in", "expected": 2, "expected_first": True}),
        ("assert f() not in {1: 'a'}", "f()", {"relation": "not in", "expected": {1: "a"}}),
        ("assert f() is None", "f()", {"relation": "is", "expected": None}),
        ("assert f() is not False", "f()", {"relation": "is not", "expected": False}),
        ("assert is_prime(7)", "is_prime(7)", {"relation": "truthy"}),
        ("assert not is_prime(8)", "is_prime(8)", {"relation": "truthy", "negated": True}),
        ("assert not f(1) == (1, -2.5)", "f(1)", {"relation": "==", "expected": (1, -2.5), "negated": True}),
        ("assert math.isclose(area(2), 12.566, rel_tol=0.001)", "area(2)", {"relation": "isclose", "rel_tol": 0.001}),
        ("assert math.isclose(0.5, half(1), abs_tol=1e-9)", "half(1)", {"relation": "isclose", "expected": 0.5}),
        ("assert abs(area(2) - 12.566) < 1e-3", "area(2)", {"relation": "<", "expected": 1e-3, "offset": 12.566}),
        ("assert 1e-6 > abs(0.5 - half(1))", "half(1)", {"relation": ">", "offset": 0.5, "expected_first": True}),
        ("assert abs(f(1)) == 2", "abs(f(1))", {"relation": "==", "expected": 2, "offset": None}),
    ],
)
def test_an_assert_is_split_into_what_the_program_evaluates_and_what_it_never_sees(assertion, expression, fields):
    [check] = parse_assertion(assertion)
    assert check.expression == expression
    assert check.statement.startswith("assert ") and "message" not in check.statement  # the message is dropped
    for name, value in fields.items():
        assert getattr(check, name) == value, name


def test_several_asserts_make_one_test_of_several_checks():
    checks = parse_assertion("assert add(1, 2) == 3\nassert add(2, 2) == 4  # a comment\n")
    assert [check.expression for check in checks] == ["add(1, 2)", "add(2, 2)"]
    [test] = parse_tests(code_prompt([{"assert": "assert add(1, 2) == 3\nassert add(2, 2) == 4"}]))
    assert test.checks == checks


@pytest.mark.parametrize(
    ("assertion", "message"),
    [
        ("assert f(1) == f(2)", "compares two expressions; one side must be a literal"),
        ("assert 0 < f(1) < 5", "chains comparisons"),
        ("assert all(f(x) == y for x, y in [(1, 2)])", "compares inside the evaluated expression"),
        ("assert (f(1) == f(2)) is True", "compares inside the evaluated expression"),
        ("assert f(1) is 3", "uses `is` with 3; use == or != for values"),
        ("assert f(1) == float('inf')", "compares two expressions"),
        ("assert math.isclose(f(1), g(2))", "one argument of math.isclose must be a literal number"),
        ("assert math.isclose(f(1), 0.5, tol=1)", "takes only rel_tol= and abs_tol="),
        ("assert math.isclose(f(1))", "takes the expression and one literal number"),
        ("x = f(1)\nassert x == 2", "`x = f(1)` is not an assert statement"),
        ("def check(candidate):\n    assert candidate(1) == 2", "is not an assert statement"),
        ("assert (yield) == 1", "the expression cannot be evaluated"),
        ("assert f(1) ==", "not valid Python"),
        ("# nothing", "holds no assert statement"),
    ],
)
def test_an_assert_outside_the_supported_forms_is_refused_naming_the_test(assertion, message):
    result = VERIFIER.verify(code_prompt([{"stdin": "", "expected_stdout": ""}, {"assert": assertion}]), fenced(ADD))
    assert result.reward == 0.0 and not result.correct and result.details == {}
    assert result.error is not None and result.error.startswith("code: prompt.answer[1].assert: ")
    assert message in result.error, result.error


@pytest.mark.parametrize(
    ("assertion", "value", "holds"),
    [
        ("assert f() == 3", 3.0, True),
        ("assert f() == 3", True, False),
        ("assert f() == [1]", (1,), False),
        ("assert f() == {1, 2}", {2, 1}, True),
        ("assert f() < 3", "a", False),
        ("assert not f() < 3", "a", False),  # the comparison raises: a failure even under `not`
        ("assert not f() < 3", 4, True),
        ("assert 2 in f()", [1, 2], True),
        ("assert f() in [1, 2]", 2, True),
        ("assert f() is True", 1, False),
        ("assert f() is None", None, True),
        ("assert f()", [0], True),
        ("assert f()", "", False),
        ("assert not f()", 0.0, True),
        ("assert f() != 1", float("nan"), True),
        ("assert math.isclose(f(), 0.3)", 0.1 + 0.2, True),
        ("assert math.isclose(f(), 0.3)", "0.3", False),
        ("assert abs(f() - 0.3) < 1e-9", 0.1 + 0.2, True),
        ("assert abs(f() - 0.3) < 1e-9", 0.31, False),
        ("assert abs(f() - 1j) <= 0", 1j, True),
    ],
)
def test_the_parent_judges_a_reported_value_with_pythons_semantics(assertion, value, holds):
    [check] = parse_assertion(assertion)
    assert check.holds(value) is holds


def test_the_program_never_holds_the_expected_values():
    expected = [987654321, "a secret word", 0.123456789, (5, 4, 3, 2, 1)]
    checks = parse_assertion("\n".join(f"assert f({index}) == {value!r}" for index, value in enumerate(expected)))
    program = harness_program("def f(x):\n    return x", [check.expression for check in checks])
    for value in expected:
        assert repr(value) not in program and str(value) not in program
    assert "f(0)" in program and "f(3)" in program


# ---- the strict serialiser (the harness's, run here) and the parent's decoder ----


@pytest.fixture(scope="module")
def encode():
    """The harness's serialiser, as the sandboxed program builds it."""
    namespace: dict[str, object] = {}
    exec(code_module._HARNESS_LIBRARY, namespace)
    return namespace["_make_encoder"](code_module._MAX_DEPTH)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(10**5000),  # past the interpreter's limit on decimal digits: sent in hexadecimal
        2**64,
        -0.0,
        1.5e308,
        float("inf"),
        -1 / 3,
        complex(1.5, -2),
        "",
        'é \ud800 \n " \\ \x00',
        b"\x00\xff",
        [],
        [1, [2, [3, ()]]],
        (1, "a", None),
        {1, "b", (2, 3)},
        frozenset({frozenset()}),
        {"a": 1, (1, 2): [3], None: {"x": {1.5}}},
    ],
    ids=lambda value: type(value).__name__,
)
def test_built_in_values_survive_the_round_trip_exactly(encode, value):
    decoded = decode_value(json.loads(encode(value)))
    assert type(decoded) is type(value) and decoded == value
    if type(value) is float:
        assert math.copysign(1, decoded) == math.copysign(1, value)  # -0.0 stays negative


def test_nan_and_the_standard_dicts_survive_the_round_trip(encode):
    assert math.isnan(decode_value(json.loads(encode(float("nan")))))
    for mapping in (Counter("abca"), OrderedDict(b=1, a=2), defaultdict(list, {1: [2]})):
        decoded = decode_value(json.loads(encode(mapping)))
        assert type(decoded) is dict and decoded == dict(mapping)


class AlwaysEqual:
    def __eq__(self, other):
        return True

    __hash__ = object.__hash__


class ForgedInt(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class ForgedStr(str):
    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


class ClaimsToBeInt:
    @property
    def __class__(self):
        return int


class Colour(enum.IntEnum):
    RED = 1


def looping_list() -> list[object]:
    looping: list[object] = []
    looping.append(looping)
    return looping


@pytest.mark.parametrize(
    "value",
    [
        AlwaysEqual(),
        ForgedInt(3),
        ForgedStr("x"),
        ClaimsToBeInt(),
        Colour.RED,
        [1, AlwaysEqual()],
        {"a": ForgedInt(1)},
        {ForgedStr("k"): 1},
        collections.namedtuple("Point", "x y")(1, 2),
        collections.deque([1]),
        range(3),
        iter([1]),
        looping_list(),
    ],
    ids=lambda value: type(value).__name__,
)
def test_anything_but_an_exact_built_in_value_is_refused(encode, value):
    with pytest.raises((TypeError, ValueError)):
        encode(value)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not JSON"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        ('[["ok", ["i", "0x3"]]]', "expected a list of 2 results"),
        ('{"a": 1}', "expected a list of 2 results"),
        ('[["ok", ["i", "0x3"]], ["ok"]]', "not a pair"),
        ('[["ok", ["i", "0x3"]], ["pass", true]]', "unknown result 'pass'"),
        ('[["ok", ["i", "0x3"]], ["error", 1]]', "unknown result 'error'"),
        ('[["ok", ["i", "3"]], ["ok", ["n"]]]', "tagged 'i' is malformed"),
        ('[["ok", ["i", 3]], ["ok", ["n"]]]', "tagged 'i' is malformed"),
        ('[["ok", ["b", true]], ["ok", ["n"]]]', "tagged 'b' is malformed"),
        ('[["ok", ["b", 2]], ["ok", ["n"]]]', "tagged 'b' is malformed"),
        ('[["ok", ["n", 1]], ["ok", ["n"]]]', "tagged 'n' is malformed"),
        ('[["ok", ["f", "x"]], ["ok", ["n"]]]', "tagged 'f'"),
        ('[["ok", ["f", NaN]], ["ok", ["n"]]]', "tagged 'f' is malformed"),
        ('[["ok", ["eq", "anything"]], ["ok", ["n"]]]', "tagged 'eq' is malformed"),
        ('[["ok", ["S", ["l"]]], ["ok", ["n"]]]', "'S': unhashable type"),
        ('[["ok", ["d", ["n"]]], ["ok", ["n"]]]', "a key and no value"),
        ('[["ok", ' + '["l", ' * 150 + '["n"]' + "]" * 150 + '], ["ok", ["n"]]]', "nested more than 100 deep"),
        ('[["ok", "x"], ["ok", ["n"]]]', "not a tagged list"),
    ],
)
def test_a_result_line_that_is_not_the_harnesss_is_refused(line, problem):
    with pytest.raises(ResultError, match=re.escape(problem)):
        decode_results(line, 2)


def test_a_result_line_decodes_to_values_and_errors():
    outcomes = decode_results('[["ok", ["t", ["i", "-0x2a"], ["s", "a"]]], ["error", "NameError: f"]]', 2)
    assert outcomes == [Outcome(value=(-42, "a")), Outcome(error="NameError: f")]
