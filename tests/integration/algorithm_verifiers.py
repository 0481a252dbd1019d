"""A verifier for runs that exercise the learner's options, given to runs by dotted path."""

from __future__ import annotations

from orchard.protocols import VerifierResult


def digits_then_exact(prompt, completion):
    """Half the share of digits in the completion, or 1 for the exact answer, which alone is correct:
    an untrained model's groups carry signal for the RL loss yet all fail (HPT, hints)."""
    if completion.strip() == prompt.answer:
        return VerifierResult(reward=1.0, correct=True)
    share = sum(c.isdigit() for c in completion) / max(len(completion), 1)
    return VerifierResult(reward=0.5 * share, correct=False)
