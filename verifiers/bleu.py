"""Sentence BLEU of a completion against reference answers, as the reward of BLEUBERI.

BLEUBERI (Chang et al., 2025, "BLEUBERI: BLEU is a surprisingly effective reward for instruction
following", arXiv 2505.11080; code github.com/lilakk/BLEUBERI, `training/dataset.py`,
`bleu_reward_func`) trains instruction following with GRPO on the BLEU of each completion against
one or more reference answers. It scores with Hugging Face `evaluate.load("bleu")` and
`smooth=True`, which is the TensorFlow NMT `compute_bleu`; this module reproduces that score:

    BLEU = BP · exp(Σ_{n=1..4} ¼ · log p_n)
    p_n  = (m_n + 1) / (t_n + 1)            (add-one smoothing, Lin & Och 2004, on every order)
    BP   = min(1, exp(1 − r/c))

where `m_n` is the number of the completion's n-grams found in the references, each n-gram clipped
to the most times it occurs in any one reference (multi-reference clipping), `t_n` the number of
the completion's n-grams, `c` the completion's length in tokens and `r` the length of the *shortest*
reference (the NMT script's choice; sacreBLEU's own `sentence_bleu` takes the closest length and
does not smooth unigrams, so it gives a different number). Text is split with sacreBLEU's `13a`
tokenizer (the one `evaluate`'s BLEU uses), case kept. An empty completion scores 0, as in BLEUBERI.

Add-one smoothing lifts short texts: with no match at all, p_n = 1/(t_n + 1), so a one-word
answer against a one-word reference still scores 0.5^¼ ≈ 0.84. For the paragraph-long references of
instruction following (BLEUBERI's setting) the floor falls towards 0; set `threshold` with that in mind.

References come from `Prompt.answer`, a string: a JSON list of strings (`["ref one", "ref two"]`)
gives several references; any other string is the one reference.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from orchard.protocols import VerifierResult
from orchard.records import Prompt

#: BLEU's highest n-gram order (BLEU-4, as in BLEUBERI).
MAX_ORDER = 4

#: Chat-template end tokens a completion may still carry; they are not part of the answer.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<end_of_turn>")

_TOKENIZER = Tokenizer13a()


def tokenize(text: str) -> list[str]:
    """Words as sacreBLEU's `13a` tokenizer splits them (punctuation apart, case kept)."""
    return _TOKENIZER(text.strip()).split()


def ngram_counts(tokens: Sequence[str], order: int) -> Counter[tuple[str, ...]]:
    """How often each n-gram of length `order` occurs in `tokens`."""
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


def references_of(answer: str) -> list[str]:
    """The references a prompt's answer holds: a JSON list of strings, else the string itself.

    Blank references are dropped, so an answer of `""` or `[]` holds none.
    """
    text = answer.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return [item for item in parsed if item.strip()]
    return [answer] if text else []


def answer_text(completion: str) -> str:
    """The completion without trailing chat-template end tokens and surrounding whitespace."""
    text = completion.strip()
    stripped = True
    while stripped:
        stripped = False
        for token in END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                stripped = True
    return text


def sentence_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """BLEUBERI's BLEU (add-one smoothed BLEU-4, shortest reference for BP) in [0, 1].

    An empty hypothesis or no references scores 0 (BP is undefined for a zero-length hypothesis).
    """
    hyp = tokenize(hypothesis)
    refs = [tokenize(reference) for reference in references]
    if not hyp or not refs:
        return 0.0
    log_precision = 0.0
    for order in range(1, MAX_ORDER + 1):
        hyp_counts = ngram_counts(hyp, order)
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref_counts |= ngram_counts(ref, order)
        matches = sum((hyp_counts & max_ref_counts).values())
        possible = max(len(hyp) - order + 1, 0)
        log_precision += math.log((matches + 1) / (possible + 1)) / MAX_ORDER
    ref_length = min(len(ref) for ref in refs)
    brevity = 1.0 if len(hyp) > ref_length else math.exp(1 - ref_length / len(hyp))
    return brevity * math.exp(log_precision)


@dataclass(frozen=True)
class BleuVerifier:
    """Rewards a completion by its BLEU against the prompt's references, for open-ended answers.

    `correct` is `reward >= threshold`; BLEU has no natural pass mark, so the default 0.3 (a close
    paraphrase of a reference, well above unrelated text) only feeds pass-rate statistics; the
    reward itself is the continuous score, as in BLEUBERI.
    """

    name: str = "bleu"
    threshold: float = 0.3

    def verify(self, prompt: Prompt, completion: str) -> VerifierResult:
        references = references_of(prompt.answer)
        if not references:
            return VerifierResult(
                reward=0.0,
                correct=False,
                error="bleu: field 'answer' holds no reference (a string, or a JSON list of strings)",
            )
        reward = sentence_bleu(answer_text(completion), references)
        return VerifierResult(reward=reward, correct=reward >= self.threshold, details={"references": len(references)})
