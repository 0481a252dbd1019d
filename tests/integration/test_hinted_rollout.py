"""Hinted rollouts through a real `TorchEngine` on a tiny model: tiers, the bare prompt's tokens and the
hinted context's behaviour logprobs."""

from __future__ import annotations

import pytest
import torch

from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
from orchard.protocols import GenerationOutput
from orchard.records import Prompt
from orchard.rollout.prompts import encode_prompt, hinted_prompt_text
from orchard.rollout.worker import RolloutWorkerCore
from orchard.verifiers.procedural import make_prompt

TINY = TinyModelConfig(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def worker() -> RolloutWorkerCore:
    return RolloutWorkerCore(
        "worker-0", ModelConfig(tiny=TINY), RolloutConfig(group_size=3, max_new_tokens=6, temperature=0.8), seed=3
    )


def logprobs_under(worker: RolloutWorkerCore, context: list[int], completion: list[int]) -> list[float]:
    logits = worker.engine.logits(torch.tensor([context + completion]))[0, len(context) - 1 : -1]
    logprobs = torch.log_softmax(logits / worker.config.temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def test_hinted_completions_are_recorded_against_the_bare_prompt(worker):
    prompt = make_prompt("addition", 2, "123+456=", "579")
    result = worker.rollout_with_hints([prompt])
    assert result.strategy == "hint" and len(result.groups) == 1
    group = result.groups[0]
    assert group.prompt_token_ids == encode_prompt(worker.tokenizer, "123+456=")
    tier = result.hint_tiers[group.id]
    hinted_context = encode_prompt(worker.tokenizer, hinted_prompt_text(prompt.text, prompt.hints[tier]))
    assert len(group.completions) == 3
    for completion in group.completions:
        assert completion.source == "hint" and completion.token_ids
        behaviour = logprobs_under(worker, hinted_context, completion.token_ids)
        # the stored logprobs are the hinted context's, not the bare prompt's
        assert completion.logprobs == pytest.approx(behaviour, abs=1e-4)
        bare = logprobs_under(worker, group.prompt_token_ids, completion.token_ids)
        assert completion.logprobs != pytest.approx(bare, abs=1e-4)
    # an untrained model fails every tier: the group is the last tier's
    if not any(c.correct for c in group.completions):
        assert tier == len(prompt.hints) - 1


def test_the_lowest_tier_with_a_success_is_kept(worker, monkeypatch):
    solved_at_tier_1 = make_prompt("sorting", 1, "sort:3142=", "1234")
    never_solved = make_prompt("reversal", 1, "rev:abcd=", "dcba")
    no_hints = Prompt(id="bare", text="1+1=", answer="2", distribution="test")
    contexts_seen: list[str] = []

    def generate(prompts, params):
        outputs = []
        for ids in prompts:
            context = worker.tokenizer.decode(ids)
            contexts_seen.append(context)
            text = "1234" if context.startswith(solved_at_tier_1.hints[1]) else "0"
            tokens = worker.tokenizer.encode(text)
            outputs.append(
                GenerationOutput(token_ids=tokens, logprobs=[-1.0] * len(tokens), finish_reason="stop", text=text)
            )
        return outputs

    monkeypatch.setattr(worker.engine, "generate", generate)
    result = worker.rollout_with_hints([solved_at_tier_1, never_solved, no_hints], group_size=2)
    tiers = {group.prompt.id: result.hint_tiers[group.id] for group in result.groups}
    assert tiers == {solved_at_tier_1.id: 1, never_solved.id: 2}
    solved = next(g for g in result.groups if g.prompt.id == solved_at_tier_1.id)
    assert all(c.correct for c in solved.completions)
    # the solved prompt is not sampled at tier 2; the bare prompt never
    assert not any(c.startswith(solved_at_tier_1.hints[2]) for c in contexts_seen)
    assert not any(c.endswith("1+1=") for c in contexts_seen)
    # tier 0: 4 samples of "0"; tier 1: 2 × "1234" and 2 × "0"; tier 2: 2 × "0"
    assert result.generated_tokens == 4 + 8 + 2 + 2
