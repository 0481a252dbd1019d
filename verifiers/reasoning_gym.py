"""reasoning-gym (PyPI `reasoning-gym`): about a hundred procedural task generators, each with its own
scorer, as a prompt source (`load_reasoning_gym_prompts`) and a verifier (`ReasoningGymVerifier`, the
built-in verifier "reasoning_gym").

Each `data.sources[...].datasets` entry is one generator and one distribution of the curricula (its
name). Entry `index` of generator `name` built with `seed` becomes the prompt `rg-{name}-{seed}-{index}`
(`rg-{name}-{digest}-{seed}-{index}` when the entry has a `config`, `digest` being a hash of it, so
that a changed config never reuses an id). Its text is the question, a blank line and the source's
`instruction` (default `ANSWER_INSTRUCTION`), which asks for the final answer between `<answer>` and
`</answer>`: reasoning-gym's own convention (its `utils.SYSTEM_PROMPTS` and `utils.extract_answer`),
which is the format its scorers expect the extracted answer in. Its `solution` is the reference answer in those tags (what the warm
start and SFT signals teach), None for generators that have no single reference answer (`boxnet`,
`graph_color`, `propositional_logic`, `rubiks_cube`, `rush_hour`: their scorers check an answer's
validity; the prompt's `answer` is then "").

A prompt's `metadata` holds `verifier`, `dataset`, `size`, `seed`, `config`, `index` and, whenever it
can be carried exactly, the generated `entry` itself, so the verifier scores against exactly what the
model was asked and never regenerates. Regenerating would be slow for some generators and wrong for
others: in reasoning-gym 0.1.25 `list_functions` draws from the global `random` module, and
`isomorphic_strings`, `knight_swap`, `polynomial_multiplication`, `ransom_note` and `word_ladder`
depend on the order of string hashes (PYTHONHASHSEED), so for these six the same index gives other
questions in another process (their ids name a task only within the process that built them).
Prompts cross processes as msgpack, which turns tuples into lists, and some scorers compare grids as
tuples (`arc_agi`, `rearc`: a list grid never equals a tuple grid, so the reference answer would score
0.05): `to_plain` writes a tuple as `{"__tuple__": [...]}` and `from_plain` restores it. An entry
holding anything else msgpack cannot carry exactly (a set, a Fraction, an object) is left out, and the
verifier regenerates it from the dataset's name, size, seed, config and index, and refuses to score if
the regenerated answer differs from the prompt's.

Nine scorers run the model's answer as Python: `string_insertion`, `spiral_matrix`, `binary_matrix`
and `n_queens` call `eval` on an answer that is not exactly right (hoping for a Python list), and
`countdown`, `puzzle24`, `simple_integration`, `intermediate_integration` and `polynomial_multiplication`
parse it with `sympy.parse_expr`, which is `eval` underneath. A completion could run code in the rollout
worker (and rewrite its own reward), or stall it in C code that no signal interrupts (`1e999999` takes
sympy ~40 s, `10**10**9` longer). So `eval` in the first four modules is replaced by
`ast.literal_eval` (same result for any list literal; anything else fails, as a failed `eval` does
there), and an answer for the other five reaches its scorer only if `refused_math` finds it to be
arithmetic on numbers, symbols and math functions, with no number sympy would take long to compute (no
strings, attributes, other names or power towers). A scorer still slow in Python code is stopped after
`timeout_seconds` by a timer signal when it runs in a process's main thread (a rollout worker's methods
do: Ray runs a synchronous actor's calls there), and its answer counted wrong with an error; in any
other thread `max_answer_chars` is the only bound.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import importlib
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import msgpack
import reasoning_gym
from reasoning_gym.factory import DATASETS

from orchard.config import ReasoningGymDataset, ReasoningGymSource
from orchard.protocols import VerifierResult
from orchard.records import Prompt
from orchard.verifiers.datasets import SourceError

VERIFIER_NAME = "reasoning_gym"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
#: Appended to every question: reasoning-gym's default system prompt (`SYSTEM_PROMPTS["default"]`) less
#: its first sentence.
ANSWER_INSTRUCTION = (
    "Once you have thought about the reasoning process, provide the answer in the following format:\n"
    "<answer>answer here</answer>\n"
    "Do not explain your reasoning inside the answer tags, provide only the final answer. When an example is"
    " provided, you should strictly follow the format of the output/answer in that example."
)
#: Scores are floats in [0, 1]; at or above this the answer counts as correct.
CORRECT_SCORE = 0.999
#: reasoning-gym's wrapper of several generators; Orchard lists them itself, one distribution each.
COMPOSITE = "composite"
#: Generators whose scorers parse the answer with `sympy.parse_expr` (Python's `eval` underneath).
SYMPY_PARSED = frozenset(
    {"countdown", "puzzle24", "simple_integration", "intermediate_integration", "polynomial_multiplication"}
)
#: Modules whose scorers `eval` an inexact answer; `eval` there is `_literal_eval`.
EVALUATING_MODULES = (
    "reasoning_gym.algorithmic.string_insertion",
    "reasoning_gym.algorithmic.spiral_matrix",
    "reasoning_gym.algorithmic.binary_matrix",
    "reasoning_gym.games.n_queens",
)
#: Names an answer for a `SYMPY_PARSED` generator may use besides single letters (symbols, E, I): the
#: functions and constants of their reference answers and their kin.
MATH_NAMES = frozenset(
    "sin cos tan cot sec csc asin acos atan acot sinh cosh tanh asinh acosh atanh exp log ln sqrt Abs pi oo"
    " Integral".split()
)
#: Single letters that sympy's namespace binds to functions (N evaluates to any precision, S sympifies).
_SYMPY_LETTERS = frozenset("NOQS")
#: The most decimal digits a number computed from such an answer may have (Python prints no longer int).
MAX_ANSWER_DIGITS = 4300
#: The largest number an exponent may be.
MAX_EXPONENT = 1000
_TUPLE_TAG = "__tuple__"
_MSGPACK_INTS = range(-(2**63), 2**64)

T = TypeVar("T")


class NotPlain(ValueError):
    """A value msgpack cannot carry exactly, even with tuples tagged."""


def to_plain(value: Any) -> Any:
    """`value` as msgpack data from which `from_plain` rebuilds an equal value, tuples included.

    Scalars become their base type, which they equal (numpy's `str_` in `knights_knaves` entries
    becomes `str`); containers are checked exactly (a namedtuple or a defaultdict would not come back
    as itself). Anything else raises `NotPlain`, as do ints beyond 64 bits, dict keys other than str
    and int, and a dict that already has the tuple tag as a key.
    """
    kind = type(value)
    if value is None or kind is bool or kind is bytes:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) not in _MSGPACK_INTS:
            raise NotPlain(f"integer {value} does not fit msgpack's 64 bits")
        return int(value)
    if kind is list:
        return [to_plain(item) for item in value]
    if kind is tuple:
        return {_TUPLE_TAG: [to_plain(item) for item in value]}
    if kind is dict:
        if _TUPLE_TAG in value:
            raise NotPlain(f"a dict with the key {_TUPLE_TAG!r} would read back as a tuple")
        for key in value:
            if not (type(key) is str or (type(key) is int and key in _MSGPACK_INTS)):
                raise NotPlain(f"dict key {key!r} of type {type(key).__name__}")
        return {key: to_plain(item) for key, item in value.items()}
    raise NotPlain(f"{kind.__module__}.{kind.__qualname__} value {value!r:.80}")


def from_plain(value: Any) -> Any:
    """The inverse of `to_plain` (lists from msgpack stay lists; tagged tuples become tuples again)."""
    if isinstance(value, list):
        return [from_plain(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1 and _TUPLE_TAG in value:
            return tuple(from_plain(item) for item in value[_TUPLE_TAG])
        return {key: from_plain(item) for key, item in value.items()}
    return value


def extract_answer(completion: str) -> str | None:
    """The text of the last complete `<answer>...</answer>` in `completion`, stripped; None if there is none.

    reasoning-gym's `utils.extract_answer` makes the same choice with a regex whose lazy `.*?` rescans
    the rest of the text from every `<answer>`, quadratic on a long completion of unclosed tags; two
    `rfind`s are linear. Unlike it, nested tags give the innermost answer (`<answer>a <answer>b</answer>`
    gives "b").
    """
    last_close = completion.rfind(ANSWER_CLOSE)
    if last_close < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, last_close)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    return completion[start : completion.find(ANSWER_CLOSE, start)].strip()


class _Refused(ValueError):
    """Why an answer may not reach `sympy.parse_expr`."""


def refused_math(answer: str) -> str | None:
    """Why `answer` may not reach `sympy.parse_expr` (which evaluates it as Python), or None if it may.

    The answer is parsed (not run) as a Python expression and every node checked against an
    allowlist, so that what passes cannot be code: numbers; names from `MATH_NAMES` or single letters
    other than sympy's functions N, O, Q and S; + - * / ^ and unary signs; calls of `MATH_NAMES`
    without keywords; and powers whose exponent is a number up to `MAX_EXPONENT`, a letter or a
    fraction of two such numbers (no towers). No strings, attributes, subscripts or other names. A
    bound on the digits of every number sympy would compute must stay within `MAX_ANSWER_DIGITS`.
    """
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an arithmetic expression"
    try:
        _digits(tree.body)
    except _Refused as refusal:
        return str(refusal)
    except RecursionError:
        return "nested too deeply"
    return None


def _number(node: ast.AST) -> float | None:
    """The value of a plain number node (a signed literal), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        return _number(node.operand)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return abs(node.value)
    return None


def _exponent(node: ast.AST) -> float:
    """How many times an exponent multiplies its base's digits; raises `_Refused` unless it is small."""
    if isinstance(node, ast.Name):
        _digits(node)  # refuses names outside the allowlist
        return 1.0  # a symbol: the power stays symbolic
    value = _number(node)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        numerator, denominator = _number(node.left), _number(node.right)
        if numerator is not None and denominator is not None and denominator >= 1:
            value = numerator / denominator
    if value is None or not value <= MAX_EXPONENT:
        raise _Refused(f"an exponent other than a number up to {MAX_EXPONENT}, a letter or a fraction of numbers")
    return max(value, 1.0)


def _digits(node: ast.AST) -> float:
    """A bound on the decimal digits of the numbers sympy computes for `node` (a symbol counts as one)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        digits = math.log10(abs(node.value)) + 1 if node.value else 1.0
    elif isinstance(node, ast.Name):
        if node.id not in MATH_NAMES and (len(node.id) > 1 or node.id in _SYMPY_LETTERS):
            raise _Refused(f"name {node.id!r}")
        digits = 1.0
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        digits = _digits(node.operand)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.BitXor):
        digits = max(_digits(node.left), _digits(node.right)) + 1
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Div):
        digits = _digits(node.left) + _digits(node.right)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        digits = _digits(node.left) * _exponent(node.right)
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in MATH_NAMES
        and not node.keywords
        and not any(isinstance(argument, ast.Starred) for argument in node.args)
    ):
        digits = max((_digits(argument) for argument in node.args), default=1.0)
    else:
        raise _Refused(f"{type(node).__name__.lower()} {ast.unparse(node)[:40]!r}")
    if not digits <= MAX_ANSWER_DIGITS:
        raise _Refused(f"numbers of over {MAX_ANSWER_DIGITS} digits")
    return digits


def _literal_eval(source: str, *namespaces: Any) -> Any:
    """`eval` for scorers that only hope for a Python literal: `ast.literal_eval`, which runs no code."""
    return ast.literal_eval(source)


def _disarm_evaluating_scorers() -> None:
    """Make `eval` in `EVALUATING_MODULES` mean `_literal_eval` (a module's globals shadow the builtins)."""
    for module_name in EVALUATING_MODULES:
        importlib.import_module(module_name).eval = _literal_eval


_disarm_evaluating_scorers()


def prompt_id(dataset: ReasoningGymDataset, index: int) -> str:
    """A stable id: the same generator, seed, config and index always give the same id."""
    if not dataset.config:
        return f"rg-{dataset.name}-{dataset.seed}-{index}"
    digest = hashlib.sha256(msgpack.packb(_sorted(to_plain(dataset.config)), use_bin_type=True)).hexdigest()[:8]
    return f"rg-{dataset.name}-{digest}-{dataset.seed}-{index}"


def _sorted(value: Any) -> Any:
    """Plain data with every dict as its items sorted by key, so that the order options are written in is moot."""
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    if isinstance(value, dict):
        return sorted(([repr(key), _sorted(item)] for key, item in value.items()), key=lambda pair: pair[0])
    return value


def _checked_config(dataset: ReasoningGymDataset, where: str) -> dict[str, Any]:
    """The dataset's config as stored in metadata; raises `SourceError` for a name or option reasoning-gym lacks."""
    if dataset.name == COMPOSITE:
        raise SourceError(
            f"{where}: 'composite' is reasoning-gym's own mixture; list its generators as separate"
            " data.sources[...].datasets entries instead (each becomes a distribution of the curricula)"
        )
    if dataset.name not in DATASETS:
        close = difflib.get_close_matches(dataset.name, DATASETS, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "no known name is close"
        raise SourceError(
            f"{where}: reasoning-gym has no dataset {dataset.name!r} ({hint}); the {len(DATASETS)} names are the"
            " keys of reasoning_gym.factory.DATASETS"
        )
    clashing = sorted({"size", "seed"} & dataset.config.keys())
    if clashing:
        raise SourceError(
            f"{where}: {', '.join(clashing)} inside config; give them as the entry's own fields"
            f" ({', '.join(f'{key}: ...' for key in clashing)}), next to name"
        )
    options = sorted(field.name for field in fields(DATASETS[dataset.name][1]) if field.name not in ("size", "seed"))
    for key in dataset.config:
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SourceError(
                f"{where}: {dataset.name!r} has no config option {key!r}{hint}; its options: {', '.join(options)}"
            )
    try:
        return to_plain(dataset.config)
    except NotPlain as error:
        raise SourceError(f"{where}: config must hold plain values (str, numbers, lists, dicts): {error}") from None


def _generated(dataset: ReasoningGymDataset, where: str) -> list[dict[str, Any]]:
    try:
        generator = reasoning_gym.create_dataset(dataset.name, size=dataset.size, seed=dataset.seed, **dataset.config)
    except Exception as error:  # reasoning-gym validates configs with asserts and raises what it likes
        raise SourceError(
            f"{where}: reasoning-gym rejected config {dataset.config} of {dataset.name!r}:"
            f" {type(error).__name__}: {error}"
        ) from None
    entries = []
    for index in range(dataset.size):
        try:
            entry = generator[index]
        except Exception as error:
            raise SourceError(
                f"{where}: reasoning-gym failed to generate entry {index} of {dataset.name!r} with config"
                f" {dataset.config}: {type(error).__name__}: {error}"
            ) from error
        if not isinstance(entry, Mapping) or not isinstance(entry.get("question"), str):
            raise SourceError(f"{where}: entry {index} of {dataset.name!r} has no question text: {entry!r:.200}")
        entries.append(dict(entry))
    return entries


def _prompt(
    dataset: ReasoningGymDataset, config: dict[str, Any], index: int, entry: dict[str, Any], instruction: str
) -> Prompt:
    answer = entry.get("answer")
    metadata: dict[str, Any] = {
        "verifier": VERIFIER_NAME,
        "dataset": dataset.name,
        "size": dataset.size,
        "seed": dataset.seed,
        "config": config,
        "index": index,
    }
    try:
        metadata["entry"] = to_plain(entry)
    except NotPlain:
        pass  # the verifier regenerates it from the fields above
    return Prompt(
        id=prompt_id(dataset, index),
        text=f"{entry['question']}\n\n{instruction}",
        answer="" if answer is None else str(answer),
        distribution=dataset.name,
        metadata=metadata,
        solution=None if answer is None else f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}",
    )


def load_reasoning_gym_prompts(source: ReasoningGymSource) -> list[Prompt]:
    """Every entry of every generator of `source` as a prompt (module docstring: ids, text, metadata).

    Raises `SourceError` (a ValueError) naming the `data.sources[...].datasets` entry for an unknown
    generator (with close names), an unknown or clashing config option, a config reasoning-gym rejects,
    or the same generator listed twice with the same seed and config.
    """
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for position, dataset in enumerate(source.datasets):
        where = f"data.sources[...].datasets[{position}] (reasoning-gym {dataset.name!r})"
        config = _checked_config(dataset, where)
        first_id = prompt_id(dataset, 0)
        if first_id in seen:
            raise SourceError(
                f"{where}: the same generator, seed and config as datasets[{seen[first_id]}], so the same"
                " prompts; give it another seed or config, or raise that entry's size"
            )
        seen[first_id] = position
        instruction = ANSWER_INSTRUCTION if source.instruction is None else source.instruction
        entries = _generated(dataset, where)
        prompts.extend(_prompt(dataset, config, index, entry, instruction) for index, entry in enumerate(entries))
    return prompts


@functools.lru_cache(maxsize=64)
def _scorer(name: str, size: int, seed: int, packed_config: bytes) -> Any:
    """The generator a prompt came from (scorers are its methods and may read its config), built once."""
    config = from_plain(msgpack.unpackb(packed_config, raw=False, strict_map_key=False))
    return reasoning_gym.create_dataset(name, size=size, seed=seed, **config)


class _ScoringTimeout(BaseException):
    """Raised by the timer inside a scorer; a BaseException, which scorers' `except Exception` let through."""


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _ScoringTimeout


def call_with_timeout(function: Callable[[], T], seconds: float | None) -> tuple[T | None, bool]:
    """`(function(), False)`, or `(None, True)` once it has run `seconds` (a SIGALRM timer).

    Some scorers catch everything with a bare `except:` and return a score anyway; a timer that fired
    still counts as a timeout. A timer already set (pytest-timeout's, a caller's) is honoured: when it
    is due first it alone bounds the call, otherwise ours runs in its place and it is set again
    afterwards, with its handler, for the time it had left. Outside the main thread signals cannot be
    used and `function` runs unbounded.
    """
    if seconds is None or threading.current_thread() is not threading.main_thread():
        return function(), False
    outer_remaining, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_remaining and outer_remaining <= seconds:
        return function(), False
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            value = function()
        finally:
            remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        return (None, True) if remaining == 0 else (value, False)
    except _ScoringTimeout:
        return None, True
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
        if outer_remaining:
            left = max(outer_remaining - (time.monotonic() - started), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def _metadata_field(prompt: Prompt, key: str) -> Any:
    if key not in prompt.metadata:
        raise ValueError(
            f"prompt {prompt.id!r} has no metadata[{key!r}]; reasoning_gym prompts are built by"
            " verifiers.reasoning_gym.load_reasoning_gym_prompts"
        )
    return prompt.metadata[key]


def scoring_entry(prompt: Prompt) -> tuple[Any, dict[str, Any]]:
    """The generator of `prompt` and the entry to score against: the stored one, else regenerated and checked."""
    name, index = _metadata_field(prompt, "dataset"), _metadata_field(prompt, "index")
    packed_config = msgpack.packb(prompt.metadata.get("config", {}), use_bin_type=True)
    scorer = _scorer(name, _metadata_field(prompt, "size"), _metadata_field(prompt, "seed"), packed_config)
    if "entry" in prompt.metadata:
        return scorer, from_plain(prompt.metadata["entry"])
    entry = scorer[index]
    answer = entry.get("answer")
    if ("" if answer is None else str(answer)) != prompt.answer:
        raise ValueError(
            f"entry {index} regenerated with answer {answer!r:.80}, but the prompt's answer is {prompt.answer!r:.80}"
            " (a generator that does not reproduce its entries, or another reasoning-gym version)"
        )
    return scorer, entry


@dataclass(frozen=True)
class ReasoningGymVerifier:
    """Scores the last `<answer>...</answer>` of a completion with the generator's own `score_answer`.

    The reward is the scorer's score in [0, 1], partial credit included (e.g. `word_sorting` gives
    the share of words in place); `correct` means a score of at least `CORRECT_SCORE`. A completion
    without a complete answer tag scores 0 with no error (`details["extracted"]` is None): the model
    broke the format, the verifier did not fail. An answer longer than `max_answer_chars` (or twice
    the reference, if longer) scores 0 unscored. A scorer that raises, runs past `timeout_seconds`
    or returns something outside [0, 1] gives reward 0 with an error naming the dataset. An answer
    for a `SYMPY_PARSED` generator that `refused_math` refuses scores 0 unscored, with no error and
    the reason in `details["refused"]`: the scorer would have run it as Python.
    """

    name: str = VERIFIER_NAME
    timeout_seconds: float | None = 5.0
    max_answer_chars: int = 10_000

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        try:
            return self._verify(prompt, completion)
        except Exception as error:  # scorers raise on odd answers (int('xx'), overflow); must not reach the worker
            dataset = prompt.metadata.get("dataset", "?")
            return VerifierResult(
                reward=0.0, correct=False, error=f"reasoning-gym {dataset!r}: {type(error).__name__}: {error}"
            )

    def _verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        answer = extract_answer(completion)
        if answer is None:
            return VerifierResult(reward=0.0, correct=False, details={"extracted": None})
        if len(answer) > max(self.max_answer_chars, 2 * len(prompt.answer)):
            return VerifierResult(reward=0.0, correct=False, details={"extracted_chars": len(answer)})
        refusal = refused_math(answer) if prompt.metadata.get("dataset") in SYMPY_PARSED else None
        if refusal is not None:
            return VerifierResult(reward=0.0, correct=False, details={"extracted": answer[:500], "refused": refusal})
        scorer, entry = scoring_entry(prompt)
        score, timed_out = call_with_timeout(lambda: scorer.score_answer(answer, entry), self.timeout_seconds)
        dataset = prompt.metadata["dataset"]
        if timed_out:
            return VerifierResult(
                reward=0.0,
                correct=False,
                error=f"reasoning-gym {dataset!r}: scoring an answer of {len(answer)} characters took over"
                f" {self.timeout_seconds}s; counted wrong",
            )
        reward = float(score)
        if not (math.isfinite(reward) and 0.0 <= reward <= 1.0):
            return VerifierResult(
                reward=0.0, correct=False, error=f"reasoning-gym {dataset!r}: score {score!r} is outside [0, 1]"
            )
        return VerifierResult(reward=reward, correct=reward >= CORRECT_SCORE, details={"extracted": answer[:500]})
