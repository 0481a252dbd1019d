"""The BLEU verifier against BLEU worked out by hand: add-one smoothed n-gram precisions, clipping
across references, the brevity penalty on the shortest reference, and how prompts carry references."""

from __future__ import annotations

import json
import math

import pytest

from orchard.config import JsonlSource
from orchard.records import Prompt
from orchard.verifiers.bleu import BleuVerifier, references_of, sentence_bleu
from orchard.verifiers.datasets import load_table_prompts
from orchard.verifiers.registry import get_verifier, safe_verify
from orchard.verifiers.sources import PromptPool


def bleu_by_hand(matches: list[int], totals: list[int], hyp_len: int, ref_len: int) -> float:
    """BLEU = BP · exp(Σ ¼ log p_n), p_n = (m_n + 1) / (t_n + 1), BP = min(1, exp(1 − r/c))."""
    log_p = sum(math.log((m + 1) / (t + 1)) for m, t in zip(matches, totals, strict=True)) / 4
    return min(1.0, math.exp(1 - ref_len / hyp_len)) * math.exp(log_p)


def prompt(answer: str) -> Prompt:
    return Prompt(id="p", text="Describe the scene.", answer=answer, distribution="chat", metadata={})


def test_one_reference_matches_the_hand_computation():
    # hyp: the cat sat on the mat / ref: the cat is on the mat (6 tokens each)
    # 1-grams: the×2, cat, on, mat match → 5 of 6; 2-grams: the cat, on the, the mat → 3 of 5;
    # 3-grams: on the mat → 1 of 4; 4-grams: none of 3. c = r = 6 so BP = 1.
    expected = bleu_by_hand([5, 3, 1, 0], [6, 5, 4, 3], hyp_len=6, ref_len=6)
    assert expected == pytest.approx((6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-12)
    result = BleuVerifier().verify(prompt("the cat is on the mat"), "the cat sat on the mat")
    assert result.reward == pytest.approx(expected, abs=1e-6)
    assert result.error is None


def test_a_short_completion_pays_the_brevity_penalty():
    # every n-gram of "the cat" matches (orders 3 and 4 have none: (0+1)/(0+1) = 1); c = 2, r = 6
    reward = BleuVerifier().verify(prompt("the cat sat on the mat"), "the cat").reward
    assert reward == pytest.approx(math.exp(1 - 6 / 2), abs=1e-6)


def test_identical_completion_scores_one_and_is_correct():
    result = BleuVerifier().verify(prompt("The cat sat on the mat."), "The cat sat on the mat.")
    assert result.reward == pytest.approx(1.0, abs=1e-12) and result.correct


def test_a_disjoint_completion_scores_the_add_one_floor():
    # no n-gram matches: p_n = 1/(t_n + 1) = 1/6, 1/5, 1/4, 1/3; c = r = 5 so BP = 1
    result = BleuVerifier().verify(prompt("v w x y z"), "a b c d e")
    assert result.reward == pytest.approx((1 / 6 * 1 / 5 * 1 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert not result.correct


def test_the_floor_vanishes_for_long_disjoint_answers():
    reference = " ".join(f"r{i}" for i in range(200))
    completion = " ".join(f"c{i}" for i in range(200))
    assert BleuVerifier().verify(prompt(reference), completion).reward < 0.02


def test_multiple_references_clip_each_ngram_to_its_best_reference():
    # refs "the cat is on the mat" and "a cat sat on a mat": every 1- and 2-gram of the completion is
    # in one of them (6 of 6, 5 of 5); 3-grams: cat sat on, on the mat → 2 of 4; 4-grams: 0 of 3.
    answer = json.dumps(["the cat is on the mat", "a cat sat on a mat"])
    reward = BleuVerifier().verify(prompt(answer), "the cat sat on the mat").reward
    assert reward == pytest.approx(bleu_by_hand([6, 5, 2, 0], [6, 5, 4, 3], 6, 6), abs=1e-6)
    # a single reference scores lower than the pair
    assert reward > BleuVerifier().verify(prompt("the cat is on the mat"), "the cat sat on the mat").reward


def test_clipping_takes_the_max_count_over_references_not_the_sum():
    # "the" ×4 against refs with "the" ×1 and ×2: clipped to 2 (not 3); "the the" ×3 clipped to 1;
    # longest-order n-grams never match. c = 4 > r = min(2, 3) so BP = 1.
    reward = sentence_bleu("the the the the", ["the cat", "the the dog"])
    assert reward == pytest.approx(bleu_by_hand([2, 1, 0, 0], [4, 3, 2, 1], 4, 2), abs=1e-6)


def test_the_brevity_penalty_uses_the_shortest_reference():
    reward = sentence_bleu("the cat", ["the cat sat", "the cat sat on the mat"])
    assert reward == pytest.approx(math.exp(1 - 3 / 2), abs=1e-6)


def test_end_tokens_and_whitespace_are_stripped_and_case_is_kept():
    verifier = BleuVerifier()
    assert verifier.verify(prompt("The cat sat."), "  The cat sat.<|im_end|>\n").reward == pytest.approx(1.0)
    assert verifier.verify(prompt("The cat sat."), "the cat sat.").reward < 1.0


def test_an_empty_completion_scores_zero_without_error():
    result = BleuVerifier().verify(prompt("the cat sat on the mat"), "  <|im_end|>")
    assert result.reward == 0.0 and not result.correct and result.error is None


@pytest.mark.parametrize("answer", ["", "   ", "[]", '["", " "]'])
def test_a_prompt_without_references_scores_zero_naming_the_field(answer):
    result = BleuVerifier().verify(prompt(answer), "the cat sat on the mat")
    assert result.reward == 0.0 and not result.correct
    assert result.error is not None and "'answer'" in result.error


def test_references_are_a_json_list_or_the_plain_string():
    assert references_of('["a b", "c d"]') == ["a b", "c d"]
    assert references_of("[not json") == ["[not json"]
    assert references_of("[1, 2]") == ["[1, 2]"]
    assert references_of("plain answer") == ["plain answer"]


def test_the_threshold_sets_correct():
    answer, completion = "the cat is on the mat", "the cat sat on the mat"
    reward = BleuVerifier().verify(prompt(answer), completion).reward
    assert BleuVerifier(threshold=reward).verify(prompt(answer), completion).correct
    assert not BleuVerifier(threshold=reward + 1e-3).verify(prompt(answer), completion).correct


def test_the_registry_knows_bleu_by_name():
    verifier = get_verifier("bleu")
    assert isinstance(verifier, BleuVerifier) and verifier.name == "bleu"
    assert safe_verify(verifier, prompt("a b c"), "a b c").reward == pytest.approx(1.0)


def test_a_jsonl_source_with_verifier_bleu_loads_and_scores(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": "Greet the user.", "answer": json.dumps(["Hello there!", "Hi, how are you?"])},
        {"prompt": "Name a colour.", "answer": "Blue is a colour."},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts, problems = load_table_prompts(JsonlSource(path=str(path), verifier="bleu"))
    assert problems == [] and len(prompts) == 2
    verifier = get_verifier(PromptPool.verifier_for(prompts[0]))
    assert isinstance(verifier, BleuVerifier)
    assert safe_verify(verifier, prompts[0], "Hi, how are you?").reward == pytest.approx(1.0)
    assert safe_verify(verifier, prompts[1], "Blue is a colour.").reward == pytest.approx(1.0)
    assert safe_verify(verifier, prompts[1], "Red.").reward < 0.5


def test_add_one_smoothing_lifts_a_one_word_miss():
    # p_1 = (0+1)/(1+1); orders 2-4 have no n-grams, (0+1)/(0+1) = 1; c = r = 1 so BP = 1
    assert sentence_bleu("yes", ["no"]) == pytest.approx(0.5**0.25, abs=1e-6)
