"""`TorchEngine` against the Hugging Face model it re-implements: logits, greedy decoding, logprobs.

The models are small Qwen2s whose weights are redrawn with a larger spread than the default
initialisation, so that logits are far from uniform and greedy decoding never hinges on a near-tie.
"""

import math
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2ForCausalLM

from orchard.config import ModelConfig, TinyModelConfig
from orchard.protocols import Engine, SamplingParams
from orchard.rollout.engines import torch_engine
from orchard.rollout.engines.sampling import find_stop, gumbel_noise, sample_next
from orchard.rollout.engines.torch_engine import TorchEngine, _prefill_mask
from orchard.rollout.model import build_model, tiny_qwen2_config
from orchard.rollout.tokenizer import CharTokenizer

TINY = TinyModelConfig(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_position_embeddings=64
)
TEXTS = ["1+2=", "hello world, how", "x", "sort: 3 1 2 ->", "abc\ndef"]
ATOL = 1e-4


def spread_weights(model: Qwen2ForCausalLM, seed: int) -> Qwen2ForCausalLM:
    """Redraw every parameter (matrices N(0, 0.2²), biases N(0, 0.1²), norm weights N(1, 0.1²))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            else:
                parameter.copy_(1 + torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def make_model(tokenizer: CharTokenizer, seed: int, **config_fields) -> Qwen2ForCausalLM:
    return spread_weights(build_model(ModelConfig(tiny=TINY.model_copy(update=config_fields)), tokenizer), seed)


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> Qwen2ForCausalLM:
    return make_model(tokenizer, seed=1)


@pytest.fixture(scope="module")
def other_model(tokenizer) -> Qwen2ForCausalLM:
    return make_model(tokenizer, seed=2)


@pytest.fixture
def engine(model, tokenizer) -> TorchEngine:
    return TorchEngine(model, tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [[tokenizer.bos_id, *tokenizer.encode(text)] for text in TEXTS]


def hf_logits(model: Qwen2ForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model: Qwen2ForCausalLM, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """HF greedy decoding of one unpadded prompt (no padding, so no padding conventions to match)."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return output[0, len(prompt) :].tolist()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)


# ------------------------------------------------------------------------------------------ (a) logits


def test_logits_of_a_left_padded_batch_equal_hf_per_prompt(engine, model, prompts, tokenizer):
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    logits = engine.logits(ids, mask)
    assert logits.dtype == torch.float32 and logits.shape == (*ids.shape, tokenizer.vocab_size)
    for row, prompt in enumerate(prompts):
        pads = ids.shape[1] - len(prompt)
        torch.testing.assert_close(logits[row, pads:], hf_logits(model, prompt), atol=ATOL, rtol=0)


def test_logits_equal_hf_on_the_same_padded_batch_with_position_ids(engine, model, prompts, tokenizer):
    # How a learner scores a padded batch: attention mask plus positions counted from the first real token.
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    torch.testing.assert_close(engine.logits(ids, mask)[valid], expected[valid], atol=ATOL, rtol=0)


def test_a_last_only_prefill_gives_the_last_position_and_the_same_cache(engine, prompts, tokenizer):
    # Generation's prefill skips the last layer's attention and MLP for every position but the last.
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    valid = mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    full_cache, last_cache = (engine._new_cache(len(prompts), ids.shape[1]) for _ in range(2))
    with torch.inference_mode():
        full = engine._forward(ids, positions, _prefill_mask(valid), full_cache, 0)
        last = engine._forward(ids, positions, _prefill_mask(valid), last_cache, 0, last_only=True)
    assert last.shape == (len(prompts), 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-6, rtol=0)
    torch.testing.assert_close(last_cache, full_cache, atol=0, rtol=0)


def test_logits_match_an_untied_model_with_the_eager_reference(tokenizer):
    config = tiny_qwen2_config(TINY, tokenizer, attn_implementation="eager")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = spread_weights(Qwen2ForCausalLM(config).eval(), seed=5)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ids = [tokenizer.bos_id, *tokenizer.encode("untied head")]
    torch.testing.assert_close(
        TorchEngine(model, tokenizer).logits(torch.tensor([ids]))[0], hf_logits(model, ids), atol=ATOL, rtol=0
    )


def test_bfloat16_model_runs_close_to_hf(tokenizer):
    model = make_model(tokenizer, seed=1).to(torch.bfloat16)
    ids = [tokenizer.bos_id, *tokenizer.encode("half precision")]
    logits = TorchEngine(model, tokenizer).logits(torch.tensor([ids]))[0]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_logits(model, ids), atol=0.15, rtol=0.05)


# ------------------------------------------------------------------------------------- (b) greedy


def test_greedy_generation_equals_hf_generate_token_for_token(engine, model, prompts, tokenizer):
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20))
    assert len(outputs) == len(prompts)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == hf_greedy(model, prompt, 20, tokenizer.eos_id)


def test_greedy_with_rows_ending_early_equals_hf(model, prompts, tokenizer):
    """Rows finish at different steps, so the batch is compacted mid-generation."""
    free_running = TorchEngine(model, tokenizer, eos_token_ids=()).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=24)
    )
    # Use as "eos" the third token of the first completion: some rows stop early, others run on.
    stop_token = free_running[0].token_ids[2]
    engine = TorchEngine(model, tokenizer, eos_token_ids=(stop_token,))
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=24))
    lengths = {len(output.token_ids) for output in outputs}
    assert min(lengths) <= 3 and max(lengths) == 24, "the test needs rows that finish at different steps"
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == hf_greedy(model, prompt, 24, stop_token)
        assert output.finish_reason == ("stop" if output.token_ids[-1] == stop_token else "length")


def test_repeated_prompts_are_prefilled_once_and_sampled_independently(model, prompts, tokenizer, monkeypatch):
    """A rollout batch holds each prompt once per completion of its group."""
    group = [prompt for prompt in prompts[:3] for _ in range(4)]
    engine = TorchEngine(model, tokenizer, eos_token_ids=())
    prefilled = []
    prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda ids, *args: prefilled.append(len(ids)) or prefill(ids, *args))
    greedy = engine.generate(group, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert prefilled == [3]
    for prompt, output in zip(group, greedy, strict=True):
        assert output.token_ids == hf_greedy(model, prompt, 12, None)
    sampled = engine.generate(group, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
    for first in range(0, len(group), 4):
        assert len({tuple(output.token_ids) for output in sampled[first : first + 4]}) > 1
    for prompt, output in zip(group, sampled, strict=True):
        logits = hf_logits(model, prompt + output.token_ids)[len(prompt) - 1 : -1]
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(output.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(output.logprobs), expected, atol=ATOL, rtol=0)


def test_batches_larger_than_max_batch_size_are_split_without_changing_results(model, prompts, tokenizer):
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    whole = TorchEngine(model, tokenizer).generate(prompts, params)
    split = TorchEngine(model, tokenizer, max_batch_size=2).generate(prompts, params)
    assert [o.token_ids for o in whole] == [o.token_ids for o in split]


# ---------------------------------------------------------------------------------- (c) logprobs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=16, seed=11),
        SamplingParams(temperature=0.7, max_new_tokens=16, seed=12),
        SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=16, seed=13),
        SamplingParams(temperature=0.0, max_new_tokens=16),
    ],
    ids=["T1", "T0.7", "T0.7-top_p0.8", "greedy"],
)
def test_logprobs_equal_a_full_forward_recomputation(model, prompts, tokenizer, params):
    """The learner recomputes log_softmax(logits / T) of the chosen tokens over prompt + completion.

    top-p only restricts which tokens may be drawn: the logprob is of the untruncated distribution.
    Greedy reports the T = 1 distribution.
    """
    outputs = TorchEngine(model, tokenizer, eos_token_ids=()).generate(prompts, params)
    temperature = params.temperature or 1.0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(output.logprobs) == len(output.token_ids) == params.max_new_tokens
        logits = hf_logits(model, prompt + output.token_ids)[len(prompt) - 1 : -1]
        expected = F.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(output.token_ids)[:, None])
        torch.testing.assert_close(torch.tensor(output.logprobs), expected.squeeze(-1), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.7, top_p=0.8),
    ],
    ids=["T1", "T0.7", "T0.7-top_p0.8"],
)
def test_next_token_logprobs_are_the_most_probable_tokens_of_a_full_forward(model, prompts, tokenizer, params):
    """DeepSearch's 'prior' expansion: per prompt the top tokens of log_softmax(logits / T) at the last
    position, most probable first, only those top-p may draw, with the logprobs generate reports."""
    engine = TorchEngine(model, tokenizer)
    answers = engine.next_token_logprobs(prompts, params, top_k=5)
    assert len(answers) == len(prompts)
    for prompt, answer in zip(prompts, answers, strict=True):
        logprobs = F.log_softmax(hf_logits(model, prompt)[-1] / params.temperature, -1)
        top = logprobs.topk(5)
        nucleus = (top.values.exp().cumsum(0) - top.values.exp()) < params.top_p
        assert [token for token, _ in answer] == top.indices[nucleus].tolist()
        torch.testing.assert_close(
            torch.tensor([logprob for _, logprob in answer]), top.values[nucleus], atol=ATOL, rtol=0
        )
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.next_token_logprobs([[]], params, top_k=5)


def test_prompt_states_are_the_final_norm_hidden_state_at_each_prompt_last_token(model, prompts, tokenizer):
    """PCL's policy features: the model's last hidden state (after the final norm) at the prompt's last
    token, for prompts of different lengths in one batch, as Hugging Face computes it per prompt."""
    engine = TorchEngine(model, tokenizer)
    states = engine.prompt_states(prompts)
    assert states.shape == (len(prompts), model.config.hidden_size) and states.dtype == torch.float32
    for prompt, state in zip(prompts, states, strict=True):
        with torch.no_grad():
            expected = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(state, expected.float(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.prompt_states([[]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_rescore_completions_as_generate_reports_them(model, prompts, tokenizer, temperature):
    """Re-scoring (a cached solution) gives each completion token the logprob generate reported when it
    sampled it, for prompts and completions of different lengths in one batch."""
    engine = TorchEngine(model, tokenizer)
    params = SamplingParams(temperature=temperature, max_new_tokens=7, seed=4)
    outputs = engine.generate(prompts, params)
    scored = engine.token_logprobs([(p, o.token_ids) for p, o in zip(prompts, outputs, strict=True)], params)
    for output, values in zip(outputs, scored, strict=True):
        torch.testing.assert_close(torch.tensor(values), torch.tensor(output.logprobs), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- (d) finishing and stops


def test_stop_string_cuts_the_text_and_keeps_the_completing_token(model, prompts, tokenizer):
    engine = TorchEngine(model, tokenizer, eos_token_ids=())
    free_running = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=24))[0]
    full_text = tokenizer.decode(free_running.token_ids)
    assert len(full_text) == 24, "the greedy completion should be plain characters for this test"
    stop = full_text[5:7]
    cut = full_text.index(stop)

    output = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=24, stop=(stop,)))[0]
    assert output.finish_reason == "stop"
    assert output.text == full_text[:cut]
    # token_ids run up to and including the token that completed the stop string, so the learner
    # trains the decision to stop; the text leaves the stop string out.
    assert output.token_ids == free_running.token_ids[: cut + len(stop)]
    assert len(output.logprobs) == len(output.token_ids)
    assert output.logprobs == pytest.approx(free_running.logprobs[: cut + len(stop)], abs=1e-6)


def test_the_earliest_of_several_stop_strings_wins_and_rows_stop_independently(model, prompts, tokenizer):
    engine = TorchEngine(model, tokenizer, eos_token_ids=())
    params = SamplingParams(temperature=0.0, max_new_tokens=20)
    free_running = engine.generate(prompts, params)
    texts = [tokenizer.decode(o.token_ids) for o in free_running]
    stops = (texts[0][8:10], texts[1][3])
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20, stop=stops))
    for text, free, output in zip(texts, free_running, outputs, strict=True):
        cuts = [(text.index(stop), len(stop)) for stop in stops if stop in text]
        if not cuts:
            assert (output.finish_reason, output.text, output.token_ids) == ("length", text, free.token_ids)
            continue
        cut, length = min(cuts, key=lambda found: found[0] + found[1])  # the first one completed
        assert output.finish_reason == "stop"
        assert output.token_ids == free.token_ids[: cut + length]
        assert output.text == text[: min(index for index, _ in cuts)]


def test_eos_finishes_with_stop_and_is_kept_in_token_ids_but_not_in_text(model, prompts, tokenizer):
    # At a high temperature eos (1 token in 100) shows up in some of 64 rows of 24 tokens.
    batch = [prompts[i % len(prompts)] for i in range(64)]
    outputs = TorchEngine(model, tokenizer).generate(batch, SamplingParams(temperature=3.0, max_new_tokens=24, seed=0))
    ended = [o for o in outputs if tokenizer.eos_id in o.token_ids]
    assert ended, "expected some rows to sample eos"
    for output in outputs:
        assert len(output.logprobs) == len(output.token_ids)
        assert all(math.isfinite(logprob) and logprob <= 0 for logprob in output.logprobs)
        if output in ended:
            assert output.token_ids.index(tokenizer.eos_id) == len(output.token_ids) - 1
            assert output.finish_reason == "stop"
            assert output.text == tokenizer.decode(output.token_ids[:-1])
        else:
            assert output.finish_reason == "length"
            assert len(output.token_ids) == 24
            assert output.text == tokenizer.decode(output.token_ids)


@pytest.mark.parametrize("stop", [(), ("a", "e1")], ids=["eos", "eos-and-stop-strings"])
def test_finished_rows_do_not_depend_on_how_often_they_are_checked(model, prompts, tokenizer, monkeypatch, stop):
    """Rows are checked for eos and stop strings every `FINISH_CHECK_INTERVAL` steps, not after each:
    a row that finished in between runs on until the check and its extra tokens are dropped. Each row
    draws the same noise wherever it sits in the (compacted) batch, so every interval gives the same
    completions."""
    batch = [prompts[i % len(prompts)] for i in range(24)]
    params = SamplingParams(temperature=3.0, max_new_tokens=20, seed=5, stop=stop)
    results = {}
    for interval in (1, 3, 4, 50):
        monkeypatch.setattr(torch_engine, "FINISH_CHECK_INTERVAL", interval)
        results[interval] = TorchEngine(model, tokenizer).generate(batch, params)
    reference = results[1]
    lengths = [len(o.token_ids) for o in reference]
    assert min(lengths) < 20 and len(set(lengths)) > 3, "the test needs rows that finish at different steps"
    assert {o.finish_reason for o in reference} == {"stop", "length"}
    for outputs in results.values():
        assert [(o.token_ids, o.finish_reason, o.text) for o in outputs] == [
            (o.token_ids, o.finish_reason, o.text) for o in reference
        ]
        for output, expected in zip(outputs, reference, strict=True):
            assert output.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    for output in reference:
        ended_by_eos = tokenizer.eos_id in output.token_ids
        assert output.finish_reason == ("stop" if ended_by_eos or len(output.token_ids) < 20 else "length")
        if ended_by_eos:
            assert output.token_ids.index(tokenizer.eos_id) == len(output.token_ids) - 1


def test_a_row_ending_on_the_first_step_of_a_check_window_keeps_one_token(model, prompts, tokenizer, monkeypatch):
    """The first token of a row as eos: found by the check 4 steps later, the row keeps only it."""
    monkeypatch.setattr(torch_engine, "FINISH_CHECK_INTERVAL", 4)
    first = TorchEngine(model, tokenizer, eos_token_ids=()).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=12)
    )
    engine = TorchEngine(model, tokenizer, eos_token_ids=(first[0].token_ids[0],))
    output = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    assert (output.token_ids, output.finish_reason) == ([first[0].token_ids[0]], "stop")
    assert output.logprobs == pytest.approx(first[0].logprobs[:1], abs=1e-5)


def test_max_new_tokens_finishes_with_length(engine, prompts):
    for output in engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)):
        if output.token_ids != [engine.tokenizer.eos_id]:
            assert output.finish_reason == "length" and len(output.token_ids) == 1


def test_find_stop_sees_stop_strings_across_tokens_that_decode_to_nothing(tokenizer):
    a, b, c = tokenizer.encode("abc")
    bos = tokenizer.bos_id
    assert find_stop(tokenizer, [c, a, bos, bos, bos, bos, b], ("ab",)) == "c"
    assert find_stop(tokenizer, [c, a, bos, b], ("xy", "ab")) == "c"
    assert find_stop(tokenizer, [c, a, bos, c], ("ab",)) is None
    assert find_stop(tokenizer, [a], ("a",)) == ""


# ------------------------------------------------------------------------------------- (e) top-p


def test_tiny_top_p_only_ever_picks_the_argmax(engine, prompts):
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    for seed in range(3):
        nucleus = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=16, seed=seed))
        assert [o.token_ids for o in nucleus] == [o.token_ids for o in greedy]


def test_sample_next_draws_from_the_nucleus_in_proportion():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log().expand(40_000, 4).contiguous()
    generator = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_next(logits, 1.0, 0.7, generator)
    # top_p 0.7 keeps {0, 1}: the smallest prefix whose mass reaches 0.7.
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(logprobs, probabilities.log()[tokens])  # untruncated distribution
    tokens, _ = sample_next(logits, 1.0, 1.0, generator)
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, probabilities, atol=0.01, rtol=0)


def test_sample_next_temperature_sharpens_and_greedy_takes_the_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40_000, 4).contiguous()
    tokens, logprobs = sample_next(logits, 0.5, 1.0, torch.Generator().manual_seed(1))
    expected = F.softmax(logits[0] / 0.5, -1)
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(logprobs, expected.log()[tokens])
    tokens, logprobs = sample_next(logits[:2], 0.0, 1.0)
    assert tokens.tolist() == [0, 0]
    torch.testing.assert_close(logprobs, F.log_softmax(logits[0], -1)[[0, 0]])


def test_sample_next_with_given_noise_is_the_gumbel_argmax_and_noise_chunks_serve_each_step():
    logits = torch.randn(8, 30)
    noise = gumbel_noise((3, 8, 30), torch.Generator().manual_seed(3))
    assert noise.shape == (3, 8, 30) and not torch.isnan(noise).any() and (noise < 17).all()
    for step in range(3):
        tokens, logprobs = sample_next(logits, 0.7, 1.0, noise=noise[step])
        assert torch.equal(tokens, (logits / 0.7 + noise[step]).argmax(-1))
        torch.testing.assert_close(logprobs, F.log_softmax(logits / 0.7, -1)[torch.arange(8), tokens])
    # top-p draws from the kept prefix with the same noise, in sorted order.
    tokens, _ = sample_next(logits, 1.0, 0.5, noise=noise[0])
    kept = F.softmax(logits, -1).sort(-1, descending=True)
    for row, token in enumerate(tokens.tolist()):
        probs, order = kept.values[row], kept.indices[row]
        allowed = order[: int((probs.cumsum(0) - probs < 0.5).sum())]
        assert token in allowed.tolist()


def test_noise_drawn_one_step_at_a_time_gives_valid_reproducible_samples(model, prompts, tokenizer, monkeypatch):
    monkeypatch.setattr(torch_engine, "NOISE_CHUNK_ELEMENTS", 1)  # one step of noise per draw
    engine = TorchEngine(model, tokenizer, eos_token_ids=())
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=7)
    first, second = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    for prompt, output in zip(prompts, first, strict=True):
        logits = hf_logits(model, prompt + output.token_ids)[len(prompt) - 1 : -1]
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(output.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(output.logprobs), expected, atol=ATOL, rtol=0)


def test_sample_next_never_picks_a_zero_probability_token():
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]]).expand(10_000, 4).contiguous()
    tokens, logprobs = sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(2))
    assert set(tokens.tolist()) == {0, 2}
    assert torch.isfinite(logprobs).all()


# ------------------------------------------------------------------------------------- (f) seeds


def test_same_seed_same_output_and_different_seeds_differ(engine, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=42)
    first, second = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [(o.token_ids, o.logprobs, o.text) for o in first] == [(o.token_ids, o.logprobs, o.text) for o in second]
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=43))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_seed_does_not_depend_on_or_disturb_the_global_rng(engine, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    torch.manual_seed(0)
    first = engine.generate(prompts, params)
    after_first = torch.rand(2)
    torch.manual_seed(999)
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in first]
    torch.manual_seed(0)
    engine.generate(prompts, params)
    assert torch.equal(torch.rand(2), after_first)


# ---------------------------------------------------------------------------------- (g) weights


def test_load_weights_swaps_weights_in_place(model, other_model, prompts, tokenizer):
    engine = TorchEngine(make_model(tokenizer, seed=1), tokenizer)
    parameter_storage = engine.model.model.embed_tokens.weight.data_ptr()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    before = engine.generate(prompts, greedy)
    engine.load_weights(other_model.state_dict(), version=1)
    assert engine.policy_version == 1
    assert engine.model.model.embed_tokens.weight.data_ptr() == parameter_storage  # copied, not replaced
    ids = prompts[1]
    torch.testing.assert_close(engine.logits(torch.tensor([ids]))[0], hf_logits(other_model, ids), atol=ATOL, rtol=0)
    after = engine.generate(prompts, greedy)
    assert [o.token_ids for o in after] == [
        o.token_ids for o in TorchEngine(other_model, tokenizer).generate(prompts, greedy)
    ]
    assert [o.token_ids for o in after] != [o.token_ids for o in before]


def test_load_weights_accepts_read_only_numpy_arrays_and_a_dict_without_the_tied_head(other_model, prompts, tokenizer):
    """As the workers get them: numpy arrays from Ray's object store, which are read-only."""
    engine = TorchEngine(make_model(tokenizer, seed=1), tokenizer)
    state = {}
    for name, tensor in other_model.state_dict().items():
        if name != "lm_head.weight":
            state[name] = tensor.numpy().copy()
            state[name].setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.load_weights(state, version=3)
    ids = torch.tensor([prompts[0]])
    torch.testing.assert_close(engine.logits(ids)[0], hf_logits(other_model, prompts[0]), atol=ATOL, rtol=0)


def test_versions_must_increase(other_model, tokenizer):
    engine = TorchEngine(make_model(tokenizer, seed=1), tokenizer)
    state = other_model.state_dict()
    engine.load_weights(state, version=0)  # the first load may repeat the initial version (the driver's warm start)
    engine.load_weights(state, version=2)
    with pytest.raises(ValueError, match=r"got version 2.*policy version 2"):
        engine.load_weights(state, version=2)
    with pytest.raises(ValueError, match=r"got version 1.*policy version 2"):
        engine.load_weights(state, version=1)
    assert engine.policy_version == 2
    fresh = TorchEngine(make_model(tokenizer, seed=1), tokenizer, policy_version=5)
    with pytest.raises(ValueError, match=r"got version 4.*policy version 5"):
        fresh.load_weights(state, version=4)


def _state_with_problem(state: dict[str, torch.Tensor], problem: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    name = "model.layers.1.mlp.down_proj.weight"
    if problem == "missing":
        del state[name]
    elif problem == "shape":
        state[name] = state[name][:, :-1]
    elif problem == "unknown":
        state["model.layers.9.self_attn.q_proj.weight"] = state[name]
    elif problem == "nan":
        state[name] = torch.full_like(state[name], math.nan)
    elif problem == "not a tensor":
        state[name] = "weights"
    return state


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", r"missing parameter 'model\.layers\.1\.mlp\.down_proj\.weight'"),
        ("shape", r"'model\.layers\.1\.mlp\.down_proj\.weight' has shape \(64, 127\), the model's is \(64, 128\)"),
        ("unknown", r"unknown parameter 'model\.layers\.9\.self_attn\.q_proj\.weight'"),
        ("nan", r"'model\.layers\.1\.mlp\.down_proj\.weight' holds non-finite values"),
        ("not a tensor", r"is a str, not a tensor"),
    ],
)
def test_a_bad_state_dict_is_refused_and_leaves_the_engine_unchanged(other_model, prompts, tokenizer, problem, message):
    engine = TorchEngine(make_model(tokenizer, seed=1), tokenizer)
    engine.load_weights(make_model(tokenizer, seed=1).state_dict(), version=1)
    ids = torch.tensor([prompts[1]])
    logits_before = engine.logits(ids)
    parameters_before = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        engine.load_weights(_state_with_problem(other_model.state_dict(), problem), version=2)
    assert engine.policy_version == 1
    assert torch.equal(engine.logits(ids), logits_before)
    for name, parameter in engine.model.named_parameters():
        assert torch.equal(parameter, parameters_before[name]), name


def test_from_state_dict_builds_an_engine_holding_the_weights(other_model, prompts, tokenizer):
    engine = TorchEngine.from_state_dict(other_model.state_dict(), other_model.config, tokenizer)
    ids = torch.tensor([prompts[2]])
    torch.testing.assert_close(engine.logits(ids)[0], hf_logits(other_model, prompts[2]), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- (h) bad requests


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(max_new_tokens=2.5), "max_new_tokens"),
        (SamplingParams(stop=("",)), "stop"),
        (SamplingParams(stop="\n"), "stop"),
        (SamplingParams(seed="7"), "seed"),
    ],
)
def test_bad_sampling_params_raise_naming_the_field(engine, prompts, params, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        engine.generate(prompts, params)


def test_prompts_the_model_cannot_take_raise_clear_errors(engine, tokenizer):
    too_long = [tokenizer.bos_id] + tokenizer.encode("x" * 60)
    with pytest.raises(ValueError, match=r"prompt 1 has 61 tokens.*max_position_embeddings=64"):
        engine.generate([[1, 5], too_long], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        engine.logits(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=re.escape("prompt 0 holds token id 100, outside the vocabulary [0, 100)")):
        engine.generate([[1, 100]], SamplingParams())
    with pytest.raises(ValueError, match="token id -1"):
        engine.generate([[1, -1]], SamplingParams())


def test_a_prompt_that_exactly_fills_the_context_is_accepted(engine, tokenizer):
    prompt = [tokenizer.bos_id] + tokenizer.encode("y" * 59)
    (output,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert 1 <= len(output.token_ids) <= 4


def test_an_empty_batch_gives_no_outputs(engine):
    assert engine.generate([], SamplingParams()) == []


def test_numpy_prompts_are_accepted(engine, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    as_numpy = engine.generate([np.array(p) for p in prompts], params)
    assert [o.token_ids for o in as_numpy] == [o.token_ids for o in engine.generate(prompts, params)]


# ----------------------------------------------------------------------- (i) the compiled forward pass

#: Geometries the kernel must handle: head_dim 16 (one AVX-512 vector), 32 (the demo's), and 24 (not a
#: multiple of the vector width: the scalar attention path), with grouped and plain multi-head attention.
KERNEL_GEOMETRIES = {
    "head_dim16-gqa": {},
    "head_dim32-mha": {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 4},
    "head_dim24-one-kv-head": {"hidden_size": 96, "num_heads": 4, "num_kv_heads": 1},
}


@pytest.fixture(scope="module")
def kernel():
    from orchard.rollout.engines.kernels import forward_tokens_kernel

    op = forward_tokens_kernel()
    if op is None and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: TorchEngine runs in plain torch")
    assert op is not None, "a C++ compiler is present but the kernel did not build (see the warning)"
    return op


def engine_pair(tokenizer, geometry: dict, **kwargs) -> tuple[TorchEngine, TorchEngine]:
    model = make_model(tokenizer, seed=4, **geometry)
    fused = TorchEngine(model, tokenizer, **kwargs)
    return fused, TorchEngine(model, tokenizer, fused_kernel=False, **kwargs)


@pytest.mark.parametrize("geometry", KERNEL_GEOMETRIES.values(), ids=KERNEL_GEOMETRIES.keys())
def test_kernel_prefill_and_decode_equal_the_torch_path(kernel, tokenizer, prompts, geometry):
    fused, plain = engine_pair(tokenizer, geometry)
    assert fused._kernel_weights() is not None and plain._kernel_weights() is None
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    valid = mask.bool()
    pad_counts = (~valid).sum(-1)
    length, steps = ids.shape[1], 3
    caches = {engine: engine._new_cache(len(prompts), length + steps) for engine in (fused, plain)}
    with torch.inference_mode():
        hidden = {engine: engine._prefill(ids, valid, pad_counts, caches[engine]) for engine in caches}
        torch.testing.assert_close(hidden[fused], hidden[plain], atol=1e-5, rtol=1e-5)
        # Keys and values of the real tokens (the kernel leaves padding slots unwritten).
        slot_valid = valid[None, None, :, None, :, None].expand_as(caches[plain][..., :length, :])
        torch.testing.assert_close(
            caches[fused][..., :length, :][slot_valid], caches[plain][..., :length, :][slot_valid], atol=1e-5, rtol=1e-5
        )
        decode_mask = torch.zeros(len(prompts), plain.num_kv_heads, 1, length + steps)
        decode_mask[:, :, 0, :length].masked_fill_(~valid[:, None], float("-inf"))
        tokens = torch.tensor([5, 17, 3, 60, 9])
        for step in range(steps):
            slot = length + step
            hidden = {
                engine: engine._decode(tokens, pad_counts, decode_mask, caches[engine], slot) for engine in caches
            }
            torch.testing.assert_close(hidden[fused], hidden[plain], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(caches[fused][..., slot, :], caches[plain][..., slot, :], atol=1e-5, rtol=1e-5)
            tokens = (tokens * 7 + step) % tokenizer.vocab_size


@pytest.mark.parametrize("geometry", KERNEL_GEOMETRIES.values(), ids=KERNEL_GEOMETRIES.keys())
def test_kernel_generation_equals_the_torch_path(kernel, tokenizer, prompts, geometry):
    """Same tokens and logprobs to float32 rounding, greedy and sampled, with rows finishing early
    (compaction) and repeated prompts (one prefill per distinct prompt)."""
    fused, plain = engine_pair(tokenizer, geometry, max_batch_size=8)
    batch = [prompt for prompt in prompts for _ in range(2)]
    for params in (
        SamplingParams(temperature=0.0, max_new_tokens=20),
        SamplingParams(temperature=1.0, max_new_tokens=20, seed=11),
        SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20, seed=12),
    ):
        expected = plain.generate(batch, params)
        outputs = fused.generate(batch, params)
        assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
        assert [o.finish_reason for o in outputs] == [o.finish_reason for o in expected]
        for output, reference in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(output.logprobs, reference.logprobs, atol=ATOL, rtol=0)
    assert any(o.finish_reason == "stop" for o in expected), "the test needs rows that finish early"


def test_kernel_refuses_inputs_outside_the_cache_naming_them(kernel, engine, tokenizer):
    cache = engine._new_cache(2, 4)
    weights = engine._kernel_weights()
    arguments = (engine._embed, weights, engine._rope_table, cache, engine.num_heads, engine.num_kv_heads, engine.eps)
    ids, rows, first_slot, every = (
        torch.tensor([3, 4]),
        torch.tensor([0, 1]),
        torch.tensor([0, 1]),
        torch.empty(0, dtype=torch.long),
    )
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="token 1 has row 1 slot 4, outside the cache's 2 rows of 4 slots"):
            kernel(ids, rows, torch.tensor([0, 4]), first_slot, every, *arguments)
        with pytest.raises(RuntimeError, match="token 1 at slot 0 of a row whose padding ends at 1"):
            kernel(ids, rows, torch.tensor([0, 0]), first_slot, every, *arguments)
        with pytest.raises(RuntimeError, match="rows must be a contiguous int64 CPU vector of 2 entries"):
            kernel(ids, rows.int(), torch.tensor([0, 1]), first_slot, every, *arguments)


def test_the_engine_runs_in_plain_torch_when_the_kernel_cannot_be_built(model, tokenizer, prompts, monkeypatch):
    from orchard.rollout.engines import kernels

    def no_compiler() -> None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match=r"plain torch \(slower\).*no C\+\+ compiler"):
        engine = TorchEngine(model, tokenizer)
    assert engine._kernel is None
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [o.token_ids for o in outputs] == [hf_greedy(model, p, 6, tokenizer.eos_id) for p in prompts]
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "0")
    assert kernels.forward_tokens_kernel() is None
