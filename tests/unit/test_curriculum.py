"""Curricula as pure functions and small objects: UCB scores, filtering, the value model, the sampler."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest

from orchard.config import CurriculumConfig, DataConfig, ProceduralSource
from orchard.records import Completion, Group, Prompt
from orchard.services.curriculum.filtering import TOO_EASY, TOO_HARD, ZERO_ADVANTAGE, filter_reason
from orchard.services.curriculum.sampler import PromptSampler, absolute_advantages
from orchard.services.curriculum.ucb import UCBScheduler, softmax, ucb_scores, with_floor
from orchard.services.curriculum.value_model import PromptValueModel, nearest_to_target, prompt_features
from orchard.verifiers.sources import PromptPool


def make_group(distribution: str, correct: list[bool], text: str = "1+1=") -> Group:
    prompt = Prompt(id=f"{distribution}:{text}", text=text, answer="2", distribution=distribution)
    completions = [
        Completion(
            text="x", token_ids=[1], logprobs=[-0.1], policy_version=0, finish_reason="stop", reward=float(c), correct=c
        )
        for c in correct
    ]
    return Group(prompt=prompt, prompt_token_ids=[0], completions=completions, worker="w", created_at=0.0)


# ---------------------------------------------------------------------------------- UCB (DUMP)
def test_ucb_scores_by_hand():
    # N = 10: bonus_d = sqrt(2 ln 11 / (n_d + 1)); ln 11 = 2.397895
    scores = ucb_scores([0.5, 0.0], [4, 6], exploration=1.0)
    assert scores[0] == pytest.approx(0.5 + math.sqrt(2 * math.log(11) / 5))  # 1.479387
    assert scores[1] == pytest.approx(math.sqrt(2 * math.log(11) / 7))  # 0.827759
    assert ucb_scores([0.3], [0], exploration=0.0) == [0.3]


def test_softmax_with_temperature_by_hand():
    probabilities = softmax([1.0, 0.9], temperature=0.1)
    assert probabilities[0] == pytest.approx(math.e / (math.e + 1))  # exp(10)/(exp(10)+exp(9))
    assert sum(softmax([1000.0, 999.0, -5.0], temperature=0.1)) == pytest.approx(1.0)  # no overflow
    with pytest.raises(ValueError, match="temperature"):
        softmax([1.0], temperature=0.0)


def test_scheduler_moves_towards_the_learnable_distribution():
    scheduler = UCBScheduler(["hard", "learnable", "solved"], window=50, exploration=1.0, temperature=0.1)
    assert scheduler.probabilities() == pytest.approx({"hard": 1 / 3, "learnable": 1 / 3, "solved": 1 / 3})
    for _ in range(40):
        scheduler.observe("hard", [0.0] * 8)  # all fail: zero advantage
        scheduler.observe("solved", [0.0] * 8)  # all pass: zero advantage
        scheduler.observe("learnable", [0.9] * 8)
    probabilities = scheduler.update()
    assert probabilities["learnable"] > 0.99
    assert scheduler.learnability() == pytest.approx({"hard": 0.0, "learnable": 0.9, "solved": 0.0})
    assert scheduler.counts == {"hard": 320, "learnable": 320, "solved": 320}


def test_scheduler_window_forgets_old_samples():
    scheduler = UCBScheduler(["a"], window=3)
    scheduler.observe("a", [1.0, 1.0, 1.0])
    scheduler.observe("a", [0.0, 0.0])
    assert scheduler.learnability()["a"] == pytest.approx(1 / 3)
    assert scheduler.counts["a"] == 5  # counts keep everything drawn


def test_scheduler_exploration_revisits_rarely_drawn_distributions():
    scheduler = UCBScheduler(["often", "rare"], exploration=1.0, temperature=0.1)
    scheduler.observe("often", [0.2] * 1000)
    scheduler.observe("rare", [0.0] * 2)
    probabilities = scheduler.update()  # rare: bonus sqrt(2 ln 1003 / 3) = 2.15 > 0.2 + 0.166
    assert probabilities["rare"] > 0.99


def test_scheduler_state_round_trip_and_mismatch():
    scheduler = UCBScheduler(["a", "b"], window=4)
    scheduler.observe("a", [0.5, 0.25])
    scheduler.update()
    restored = UCBScheduler(["a", "b"], window=4)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.probabilities() == scheduler.probabilities()
    assert restored.learnability() == scheduler.learnability() and restored.counts == scheduler.counts
    with pytest.raises(ValueError, match="distributions"):
        UCBScheduler(["a", "c"]).load_state_dict(scheduler.state_dict())
    with pytest.raises(KeyError, match="unknown distribution 'z'"):
        scheduler.observe("z", [1.0])


def test_scheduler_samples_by_its_probabilities():
    scheduler = UCBScheduler(["a", "b"], temperature=0.1)
    scheduler.observe("a", [1.0] * 100)
    scheduler.observe("b", [0.0] * 100)
    scheduler.update()
    rng = random.Random(0)
    draws = [scheduler.sample(rng) for _ in range(2000)]
    assert draws.count("a") / len(draws) == pytest.approx(scheduler.probabilities()["a"], abs=0.03)


# ---------------------------------------------------------------------------------- filtering
@pytest.mark.parametrize(
    ("pass_rate", "has_signal", "dynamic", "band", "expected"),
    [
        (0.0, False, True, None, ZERO_ADVANTAGE),
        (1.0, False, True, None, ZERO_ADVANTAGE),
        (0.0, False, False, None, None),
        (0.5, True, True, None, None),
        (0.125, True, True, (0.2, 0.8), TOO_HARD),
        (0.875, True, True, (0.2, 0.8), TOO_EASY),
        (1.0, False, True, (0.2, 0.8), TOO_EASY),  # difficulty is judged first
        (0.0, False, False, (0.2, 0.8), TOO_HARD),
        (0.2, True, True, (0.2, 0.8), None),  # bounds are inclusive
        (0.8, True, True, (0.2, 0.8), None),
    ],
)
def test_filter_reason(pass_rate, has_signal, dynamic, band, expected):
    assert filter_reason(pass_rate, has_signal, dynamic_sampling=dynamic, band=band) == expected


def test_absolute_advantages_of_a_group_by_hand():
    # rewards 1,0,0,0: mean 0.25, unbiased std 0.5 -> |Â| = 1.5, 0.5, 0.5, 0.5
    values = absolute_advantages(make_group("d", [True, False, False, False]), "group")
    assert values == pytest.approx([1.5, 0.5, 0.5, 0.5], rel=1e-5)
    assert absolute_advantages(make_group("d", [True] * 4), "group") == [0.0] * 4
    assert absolute_advantages(make_group("d", [True, False]), "none") == pytest.approx([0.5, 0.5])


# ---------------------------------------------------------------------------------- PCL value model
def test_nearest_to_target_keeps_pool_order():
    assert nearest_to_target([0.9, 0.45, 0.1, 0.6, 0.52], 0.5, 2) == [1, 4]
    assert nearest_to_target([0.4, 0.6], 0.5, 1) == [0]  # a tie goes to the earlier candidate
    assert nearest_to_target([0.1], 0.5, 3) == [0]


def test_features_are_deterministic_and_distribution_aware():
    a = prompt_features("12+34=", "addition/d2", dimension=256)
    assert np.array_equal(a, prompt_features("12+34=", "addition/d2", dimension=256))
    assert not np.array_equal(a, prompt_features("12+34=", "sorting/d2", dimension=256))


def test_value_model_learns_pass_rates_by_distribution():
    model = PromptValueModel(dimension=512, lr=0.5, epochs=4)
    rng = random.Random(0)
    truth = {"easy": 0.9, "medium": 0.5, "hard": 0.05}

    def batch(size: int) -> tuple[list[Prompt], list[float]]:
        prompts, rates = [], []
        for _ in range(size):
            distribution = rng.choice(list(truth))
            text = "".join(rng.choices("0123456789+", k=rng.randint(4, 9)))
            prompts.append(Prompt(id=text, text=text, answer="", distribution=distribution))
            rates.append(sum(rng.random() < truth[distribution] for _ in range(8)) / 8)
        return prompts, rates

    first_error = model.update(*batch(32))
    for _ in range(150):
        model.update(*batch(32))
    prompts, rates = batch(300)
    predictions = model.predict(prompts)
    by_distribution = {
        d: np.mean([p for p, q in zip(predictions, prompts, strict=True) if q.distribution == d]) for d in truth
    }
    assert by_distribution == pytest.approx(truth, abs=0.08)
    assert model.update(prompts, rates) < first_error
    state = model.state_dict()
    restored = PromptValueModel(dimension=512)
    restored.load_state_dict(state)
    assert np.allclose(restored.predict(prompts), model.predict(prompts))


def test_value_model_refuses_bad_input():
    model = PromptValueModel(dimension=64)
    prompt = Prompt(id="p", text="x", answer="", distribution="d")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.update([prompt], [1.5])
    with pytest.raises(ValueError, match="1 prompts for 2"):
        model.update([prompt], [0.5, 0.5])
    with pytest.raises(ValueError, match="dimension"):
        PromptValueModel(dimension=128).load_state_dict(model.state_dict())


# ---------------------------------------------------------------------------------- the sampler
def pool() -> PromptPool:
    return PromptPool.from_config(
        DataConfig(
            sources=[ProceduralSource(families=["addition", "sorting"], difficulties=[1, 2])],
            held_out_size=8,
        )
    )


def test_uniform_sampler_draws_by_source_weight():
    sampler = PromptSampler(pool(), CurriculumConfig())
    assert sampler.probabilities() == pytest.approx(
        dict.fromkeys(["addition/d1", "addition/d2", "sorting/d1", "sorting/d2"], 0.25)
    )
    prompts = sampler.next_prompts(40, random.Random(0))
    assert len(prompts) == 40 and len({p.distribution for p in prompts}) == 4


def test_ucb_sampler_learns_from_groups_and_draws_from_the_learnable_distribution():
    sampler = PromptSampler(pool(), CurriculumConfig(scheduler="ucb"))
    for _ in range(30):
        sampler.observe(
            [
                make_group("addition/d1", [True] * 8),
                make_group("addition/d2", [False] * 8),
                make_group("sorting/d1", [True, False] * 4),
                make_group("sorting/d2", [False] * 8),
            ]
        )
    probabilities = sampler.on_learner_step()
    assert max(probabilities, key=probabilities.get) == "sorting/d1"
    prompts = sampler.next_prompts(50, random.Random(1))
    assert sum(p.distribution == "sorting/d1" for p in prompts) >= 45


def test_pcl_sampler_keeps_candidates_nearest_the_target_and_meters_its_cost():
    sampler = PromptSampler(pool(), CurriculumConfig(selection="pcl", pcl={"pool_factor": 4}))
    rates = {"addition/d1": 1.0, "addition/d2": 0.0, "sorting/d1": 0.5, "sorting/d2": 0.0}
    rng = random.Random(2)
    for _ in range(60):
        prompts = [pool_prompt for pool_prompt in sampler.next_prompts(16, rng)]
        sampler.observe(
            [make_group(p.distribution, [i < 8 * rates[p.distribution] for i in range(8)], p.text) for p in prompts]
        )
    chosen = sampler.next_prompts(32, rng)
    assert sum(p.distribution == "sorting/d1" for p in chosen) >= 28
    assert sampler.candidates_scored == 61 * 16 * 4 + 32 * 4 - 16 * 4
    assert sampler.selection_seconds > 0
    assert sampler.value_model_error() < 0.15


def test_sampler_state_round_trip_and_config_mismatch():
    config = CurriculumConfig(scheduler="ucb", selection="pcl", pcl={"dimension": 64})
    sampler = PromptSampler(pool(), config)
    sampler.observe([make_group("sorting/d1", [True, False] * 4)])
    sampler.on_learner_step()
    restored = PromptSampler(pool(), config)
    restored.load_bytes(sampler.to_bytes())
    assert restored.probabilities() == sampler.probabilities()
    assert restored.value_errors == sampler.value_errors
    with pytest.raises(ValueError, match="another curriculum config"):
        PromptSampler(pool(), CurriculumConfig()).load_bytes(sampler.to_bytes())


def test_difficulty_filter_config_must_be_ordered():
    from orchard.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="curriculum.difficulty_filter"):
        config_from_dict({"curriculum": {"difficulty_filter": {"enabled": True, "low": 0.9, "high": 0.1}}})


def test_value_model_reads_policy_states_beside_the_prompt_text():
    """With `state_dimension`, each prompt's policy state (L2-normalised) extends its features; a model
    that can only tell two prompts of one distribution apart by their states learns both pass rates."""
    model = PromptValueModel(dimension=64, lr=2.0, epochs=8, state_dimension=2)
    prompts = [Prompt(id=str(i), text="same", answer="", distribution="d") for i in range(2)]
    states = np.array([[3.0, 0.0], [0.0, 0.5]])
    features = model.features(prompts, states)
    assert features.shape == (2, 66) and features[:, 64:].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    for _ in range(200):
        model.update(prompts, [0.9, 0.1], states)
    assert model.predict(prompts, states) == pytest.approx([0.9, 0.1], abs=0.05)
    text_only = PromptValueModel(dimension=64, lr=2.0, epochs=8)
    for _ in range(200):
        text_only.update(prompts, [0.9, 0.1])
    assert text_only.predict(prompts) == pytest.approx([0.5, 0.5], abs=0.05)  # the text cannot tell them apart
    with pytest.raises(ValueError, match=r"expected policy states of shape \(2, 2\)"):
        model.predict(prompts)
    with pytest.raises(ValueError, match="reads no policy states"):
        text_only.predict(prompts, states)
    with pytest.raises(ValueError, match="dimensions 64 \\+ 2, this model 64 \\+ 0"):
        text_only.load_state_dict(model.state_dict())


def test_pcl_with_policy_features_chooses_and_learns_by_the_states_it_was_given():
    """`pcl.features: policy`: candidates are read through `prompt_states`; a chosen prompt's outcome
    trains the value model on the states it was chosen by (not re-read), other prompts are read then."""
    config = CurriculumConfig(selection="pcl", pcl={"pool_factor": 3, "dimension": 64, "features": "policy"})
    sampler = PromptSampler(pool(), config, state_dimension=4)
    with pytest.raises(RuntimeError, match="needs the policy's hidden states"):
        sampler.next_prompts(2, random.Random(0))
    calls: list[list[str]] = []

    def states(prompts):
        calls.append([p.id for p in prompts])
        return np.array([[len(p.text), 1.0, 0.0, float(i)] for i, p in enumerate(prompts)])

    sampler.prompt_states = states
    chosen = sampler.next_prompts(2, random.Random(0))
    assert len(calls) == 1 and len(calls[0]) == 6 and {p.id for p in chosen} <= set(calls[0])
    groups = [dataclasses.replace(make_group(p.distribution, [True, False]), prompt=p) for p in chosen]
    sampler.observe([*groups, make_group("d1", [True, True], text="other")])
    assert calls[1:] == [["d1:other"]]  # only the prompt that was not chosen here is read again
    assert sampler.value_model.updates == 1 and sampler.value_model.state_dimension == 4
    state = json.loads(sampler.to_bytes())
    assert state["value_model"]["state_dimension"] == 4
    with pytest.raises(ValueError, match="another curriculum config|dimensions"):
        PromptSampler(pool(), config, state_dimension=8).load_bytes(sampler.to_bytes())


def test_ucb_floor_keeps_every_distribution_drawn_by_hand():
    # softmax [0.9, 0.1, 0.0], floor 0.05 over 3: 0.05 + 0.85·p
    assert with_floor([0.9, 0.1, 0.0], 0.05) == pytest.approx([0.815, 0.135, 0.05])
    assert with_floor([0.5, 0.5], 0.0) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"must lie in \[0, 1/3\]"):
        with_floor([0.2, 0.3, 0.5], 0.4)


def test_ucb_scheduler_with_a_floor_still_draws_an_all_fail_distribution():
    plain = UCBScheduler(["learnable", "failing"], temperature=0.1)
    floored = UCBScheduler(["learnable", "failing"], temperature=0.1, min_probability=0.1)
    for scheduler in (plain, floored):
        for _ in range(50):
            scheduler.observe("learnable", [0.9] * 8)
            scheduler.observe("failing", [0.0] * 8)
        scheduler.update()
    assert plain.probabilities()["failing"] < 0.001
    assert floored.probabilities()["failing"] == pytest.approx(0.1 + 0.8 * plain.probabilities()["failing"])
    assert sum(floored.probabilities().values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_probability 0.6 for each of 2 distributions exceeds 1"):
        UCBScheduler(["a", "b"], min_probability=0.6)
