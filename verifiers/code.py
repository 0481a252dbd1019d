"""Code answers checked by running them against test cases in the sandbox (`verifiers/sandbox.py`).

The tests of a prompt come from `prompt.metadata["tests"]` or, when that is absent, from
`prompt.answer` read as JSON, so that a JSONL line can carry them in its `answer` field:

    {"tests": [{"stdin": "1 2\\n", "expected_stdout": "3\\n"}, {"assert": "assert add(1, 2) == 3"}]}

A bare list of tests is accepted too. Two kinds of test:

- `{"stdin": ..., "expected_stdout": ...}` (`stdin` optional) runs the program with that input and
  passes when it exits with status 0 and prints the expected output; lines are compared with their
  trailing whitespace removed, and trailing blank lines are ignored.
- `{"assert": ...}`: one or more assert statements (one per line), each checked as described below;
  the test passes when every one holds.

The program is the last ```python (or ```py) fenced block of the completion, else its last
unlabelled fenced block, else the whole completion. The reward is the share of tests passed, which
gives group-relative advantages a signal on partly right programs; `all_or_nothing=True` makes it
1.0 or 0.0. `correct` means every test passed. A malformed test specification scores 0 with an
`error` that names the problem; the verifier never raises.

Assert tests, and why they are not run as written
-------------------------------------------------

Appending an assert to the program and rewarding a clean exit pays for tricks instead of solutions:
the program can end the interpreter before the assert runs (`os._exit(0)`, `sys.exit(0)`, an
`excepthook` or `atexit` handler that exits 0), return an object whose `__eq__` always says True,
or read the assert (its own source file, `sys.argv`, the frames and code objects of `__main__`) to
learn the expected value. So the process that runs the program is never asked whether a test
passed, and never sees what is expected:

1. The parent parses each assert with `ast` into an *expression* and a hidden *expectation* (a
   literal, a comparison operator, a tolerance). Only the expression goes into the sandbox.
2. The sandboxed program is a harness that holds the model's code as a string: it runs the code as
   `__main__`, then evaluates each expression in the code's namespace, and serialises each value
   with a strict serialiser that accepts only exact built-in types (`type(x) is int`, never
   `isinstance`, so a subclass or a forged `__class__` is refused): None, bool, int, float, complex,
   str, bytes, list, tuple, set, frozenset, dict, and the dicts `Counter`, `OrderedDict` and
   `defaultdict`, nested at most `_MAX_DEPTH` deep. Every expression is evaluated even when an
   earlier one raised, and the harness writes all results on one line of stdout, behind
   `_RESULT_MARKER`, then leaves with `os._exit(0)` so no handler of the program runs afterwards.
   What it needs (`type`, `os.write`, the JSON string escaper ...) it takes before the code runs, so
   that an honest program that rebinds `list`, `print` or `json` does not break the report.
3. The parent decodes that line into built-in values (`decode_results`) and compares them with the
   expectation itself; no code of the program runs in the parent.

A test passes only when the run exits with status 0, within its limits, and stdout holds exactly
one result line with a value for each of the test's asserts, each meeting its expectation. Hence:
an exit before the harness ran, a signal, a closed or redirected fd 1, or an exception in the
program's top level leaves no result line (fail); a value of any other type is refused (fail); a
forged result line, or a patched serialiser, can only report values the program chose without
knowing what is expected (two lines, the forged and the real one, fail). The harness is not a
security boundary: the model's code runs in the same process and may patch or bypass all of it.
The scheme is sound because the process can only ever report values, never a verdict, and the
expected value never enters it. The exact types are not what defeats a forged `__eq__` (the parent
compares); they keep the serialiser from running any of the program's code (a subclass's
`__iter__` or `__index__`) and make the rule simple, at the cost of refusing a namedtuple, an
`IntEnum` member or a `deque` that Python's `==` might have accepted. No secret nonce marks the result line: the process can read its
own source, and a program that forges the line gains nothing over returning the values it forges.

Each assert test is one sandbox run (the same cost as a stdin test): a timeout or crash in one test
cannot hide the others' results, and within a test each expression's exception is recorded apart.

The supported asserts (`X` is any expression without a comparison in it; `L` a literal that
`ast.literal_eval` reads; a trailing `, "message"` is ignored):

- `assert X == L` or `assert L == X`, and likewise `!=`, `<`, `<=`, `>`, `>=`, `in`, `not in`;
- `assert X is L` and `is not`, with L one of None, True, False;
- `assert math.isclose(X, L)` (either order; `rel_tol` and `abs_tol` given as literals);
- `assert abs(X - L) < T` (`abs(L - X)`, any comparison, T a literal): the parent subtracts, so the
  expected number stays hidden too;
- `assert X` and `assert not X`: the truthiness of X's value, decided in the parent;
- `not` before any of these negates it. Python's semantics hold throughout (`3 == 3.0`,
  `[1] != (1,)`); a comparison that raises (`"a" < 1`) fails, negated or not.

Anything else (setup statements, a `check(candidate)` function, `f(1) == f(2)`, chained
comparisons, `all(f(x) == y for ...)`) is refused as a malformed specification with an error naming
the test, rather than run the old way: a comparison inside the program's process is decided by the
program's objects, and a literal inside the expression is shown to the program. Write such a test
as one assert per value, or as a stdin test.

Residual risks: a program can still guess; a test whose expectation is easy to guess from what the
program sees (a bare `assert is_valid(x)` that the data set always expects True, `f(3) == 3` for a
function that could return its argument) is passed by the guess, exactly as by an honest program
returning that constant. The expression is shown to the program and its operations run on the
program's objects, so a spec that moves the expected value into it (`assert f(x) - 3 == 0`) shows
that value, and one whose operations decide the outcome (`abs(f(1) - f(2)) < 1e-9`, where a
forged `__sub__` returns 0) is only as strong as that outcome is hard to guess. A value larger than
the output limit (`SandboxLimits.output_bytes`) fails, and the sandbox's own limits (it hides the
data sets; see `verifiers/sandbox.py`) apply as for any test.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchard.protocols import VerifierResult
from orchard.records import Prompt
from orchard.verifiers.sandbox import SandboxError, SandboxLimits, SandboxResult, run_sandboxed

_FENCED_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[^\n]*\n", re.IGNORECASE)
_PYTHON_LABELS = {"python", "python3", "py"}
_STDERR_TAIL_CHARS = 1000
_SHOWN_CHARS = 200
#: Starts the harness's one line of results on stdout (see the module docstring).
_RESULT_MARKER = "@orchard-assert-results@ "
#: How deeply a reported value may nest, in the harness and in the parent's decoder alike.
_MAX_DEPTH = 100


class CodeSpecError(ValueError):
    """A prompt's test cases are missing or malformed."""


_COMPARISONS: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda item, container: item in container),
    ast.NotIn: ("not in", lambda item, container: item not in container),
    ast.Is: ("is", operator.is_),
    ast.IsNot: ("is not", operator.is_not),
}
_RELATIONS: dict[str, Callable[[Any, Any], Any]] = dict(_COMPARISONS.values())
_SUPPORTED_FORMS = (
    "supported: assert X == L (or !=, <, <=, >, >=, in, not in; `is` with None, True or False), "
    "assert math.isclose(X, L), assert abs(X - L) < T, assert X, assert not X; "
    "X an expression without comparisons, L and T literals"
)


@dataclass(frozen=True)
class AssertCheck:
    """One assert, split into the expression the program evaluates and the expectation it never sees.

    The parent judges the value the program reports: `abs(value - offset)` first when `offset` is
    set, then `relation` against `expected` (`expected_first` keeps the operands' written order),
    `truthy` for a bare assert, `isclose` for `math.isclose`; `negated` for a leading `not`.
    """

    statement: str
    """The assert as parsed (without its message), to name it in a failure."""
    expression: str
    """The only part of the assert that the program sees and evaluates."""
    relation: str
    expected: Any = None
    expected_first: bool = False
    offset: int | float | complex | None = None
    negated: bool = False
    rel_tol: float = 1e-09
    abs_tol: float = 0.0

    def holds(self, value: object) -> bool:
        """Whether the reported (decoded, built-in) value meets the expectation; an error fails it."""
        try:
            if self.offset is not None:
                value = abs(value - self.offset)  # type: ignore[operator]
            if self.relation == "truthy":
                verdict = bool(value)
            elif self.relation == "isclose":
                verdict = math.isclose(value, self.expected, rel_tol=self.rel_tol, abs_tol=self.abs_tol)  # type: ignore[arg-type]
            else:
                left, right = (self.expected, value) if self.expected_first else (value, self.expected)
                verdict = bool(_RELATIONS[self.relation](left, right))
        except Exception:  # e.g. "a" < 1: the assert would have raised, which fails it even under `not`
            return False
        return verdict != self.negated


@dataclass(frozen=True)
class CodeTest:
    """One test case: stdin and the expected stdout, or assert statements checked after the program."""

    stdin: str = ""
    expected_stdout: str | None = None
    assertion: str | None = None
    """The assert test as written."""
    checks: tuple[AssertCheck, ...] = ()
    """`assertion` parsed, one check per assert statement."""


def extract_code(completion: str) -> str:
    """The program in a completion: its last Python fenced block, else last unlabelled one, else all of it."""
    blocks = [(label.lower(), body) for label, body in _FENCED_BLOCK.findall(completion)]
    for wanted in (_PYTHON_LABELS, {""}):
        chosen = [body for label, body in blocks if label in wanted]
        if chosen:
            return chosen[-1]
    opened = list(_OPEN_PYTHON_FENCE.finditer(completion))
    if opened:  # a block cut off by the length limit before its closing fence
        return completion[opened[-1].end() :]
    return completion


def parse_tests(prompt: Prompt, *, max_tests: int = 64) -> list[CodeTest]:
    """The prompt's tests; raises `CodeSpecError` naming what is wrong."""
    if "tests" in prompt.metadata:
        spec: Any = prompt.metadata["tests"]
        where = "prompt.metadata['tests']"
    else:
        where = "prompt.answer"
        try:
            spec = json.loads(prompt.answer)
        except (TypeError, ValueError) as error:
            raise CodeSpecError(f'{where} is not JSON test cases ({error}); expected {{"tests": [...]}}') from None
    if isinstance(spec, dict):
        if set(spec) != {"tests"}:
            raise CodeSpecError(f'{where} must be {{"tests": [...]}} or a list; it has keys {sorted(map(str, spec))}')
        spec = spec["tests"]
        where += "['tests']"
    if not isinstance(spec, list):
        raise CodeSpecError(f"{where} must be a list of tests, not {type(spec).__name__}")
    if not spec:
        raise CodeSpecError(f"{where} holds no tests")
    if len(spec) > max_tests:
        raise CodeSpecError(f"{where} holds {len(spec)} tests; at most {max_tests} are run")
    return [_parse_test(item, f"{where}[{index}]") for index, item in enumerate(spec)]


def _parse_test(item: Any, where: str) -> CodeTest:
    if not isinstance(item, dict):
        raise CodeSpecError(f"{where} must be an object, not {type(item).__name__}")
    unknown = set(item) - {"stdin", "expected_stdout", "assert"}
    if unknown:
        raise CodeSpecError(f"{where} has unknown keys {sorted(unknown)}; use stdin, expected_stdout or assert")
    if ("expected_stdout" in item) == ("assert" in item):
        raise CodeSpecError(f"{where} needs exactly one of 'expected_stdout' and 'assert'")
    for key in item:
        if not isinstance(item[key], str):
            raise CodeSpecError(f"{where}.{key} must be a string, not {type(item[key]).__name__}")
    if "assert" in item and "stdin" in item:
        raise CodeSpecError(f"{where}: an assert test takes no stdin")
    if "assert" in item:
        return CodeTest(assertion=item["assert"], checks=parse_assertion(item["assert"], f"{where}.assert"))
    return CodeTest(stdin=item.get("stdin", ""), expected_stdout=item["expected_stdout"])


# ---- assert statements: what the program evaluates, and what only the parent knows ----


def parse_assertion(text: str, where: str = "assert") -> tuple[AssertCheck, ...]:
    """The checks of an assert test (one per assert statement); raises `CodeSpecError` for any
    statement outside the supported forms (see the module docstring), naming it."""
    try:
        statements = ast.parse(text, mode="exec").body
    except (SyntaxError, ValueError) as error:  # ValueError: null bytes
        raise CodeSpecError(f"{where}: not valid Python ({error})") from None
    if not statements:
        raise CodeSpecError(f"{where}: holds no assert statement")
    checks = []
    for statement in statements:
        if not isinstance(statement, ast.Assert):
            shown = _clip(ast.unparse(statement))
            raise CodeSpecError(f"{where}: `{shown}` is not an assert statement; an assert test holds asserts only")
        text_of_assert = f"assert {ast.unparse(statement.test)}"
        checks.append(_check(statement.test, text_of_assert, f"{where}: `{_clip(text_of_assert)}`"))
    return tuple(checks)


def _check(node: ast.expr, statement: str, where: str) -> AssertCheck:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _check(node.operand, statement, where)
        return dataclasses.replace(inner, negated=not inner.negated)
    if isinstance(node, ast.Compare):
        return _comparison(node, statement, where)
    if _is_isclose(node):
        return _closeness(node, statement, where)  # type: ignore[arg-type]
    return AssertCheck(statement, _shown_expression(node, where), "truthy")


def _comparison(node: ast.Compare, statement: str, where: str) -> AssertCheck:
    """`X op L` or `L op X`: X goes to the program, op and L stay here."""
    if len(node.ops) != 1:
        raise CodeSpecError(f"{where} chains comparisons; write one comparison per assert ({_SUPPORTED_FORMS})")
    relation = _COMPARISONS[type(node.ops[0])][0]
    left, right = node.left, node.comparators[0]
    is_literal, expected = _literal(right)
    expression, expected_first = left, False
    if not is_literal:
        is_literal, expected = _literal(left)
        expression, expected_first = right, True
    if not is_literal:
        raise CodeSpecError(
            f"{where} compares two expressions; one side must be a literal, the expected value, which the "
            f"program never sees ({_SUPPORTED_FORMS})"
        )
    if relation in ("is", "is not") and not (expected is None or expected is True or expected is False):
        raise CodeSpecError(f"{where} uses `{relation}` with {_clip(repr(expected))}; use == or != for values")
    offset = None
    difference = _tolerance_operands(expression)
    if difference is not None:
        expression, offset = difference
    return AssertCheck(
        statement,
        _shown_expression(expression, where),
        relation,
        expected=expected,
        expected_first=expected_first,
        offset=offset,
    )


def _is_isclose(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "isclose"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "math"
    )


def _closeness(node: ast.Call, statement: str, where: str) -> AssertCheck:
    """`math.isclose(X, L, rel_tol=..., abs_tol=...)`, L and the tolerances literal numbers."""
    if len(node.args) != 2 or any(isinstance(argument, ast.Starred) for argument in node.args):
        raise CodeSpecError(f"{where}: math.isclose takes the expression and one literal number")
    tolerances: dict[str, float] = {}
    for keyword in node.keywords:
        is_number, value = _literal_number(keyword.value)
        if keyword.arg not in ("rel_tol", "abs_tol") or not is_number or isinstance(value, complex):
            raise CodeSpecError(f"{where}: math.isclose takes only rel_tol= and abs_tol=, as literal numbers")
        tolerances[keyword.arg] = float(value)  # type: ignore[arg-type]
    first, second = node.args
    is_number, expected = _literal_number(second)
    expression = first
    if not is_number:
        is_number, expected = _literal_number(first)
        expression = second
    if not is_number or isinstance(expected, complex):
        raise CodeSpecError(f"{where}: one argument of math.isclose must be a literal number, the expected value")
    return AssertCheck(statement, _shown_expression(expression, where), "isclose", expected=expected, **tolerances)


def _tolerance_operands(node: ast.expr) -> tuple[ast.expr, int | float | complex] | None:
    """For `abs(X - L)` or `abs(L - X)` with L a literal number: X and L, so that L stays hidden."""
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "abs"
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.BinOp)
        and isinstance(node.args[0].op, ast.Sub)
    ):
        return None
    difference = node.args[0]
    for expression, other in ((difference.left, difference.right), (difference.right, difference.left)):
        is_number, value = _literal_number(other)
        if is_number:
            return expression, value  # type: ignore[return-value]
    return None


def _literal(node: ast.expr) -> tuple[bool, Any]:
    """(True, value) when `node` is a literal that `ast.literal_eval` reads, else (False, None)."""
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _literal_number(node: ast.expr) -> tuple[bool, Any]:
    is_literal, value = _literal(node)
    return (is_literal and type(value) in (int, float, complex)), value


def _shown_expression(node: ast.expr, where: str) -> str:
    """The source of the expression the program evaluates; refused when it holds a comparison, which
    the program's own `__eq__` would decide, and whose literal side the program would read."""
    if any(isinstance(inner, ast.Compare) for inner in ast.walk(node)):
        raise CodeSpecError(
            f"{where} compares inside the evaluated expression; the program's objects would decide that "
            f"comparison and see its literal ({_SUPPORTED_FORMS})"
        )
    source = ast.unparse(node)
    try:
        compile(source, "<assert>", "eval", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        raise CodeSpecError(f"{where}: the expression cannot be evaluated: {error}") from None
    return source


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


# ---- the harness: the sandboxed program of an assert test ----

# Runs in the sandbox as the whole program, with the model's code held as a string. What it uses it
# takes before the code runs, so that an honest program that rebinds `list` or `json` cannot break
# it; a hostile program can patch or bypass any of it, which gains nothing (see the module docstring).
# Kept to Python 3.8, the oldest interpreter the sandbox accepts.
_HARNESS_LIBRARY = r'''
import collections as _collections
import json.encoder as _json_encoder
import os as _os
import sys as _sys
import traceback as _traceback
import types as _types

# Taken while this file loads, before the model's code runs: its rebinding of a builtin cannot reach them.
_type, _str, _BaseException, _TypeError, _ValueError = type, str, BaseException, TypeError, ValueError
_quote = _json_encoder.encode_basestring_ascii


def _make_encoder(max_depth):
    """Serialise exact built-in values to tagged JSON text; anything else raises TypeError."""
    exact, quote, hex_of, float_hex, bytes_hex, dict_items = _type, _quote, hex, float.hex, bytes.hex, dict.items
    none_type, counter, ordered, default = _type(None), _collections.Counter, _collections.OrderedDict, _collections.defaultdict
    containers = ((list, '["l"'), (tuple, '["t"'), (set, '["S"'), (frozenset, '["F"'))

    def encode(value, depth):
        if depth > max_depth:
            raise _ValueError("the value is nested more than %d deep" % max_depth)
        kind = exact(value)  # never isinstance: a subclass or a forged __class__ is refused
        if kind is none_type:
            return '["n"]'
        if kind is bool:
            return '["b",1]' if value is True else '["b",0]'
        if kind is int:
            return '["i",' + quote(hex_of(value)) + "]"
        if kind is float:
            return '["f",' + quote(float_hex(value)) + "]"
        if kind is complex:
            return '["c",' + quote(float_hex(value.real)) + "," + quote(float_hex(value.imag)) + "]"
        if kind is str:
            return '["s",' + quote(value) + "]"
        if kind is bytes:
            return '["y",' + quote(bytes_hex(value)) + "]"
        for container, opening in containers:
            if kind is container:
                return opening + "".join(["," + encode(item, depth + 1) for item in value]) + "]"
        if kind is dict or kind is counter or kind is ordered or kind is default:
            pairs = [",%s,%s" % (encode(key, depth + 1), encode(item, depth + 1)) for key, item in dict_items(value)]
            return '["d"' + "".join(pairs) + "]"
        raise _TypeError("the value is of type %s, not a plain built-in type" % _name_of(kind))

    return lambda value: encode(value, 0)


def _name_of(kind):
    try:
        name = _type.__getattribute__(kind, "__name__")
        return name if _type(name) is _str else "?"
    except _BaseException:
        return "?"


def _describe(error):
    """The error's type, and its message when the type is a built-in one (whose str is known)."""
    try:
        kind = _type(error)
        name = _name_of(kind)
        if _type.__getattribute__(kind, "__module__") != "builtins":
            return name
        message = _str(error)
        if _type(message) is not _str or not message:
            return name
        return name + ": " + message[:200]
    except _BaseException:
        return "?"


def _main(code, expressions, marker, max_depth):
    evaluate, write, exit_now, show = eval, _os.write, _os._exit, _traceback.print_exception
    stdout, stderr, encode = _sys.stdout, _sys.stderr, _make_encoder(max_depth)
    compiled = [compile(source, "<assert>", "eval", dont_inherit=True) for source in expressions]
    program = compile(code, "solution.py", "exec", dont_inherit=True)
    module = _types.ModuleType("__main__")
    _sys.modules["__main__"] = module
    namespace = module.__dict__
    exec(program, namespace)  # an exception here ends the run with no result line: every check fails
    entries = []
    for expression in compiled:
        try:
            value = evaluate(expression, namespace)
        except _BaseException as error:  # SystemExit too: this check fails, the others are still evaluated
            entries.append('["error",' + _quote(_describe(error)) + "]")
            try:
                show(_type(error), error, error.__traceback__.tb_next, file=stderr)
            except _BaseException:
                pass
            continue
        try:
            entries.append('["ok",' + encode(value) + "]")
        except _BaseException as error:
            entries.append('["error",' + _quote(_describe(error)) + "]")
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    report = ("\n" + marker + "[" + ",".join(entries) + "]\n").encode("ascii")
    while report:
        report = report[write(1, report):]
    exit_now(0)  # no handler of the program runs after the report
'''


def harness_program(code: str, expressions: Sequence[str]) -> str:
    """The sandboxed program of an assert test: the harness, given the model's code and the
    expressions to evaluate after it. Nothing expected is in it."""
    arguments = f"{code!r}, {list(expressions)!r}, {_RESULT_MARKER!r}, {_MAX_DEPTH}"
    return f"{_HARNESS_LIBRARY}\n_main({arguments})\n"


# ---- the parent's side of the result line ----


class ResultError(ValueError):
    """A result line that is not what the harness writes."""


@dataclass(frozen=True)
class Outcome:
    """What the program reported for one expression: its value, or the error it raised."""

    value: object = None
    error: str | None = None


def decode_results(text: str, count: int) -> list[Outcome]:
    """The outcomes in a result line (after the marker), one per expression; raises `ResultError`
    for anything else, so that a forged line cannot carry more than values."""
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ResultError(f"not JSON: {error}") from None
    if type(entries) is not list or len(entries) != count:
        raise ResultError(f"expected a list of {count} results")
    return [_decode_entry(entry) for entry in entries]


def _decode_entry(entry: object) -> Outcome:
    if type(entry) is not list or len(entry) != 2:
        raise ResultError("a result is not a pair")
    status, payload = entry
    if status == "ok":
        return Outcome(value=decode_value(payload))
    if status == "error" and type(payload) is str:
        return Outcome(error=payload)
    raise ResultError(f"unknown result {_clip(repr(status))}")


_INTEGER_HEX = re.compile(r"-?0x[0-9a-f]+")


def decode_value(node: object, depth: int = 0) -> object:
    """The built-in value of a tagged node written by the harness's serialiser."""
    if depth > _MAX_DEPTH:
        raise ResultError(f"a value nested more than {_MAX_DEPTH} deep")
    if type(node) is not list or not node or type(node[0]) is not str:
        raise ResultError("a value is not a tagged list")
    tag, payload = node[0], node[1:]
    if tag in _CONTAINERS:
        items = [decode_value(item, depth + 1) for item in payload]
        try:
            return _CONTAINERS[tag](items)
        except TypeError as error:  # an unhashable member of a set, or dict key
            raise ResultError(f"{tag!r}: {error}") from None
    if tag == "n" and not payload:
        return None
    if tag == "b" and len(payload) == 1 and type(payload[0]) is int and payload[0] in (0, 1):
        return payload[0] == 1
    if not payload or any(type(part) is not str for part in payload):
        raise ResultError(f"a value tagged {_clip(repr(tag))} is malformed")
    return _decode_scalar(tag, payload)


def _decode_scalar(tag: str, payload: list[str]) -> object:
    try:
        if tag == "i" and len(payload) == 1 and _INTEGER_HEX.fullmatch(payload[0]):
            return int(payload[0], 16)
        if tag == "f" and len(payload) == 1:
            return float.fromhex(payload[0])
        if tag == "c" and len(payload) == 2:
            return complex(float.fromhex(payload[0]), float.fromhex(payload[1]))
        if tag == "s" and len(payload) == 1:
            return payload[0]
        if tag == "y" and len(payload) == 1:
            return bytes.fromhex(payload[0])
    except (ValueError, OverflowError) as error:
        raise ResultError(f"a value tagged {tag!r}: {error}") from None
    raise ResultError(f"a value tagged {_clip(repr(tag))} is malformed")


def _pairs(items: list[object]) -> dict[object, object]:
    if len(items) % 2:
        raise ResultError("a dict with a key and no value")
    return dict(zip(items[::2], items[1::2], strict=True))


_CONTAINERS: dict[str, Callable[[list[object]], object]] = {
    "l": list,
    "t": tuple,
    "S": set,
    "F": frozenset,
    "d": _pairs,
}


# ---- scoring ----


def _normalise_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _run_failure(result: SandboxResult) -> str | None:
    """Why the run as a whole failed (a limit, a signal, an exit status other than 0), or None."""
    if result.limit is not None:
        return f"limit: {result.limit}"
    if result.signal is not None:
        return f"killed by {signal.Signals(result.signal).name}"
    if result.exit_code != 0:
        return f"exit status {result.exit_code}"
    return None


def _failure(result: SandboxResult, test: CodeTest) -> str | None:
    """Why the test failed, or None if it passed."""
    reason = _run_failure(result)
    if reason is not None:
        return reason
    if test.checks:
        return _assert_failure(result.stdout, test.checks)
    if test.expected_stdout is not None and _normalise_output(result.stdout) != _normalise_output(test.expected_stdout):
        return "wrong output"
    return None


def _assert_failure(stdout: str, checks: Sequence[AssertCheck]) -> str | None:
    """Why the harness's report fails the checks, or None when every check holds."""
    lines = [line[len(_RESULT_MARKER) :] for line in stdout.split("\n") if line.startswith(_RESULT_MARKER)]
    if not lines:
        return "no result: the program ended, or took stdout, before its asserts were reported"
    if len(lines) > 1:
        return f"{len(lines)} result lines; the harness writes one"
    try:
        outcomes = decode_results(lines[0], len(checks))
    except ResultError as error:
        return f"malformed result line: {error}"
    failed = [message for check, outcome in zip(checks, outcomes, strict=True) if (message := _judge(check, outcome))]
    return "; ".join(failed) if failed else None


def _judge(check: AssertCheck, outcome: Outcome) -> str | None:
    if outcome.error is not None:
        return f"{_clip(check.statement)}: raised {_clip(outcome.error)}"
    if check.holds(outcome.value):
        return None
    return f"{_clip(check.statement)}: the value was {_shown_value(outcome.value)}"


def _shown_value(value: object) -> str:
    try:
        return _clip(repr(value))
    except ValueError:  # an int past the interpreter's limit on decimal digits
        return "an integer too long to show"


@dataclass(frozen=True)
class CodeVerifier:
    name: str = "code"
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    """What each test's run may use."""
    all_or_nothing: bool = False
    """Reward 1.0 only when every test passes (and stop at the first failure), instead of the share passed."""
    max_tests: int = 64
    """Prompts with more tests than this are refused as malformed (each test is a process)."""
    max_code_chars: int = 100_000
    """Longer programs are not run and score 0."""

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        try:
            return self._verify(prompt, completion)
        except CodeSpecError as error:
            return VerifierResult(reward=0.0, correct=False, error=f"code: {error}")
        except SandboxError as error:
            return VerifierResult(reward=0.0, correct=False, error=f"code: {error}")
        except Exception as error:  # a verifier must not raise on any model output
            return VerifierResult(reward=0.0, correct=False, error=f"code: {type(error).__name__}: {error}")

    def _verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        tests = parse_tests(prompt, max_tests=self.max_tests)
        code = extract_code(completion)
        total = len(tests)
        if len(code) > self.max_code_chars:
            details = {"passed": 0, "total": total, "reason": f"program of {len(code)} characters not run"}
            return VerifierResult(reward=0.0, correct=False, details=details)
        passed = 0
        failures: list[dict[str, object]] = []
        for index, test in enumerate(tests):
            result = self._run(code, test)
            reason = _failure(result, test)
            if reason is None:
                passed += 1
                continue
            failures.append({"test": index, "reason": reason, "stderr": result.stderr[-_STDERR_TAIL_CHARS:]})
            if self.all_or_nothing:
                break
        correct = passed == total
        reward = float(correct) if self.all_or_nothing else passed / total
        details: dict[str, object] = {"passed": passed, "total": total, "failures": failures[:3]}
        return VerifierResult(reward=reward, correct=correct, details=details)

    def _run(self, code: str, test: CodeTest) -> SandboxResult:
        """One sandbox run: the program on the test's stdin, or the harness around it for an assert test."""
        if not test.checks:
            return run_sandboxed(code, stdin=test.stdin, limits=self.limits)
        program = harness_program(code, [check.expression for check in test.checks])
        return run_sandboxed(program, limits=self.limits)
