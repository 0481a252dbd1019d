"""The vLLM engine's own logic without vLLM: converting vLLM's documented outputs into our records
and building its sampling parameters.

The objects below are plain dataclasses with the fields vLLM 0.30 documents for `RequestOutput`,
`CompletionOutput` and `Logprob` (`vllm.outputs`, https://docs.vllm.ai/en/v0.30.0/api/vllm/). This tests
our conversion of that shape, not vLLM: whether vLLM really fills them so is checked only by the
GPU test at the end, which runs vLLM where it is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from orchard.protocols import SamplingParams
from rollout.engines.vllm import (
    generations_from_request_outputs,
    next_token_sampling_kwargs,
    next_tokens_from_request_outputs,
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


def test_sampling_params_ask_for_one_sample_with_the_sampled_tokens_logprob():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, stop=("\n",), seed=3)
    assert sampling_params_kwargs(params) == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 12,
        "stop": ["\n"],
        "logprobs": 0,
        "seed": 3,
    }


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
