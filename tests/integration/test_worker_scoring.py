"""A plain rollout that also scores given completions (cached solutions) with the policy that sampled
its groups: what `RolloutResult.solution_logprobs` holds, on a real `TorchEngine`."""

from __future__ import annotations

import pytest

from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
from orchard.rollout.worker import RolloutWorkerCore
from orchard.verifiers.procedural import make_prompt

TINY = TinyModelConfig(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_position_embeddings=64
)


def test_a_rollout_scores_the_completions_it_is_given():
    worker = RolloutWorkerCore(
        "worker-0", ModelConfig(tiny=TINY), RolloutConfig(group_size=2, max_new_tokens=4, temperature=0.8), seed=3
    )
    first, second = make_prompt("addition", 1, "12+34=", "46"), make_prompt("addition", 1, "5+6=", "11")
    solutions = [worker.tokenizer.encode("46"), worker.tokenizer.encode("47")]
    result = worker.rollout([first, second], score={first.id: solutions})
    first_ids, second_ids = (tuple(group.prompt_token_ids) for group in result.groups)
    assert set(result.solution_logprobs) == {(first_ids, tuple(s)) for s in solutions}
    for solution in solutions:
        expected = worker.token_logprobs(list(first_ids), solution)
        assert result.solution_logprobs[(first_ids, tuple(solution))] == pytest.approx(expected, abs=1e-6)
    assert not any(key[0] == second_ids for key in result.solution_logprobs)
    assert worker.rollout([first]).solution_logprobs == {}  # nothing asked, nothing scored
