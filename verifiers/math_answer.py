"""Math answers checked by `math-verify` (Hugging Face): LaTeX, fractions, expressions, `\\boxed{}`.

`math-verify` bounds parsing and comparison time with `signal.alarm`, which only works in a
process's main thread; elsewhere (a verifier thread pool, a Ray actor's worker thread) the timeouts
are switched off and the work is bounded by the completion length limit instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from math_verify import parse, verify

from orchard.protocols import VerifierResult
from orchard.records import Prompt

#: Completions longer than this are judged on their last characters only (where answers are).
MAX_COMPLETION_CHARS = 4000


@dataclass(frozen=True)
class MathVerifier:
    name: str = "math"
    timeout_seconds: int = 5

    def _timeout(self) -> int | None:
        return self.timeout_seconds if threading.current_thread() is threading.main_thread() else None

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        timeout = self._timeout()
        gold = parse(prompt.answer, parsing_timeout=timeout)
        if not gold:
            # the reference itself does not parse: fall back to an exact string comparison
            correct = completion.strip() == prompt.answer.strip()
            return VerifierResult(reward=float(correct), correct=correct, details={"gold_parsed": False})
        answer = parse(completion[-MAX_COMPLETION_CHARS:], parsing_timeout=timeout)
        correct = bool(answer) and bool(verify(gold, answer, timeout_seconds=timeout))
        return VerifierResult(reward=1.0 if correct else 0.0, correct=correct)
