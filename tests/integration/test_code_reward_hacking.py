"""Reward hacking of the code verifier's assert tests, through the real sandbox: each trick that
passed asserts appended to the program (ending the interpreter first, forging `__eq__`, reading the
expected value, forging the report) must score no more than an honest wrong program, 0 here, while
honest programs keep their score. Where a trick needs it, the control shows that it beats asserts
appended to the program (the old scheme), so that the test is not vacuous."""

from __future__ import annotations

import json

import pytest

from orchard.protocols import VerifierResult
from orchard.records import Prompt
from orchard.verifiers.code import _RESULT_MARKER, CodeVerifier
from orchard.verifiers.sandbox import SandboxLimits, run_sandboxed
from tests.integration.test_sandbox import nothing_left_behind  # noqa: F401 (an autouse fixture)

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=1, memory_bytes=256 * 2**20, output_bytes=4096)
VERIFIER = CodeVerifier(limits=LIMITS)
#: No constant passes more than one of these, and an honest wrong program passes none.
ASSERTS = ["assert add(1, 2) == 3", "assert add(20, 22) == 42", "assert add(-5, 105) == 100"]
PROMPT = Prompt(
    id="add",
    text="Write add(a, b).",
    answer=json.dumps({"tests": [{"assert": a} for a in ASSERTS]}),
    distribution="code",
)
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def score(program: str, prompt: Prompt = PROMPT) -> VerifierResult:
    result = VERIFIER.verify(prompt, f"```python\n{program}\n```")
    assert result.error is None, result.error
    return result


def passes_appended_asserts(program: str) -> bool:
    """The old scheme: every assert appended to the program, passed on a clean exit."""
    return all(run_sandboxed(f"{program}\n\n{assertion}\n", limits=LIMITS).ok for assertion in ASSERTS)


def forged_line(*values: int) -> str:
    """A result line as the harness writes it, claiming `values` for the asserts in turn."""
    entries = [["ok", ["i", hex(value)]] for value in values]
    return _RESULT_MARKER + json.dumps(entries)


def assert_no_better_than_honest_wrong(result: VerifierResult) -> None:
    honest_wrong = score(WRONG)
    assert honest_wrong.reward == 0.0
    assert result.reward == honest_wrong.reward and not result.correct
    assert len(result.details["failures"]) == len(ASSERTS)


def test_an_honest_right_program_scores_one():
    result = score(RIGHT)
    assert result.reward == 1.0 and result.correct and result.details["failures"] == []


def test_an_honest_partly_right_program_scores_the_share_of_asserts_passed():
    result = score("def add(a, b):\n    return a + b if a > 0 else 0\n")
    assert result.reward == pytest.approx(2 / 3) and not result.correct
    assert [failure["reason"] for failure in result.details["failures"]] == [
        "assert add(-5, 105) == 100: the value was 0"
    ]


EXITS = {
    "os._exit(0)": "import os\nos._exit(0)",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit": "raise SystemExit",
    "exit()": "exit()",
    "excepthook exits 0": "import os, sys\nsys.excepthook = lambda *error: os._exit(0)",
    "atexit exits 0": "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(1)",
    "SIGTERM handler exits 0": (
        "import os, signal\nsignal.signal(signal.SIGTERM, lambda *args: os._exit(0))\nos.kill(os.getpid(), signal.SIGTERM)"
    ),
    "fork, the first process exits 0": "import os, time\nif os.fork():\n    os._exit(0)\ntime.sleep(0.5)",
}


@pytest.mark.parametrize("trick", EXITS.values(), ids=EXITS.keys())
def test_ending_the_interpreter_before_the_asserts_scores_zero(trick):
    program = f"{WRONG}\n{trick}\n"
    assert passes_appended_asserts(program)  # the control: the old scheme paid for it
    assert_no_better_than_honest_wrong(score(program))


@pytest.mark.parametrize(
    "trick",
    [
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",
    ],
    ids=["SIGKILL", "SIGTERM", "SIGSEGV"],
)
def test_a_program_that_kills_itself_scores_zero(trick):
    result = score(f"{RIGHT}\n{trick}\n")
    assert result.reward == 0.0 and result.details["failures"][0]["reason"].startswith("killed by SIG")


def test_a_function_that_ends_the_process_while_evaluated_scores_zero():
    result = score("import os\ndef add(a, b):\n    os._exit(0)\n")
    assert_no_better_than_honest_wrong(result)
    assert (
        result.details["failures"][0]["reason"]
        == "no result: the program ended, or took stdout, before its asserts were reported"
    )


def test_a_function_that_raises_system_exit_fails_only_its_own_assert():
    result = score("import sys\ndef add(a, b):\n    if a == 20:\n        sys.exit(0)\n    return a + b\n")
    assert result.reward == pytest.approx(2 / 3)
    assert result.details["failures"][0]["reason"] == "assert add(20, 22) == 42: raised SystemExit: 0"


FORGED_VALUES = {
    "__eq__ always True": (
        "class Anything:\n"
        "    def __eq__(self, other):\n        return True\n"
        "    def __ne__(self, other):\n        return False\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Anything()\n"
    ),
    "int subclass": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(a - b)\n"
    ),
    "str subclass": (
        "class Str(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
        "def add(a, b):\n    return Str('no')\n"
    ),
    "forged __class__": (
        "class Anything:\n"
        "    __class__ = property(lambda self: int)\n"
        "    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Anything()\n"
    ),
}


@pytest.mark.parametrize("program", FORGED_VALUES.values(), ids=FORGED_VALUES.keys())
def test_a_value_with_a_forged_equality_scores_zero(program):
    assert passes_appended_asserts(program)
    result = score(program)
    assert_no_better_than_honest_wrong(result)
    assert "not a plain built-in type" in result.details["failures"][0]["reason"]


PATCHES = {
    "json": (
        "import json, json.encoder\n"
        'json.dumps = lambda *args, **kwargs: \'["i", "0x3"]\'\n'
        "json.encoder.encode_basestring_ascii = lambda text: '\"0x3\"'\n"
    ),
    "print": "import builtins\nbuiltins.print = lambda *args, **kwargs: None\n",
    "builtins.type": "import builtins\nbuiltins.type = lambda *args: int\nbuiltins.isinstance = lambda *args: True\n",
    "sys.stdout": (
        "import sys\n"
        "class Rewriter:\n"
        "    def write(self, text):\n        return sys.__stdout__.write(text.replace('error', 'ok'))\n"
        "    def flush(self):\n        sys.__stdout__.flush()\n"
        "sys.stdout = Rewriter()\n"
    ),
    "os.write": (
        "import os\n"
        "real_write = os.write\n"
        "os.write = lambda fd, data: real_write(fd, data.replace(b'\"error\"', b'\"ok\"'))\n"
    ),
}


@pytest.mark.parametrize("patch", PATCHES.values(), ids=PATCHES.keys())
def test_patching_what_the_report_uses_scores_zero(patch):
    program = FORGED_VALUES["__eq__ always True"] + patch
    assert_no_better_than_honest_wrong(score(program))


def test_replacing_the_harnesss_expressions_reports_only_values_the_program_chose():
    """A program can reach into the harness (it shares the process) and make it report a constant
    for every assert: that is returning a constant, which scores what `return 3` scores."""
    program = (
        "import sys\n"
        "harness = sys._getframe(1).f_locals\n"
        "harness['compiled'][:] = [compile('3', '<forged>', 'eval')] * len(harness['compiled'])\n"
        "def add(a, b):\n    return 0\n"
    )
    result = score(program)
    assert result.reward == score("def add(a, b):\n    return 3\n").reward == pytest.approx(1 / 3)


# Looks for the expected value everywhere the old scheme put it: the program's source file, the
# code objects and locals of every frame (the `__main__` of the harness and the prelude), every
# string the interpreter holds; `add` then answers from what it found.
HUNTER = r"""
import gc, os, re, sys

def texts():
    found = [" ".join(sys.argv)]
    for path in (sys.argv[0], os.path.join(os.path.dirname(os.getcwd()), "solution.py")):
        try:
            with open(path) as file:
                found.append(file.read())
        except OSError:
            pass
    frame = sys._getframe()
    while frame is not None:
        found.extend(repr(value) for value in frame.f_code.co_consts)
        found.extend(repr(value) for value in frame.f_locals.values())
        frame = frame.f_back
    found.extend(repr(vars(module)) for module in list(sys.modules.values()) if module.__name__ == "__main__")
    found.extend(value for value in gc.get_objects() if isinstance(value, str))
    return found

def add(a, b):
    pattern = re.compile(r"add\(%d, %d\) == (-?\d+)" % (a, b))
    for text in texts():
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return 0
"""


def test_reading_the_expected_value_from_the_source_frames_or_memory_scores_zero():
    assert passes_appended_asserts(HUNTER)
    assert_no_better_than_honest_wrong(score(HUNTER))


def test_a_forged_result_line_reports_only_guessed_values():
    """The line holds values, never verdicts: forging it scores what returning that value scores."""
    for value, share in [(1, 0.0), (3, 1 / 3)]:
        forger = f"import os\nprint({forged_line(value)!r}, flush=True)\nos._exit(0)\n"
        assert score(forger).reward == score(f"def add(a, b):\n    return {value}\n").reward == pytest.approx(share)


@pytest.mark.parametrize(
    "line",
    [
        _RESULT_MARKER + json.dumps([["ok", ["b", 1]]]),
        _RESULT_MARKER + json.dumps([["ok", ["eq", "anything"]]]),
        _RESULT_MARKER + json.dumps([["pass", True]]),
        _RESULT_MARKER + json.dumps([["ok", ["i", "0x3"]], ["ok", ["i", "0x2a"]]]),  # one more than asked
        _RESULT_MARKER + "all passed",
    ],
    ids=["True", "unknown tag", "a verdict", "an extra result", "not JSON"],
)
def test_a_forged_line_that_is_not_a_value_per_assert_scores_zero(line):
    assert_no_better_than_honest_wrong(score(f"import os\nprint({line!r}, flush=True)\nos._exit(0)\n"))


def test_a_forged_line_beside_the_real_one_fails_even_with_the_right_value():
    program = f"print({forged_line(3)!r})\n{WRONG}"
    result = score(program)
    assert_no_better_than_honest_wrong(result)
    assert result.details["failures"][0]["reason"] == "2 result lines; the harness writes one"


def test_a_forged_line_written_at_exit_scores_zero():
    program = f"import atexit, sys\natexit.register(print, {forged_line(1)!r})\n{WRONG}\nsys.exit(0)\n"
    assert_no_better_than_honest_wrong(score(program))


FD_TRICKS = {
    # even a right program scores 0 when the harness's report cannot reach stdout
    "closed": RIGHT + "import os\nos.close(1)\n",
    "to /dev/null": RIGHT + "import os\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n",
    "to a pipe, a forged line on the real stdout": (
        WRONG + "import os\n"
        "real = os.dup(1)\n"
        "read_end, write_end = os.pipe()\n"
        "os.dup2(write_end, 1)\n"
        f"os.write(real, ({forged_line(1)!r} + '\\n').encode())\n"
    ),
}


@pytest.mark.parametrize("program", FD_TRICKS.values(), ids=FD_TRICKS.keys())
def test_closing_or_redirecting_stdout_scores_zero(program):
    assert_no_better_than_honest_wrong(score(program))


def test_an_honest_program_that_rebinds_names_and_prints_still_scores_one():
    program = (
        "from __future__ import annotations\n"
        "import sys\n"
        "from collections import Counter\n"
        "from dataclasses import dataclass\n"
        "list = [1, 2]\ntype = 'kind'\njson = None\nstr = repr\n"
        "def print(*args):\n    sys.stderr.write('debug\\n')\n"
        "@dataclass\nclass Pair:\n    a: int\n    b: int\n"
        "    def total(self) -> int:\n        return self.a + self.b\n"
        "def add(a, b):\n    sys.stdout.write(f'adding {a} and {b}\\n')\n    return Pair(a, b).total()\n"
        "def letters(word):\n    return Counter(word)\n"
    )
    tests = [{"assert": assertion} for assertion in ASSERTS] + [
        {"assert": "assert letters('abca') == {'a': 2, 'b': 1, 'c': 1}"},
        {"assert": "assert not letters('')\nassert math.isclose(add(0.1, 0.2), 0.3)\nassert abs(add(1, 1) - 2) < 1e-9"},
    ]
    prompt = Prompt(id="p", text="", answer=json.dumps(tests), distribution="code")
    result = score(program, prompt)
    assert result.reward == 1.0 and result.correct, result.details


def test_one_failing_expression_hides_no_other_result():
    """Within a test each expression is evaluated even after another raised; a test that hangs is
    its own run, so the other tests keep their results."""
    program = (
        "def add(a, b):\n"
        "    if a == 20:\n        raise ValueError('twenty')\n"
        "    if a == 7:\n        while True:\n            pass\n"
        "    return a + b\n"
    )
    tests = [
        {"assert": "assert add(1, 2) == 3\nassert add(20, 22) == 42\nassert add(-5, 105) == 101"},
        {"assert": "assert add(7, 1) == 8"},
        {"assert": "assert add(2, 2) == 4"},
    ]
    prompt = Prompt(id="p", text="", answer=json.dumps(tests), distribution="code")
    result = score(program, prompt)
    assert result.reward == pytest.approx(1 / 3)
    first, second = result.details["failures"]
    assert first["reason"] == (
        "assert add(20, 22) == 42: raised ValueError: twenty; assert add(-5, 105) == 101: the value was 100"
    )
    assert "ValueError: twenty" in first["stderr"]
    assert second["test"] == 1 and second["reason"].startswith("limit: ")
