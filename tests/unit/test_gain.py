"""GAIN-RL against hand-computed values: angle concentration, the Gaussian over ranks, the mean's update,
selection without replacement, the selector's state, the hidden-state hook and the config's refusals."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from orchard.config import (
    ConfigError,
    CurriculumConfig,
    DataConfig,
    GainConfig,
    ModelConfig,
    ProceduralSource,
    config_from_dict,
)
from orchard.records import Completion, Group, Prompt
from orchard.rollout.hidden_states import UP_PROJECTION_PATH, last_up_projection, up_projection_inputs
from orchard.rollout.model import build_model
from orchard.rollout.prompts import PromptFormat
from orchard.rollout.tokenizer import load_tokenizer
from orchard.services.curriculum.gain import (
    GainSelector,
    angle_concentration,
    draw_without_replacement,
    gain_candidates,
    gaussian_rank_probabilities,
    shift_mean,
)
from orchard.services.curriculum.gain_ranking import measure_concentrations, segments
from orchard.services.curriculum.sampler import PromptSampler
from orchard.verifiers.sources import PromptPool

ROOT_HALF = 1 / math.sqrt(2)
#: Two context tokens, then a question of three: directions e1, e2 and their diagonal (lengths vary: the
#: cosine ignores them).
HIDDEN = torch.tensor(
    [
        [2.0, 0.0, 0.0],  # context: e1
        [1.0, 1.0, 0.0],  # context: diagonal
        [3.0, 0.0, 0.0],  # question: e1
        [0.0, 0.5, 0.0],  # question: e2
        [4.0, 4.0, 0.0],  # question: diagonal
    ]
)


def brute_force(hidden: torch.Tensor, start: int, end: int, context_start: int, weight: float) -> float:
    units = torch.nn.functional.normalize(hidden.double(), dim=1)
    question = range(start, end)
    pairs = [float(units[i] @ units[j]) for i in question for j in question if i < j]
    intra = sum(pairs) / len(pairs) if pairs else 1.0
    cross = [float(units[i] @ units[j]) for i in question for j in range(context_start, start)]
    return intra + (weight * sum(cross) / len(cross) if cross else 0.0)


# ---------------------------------------------------------------------------------- angle concentration
def test_angle_concentration_by_hand():
    # intra: cos(e1, e2) = 0, cos(e1, d) = cos(e2, d) = 1/√2 over 3 pairs -> √2/3 = 0.471405
    intra = 2 * ROOT_HALF / 3
    assert angle_concentration(HIDDEN[2:], 0) == pytest.approx(intra)
    # inter: e1·e1 = 1, e1·d = 1/√2, e2·e1 = 0, e2·d = 1/√2, d·e1 = 1/√2, d·d = 1 over 6 pairs -> 0.686887
    inter = (2 + 3 * ROOT_HALF) / 6
    assert angle_concentration(HIDDEN, 2) == pytest.approx(intra + inter)
    assert angle_concentration(HIDDEN, 2, inter_weight=8.0) == pytest.approx(intra + 8 * inter)
    assert angle_concentration(HIDDEN, 2, inter_weight=0.0) == pytest.approx(intra)
    # context from token 1 only (the diagonal): 1/√2, 1/√2, 1 over 3 pairs
    assert angle_concentration(HIDDEN, 2, context_start=1) == pytest.approx(intra + (1 + 2 * ROOT_HALF) / 3)
    # the question ends before the last token: e1, e2 alone, against both context tokens
    assert angle_concentration(HIDDEN, 2, 4) == pytest.approx(0.0 + (1 + ROOT_HALF + 0 + ROOT_HALF) / 4)
    # one question token: its only pair is itself
    assert angle_concentration(HIDDEN[2:3], 0) == 1.0
    # the diagonal against e1, d, e1, e2: (1 + 3/√2) / 4 = 0.780330
    assert angle_concentration(HIDDEN, 4) == pytest.approx(1.0 + (1 + 3 * ROOT_HALF) / 4)


def test_angle_concentration_matches_the_pairwise_definition():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = int(torch.randint(2, 12, (1,), generator=generator))
        hidden = torch.randn(tokens, 5, generator=generator)
        hidden[0] = 0.0  # a zero vector has cosine 0 with everything
        start = int(torch.randint(0, tokens - 1, (1,), generator=generator))
        end = int(torch.randint(start + 1, tokens + 1, (1,), generator=generator))
        context_start = int(torch.randint(0, start + 1, (1,), generator=generator))
        expected = brute_force(hidden, start, end, context_start, 1.5)
        got = angle_concentration(hidden, start, end, context_start=context_start, inter_weight=1.5)
        assert got == pytest.approx(expected, abs=1e-12)


def test_angle_concentration_refuses_an_empty_question_or_a_wrong_shape():
    with pytest.raises(ValueError, match="at least one token"):
        angle_concentration(HIDDEN, 5)
    with pytest.raises(ValueError, match="at least one token"):
        angle_concentration(HIDDEN, 3, 3)
    with pytest.raises(ValueError, match="context_start"):
        angle_concentration(HIDDEN, 1, context_start=2)
    with pytest.raises(ValueError, match=r"\[tokens, hidden\]"):
        angle_concentration(HIDDEN[0], 0)


def test_segments_leave_out_a_leading_bos_token():
    assert segments(6, (1, 6), starts_with_bos=True) == (1, 1, 6)  # no context: C = C_intra
    assert segments(9, (4, 7), starts_with_bos=True) == (1, 4, 7)  # context 1..4
    assert segments(9, (4, 7), starts_with_bos=False) == (0, 4, 7)
    assert segments(5, None, starts_with_bos=True) == (1, 1, 5)  # question not found: the whole prompt
    assert segments(1, None, starts_with_bos=True) == (0, 0, 1)  # a lone BOS is the question


# ---------------------------------------------------------------------------------- Gaussian, update, draws
def test_gaussian_rank_probabilities_by_hand():
    total = 1 + math.exp(-0.5) + math.exp(-2)  # 1.741865
    assert gaussian_rank_probabilities(3, 0.0, 1.0).tolist() == pytest.approx(
        [1 / total, math.exp(-0.5) / total, math.exp(-2) / total]  # 0.574095, 0.348208, 0.077697
    )
    symmetric = gaussian_rank_probabilities(5, 2.0, 1.0)
    assert symmetric[1] == pytest.approx(symmetric[3]) and symmetric.argmax() == 2
    far = gaussian_rank_probabilities(4, 1e6, 1.0)  # every exponent underflows: still a distribution
    assert far.sum() == pytest.approx(1.0) and far[3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_rank_probabilities(3, 0.0, 0.0)
    with pytest.raises(ValueError, match="size"):
        gaussian_rank_probabilities(0, 0.0, 1.0)


def test_shift_mean_by_hand_with_clamping():
    # 500·tanh(2·0.25) + 500·tanh(2·0.2) = 500·0.462117 + 500·0.379949 = 421.033
    moved = shift_mean(100.0, 0.75, 0.2, step=500.0, alpha=2.0, beta=0.5, adj_min=0.0, adj_max=1000.0)
    assert moved == pytest.approx(100.0 + 500 * math.tanh(0.5) + 500 * math.tanh(0.4))
    assert moved == pytest.approx(521.033, abs=1e-3)
    assert shift_mean(100.0, 0.75, 0.2, step=500.0, alpha=2.0, beta=0.5, adj_min=0.0, adj_max=300.0) == 400.0
    # all wrong, no concentration: 500·tanh(−1) = −380.797, clamped to adj_min
    assert shift_mean(100.0, 0.0, 0.0, step=500.0, alpha=2.0, beta=0.5, adj_min=0.0, adj_max=1000.0) == 100.0
    assert shift_mean(
        100.0, 0.0, 0.0, step=500.0, alpha=2.0, beta=0.5, adj_min=-1000.0, adj_max=1000.0
    ) == pytest.approx(100.0 - 500 * math.tanh(1.0))


def test_draws_are_without_replacement_and_follow_successive_sampling():
    generator = np.random.default_rng(0)
    assert sorted(draw_without_replacement(np.array([0.1, 0.2, 0.3, 0.4]), 4, generator)) == [0, 1, 2, 3]
    for _ in range(20):  # probability 0 is drawn only once nothing else is left
        first, second = draw_without_replacement(np.array([1.0, 0.0, 0.0, 0.0]), 2, generator)
        assert first == 0 and second in (1, 2, 3)
    with pytest.raises(ValueError, match="cannot draw 5"):
        draw_without_replacement(np.array([0.25] * 4), 5, generator)
    probabilities = np.array([0.5, 0.3, 0.2])
    draws = [draw_without_replacement(probabilities, 2, generator) for _ in range(20_000)]
    first = Counter(draw[0] for draw in draws)
    assert [first[index] / len(draws) for index in range(3)] == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    # P(1 second) = 0.5·0.3/0.5 + 0.2·0.3/0.8 = 0.375
    assert sum(draw[1] == 1 for draw in draws) / len(draws) == pytest.approx(0.375, abs=0.015)


# ---------------------------------------------------------------------------------- the selector
def prompts(count: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", text=f"{i}+{i}=", answer=str(2 * i), distribution=f"d{i % 2}") for i in range(count)]


def group(prompt: Prompt, correct: list[bool]) -> Group:
    completions = [
        Completion(text="x", token_ids=[1], logprobs=[-0.1], policy_version=0, reward=float(c), correct=c)
        for c in correct
    ]
    return Group(prompt=prompt, prompt_token_ids=[0], completions=completions, worker="w", created_at=0.0)


#: 10 prompts: σ 1 rank, n 5 ranks, adjustment within [0, 10] ranks.
SMALL = GainConfig(std=0.1, step=0.5, alpha=2.0, beta=0.5, adj_min=0.0, adj_max=1.0)
CONCENTRATIONS = [0.1 * i for i in range(10)]  # p9 highest


def ranked_selector() -> GainSelector:
    selector = GainSelector(prompts(10), SMALL)
    selector.rank(CONCENTRATIONS)
    return selector


def test_the_ranking_is_by_concentration_highest_first():
    selector = ranked_selector()
    assert [p.id for p in selector.ranked] == [f"p{i}" for i in range(9, -1, -1)]
    assert selector.concentrations == pytest.approx(sorted(CONCENTRATIONS, reverse=True))
    with pytest.raises(ValueError, match="3 concentrations for 10"):
        GainSelector(prompts(10), SMALL).rank([0.1, 0.2, 0.3])
    with pytest.raises(RuntimeError, match="not been ranked"):
        GainSelector(prompts(10), SMALL).next_prompts(1, random.Random(0))


def test_selection_draws_distinct_prompts_near_the_mean():
    selector = ranked_selector()
    rng = random.Random(0)
    chosen = selector.next_prompts(4, rng)
    assert len({p.id for p in chosen}) == 4
    counts = Counter(p.id for _ in range(300) for p in selector.next_prompts(1, rng))
    assert counts.most_common(1)[0][0] == "p9"  # μ = 0: the most concentrated prompt
    assert counts["p0"] == 0
    assert len(selector.next_prompts(25, rng)) == 25  # more than the ranking: every prompt, then again
    assert sum(selector.distribution_probabilities().values()) == pytest.approx(1.0)


def test_the_mean_moves_by_the_batch_observed_since_the_last_step():
    selector = ranked_selector()
    ranked = selector.ranked
    # pass rates 1 and 0.5 (acc 0.75) of prompts with C 0.9 and 0.8 (ang 0.85), and an unranked prompt
    outsider = Prompt(id="elsewhere", text="?", answer="", distribution="d0")
    selector.observe([group(ranked[0], [True, True]), group(ranked[1], [True, False])])
    selector.observe([group(outsider, [True, False, True, False])])  # its pass rate counts, it has no C
    mean = selector.on_learner_step()
    accuracy = (1.0 + 0.5 + 0.5) / 3
    assert mean == pytest.approx(5 * math.tanh(2 * (accuracy - 0.5)) + 5 * math.tanh(2 * 0.85))
    assert selector.on_learner_step() == mean  # nothing observed: unchanged
    for _ in range(5):
        selector.observe([group(ranked[0], [True, True])])
        selector.on_learner_step()
    assert selector.mean == 9.0  # kept inside the ranking
    selector.observe([group(ranked[0], [False, False])])
    assert selector.on_learner_step() == 9.0  # adj_min 0: never back


def test_selector_state_round_trips_through_json():
    selector = ranked_selector()
    selector.observe([group(selector.ranked[0], [True, True])])
    selector.on_learner_step()
    selector.observe([group(selector.ranked[2], [True, False])])  # pending at the save
    restored = GainSelector(prompts(10), SMALL)
    restored.load_state_dict(json.loads(json.dumps(selector.state_dict())))
    assert restored.ranked == selector.ranked and restored.mean == selector.mean
    assert restored.on_learner_step() == selector.on_learner_step()
    assert restored.next_prompts(3, random.Random(7)) == selector.next_prompts(3, random.Random(7))
    with pytest.raises(ValueError, match="other prompts"):
        GainSelector(prompts(11), SMALL).load_state_dict(selector.state_dict())


def test_candidates_are_the_finite_pool_or_draws_by_the_seed():
    listed = PromptPool.from_prompts(prompts(10))
    assert [p.id for p in gain_candidates(listed, 100, seed=0)] == [f"p{i}" for i in range(10)]
    subset = gain_candidates(listed, 4, seed=0)
    assert len(subset) == 4 and subset == gain_candidates(listed, 4, seed=0)
    procedural = PromptPool.from_config(
        DataConfig(sources=[ProceduralSource(families=["addition"], difficulties=[2])], held_out_size=4)
    )
    drawn = gain_candidates(procedural, 50, seed=3)
    assert 40 <= len(drawn) <= 50 and len({p.id for p in drawn}) == len(drawn)
    assert drawn == gain_candidates(procedural, 50, seed=3) != gain_candidates(procedural, 50, seed=4)


def test_sampler_with_gain_selection_chooses_learns_and_keeps_its_state():
    config = CurriculumConfig(selection="gain", gain=SMALL.model_dump())
    pool = PromptPool.from_prompts(prompts(10))
    sampler = PromptSampler(pool, config)
    assert sampler.probabilities() == {"d0": 0.5, "d1": 0.5}  # the pool's until ranked
    sampler.gain.rank(CONCENTRATIONS)
    assert sampler.probabilities()["d1"] > 0.6  # μ = 0 sits on p9, p7, p5 (d1)
    chosen = sampler.next_prompts(3, random.Random(0))
    sampler.observe([group(prompt, [True, True]) for prompt in chosen])
    sampler.on_learner_step()
    assert sampler.gain.mean > 0 and sampler.selection_seconds > 0
    restored = PromptSampler(pool, config)
    restored.load_bytes(sampler.to_bytes())
    assert restored.gain.mean == sampler.gain.mean and restored.gain.ranked == sampler.gain.ranked
    with pytest.raises(ValueError, match="another curriculum config"):
        PromptSampler(pool, CurriculumConfig()).load_bytes(sampler.to_bytes())
    # a state written before GAIN-RL existed (version 1) still loads into a sampler without it
    old = {"version": 1, "scheduler": None, "value_model": None, "value_errors": [0.25]}
    plain = PromptSampler(pool, CurriculumConfig())
    plain.load_state_dict(old)
    assert plain.value_errors == [0.25]


# ---------------------------------------------------------------------------------- config
def problems_of(data):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return dict(caught.value.problems)


def test_gain_config_defaults_are_the_references_gsm8k_figures_as_fractions():
    gain = config_from_dict({"curriculum": {"selection": "gain"}}).curriculum.gain
    assert gain.std * 7473 == pytest.approx(1000, abs=0.5) and gain.adj_max * 7473 == pytest.approx(1000, abs=0.5)
    assert gain.step * 7473 == pytest.approx(500, abs=0.5) and gain.adj_min == 0.0
    assert (gain.alpha, gain.beta, gain.inter_weight, gain.pool_size) == (2.0, 0.5, 1.0, 8192)
    # vLLM runs rank with a Hugging Face model of their own: accepted
    assert config_from_dict({"rollout": {"engine": "vllm"}, "curriculum": {"selection": "gain"}})


@pytest.mark.parametrize(
    ("gain", "path", "words"),
    [
        ({"std": 0.0}, "curriculum.gain.std", "greater than 0"),
        ({"pool_size": 0}, "curriculum.gain.pool_size", "greater than or equal to 1"),
        ({"beta": 1.5}, "curriculum.gain.beta", "less than or equal to 1"),
        ({"inter_weight": -1.0}, "curriculum.gain.inter_weight", "greater than or equal to 0"),
        ({"adj_min": 0.2, "adj_max": 0.1}, "curriculum.gain", "must not exceed adj_max"),
        ({"sigma": 0.1}, "curriculum.gain.sigma", "Extra inputs"),
    ],
)
def test_wrong_gain_values_are_refused_by_dotted_path(gain, path, words):
    problems = problems_of({"curriculum": {"selection": "gain", "gain": gain}})
    assert list(problems) == [path]
    assert words in problems[path]


def test_gain_with_the_ucb_scheduler_is_refused():
    problems = problems_of({"curriculum": {"selection": "gain", "scheduler": "ucb"}})
    assert list(problems) == ["curriculum"]
    assert "curriculum.scheduler: uniform" in problems["curriculum"]


# ---------------------------------------------------------------------------------- hidden states
TINY = ModelConfig(
    tiny={"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer(TINY)
    return build_model(TINY, tokenizer, seed=1), tokenizer


def manual_up_projection_input(model, ids: list[int]) -> torch.Tensor:
    """The last layer's post-attention RMSNorm of one unpadded prompt, through the Hugging Face modules."""
    with torch.no_grad():
        entering = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]  # into the last layer
        layer = model.model.layers[-1]
        positions = model.model.rotary_emb(entering, torch.arange(len(ids))[None])
        attended, _ = layer.self_attn(
            layer.input_layernorm(entering), attention_mask=None, position_embeddings=positions
        )
        return layer.post_attention_layernorm(entering + attended)[0]


def test_the_hook_returns_the_up_projection_input_of_each_prompt_in_a_padded_batch(tiny):
    model, tokenizer = tiny
    ids = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in ("12+34=", "7+1=", "reverse: abcdef")]
    states = up_projection_inputs(model, ids, pad_id=tokenizer.pad_id, batch_size=2)
    assert [tuple(state.shape) for state in states] == [(len(prompt), 32) for prompt in ids]
    for prompt, state in zip(ids, states, strict=True):
        assert state.dtype == torch.float32
        torch.testing.assert_close(state, manual_up_projection_input(model, prompt), atol=1e-5, rtol=1e-5)
    alone = up_projection_inputs(model, [ids[1]], pad_id=tokenizer.pad_id)
    torch.testing.assert_close(alone[0], states[1], atol=1e-5, rtol=1e-5)
    assert up_projection_inputs(model, [], pad_id=tokenizer.pad_id) == []
    assert not model.model.layers[-1].mlp.up_proj._forward_pre_hooks  # the hook is removed


def test_a_model_without_the_up_projection_is_refused():
    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=UP_PROJECTION_PATH.replace("[", r"\[").replace("]", r"\]")):
        last_up_projection(Decoder())
    with pytest.raises(ValueError, match="Linear has no model.layers"):
        up_projection_inputs(nn.Linear(2, 2), [[1]], pad_id=0)


def test_the_ranking_pass_measures_each_prompt_with_the_given_weights(tiny):
    model, tokenizer = tiny
    pool = prompts(3)
    ranking = measure_concentrations(TINY, model.state_dict(), PromptFormat(), pool, batch_size=2, device="cpu")
    for prompt, value in zip(pool, ranking.concentrations, strict=True):
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt.text)]
        # the question from token 1 on; the BOS token before it is left out, so there is no context
        expected = angle_concentration(manual_up_projection_input(model, ids), 1, context_start=1)
        assert value == pytest.approx(expected, abs=1e-5)
    assert ranking.with_context == 0 and ranking.question_not_found == 0 and ranking.device == "cpu"
    assert "GAIN-RL ranking: 3 prompts" in ranking.describe()
    # with a system prompt the question has context before it, and C_inter counts
    with_system = measure_concentrations(
        TINY, model.state_dict(), PromptFormat(system_prompt="Answer."), pool, device="cpu"
    )
    assert with_system.with_context == 3 and with_system.concentrations != ranking.concentrations
