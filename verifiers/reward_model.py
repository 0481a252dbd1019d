"""Reward models as verifiers: a Hugging Face sequence-classification checkpoint scoring completions.

`RewardModelScorer` loads a checkpoint directory (`AutoModelForSequenceClassification` with one
label, and its tokenizer) and scores (prompt, completion) pairs in batches: the pair is rendered
through the tokenizer's chat template as a user turn and an assistant turn when it has one (as
reward models of instruct policies are trained), else as the prompt's text followed by the
completion, and its score is the label's logit, or its sigmoid (`transform: sigmoid`, the default,
so that it sits on the 0–1 scale of the rule verifiers it may be combined with).

`combine` is the rule of a reward model used together with a rule verifier (`reward_models.<name>.
rule`): `sum` gives `rule_weight · rule + model_weight · model`, `gate` gives the model's score only
where the rule verifier accepts the answer and the rule's reward elsewhere.

The scorer is plain Python and torch; `services/reward_models.py` serves it from Ray actors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from orchard.protocols import VerifierResult

#: The prefix of a data source's `verifier` that names a reward model of `reward_models`.
REWARD_MODEL_PREFIX = "reward_model:"


class RewardModelError(RuntimeError):
    """A reward model could not be loaded, or could not score a batch; the message says which and why."""


def reward_model_name(verifier: str) -> str | None:
    """`"rm"` for the verifier name `"reward_model:rm"`, None for any other verifier."""
    return verifier.removeprefix(REWARD_MODEL_PREFIX) if verifier.startswith(REWARD_MODEL_PREFIX) else None


class RewardModelScorer:
    """A sequence-classification checkpoint that scores (prompt, completion) pairs."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 32,
        max_length: int = 1024,
        transform: str = "sigmoid",
        torch_threads: int = 1,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(torch_threads)
        if transform not in ("sigmoid", "raw"):
            raise RewardModelError(f"reward model transform must be 'sigmoid' or 'raw', got {transform!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path))
        except (OSError, ValueError, RuntimeError) as error:
            raise RewardModelError(f"cannot load a sequence-classification reward model from {path}: {error}") from None
        labels = self.model.config.num_labels
        if labels != 1:
            raise RewardModelError(f"reward model {path} has {labels} labels; a reward model has one (a scalar score)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.eval()
        self.batch_size, self.max_length, self.transform = batch_size, max_length, transform

    def render(self, prompt: str, completion: str) -> str:
        """The text the reward model reads: a user and an assistant turn, or prompt then completion."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """One score per (prompt, completion) pair, in batches of `batch_size`."""
        import torch

        scores: list[float] = []
        texts = [self.render(prompt, completion) for prompt, completion in pairs]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            with torch.no_grad():
                logits = self.model(**batch).logits[:, 0].double()
            values = torch.sigmoid(logits) if self.transform == "sigmoid" else logits
            scores.extend(float(value) for value in values)
        return scores


def combined(
    model_score: float, rule: VerifierResult | None, *, mode: str, rule_weight: float, model_weight: float
) -> VerifierResult:
    """The reward of a completion scored by a reward model and, when configured, a rule verifier.

    No rule: the model's score, correct when it is at least 0.5. `sum`: `rule_weight · rule +
    model_weight · model`, correct as the rule says. `gate`: the model's score where the rule accepts
    the answer, the rule's reward where it does not."""
    if not math.isfinite(model_score):
        return VerifierResult(reward=0.0, correct=False, error=f"reward model: non-finite score {model_score!r}")
    if rule is None:
        return VerifierResult(reward=model_score, correct=model_score >= 0.5)
    if mode == "sum":
        return VerifierResult(
            reward=rule_weight * rule.reward + model_weight * model_score, correct=rule.correct, error=rule.error
        )
    if mode == "gate":
        return VerifierResult(
            reward=model_score if rule.correct else rule.reward, correct=rule.correct, error=rule.error
        )
    raise ValueError(f"combine mode must be 'sum' or 'gate', got {mode!r}")
