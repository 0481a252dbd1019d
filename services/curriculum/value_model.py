"""PCL: prompt selection by a value model of the current policy's pass rate (Gao et al., 2025,
"Prompt Curriculum Learning for Efficient LLM Post-Training").

Each step: draw a candidate pool of `k·B` prompts, keep the `B` whose predicted pass rate `V(q)` is
nearest the target `τ` (0.5, where `p(1 − p)` is largest), roll them out, then train `V` on the same
prompts' observed pass rates with `L = (V(q) − mean_i r_i)²`. Its cost is one forward pass per
candidate instead of `G` rollouts.

The value model here is a separate tiny network, not a head on the policy: a logistic regression on
hashed character n-grams of the prompt and its distribution. It needs nothing from the engine (so it
works the same behind vLLM, which exposes no hidden states), costs microseconds per candidate on a
CPU, and trains online in closed form per step with no backward pass through the policy. Its
weakness: it sees the prompt's surface, not the policy's internal state, so it tracks the policy
only through the outcomes it is trained on each step (which is what PCL's on-policy training does).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from orchard.records import Prompt


def nearest_to_target(predictions: Sequence[float], target: float, count: int) -> list[int]:
    """Indices of the `count` predictions nearest `target` (ties by position), in pool order."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    ranked = sorted(range(len(predictions)), key=lambda index: (abs(predictions[index] - target), index))
    return sorted(ranked[:count])


def prompt_features(text: str, distribution: str, *, dimension: int, ngram: int = 3) -> np.ndarray:
    """Hashed, L2-normalised character 1..`ngram`-gram counts of `text`, plus its distribution's slot."""
    features = np.zeros(dimension, dtype=np.float32)
    padded = f"^{text}$"
    for size in range(1, ngram + 1):
        for start in range(len(padded) - size + 1):
            features[zlib.crc32(padded[start : start + size].encode()) % dimension] += 1.0
    norm = float(np.linalg.norm(features))
    if norm > 0:
        features /= norm
    features[zlib.crc32(b"distribution:" + distribution.encode()) % dimension] += 1.0
    return features


class PromptValueModel:
    """Predicts a prompt's pass rate under the current policy; trained online on observed pass rates.

    Reads each prompt as hashed character n-grams and its distribution and, with `state_dimension`
    > 0, also as the policy's own hidden state at the prompt's last token (L2-normalised; passed in
    by the caller as `states`, e.g. `RolloutWorkerCore.prompt_states`)."""

    def __init__(
        self, *, dimension: int = 4096, lr: float = 0.5, epochs: int = 4, seed: int = 0, state_dimension: int = 0
    ) -> None:
        if dimension < 16:
            raise ValueError(f"dimension must be >= 16, got {dimension}")
        if state_dimension < 0:
            raise ValueError(f"state_dimension must be >= 0, got {state_dimension}")
        self.dimension = dimension
        self.state_dimension = state_dimension
        self.lr = lr
        self.epochs = epochs
        self.weights = np.zeros(dimension + state_dimension, dtype=np.float64)
        self.bias = 0.0
        self.updates = 0
        self.last_abs_error: float | None = None  # on each batch, before training on it

    def features(self, prompts: Sequence[Prompt], states: np.ndarray | None = None) -> np.ndarray:
        text = np.stack([prompt_features(p.text, p.distribution, dimension=self.dimension) for p in prompts])
        if self.state_dimension == 0:
            if states is not None:
                raise ValueError("this value model reads no policy states (state_dimension 0)")
            return text
        if states is None or np.shape(states) != (len(prompts), self.state_dimension):
            raise ValueError(
                f"expected policy states of shape ({len(prompts)}, {self.state_dimension}), got "
                f"{None if states is None else np.shape(states)}"
            )
        states = np.asarray(states, dtype=np.float32)
        norms = np.linalg.norm(states, axis=1, keepdims=True)
        return np.concatenate([text, states / np.maximum(norms, 1e-12)], axis=1)

    def predict(self, prompts: Sequence[Prompt], states: np.ndarray | None = None) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        return _sigmoid(self.features(prompts, states) @ self.weights + self.bias)

    def update(self, prompts: Sequence[Prompt], pass_rates: Sequence[float], states: np.ndarray | None = None) -> float:
        """Train on observed pass rates (squared error); returns the mean |error| *before* this update."""
        if len(prompts) != len(pass_rates):
            raise ValueError(f"{len(prompts)} prompts for {len(pass_rates)} pass rates")
        if not prompts:
            return math.nan
        targets = np.asarray(pass_rates, dtype=np.float64)
        if not np.all((targets >= 0) & (targets <= 1)):
            raise ValueError("pass rates must lie in [0, 1]")
        features = self.features(prompts, states).astype(np.float64)
        error_before = float(np.mean(np.abs(_sigmoid(features @ self.weights + self.bias) - targets)))
        for _ in range(self.epochs):
            predictions = _sigmoid(features @ self.weights + self.bias)
            # d/dz of (σ(z) − y)² = 2 (σ − y) σ (1 − σ)
            gradient = 2.0 * (predictions - targets) * predictions * (1.0 - predictions)
            self.weights -= self.lr * features.T @ gradient / len(targets)
            self.bias -= self.lr * float(gradient.mean())
        self.updates += 1
        self.last_abs_error = error_before
        return error_before

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "state_dimension": self.state_dimension,
            "weights": self.weights.tolist(),
            "bias": self.bias,
            "updates": self.updates,
            "last_abs_error": self.last_abs_error,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["dimension"]) != self.dimension or int(state.get("state_dimension", 0)) != self.state_dimension:
            raise ValueError(
                f"value-model state has dimensions {state['dimension']} + {state.get('state_dimension', 0)}, this"
                f" model {self.dimension} + {self.state_dimension}"
            )
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.bias = float(state["bias"])
        self.updates = int(state["updates"])
        self.last_abs_error = state.get("last_abs_error")


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))
