"""Reward models as verifiers, without Ray: the scorer against the checkpoint's own forward pass, and
how a model's score combines with a rule verifier's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from orchard.config import ConfigError, TinyModelConfig, load_config
from orchard.protocols import VerifierResult
from orchard.rollout.instruct_model import write_reward_model
from orchard.verifiers.reward_model import RewardModelError, RewardModelScorer, combined, reward_model_name

TINY = TinyModelConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_position_embeddings=128
)
PAIRS = [("12+34=", "46"), ("5+6=", "11, and then a longer answer"), ("7+8=", "")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    texts = ["12+34=46", "5+6=11", "7+8=15", "and then a longer answer"] * 10
    return write_reward_model(tmp_path_factory.mktemp("rm") / "rm", texts, TINY, vocab_size=300)


def direct_scores(path, pairs):
    """The checkpoint's logits as transformers computes them for each rendered pair on its own."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    scores = []
    for prompt, completion in pairs:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
        with torch.no_grad():
            scores.append(float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0]))
    return scores


def test_scores_are_the_checkpoints_own_whatever_the_batch(checkpoint):
    logits = direct_scores(checkpoint, PAIRS)
    raw = RewardModelScorer(checkpoint, batch_size=2, transform="raw").score(PAIRS)  # one padded batch of 2
    assert raw == pytest.approx(logits, abs=1e-5)
    sigmoid = RewardModelScorer(checkpoint, batch_size=3).score(PAIRS)
    assert sigmoid == pytest.approx([1 / (1 + torch.exp(torch.tensor(-x)).item()) for x in logits], abs=1e-6)
    assert len(set(raw)) == 3  # the pairs are told apart


def test_checkpoints_that_are_not_reward_models_are_refused(checkpoint, tmp_path):
    with pytest.raises(RewardModelError, match="cannot load a sequence-classification reward model"):
        RewardModelScorer(tmp_path / "absent")
    config = AutoConfig.from_pretrained(str(checkpoint))
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(tmp_path / "two"))
    AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(str(tmp_path / "two"))
    with pytest.raises(RewardModelError, match="has 2 labels; a reward model has one"):
        RewardModelScorer(tmp_path / "two")
    with pytest.raises(RewardModelError, match="transform must be 'sigmoid' or 'raw'"):
        RewardModelScorer(checkpoint, transform="tanh")


def test_combining_with_a_rule_verifier():
    right, wrong = VerifierResult(reward=1.0, correct=True), VerifierResult(reward=0.0, correct=False)
    alone = combined(0.8, None, mode="sum", rule_weight=1.0, model_weight=1.0)
    assert alone.reward == 0.8 and alone.correct
    assert not combined(0.3, None, mode="sum", rule_weight=1.0, model_weight=1.0).correct
    summed = combined(0.8, right, mode="sum", rule_weight=0.5, model_weight=2.0)
    assert summed.reward == pytest.approx(0.5 * 1.0 + 2.0 * 0.8) and summed.correct
    assert combined(0.8, wrong, mode="sum", rule_weight=0.5, model_weight=2.0).reward == pytest.approx(1.6)
    gated = combined(0.8, right, mode="gate", rule_weight=1.0, model_weight=1.0)
    assert gated.reward == 0.8 and gated.correct
    shut = combined(0.8, wrong, mode="gate", rule_weight=1.0, model_weight=1.0)
    assert shut.reward == 0.0 and not shut.correct
    broken = combined(float("nan"), right, mode="sum", rule_weight=1.0, model_weight=1.0)
    assert broken.reward == 0.0 and "non-finite score" in broken.error


def test_a_source_must_name_a_configured_reward_model(tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    source = f"data.sources=[{{kind: jsonl, path: '{data}', verifier: 'reward_model:judge'}}]"
    with pytest.raises(ConfigError, match="names no reward model of reward_models"):
        load_config(None, [source])
    config = load_config(None, [source, "reward_models={judge: {path: /models/judge, rule: math, combine: gate}}"])
    assert config.reward_models["judge"].combine == "gate" and config.reward_models["judge"].timeout_seconds == 60
    assert reward_model_name("reward_model:judge") == "judge" and reward_model_name("math") is None
