"""Procedural task families with exact checkers.

Each family × difficulty is one *distribution* (`"addition/d1"`). Prompts are short enough for a
character-level model whose answer is one line:

| family | d1 | d2 | d3 |
| --- | --- | --- | --- |
| addition | `37+58=` → `95` | 3-digit + 3-digit | 4-digit + 4-digit |
| multiplication | 2-digit × 1-digit `47*6=` | 3-digit × 1-digit | 2-digit × 2-digit |
| sorting | 4 digits `sort:3142=` → `1234` | 6 digits | 8 digits |
| reversal | 4 letters `rev:abcd=` → `dcba` | 6 letters | 8 letters |
| counting | `count a:abaab=` → `3` over 6 letters of "ab" | 9 letters of "abc" | 12 letters of "abcd" |
| big_multiplication | 3-digit × 3-digit `mul:482*937=` → `451634` | 4-digit × 4-digit | 5-digit × 5-digit |

`big_multiplication` is beyond what the demo's model computes in its head, and one line of Python
away: its prompts carry the call that solves them (`metadata["tool_call"]`, `print(482*937)`), from
which a warm start shows the policy the format of a tool call (`rollout.multi_turn`). Its reward gives
partial credit (`metadata["partial_credit"]`): the share of the answer's characters right at their
position, so that an answer copied from the tool's output with one digit wrong still teaches; only the
exact answer is correct.

Generators are pure functions of a `random.Random`, so a seed reproduces a prompt set. Prompt ids
are derived from the text, so the same task always has the same id. Every prompt carries its
reference solution (the answer, as the model should write it) and three tiers of hints from
abstract to concrete (`answer_hints`) for prompts the policy cannot solve yet.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from orchard.protocols import VerifierResult
from orchard.records import Prompt

DIFFICULTIES = (1, 2, 3)

Generator = Callable[[int, random.Random], tuple[str, str]]


def _number(digits: int, rng: random.Random) -> int:
    return rng.randrange(10 ** (digits - 1), 10**digits)


def addition(difficulty: int, rng: random.Random) -> tuple[str, str]:
    digits = difficulty + 1
    a, b = _number(digits, rng), _number(digits, rng)
    return f"{a}+{b}=", str(a + b)


def multiplication(difficulty: int, rng: random.Random) -> tuple[str, str]:
    left, right = {1: (2, 1), 2: (3, 1), 3: (2, 2)}[difficulty]
    a, b = _number(left, rng), _number(right, rng)
    return f"{a}*{b}=", str(a * b)


def sorting(difficulty: int, rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(2 + 2 * difficulty))
    return f"sort:{digits}=", "".join(sorted(digits))


def reversal(difficulty: int, rng: random.Random) -> tuple[str, str]:
    letters = "".join(rng.choice("abcdefghij") for _ in range(2 + 2 * difficulty))
    return f"rev:{letters}=", letters[::-1]


def counting(difficulty: int, rng: random.Random) -> tuple[str, str]:
    alphabet = "abcd"[: difficulty + 1]
    text = "".join(rng.choice(alphabet) for _ in range(3 + 3 * difficulty))
    target = rng.choice(alphabet)
    return f"count {target}:{text}=", str(text.count(target))


def big_multiplication(difficulty: int, rng: random.Random) -> tuple[str, str]:
    digits = difficulty + 2
    a, b = _number(digits, rng), _number(digits, rng)
    return f"mul:{a}*{b}=", str(a * b)


#: Families whose prompts carry the tool call that solves them: the call's text from the prompt's text.
TOOL_CALLS: dict[str, Callable[[str], str]] = {
    "big_multiplication": lambda text: f"print({text.removeprefix('mul:').removesuffix('=')})",
}


FAMILIES: dict[str, Generator] = {
    "addition": addition,
    "multiplication": multiplication,
    "sorting": sorting,
    "reversal": reversal,
    "counting": counting,
    "big_multiplication": big_multiplication,
}


def distribution_name(family: str, difficulty: int) -> str:
    return f"{family}/d{difficulty}"


def check_family(family: str, difficulty: int) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown procedural family {family!r}; known: {', '.join(FAMILIES)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty {difficulty} of {family!r} must be one of {DIFFICULTIES}")


def answer_hints(answer: str) -> tuple[str, str, str]:
    """Hints for a one-line answer, abstract to concrete (Scaf-GRPO's tiers), short enough for the demo's
    character model to read in its context:

    1. its length (`len 3`) — what shape the answer has;
    2. its length and first character (`len 3, starts 1`) — where to begin;
    3. its first half, at least one character (`starts 12`) — a concrete partial step.
    """
    if not answer:
        raise ValueError("answer_hints needs a non-empty answer")
    half = answer[: max(1, (len(answer) + 1) // 2)]
    return (f"len {len(answer)}", f"len {len(answer)}, starts {answer[0]}", f"starts {half}")


def make_prompt(family: str, difficulty: int, text: str, answer: str) -> Prompt:
    metadata: dict[str, object] = {"verifier": "procedural", "family": family, "difficulty": difficulty}
    if family in TOOL_CALLS:
        metadata["tool_call"] = {"tool": "python", "call": TOOL_CALLS[family](text), "output": answer}
        metadata["partial_credit"] = True
    return Prompt(
        id=f"{family}-d{difficulty}:{text}",
        text=text,
        answer=answer,
        distribution=distribution_name(family, difficulty),
        metadata=metadata,
        solution=answer,
        hints=answer_hints(answer),
    )


def generate_prompt(family: str, difficulty: int, rng: random.Random) -> Prompt:
    """One fresh task of `family` at `difficulty`."""
    check_family(family, difficulty)
    text, answer = FAMILIES[family](difficulty, rng)
    return make_prompt(family, difficulty, text, answer)


def position_share(answer: str, reference: str) -> float:
    """The share of `reference`'s characters that `answer` has at the same position, over the longer of
    the two (so extra characters cost as much as missing ones)."""
    if not answer and not reference:
        return 1.0
    matches = sum(a == b for a, b in zip(answer, reference, strict=False))
    return matches / max(len(answer), len(reference))


@dataclass(frozen=True)
class ProceduralVerifier:
    """Exact match of the completion (surrounding whitespace ignored) with the reference answer; for a
    prompt with `metadata["partial_credit"]` the reward of a wrong answer is `position_share` of it."""

    name: str = "procedural"

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        answer = completion.strip()
        correct = answer == prompt.answer
        if correct or not prompt.metadata.get("partial_credit"):
            return VerifierResult(reward=1.0 if correct else 0.0, correct=correct)
        return VerifierResult(reward=position_share(answer, prompt.answer), correct=False)
