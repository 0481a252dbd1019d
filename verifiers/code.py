"""Code answers checked by running them against test cases in the sandbox (`verifiers/sandbox.py`).

The tests of a prompt come from `prompt.metadata["tests"]` or, when that is absent, from
`prompt.answer` read as JSON, so that a JSONL line can carry them in its `answer` field:

    {"tests": [{"stdin": "1 2\\n", "expected_stdout": "3\\n"}, {"assert": "assert add(1, 2) == 3"}]}

A bare list of tests is accepted too. Two kinds of test:

- `{"stdin": ..., "expected_stdout": ...}` (`stdin` optional) runs the program with that input and
  passes when it exits with status 0 and prints the expected output; lines are compared with their
  trailing whitespace removed, and trailing blank lines are ignored.
- `{"assert": ...}` appends the snippet to the program and passes when the whole exits with status 0.

The program is the last ```python (or ```py) fenced block of the completion, else its last
unlabelled fenced block, else the whole completion. The reward is the share of tests passed, which
gives group-relative advantages a signal on partly right programs; `all_or_nothing=True` makes it
1.0 or 0.0. `correct` means every test passed. A malformed test specification scores 0 with an
`error` that names the problem; the verifier never raises.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from orchard.protocols import VerifierResult
from orchard.records import Prompt
from orchard.verifiers.sandbox import SandboxError, SandboxLimits, SandboxResult, run_sandboxed

_FENCED_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[^\n]*\n", re.IGNORECASE)
_PYTHON_LABELS = {"python", "python3", "py"}
_STDERR_TAIL_CHARS = 1000


class CodeSpecError(ValueError):
    """A prompt's test cases are missing or malformed."""


@dataclass(frozen=True)
class CodeTest:
    """One test case: stdin and the expected stdout, or an assert snippet run after the program."""

    stdin: str = ""
    expected_stdout: str | None = None
    assertion: str | None = None


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
    return CodeTest(
        stdin=item.get("stdin", ""), expected_stdout=item.get("expected_stdout"), assertion=item.get("assert")
    )


def _normalise_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _failure(result: SandboxResult, test: CodeTest) -> str | None:
    """Why the test failed, or None if it passed."""
    if result.limit is not None:
        return f"limit: {result.limit}"
    if result.signal is not None:
        return f"killed by {signal.Signals(result.signal).name}"
    if result.exit_code != 0:
        return f"exit status {result.exit_code}"
    if test.expected_stdout is not None and _normalise_output(result.stdout) != _normalise_output(test.expected_stdout):
        return "wrong output"
    return None


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
            program = code if test.assertion is None else f"{code}\n\n{test.assertion}\n"
            result = run_sandboxed(program, stdin=test.stdin, limits=self.limits)
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
