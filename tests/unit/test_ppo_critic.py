"""PPO with a learned critic: GAE, the clipped value loss, whitening and the critic's alignment,
against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest
import torch

from orchard.config import ConfigError, LearnerConfig, load_config
from orchard.learner.algorithms import (
    explained_variance,
    gae_advantages,
    outcome_token_rewards,
    value_loss_terms,
    whiten,
)
from orchard.learner.batching import TrainingTensors
from orchard.learner.critic import ValueModel
from orchard.learner.signals import gae_signals


def close(actual: torch.Tensor, expected: list | float, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def test_the_outcome_reward_sits_on_the_last_completion_token():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    rewards = torch.tensor([2.0, 3.0, -1.0])
    # row 1 has no completion token: no reward anywhere
    close(outcome_token_rewards(rewards, mask), [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, -1]])


def test_gae_by_hand():
    # values V(1..3) = 0.5, 0.2, 0.8; reward 1 on token 3; γ = 1, λ = 0.5
    # t=3: δ = 1 + 0 − 0.8 = 0.2, Â = 0.2;          R = 0.2 + 0.8 = 1.0
    # t=2: δ = 0 + 0.8 − 0.2 = 0.6, Â = 0.6 + 0.5·0.2 = 0.7;  R = 0.9
    # t=1: δ = 0 + 0.2 − 0.5 = −0.3, Â = −0.3 + 0.5·0.7 = 0.05;  R = 0.55
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.0, 0.5, 0.2, 0.8]])
    rewards = outcome_token_rewards(torch.tensor([1.0]), mask)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[0.0, 0.05, 0.7, 0.2]])
    close(returns, [[0.0, 0.55, 0.9, 1.0]])


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    # γ = 0.9, λ = 1: Â_t = γ^(T−t)·r − V(t): t=3 1 − 0.8 = 0.2, t=2 0.9 − 0.2 = 0.7, t=1 0.81 − 0.5 = 0.31
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.0, 0.5, 0.2, 0.8]])
    rewards = outcome_token_rewards(torch.tensor([1.0]), mask)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=1.0)
    close(advantages, [[0.0, 0.31, 0.7, 0.2]])
    close(returns, [[0.0, 0.81, 0.9, 1.0]])


def test_gae_skips_tokens_off_the_mask_such_as_a_tools_observation():
    # token 2 is the environment's: t=3 Â = 0.2; t=1: δ = 0 + V(3) − V(1) = 0.8 − 0.5 = 0.3, Â = 0.3 + 0.5·0.2 = 0.4
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    values = torch.tensor([[0.0, 0.5, 9.0, 0.8]])
    rewards = outcome_token_rewards(torch.tensor([1.0]), mask)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[0.0, 0.4, 0.0, 0.2]])
    close(returns, [[0.0, 0.9, 0.0, 1.0]])


def test_gae_rows_are_independent_and_refuse_bad_arguments():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.2, 0.8], [0.3, 0.1, 7.0, 7.0]])
    rewards = outcome_token_rewards(torch.tensor([1.0, 0.0]), mask)
    advantages, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: t=1 δ = 0 − 0.1 = −0.1; t=0 δ = 0 + 0.1 − 0.3 = −0.2, Â = −0.2 + 0.5·(−0.1) = −0.25
    close(advantages[1], [-0.25, -0.1, 0.0, 0.0])
    close(advantages[0], [0.0, 0.05, 0.7, 0.2])
    with pytest.raises(ValueError, match="gamma and lam must lie in"):
        gae_advantages(rewards, values, mask, gamma=1.5)
    with pytest.raises(ValueError, match="must have one shape"):
        gae_advantages(rewards, values[:, :3], mask)


def test_the_clipped_value_loss_by_hand():
    # ε_v = 0.2, one token each:
    # V=1.0, V_old=0.5, R=0: (1−0)² = 1; V_clip = 0.7, 0.49; ½·max = 0.5, unclipped term larger
    # V=0.6, V_old=0.5, R=1: 0.16 both (inside the range): 0.08
    # V=1.0, V_old=0.5, R=1: 0; V_clip = 0.7, (0.7−1)² = 0.09: ½·0.09 = 0.045, the clipped term larger
    values = torch.tensor([[1.0, 0.6, 1.0]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, clipped = value_loss_terms(values, old, returns, mask, clip=0.2)
    close(loss, [[0.5, 0.08, 0.045]])
    assert clipped.tolist() == [[False, False, True]]
    unclipped, none = value_loss_terms(values, old, returns, mask, clip=None)
    close(unclipped, [[0.5, 0.08, 0.0]])
    assert not none.any()
    masked, _ = value_loss_terms(values, old, returns, torch.tensor([[1.0, 0.0, 1.0]]), clip=0.2)
    close(masked, [[0.5, 0.0, 0.045]])


def test_the_clipped_value_loss_passes_no_gradient_through_the_clipped_term():
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, _ = value_loss_terms(values, torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.ones(1, 1), clip=0.2)
    loss.sum().backward()
    assert values.grad is not None and float(values.grad) == 0.0  # V_clip is at its bound: constant in V


def test_whitening_is_over_the_masked_tokens_of_the_whole_batch():
    values = torch.tensor([[1.0, 100.0], [2.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    close(whiten(values, mask), [[-1.0, 0.0], [0.0, 1.0]], tol=1e-6)  # mean 2, unbiased std 1
    close(whiten(values, torch.zeros(2, 2)), [[0.0, 0.0], [0.0, 0.0]])


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask) == pytest.approx(0.0)
    assert explained_variance(torch.tensor([[3.0, 2.0, 1.0]]), returns, mask) == pytest.approx(-3.0)
    assert explained_variance(returns, torch.ones(1, 3), mask) == 0.0  # returns do not vary


def test_gae_signals_put_the_shaped_reward_through_gae_and_whiten():
    tensors = TrainingTensors(
        input_ids=torch.zeros(2, 4, dtype=torch.long),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        completion_mask=torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]),
        old_logprobs=torch.zeros(2, 4),
        rewards=torch.tensor([1.0, 0.0]),
        group_index=torch.tensor([0, 0]),
    )
    values = torch.tensor([[0.0, 0.5, 0.2, 0.8], [0.0, 0.0, 0.4, 0.1]])
    config = LearnerConfig(advantage="gae", critic={"lam": 0.5, "normalize_advantages": False})
    advantages, returns, per_sequence = gae_signals(config, tensors, tensors.rewards, values)
    # row 1: t=3 δ = 0 − 0.1 = −0.1; t=2 δ = 0.1 − 0.4 = −0.3, Â = −0.3 + 0.5·(−0.1) = −0.35
    close(advantages, [[0.0, 0.05, 0.7, 0.2], [0.0, 0.0, -0.35, -0.1]])
    close(returns, [[0.0, 0.55, 0.9, 1.0], [0.0, 0.0, 0.05, 0.0]])
    close(per_sequence, [(0.05 + 0.7 + 0.2) / 3, -0.225])
    whitened, _, _ = gae_signals(LearnerConfig(advantage="gae"), tensors, tensors.rewards, values)
    on = tensors.completion_mask > 0
    assert float(whitened[on].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(whitened[on].std()) == pytest.approx(1.0, abs=1e-5)
    assert float(whitened[~on].abs().sum()) == 0.0


# ------------------------------------------------------------------------------------ the critic


def tiny_causal_lm() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def test_the_critics_value_at_t_reads_only_the_tokens_before_t():
    critic = ValueModel.from_policy(tiny_causal_lm()).eval()
    torch.nn.init.normal_(critic.value_head.weight)  # a zero head (the start) would say nothing
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    changed = ids.clone()
    changed[0, 3] = 20
    mask = torch.ones_like(ids)
    with torch.no_grad():
        values, other = critic(ids, mask), critic(changed, mask)
    assert values.shape == (1, 5) and float(values[0, 0]) == 0.0
    torch.testing.assert_close(values[0, :4], other[0, :4])  # up to token 3: the state before it
    assert float((values[0, 4] - other[0, 4]).abs()) > 1e-6  # the state before token 4 includes token 3


def test_the_critic_starts_at_zero_with_its_own_copy_of_the_decoder():
    policy = tiny_causal_lm()
    critic = ValueModel.from_policy(policy)
    with torch.no_grad():
        assert float(critic(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)).abs().sum()) == 0.0
    decoder_weight = next(critic.decoder.parameters())
    assert decoder_weight.data_ptr() != next(policy.parameters()).data_ptr()
    assert set(policy.state_dict()).isdisjoint(k for k in critic.state_dict() if k.startswith("value_head"))


def test_a_policy_without_a_decoder_is_refused_by_name():
    with pytest.raises(ValueError, match="Linear has no Hugging Face `base_model`"):
        ValueModel.from_policy(torch.nn.Linear(4, 4))


# ------------------------------------------------------------------------------------ config


def test_gae_is_refused_with_objectives_of_one_score_per_sequence_and_with_tree_search():
    for objective in ("disco", "gspo"):
        problems = dict(
            LearnerConfig(advantage="gae", objective=objective, aggregation="seq-mean-token-mean").problems(12)
        )
        assert "takes one per sequence" in problems["objective"]
    assert LearnerConfig(advantage="gae", objective="gspo_token", aggregation="seq-mean-token-mean").problems(12) == []
    with pytest.raises(ConfigError, match="use rollout.strategy 'sample' with 'gae'"):
        load_config(None, ["learner.advantage=gae", "rollout.strategy=mcts"])
    loaded = load_config(None, ["learner.advantage=gae", "rollout.strategy=sample"])
    assert loaded.learner.advantage_std == "batch" and loaded.learner.critic.lam == 0.95
    with pytest.raises(ConfigError, match="critic.value_clip"):
        load_config(None, ["learner.advantage=gae", "rollout.strategy=sample", "learner.critic.value_clip=0"])
