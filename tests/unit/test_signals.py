"""learner.signals: shaped rewards, per-token advantages and the rows and SFT examples a step trains on."""

from __future__ import annotations

import pytest
import torch

from orchard.config import LearnerConfig
from orchard.learner.batching import build_training_tensors
from orchard.learner.signals import select_signals, shaped_rewards, token_advantages
from orchard.records import Completion, Group, Prompt


def completion(tokens: int, reward: float, *, correct: bool = False, **fields) -> Completion:
    return Completion(
        text="x" * tokens,
        token_ids=[7] * tokens,
        logprobs=[-1.0] * tokens,
        policy_version=0,
        reward=reward,
        correct=correct,
        **fields,
    )


def group(name: str, completions: list[Completion], solution: str | None = None) -> Group:
    prompt = Prompt(id=name, text="q", answer="a", distribution="test", solution=solution)
    return Group(prompt=prompt, prompt_token_ids=[1, 2], completions=completions, id=name)


def test_rewards_are_shaped_overlong_then_truncated():
    groups = [group("g", [completion(2, 1.0), completion(7, 1.0), completion(8, 1.0, finish_reason="length")])]
    tensors = build_training_tensors(groups, 0)
    # L_max 8, L_cache 2: free up to 6, 7 tokens → −0.5, 8 → −1
    config = LearnerConfig(overlong={"enabled": True, "cache_length": 2})
    assert shaped_rewards(config, tensors, 8).tolist() == [1.0, 0.5, 0.0]
    # and DLER's L_T = 6 zeroes both long ones
    config = LearnerConfig(
        advantage="lite_ppo",
        overlong={"enabled": True, "cache_length": 2},
        length_penalty={"enabled": True, "target_length": 6},
    )
    assert shaped_rewards(config, tensors, 8).tolist() == [1.0, 0.0, 0.0]
    assert shaped_rewards(LearnerConfig(), tensors, 8).tolist() == [1.0, 1.0, 1.0]


def test_token_advantages_of_tree_trajectories_follow_learner_tree_advantage():
    def tree_completion(tokens: list[int], reward: float, values: list[float]) -> Completion:
        return Completion(
            text="t",
            token_ids=tokens,
            logprobs=[-1.0] * len(tokens),
            policy_version=0,
            reward=reward,
            correct=reward > 0,
            source="tree",
            token_values=values,
        )

    groups = [
        group("plain", [completion(1, 1.0), completion(2, 0.0)]),
        group("tree", [tree_completion([5, 6], 1.0, [0.5, 1.0]), tree_completion([5, 7], 0.0, [-0.2, -1.0])]),
    ]
    tensors = build_training_tensors(groups, 0)
    assert tensors.tree.tolist() == [False, False, True, True]

    def advantages(tree_advantage: str):
        config = LearnerConfig(
            advantage="dr_grpo", aggregation="seq-mean-token-sum-norm", tree_advantage=tree_advantage
        )
        return token_advantages(config, tensors, tensors.rewards)

    per_token, per_sequence = advantages("prefix_credit")
    assert per_sequence.tolist() == [0.5, -0.5, 0.5, -0.5]
    # prompt positions 0-1 hold 0; the plain rows carry their outcome advantage on every token
    assert per_token[0].tolist() == [0.0, 0.0, 0.5, 0.0]
    assert per_token[1].tolist() == [0.0, 0.0, -0.5, -0.5]
    # the tree's trajectories share their first token: all of their advantage sits on the second
    torch.testing.assert_close(per_token[2], torch.tensor([0.0, 0.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_token[3], torch.tensor([0.0, 0.0, 0.0, -0.5]), atol=1e-6, rtol=0)
    # node values, finals (1, −1): mean 0, population std 1
    per_token, _ = advantages("node_values")
    torch.testing.assert_close(per_token[2], torch.tensor([0.0, 0.0, 0.5, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_token[3], torch.tensor([0.0, 0.0, -0.2, -1.0]), atol=1e-5, rtol=0)
    per_token, _ = advantages("outcome")
    assert per_token[2].tolist() == [0.0, 0.0, 0.5, 0.5] and per_token[3].tolist() == [0.0, 0.0, -0.5, -0.5]


def test_rows_and_sft_examples():
    groups = [
        group("failed", [completion(1, 0.0), completion(1, 0.0, finish_reason="length")], solution="ab"),
        group("solved", [completion(1, 1.0, correct=True), completion(2, 0.0)], solution="ab"),
    ]
    tensors = build_training_tensors(groups, 0)
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    signals = select_signals(LearnerConfig(overlong={"mask_truncated": True}), groups, tensors, None)
    assert signals.keep.tolist() == [True, False, True, True] and signals.sft_examples == []
    config = LearnerConfig(overlong={"mask_truncated": True}, hpt={"enabled": True, "sft_coef": 2.0})
    signals = select_signals(config, groups, tensors, encode)
    assert signals.keep.tolist() == [False, False, True, True]
    assert signals.rl_weights.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert signals.sft_examples == [([1, 2], [97, 98], 2.0)]
    with pytest.raises(ValueError, match="solution_tokens"):
        select_signals(config, groups, tensors, None)
