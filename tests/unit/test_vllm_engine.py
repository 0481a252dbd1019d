"""The vLLM engine's own logic as pure functions: converting vLLM's outputs into our records, grouping
a batch into requests, seeds and sampling parameters, re-scoring from prompt logprobs.

The objects below are plain dataclasses with the fields vLLM 0.32 documents for `RequestOutput`,
`CompletionOutput` and `Logprob` (`vllm.outputs`), so that malformed outputs can be built; that vLLM
really fills them so is checked by tests/integration/test_vllm_engine.py, which runs vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from orchard.protocols import SamplingParams
from orchard.rollout.engines.vllm import (
    RequestPlan,
    completion_logprobs_from_prompt_logprobs,
    generations_from_request_outputs,
    named_tensors,
    next_token_sampling_kwargs,
    next_tokens_from_request_outputs,
    processed_logprobs,
    request_plan,
    request_seed,
    sampling_params_kwargs,
)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


def completion(token_ids, logprobs, finish_reason="stop", text="", extra_top=True):
    positions = []
    for token, value in zip(token_ids, logprobs, strict=True):
        entry = {token: Logprob(value, rank=1)}
        if extra_top:  # vLLM may add the most likely token beside the sampled one
            entry[token + 1000] = Logprob(value + 0.5, rank=0)
        positions.append(entry)
    return CompletionOutput(0, text, list(token_ids), sum(logprobs), positions, finish_reason)


def test_sampled_tokens_logprobs_and_finish_reasons_in_request_order():
    outputs = [
        RequestOutput("a", [1, 2], [completion([5, 6, 7], [-0.1, -0.2, -0.3], "stop", text="xyz")]),
        RequestOutput("b", [1, 3], [completion([8], [-1.5], "length")]),
        RequestOutput("c", [1, 4], [completion([], [], "stop")]),
    ]
    generations = generations_from_request_outputs(outputs)
    assert [g.token_ids for g in generations] == [[5, 6, 7], [8], []]
    assert [g.logprobs for g in generations] == [[-0.1, -0.2, -0.3], [-1.5], []]
    assert [g.finish_reason for g in generations] == ["stop", "length", "stop"]
    assert generations[0].text == "xyz"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (CompletionOutput(0, "", [5, 6], None, None, "stop"), "logprobs=0"),
        (CompletionOutput(0, "", [5, 6], None, [{5: Logprob(-0.1)}], "stop"), "2 tokens but 1 logprob"),
        (CompletionOutput(0, "", [5], None, [{9: Logprob(-0.1)}], "stop"), "no logprob for sampled token 5"),
        (CompletionOutput(0, "", [5], None, [{5: Logprob(-math.inf)}], "stop"), "logprob -inf"),
        (CompletionOutput(0, "", [5], None, [{5: Logprob(-0.1)}], "abort"), "finished with 'abort'"),
    ],
)
def test_incomplete_outputs_are_errors_naming_the_request(broken, message):
    with pytest.raises(ValueError, match=message) as raised:
        generations_from_request_outputs([RequestOutput("req-7", [1], [broken])])
    assert "req-7" in str(raised.value)


def test_sampling_params_ask_for_n_samples_with_the_sampled_tokens_logprob():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, stop=("\n",), seed=3)
    assert sampling_params_kwargs(params, n=8, seed=99) == {
        "n": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 12,
        "stop": ["\n"],
        "logprobs": 0,
        "seed": 99,
    }
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    assert sampling_params_kwargs(greedy, seed=5)["seed"] is None
    # a chat template's end-of-turn ends a completion as eos does; no eos tokens at all: eos ignored
    assert sampling_params_kwargs(params, eos_token_ids=(2, 7))["stop_token_ids"] == [2, 7]
    assert sampling_params_kwargs(params, eos_token_ids=())["ignore_eos"] is True
    assert "ignore_eos" not in sampling_params_kwargs(params) and "stop_token_ids" not in sampling_params_kwargs(params)


def test_identical_prompts_become_one_request_answering_their_rows_in_order():
    plan = request_plan([[1, 2], [1, 3], [1, 2], [1, 2], [1, 3], [4]])
    assert plan.prompts == [[1, 2], [1, 3], [4]]
    assert plan.rows == [[0, 2, 3], [1, 4], [5]]


def test_samples_of_a_request_go_back_to_their_rows():
    plan = RequestPlan(prompts=[[1], [2]], rows=[[0, 2], [1]])
    outputs = [
        RequestOutput("a", [1], [completion([5], [-0.5]), completion([6], [-0.6])]),
        RequestOutput("b", [2], [completion([7], [-0.7], "length")]),
    ]
    generations = generations_from_request_outputs(outputs, plan)
    assert [g.token_ids for g in generations] == [[5], [7], [6]]
    assert [g.finish_reason for g in generations] == ["stop", "length", "stop"]
    with pytest.raises(ValueError, match="request a returned 1 completions, 2 asked"):
        generations_from_request_outputs([outputs[0].__class__("a", [1], [completion([5], [-0.5])]), outputs[1]], plan)


def test_request_seeds_are_reproducible_and_far_apart():
    assert request_seed(None, 3) is None
    assert request_seed(7, 2) == request_seed(7, 2)
    seeds = [request_seed(seed, request) for seed in range(50) for request in range(50)]
    assert all(0 <= value < 2**63 for value in seeds)
    # a request's samples use seeds s..s+n-1 (n well below 2**16): no two requests' ranges meet
    ordered = sorted(seeds)
    assert min(b - a for a, b in zip(ordered, ordered[1:], strict=False)) > 2**16


def test_processed_logprobs_temper_and_renormalise_over_the_nucleus():
    raw = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64), -1)
    tempered = processed_logprobs(raw, 0.5, 1.0)
    assert torch.allclose(tempered, torch.log_softmax(torch.tensor([4.0, 2.0, 0.0, -2.0], dtype=torch.float64), -1))
    probabilities = raw.exp()  # 0.644, 0.237, 0.087, 0.032
    nucleus = processed_logprobs(raw, 1.0, 0.8)  # the first two reach 0.8
    kept = probabilities[:2] / probabilities[:2].sum()
    assert torch.allclose(nucleus[:2], kept.log()) and torch.isinf(nucleus[2:]).all()
    assert torch.allclose(processed_logprobs(raw, 0.0, 1.0), raw)  # greedy reports the untempered logprobs


def test_completion_logprobs_come_from_the_prompt_logprobs_after_the_prompt():
    raw = torch.log_softmax(torch.tensor([0.5, 1.5, -1.0]), -1)
    full = {token: Logprob(float(value)) for token, value in enumerate(raw)}
    output = RequestOutput("r", [1, 2, 1], prompt_logprobs=[None, {2: Logprob(-0.3)}, full])
    plain = SamplingParams(temperature=1.0)
    assert completion_logprobs_from_prompt_logprobs(output, 1, [2, 1], plain) == pytest.approx([-0.3, float(raw[1])])
    tempered = SamplingParams(temperature=0.5)
    expected = torch.log_softmax(raw / 0.5, -1)[1]
    assert completion_logprobs_from_prompt_logprobs(output, 2, [1], tempered) == pytest.approx([float(expected)])
    with pytest.raises(ValueError, match="request r returned no prompt logprobs"):
        completion_logprobs_from_prompt_logprobs(output, 2, [1, 0], plain)
    with pytest.raises(ValueError, match="no prompt logprob for token 9"):
        completion_logprobs_from_prompt_logprobs(output, 1, [9], plain)


def test_weights_are_checked_before_anything_is_loaded():
    import numpy as np

    good = {"a": torch.ones(2), "b": np.zeros((2, 2), dtype=np.float32)}
    assert [(name, tuple(t.shape)) for name, t in named_tensors(good)] == [("a", (2,)), ("b", (2, 2))]
    bad = {"a": torch.tensor([1.0, float("inf")]), "b": torch.ones(2, dtype=torch.long), "c": [1.0]}
    with pytest.raises(ValueError) as refused:
        named_tensors(bad)
    assert "'a' holds non-finite values" in str(refused.value)
    assert "'b' is torch.int64, not floating point" in str(refused.value)
    assert "'c' is a list" in str(refused.value)


def test_next_tokens_are_the_first_positions_top_logprobs_most_probable_first():
    # vLLM returns the top `logprobs` tokens of the position and the sampled token when it is not among them
    top = {7: Logprob(-0.5, rank=2), 3: Logprob(-0.2, rank=1), 9: Logprob(-3.0, rank=5), 4: Logprob(-math.inf)}
    outputs = [
        RequestOutput("a", [1], [CompletionOutput(0, "", [9], -3.0, [top], "length")]),
        RequestOutput("b", [1], [CompletionOutput(0, "", [2], -0.1, [{2: Logprob(-0.1, rank=1)}], "length")]),
    ]
    assert next_tokens_from_request_outputs(outputs, top_k=2) == [[(3, -0.2), (7, -0.5)], [(2, -0.1)]]
    assert next_tokens_from_request_outputs(outputs, top_k=5)[0] == [(3, -0.2), (7, -0.5), (9, -3.0)]
    with pytest.raises(ValueError, match="req-3 returned no logprobs"):
        next_tokens_from_request_outputs([RequestOutput("req-3", [1], [CompletionOutput(0, "", [5], None, None)])], 2)


def test_next_token_sampling_params_ask_for_one_token_and_its_top_logprobs():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, stop=("\n",), seed=3)
    assert next_token_sampling_kwargs(params, 16) == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 1,
        "logprobs": 16,
        "seed": 3,
    }
