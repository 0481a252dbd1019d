"""Verifiers by name: the built-ins, or a user's own given by dotted path.

A dotted path (`package.module:attribute` or `package.module.attribute`) may name a class with a
no-argument constructor, an object with a `verify(prompt, completion)` method, or a plain function
`(prompt, completion) -> VerifierResult | float | bool`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchard.protocols import Verifier, VerifierResult
from orchard.records import Prompt


class VerifierError(ValueError):
    """A verifier name that cannot be resolved to a verifier."""


def _builtin(name: str) -> Verifier | None:
    if name == "procedural":
        from orchard.verifiers.procedural import ProceduralVerifier

        return ProceduralVerifier()
    if name == "math":
        from orchard.verifiers.math_answer import MathVerifier

        return MathVerifier()
    if name == "code":
        from orchard.verifiers.code import CodeVerifier

        return CodeVerifier()
    if name == "reasoning_gym":
        from orchard.verifiers.reasoning_gym import ReasoningGymVerifier

        return ReasoningGymVerifier()
    if name == "bleu":
        from orchard.verifiers.bleu import BleuVerifier

        return BleuVerifier()
    return None


@dataclass(frozen=True)
class FunctionVerifier:
    """Adapts a function returning a result, a reward or a verdict to the `Verifier` protocol."""

    function: Callable[[Prompt, str], Any]
    name: str

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        value = self.function(prompt, completion)
        if isinstance(value, VerifierResult):
            return value
        if isinstance(value, bool):
            return VerifierResult(reward=float(value), correct=value)
        if isinstance(value, int | float):
            return VerifierResult(reward=float(value), correct=float(value) > 0)
        raise TypeError(f"returned {type(value).__name__}; expected VerifierResult, float or bool")


def _import(path: str) -> Any:
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise VerifierError(
            f"unknown verifier {path!r}: not a built-in (procedural, math, code, reasoning_gym, bleu) and not a dotted"
            " path 'package.module:attribute'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise VerifierError(f"verifier {path!r}: cannot import {module_name!r}: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise VerifierError(f"verifier {path!r}: module {module_name!r} has no attribute {attribute!r}") from None


_BUILTINS: dict[str, Verifier] = {}


def get_verifier(name: str) -> Verifier:
    """The verifier called `name` (built-in or dotted path); raises `VerifierError` naming the problem."""
    builtin = _BUILTINS.get(name) or _builtin(name)
    if builtin is not None:
        _BUILTINS[name] = builtin
        return builtin
    target = _import(name)
    if inspect.isclass(target):
        try:
            target = target()
        except Exception as error:
            raise VerifierError(f"verifier {name!r}: cannot construct {target.__name__}(): {error}") from error
    if callable(getattr(target, "verify", None)):
        return target
    if callable(target):
        return FunctionVerifier(target, name)
    raise VerifierError(f"verifier {name!r} is a {type(target).__name__}, not a verifier or a function")


def verifier_label(verifier: Verifier) -> str:
    return str(getattr(verifier, "name", type(verifier).__name__))


def safe_verify(verifier: Verifier, prompt: Prompt, completion: str) -> VerifierResult:
    """`verifier.verify`, except that a raising or misbehaving verifier scores 0 with the error named."""
    try:
        result = verifier.verify(prompt, completion)
        if not isinstance(result, VerifierResult):
            raise TypeError(f"returned {type(result).__name__}, not VerifierResult")
    except Exception as error:  # a user's verifier may raise anything; the run must go on
        message = f"{verifier_label(verifier)}: {type(error).__name__}: {error}"
        return VerifierResult(reward=0.0, correct=False, error=message)
    if not math.isfinite(result.reward):
        message = f"{verifier_label(verifier)}: non-finite reward {result.reward!r}"
        return VerifierResult(reward=0.0, correct=False, error=message)
    return result
