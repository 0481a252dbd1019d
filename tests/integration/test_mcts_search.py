"""Tree search through a real `TorchEngine` on a tiny model, with both expansions: behaviour logprobs and
the token budget."""

from __future__ import annotations

import pytest
import torch

from orchard.config import MCTSConfig, ModelConfig, RolloutConfig, TinyModelConfig
from orchard.protocols import SamplingParams, VerifierResult
from orchard.rollout.prompts import encode_prompt
from orchard.rollout.strategies.tree_search import SearchSettings, search
from orchard.rollout.worker import RolloutWorkerCore
from orchard.verifiers.procedural import make_prompt

TINY = TinyModelConfig(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_position_embeddings=64
)


EXPANSIONS = {
    "prior": MCTSConfig(expansion="prior", chunk_tokens=1, expansion_width=3),
    "sample": MCTSConfig(expansion="sample", chunk_tokens=2, expansion_width=3),
}


@pytest.fixture(scope="module", params=list(EXPANSIONS))
def worker(request) -> RolloutWorkerCore:
    rollout = RolloutConfig(group_size=4, max_new_tokens=8, temperature=0.8, mcts=EXPANSIONS[request.param])
    return RolloutWorkerCore("worker-0", ModelConfig(tiny=TINY), rollout, seed=5)


def engine_logprobs(worker: RolloutWorkerCore, prompt_ids: list[int], completion: list[int]) -> list[float]:
    """log_softmax(logits / T) of each completion token, from one forward over the whole sequence."""
    logits = worker.engine.logits(torch.tensor([prompt_ids + completion]))[0, len(prompt_ids) - 1 : -1]
    logprobs = torch.log_softmax(logits / worker.config.temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def test_trajectory_logprobs_are_the_engines_for_those_tokens(worker):
    prompt_ids = encode_prompt(worker.tokenizer, "12+34=")
    settings = SearchSettings.from_config(worker.config.mcts, max_new_tokens=8, group_size=6, budget_tokens=400)
    result = search(
        prompt_ids,
        worker.engine.generate,
        lambda text: VerifierResult(reward=0.0, correct=False),
        settings,
        SamplingParams(temperature=0.8, max_new_tokens=8, stop=("\n",), seed=11),
        next_tokens=worker.engine.next_token_logprobs,
        decode=worker.tokenizer.decode,
        eos_token_ids=worker.engine.eos_token_ids,
    )
    assert result.trajectories
    for trajectory in result.trajectories:
        assert len(trajectory.token_ids) <= 8
        assert trajectory.logprobs == pytest.approx(engine_logprobs(worker, prompt_ids, trajectory.token_ids), abs=1e-4)
        assert worker.token_logprobs(prompt_ids, trajectory.token_ids) == pytest.approx(trajectory.logprobs, abs=1e-4)
    assert result.tokens_generated <= 400
    if worker.config.mcts.expansion == "prior":
        assert all(set(trajectory.step_lengths) == {1} for trajectory in result.trajectories)


@pytest.mark.parametrize("budget", [7, 30, 90])
def test_worker_search_respects_the_token_budget(worker, budget):
    prompts = [make_prompt("addition", 1, text, answer) for text, answer in [("12+34=", "46"), ("50+7=", "57")]]
    result = worker.search(prompts, budget_tokens=budget, terminate_num=50)
    assert result.strategy == "mcts"
    assert result.generated_tokens <= budget * len(prompts)
    assert result.nodes_expanded > 0
    for group in result.groups:
        assert group.policy_version == worker.policy_version
        prompt_ids = group.prompt_token_ids
        for completion in group.completions:
            assert len(completion.token_ids) == len(completion.logprobs) <= worker.config.max_new_tokens
            assert completion.source == "tree" and len(completion.token_values) == len(completion.token_ids)
            assert completion.token_values[-1] in (1.0, -1.0)  # the terminal's value after its one backup
            assert completion.logprobs == pytest.approx(
                engine_logprobs(worker, prompt_ids, completion.token_ids), abs=1e-4
            )
    assert len(result.groups) + len(result.unsearched_prompts) == len(prompts)
