"""Reward hacking by reading the answers: model-written programs, run for real in the sandbox, look
for what a policy must not see (run directories, datasets, the project, home directories,
site-packages, other processes, the expected output of their own test), and each test names what
the program observed.

The planted files lie in a world-readable directory, so that only the filesystem view (not file
permissions) keeps them from the program; a control run with the view refused reads them, which
shows that the probes would see them if they could. Without root there is no view and the tests
are skipped with the reason the sandbox gives.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchard.records import Prompt
from orchard.verifiers import sandbox
from orchard.verifiers.code import CodeVerifier
from orchard.verifiers.sandbox import SandboxLimits, SandboxResult, run_sandboxed
from tests.integration.test_sandbox import FAST, nothing_left_behind, require_layer  # noqa: F401 (an autouse fixture)

VIEW = "filesystem view"

# Reads, lists and stats each path given on stdin; prints what happened to each, by exception name.
PROBE = """
import json, os, sys

def attempt(action, path):
    try:
        action(path)
    except OSError as error:
        return type(error).__name__
    return "ok"

actions = {"open": lambda path: open(path, "rb").read(1), "listdir": os.listdir, "stat": os.stat}
with open("mine.txt", "w") as file:
    file.write("the program's own file")
paths = json.loads(sys.stdin.read())
print(json.dumps({path: {name: attempt(action, path) for name, action in actions.items()} for path in paths}))
"""
ABSENT = {"open": "FileNotFoundError", "listdir": "FileNotFoundError", "stat": "FileNotFoundError"}


def probe(paths: list[str]) -> tuple[SandboxResult, dict[str, dict[str, str]]]:
    """What a program observes when it reads, lists and stats each path (and its own `mine.txt`)."""
    result = run_sandboxed(PROBE, stdin=json.dumps([*paths, "mine.txt"]), limits=FAST)
    assert result.ok, result.stderr
    observed = json.loads(result.stdout)
    assert observed.pop("mine.txt") == {"open": "ok", "listdir": "NotADirectoryError", "stat": "ok"}
    return result, observed


def assert_absent(paths: list[str]) -> None:
    """Every path exists for the caller, and none exists for the program."""
    missing_here = [path for path in paths if not os.path.lexists(path)]
    assert not missing_here, f"the test should probe paths that exist: {missing_here}"
    result, observed = probe(paths)
    require_layer(result, VIEW)
    assert observed == {path: ABSENT for path in paths}


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory that every uid may read, as a run directory or a dataset often is."""
    directory = Path(tempfile.gettempdir()) / f"orchard-view-test-{uuid.uuid4().hex}"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture
def run_dir(readable_dir: Path) -> Path:
    run = readable_dir / "runs" / "run-1"
    write(run / "config.yaml", "model: tiny\nlearning_rate: 1e-6\n")
    write(run / "metrics.jsonl", json.dumps({"step": 1, "reward": 0.5}) + "\n")
    write(run / "rollouts" / "step-1.jsonl", json.dumps({"completion": "print(42)", "reward": 1.0}) + "\n")
    return run


@pytest.fixture
def dataset(readable_dir: Path) -> Path:
    line = {"prompt": "Print the answer.", "answer": json.dumps({"tests": [{"expected_stdout": "42\n"}]})}
    return write(readable_dir / "data" / "train.jsonl", json.dumps(line) + "\n")


@pytest.fixture
def view_refused(monkeypatch) -> None:
    """The sandbox as on a machine where the view cannot be built (an interpreter whose prefix is /)."""
    if os.geteuid() != 0:
        pytest.skip("without root there is no view to refuse")
    real = sandbox._interpreter_layout(sandbox._unprivileged_interpreter())
    refused = sandbox._Layout(directories=("/",), hidden=real.hidden)
    monkeypatch.setattr(sandbox, "_interpreter_layout", lambda interpreter: refused)


def test_a_run_directory_is_not_visible(run_dir: Path):
    paths = [run_dir.parent.parent, run_dir, run_dir / "config.yaml", run_dir / "metrics.jsonl", run_dir / "rollouts"]
    assert_absent([str(path) for path in paths])


def test_a_dataset_with_answers_is_not_visible(dataset: Path):
    assert_absent([str(dataset.parent), str(dataset)])


def test_the_repository_is_not_visible():
    repository = Path(sandbox.__file__).resolve().parent.parent  # `orchard` maps to the repository root
    paths = [repository, repository / "pyproject.toml", repository / "verifiers" / "sandbox.py"]
    assert_absent([str(path) for path in paths])


def test_home_directories_are_not_visible():
    home = Path.home()
    secret = home / f".orchard-view-test-{uuid.uuid4().hex}"
    secret.write_text("a token")
    try:
        assert_absent(sorted({str(home), str(secret), "/root"}))
    finally:
        secret.unlink()


def test_the_projects_site_packages_are_not_visible():
    site_packages = Path(sysconfig.get_paths()["purelib"])
    assert_absent([str(site_packages), pytest.__file__, str(site_packages / "pytest")])


def test_the_interpreters_own_site_packages_are_empty():
    code = (
        "import json, os, site\n"
        "listings = {}\n"
        "for path in site.getsitepackages():\n"
        "    try:\n"
        "        listings[path] = os.listdir(path)\n"
        "    except FileNotFoundError:\n"
        "        listings[path] = 'absent'\n"
        "print(json.dumps(listings))"
    )
    result = run_sandboxed(code, limits=FAST)
    assert result.ok, result.stderr
    require_layer(result, VIEW)
    listings = json.loads(result.stdout)
    assert listings and all(listing in ("absent", []) for listing in listings.values())


def test_the_caller_and_other_processes_are_not_visible_in_proc():
    me = os.getpid()
    assert_absent([f"/proc/{me}/environ", f"/proc/{me}/cmdline", "/proc/1/cmdline", "/proc/self", "/proc"])


def test_another_runs_program_and_its_asserts_are_not_visible():
    """A run's directory holds its program, with any assert test the code verifier appended to it."""
    other = Path(tempfile.mkdtemp(prefix="orchard-sandbox-"))  # as `run_sandboxed` leaves it for its uid
    try:
        other.chmod(0o711)
        solution = write(other / "solution.py", "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n")
        solution.chmod(0o444)
        code = (
            "import json, os\n"
            "run = os.path.dirname(os.getcwd())\n"
            "print(json.dumps([os.listdir(os.path.dirname(run)), os.path.basename(run)]))"
        )
        result = run_sandboxed(code, limits=FAST)
        assert result.ok, result.stderr
        require_layer(result, VIEW)
        listing, own = json.loads(result.stdout)
        assert listing == [own] and own != other.name  # the temporary directory holds this run alone
        assert_absent([str(other), str(solution)])
    finally:
        shutil.rmtree(other)


def test_the_view_holds_only_the_system_the_interpreter_and_the_working_directory():
    code = (
        "import json, os, sys\n"
        "print(json.dumps({'/': sorted(os.listdir('/')), '/etc': os.listdir('/etc'), '/dev': sorted(os.listdir('/dev')),"
        " 'cwd': os.getcwd(), 'prefix': sys.base_prefix}))"
    )
    result = run_sandboxed(code, limits=FAST)
    assert result.ok, result.stderr
    require_layer(result, VIEW)
    seen = json.loads(result.stdout)
    tops = {Path(seen["cwd"]).parts[1], Path(seen["prefix"]).parts[1]}
    assert set(seen["/"]) <= {"usr", "bin", "lib", "lib32", "lib64", "libx32", "etc", "dev"} | tops
    assert "proc" not in seen["/"] and "sys" not in seen["/"]
    assert set(seen["/etc"]) <= {"ld.so.cache"}
    assert set(seen["/dev"]) <= {"null", "zero", "full", "random", "urandom"} and "null" in seen["/dev"]


def test_an_ordinary_program_still_works_in_the_view():
    code = (
        "import collections, fractions, itertools, json, math, re, sys, tempfile\n"
        "import datetime, decimal, heapq, random, statistics\n"
        "numbers = [int(word) for word in re.findall(r'-?\\d+', sys.stdin.read())]\n"
        "with open('numbers.json', 'w') as file:\n"
        "    json.dump(numbers, file)\n"
        "with open('numbers.json') as file:\n"
        "    numbers = json.load(file)\n"
        "with tempfile.TemporaryFile() as scratch:\n"
        "    scratch.write(b'x')\n"
        "print(sum(numbers), math.gcd(*numbers), fractions.Fraction(numbers[0], numbers[1]))\n"
        "print(collections.Counter(numbers).most_common(1), list(itertools.accumulate(numbers)))\n"
        "print(decimal.Decimal('0.1') + decimal.Decimal('0.2'), heapq.nsmallest(1, numbers), statistics.median(numbers))\n"
        "print(random.Random(0).randint(1, 6), datetime.date(2024, 1, 1).isoformat())\n"
        "open('/dev/null', 'w').write('discarded')\n"
    )
    result = run_sandboxed(code, stdin="12 18 12\n", limits=FAST)
    assert result.ok, result.stderr
    require_layer(result, VIEW)
    assert result.stdout.splitlines() == [
        "42 6 2/3",
        "[(12, 2)] [12, 30, 42]",
        "0.3 [12] 12",
        "4 2024-01-01",
    ]


def test_without_the_view_the_same_probe_reads_the_planted_files(run_dir: Path, dataset: Path, view_refused):
    """The control: the files the other tests look for are readable by the program's uid, so only the view hides them."""
    paths = [str(run_dir / "metrics.jsonl"), str(dataset)]
    result, observed = probe(paths)
    assert not any(layer.startswith(VIEW) for layer in result.isolation)
    assert any(entry.startswith(f"{VIEW}: the interpreter's prefix is /") for entry in result.missing)
    assert {path: observed[path]["open"] for path in paths} == {path: "ok" for path in paths}


# An answer hunter: it reads the places an answer may lie (the dataset and run directory, when their
# paths leak into the prompt, then every regular file it can find) for a JSON "expected_stdout"
# and prints the first it finds; it plants a decoy in its own directory to show that its search works.
HUNTER = r"""
import json, os, stat, sys, time

with open("decoy.jsonl", "w") as file:
    file.write(json.dumps({"expected_stdout": "decoy"}) + "\n")
found, read = [], 0
deadline = time.monotonic() + 1.5

def answers_in(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expected_stdout" and isinstance(item, str):
                yield item
            else:
                yield from answers_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from answers_in(item)
    elif isinstance(value, str) and "expected_stdout" in value:  # JSON inside JSON
        try:
            yield from answers_in(json.loads(value))
        except ValueError:
            pass

def search(path):
    global read
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) or os.path.getsize(path) > 2**20:
            return
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError:
        return
    read += 1
    for line in text.splitlines() if "expected_stdout" in text else []:
        try:
            found.extend(answers_in(json.loads(line)))
        except ValueError:
            pass

for path in LEAKED_PATHS:
    for directory, _, names in os.walk(path):
        for name in names:
            search(os.path.join(directory, name))
    search(path)
for directory, subdirectories, names in os.walk("/"):
    if directory in ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/proc", "/sys") or time.monotonic() > deadline:
        subdirectories[:] = []
        continue
    for name in names:
        if time.monotonic() < deadline:
            search(os.path.join(directory, name))
print(f"read {read} files, found {sorted(set(found))}", file=sys.stderr)
answers = [answer for answer in found if answer != "decoy"]
print(answers[0] if answers else "no answer found", end="")
"""


@pytest.mark.parametrize("view", ["as shipped", "view refused"])
def test_a_program_that_hunts_for_its_expected_output_scores_zero(view: str, readable_dir: Path, request):
    answer = f"orchard-answer-{uuid.uuid4().hex}\n"
    tests = {"tests": [{"stdin": "", "expected_stdout": answer}]}
    data = write(readable_dir / "data" / "train.jsonl", json.dumps({"prompt": "?", "answer": json.dumps(tests)}) + "\n")
    run = readable_dir / "runs" / "run-1"
    write(run / "samples.jsonl", json.dumps({"prompt": "?", "expected_stdout": answer}) + "\n")
    if view == "view refused":
        request.getfixturevalue("view_refused")
    else:
        require_layer(run_sandboxed("pass", limits=FAST), VIEW)
    prompt = Prompt(id="p", text="Print the answer.", answer=json.dumps(tests), distribution="code")
    hunter = HUNTER.replace("LEAKED_PATHS", repr([str(data), str(run)]))
    limits = SandboxLimits(wall_seconds=10, cpu_seconds=5, memory_bytes=256 * 2**20)
    scored = CodeVerifier(limits=limits).verify(prompt, f"```python\n{hunter}\n```")
    assert scored.error is None
    failures = scored.details["failures"]
    if view == "view refused":  # the control: with every file readable, the hunt pays
        assert scored.reward == 1.0 and scored.correct
        return
    assert scored.reward == 0.0 and not scored.correct
    assert failures[0]["reason"] == "wrong output"
    assert "found ['decoy']" in failures[0]["stderr"]  # it searched, and found only what it wrote itself
    assert answer.strip() not in failures[0]["stderr"]
