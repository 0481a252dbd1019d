"""Reference solutions and tiered hints on prompts: procedural tasks know theirs, JSONL files may give them."""

from __future__ import annotations

import json
import random
import re

import pytest

from orchard.verifiers.procedural import FAMILIES, answer_hints, generate_prompt
from orchard.verifiers.sources import SourceError, load_jsonl_prompts


def test_answer_hints_go_from_shape_to_a_concrete_prefix():
    assert answer_hints("95") == ("len 2", "len 2, starts 9", "starts 9")
    assert answer_hints("1234") == ("len 4", "len 4, starts 1", "starts 12")
    assert answer_hints("12345") == ("len 5", "len 5, starts 1", "starts 123")
    assert answer_hints("7") == ("len 1", "len 1, starts 7", "starts 7")
    with pytest.raises(ValueError):
        answer_hints("")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_procedural_prompt_carries_its_solution_and_three_hints(family):
    rng = random.Random(7)
    for difficulty in (1, 2, 3):
        prompt = generate_prompt(family, difficulty, rng)
        assert prompt.solution == prompt.answer
        assert len(prompt.hints) == 3
        # each tier tells more: the last one is a prefix of the answer itself
        assert prompt.hints[2].startswith("starts ") and prompt.answer.startswith(prompt.hints[2][len("starts ") :])
        assert str(len(prompt.answer)) in prompt.hints[0]


def write(tmp_path, *records):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_jsonl_solution_and_hints_are_optional(tmp_path):
    path = write(
        tmp_path,
        {"prompt": "What is 2+2?", "answer": "4", "solution": "2+2 = 4, so \\boxed{4}", "hints": ["add", "2+2"]},
        {"prompt": "What is 3+3?", "answer": "6"},
    )
    prompts, problems = load_jsonl_prompts(path, verifier="math")
    assert problems == []
    assert prompts[0].solution == "2+2 = 4, so \\boxed{4}" and prompts[0].hints == ("add", "2+2")
    assert prompts[1].solution is None and prompts[1].hints == ()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"solution": 4}, "field 'solution' must be a non-empty string"),
        ({"solution": "  "}, "field 'solution' must be a non-empty string"),
        ({"hints": "add"}, "field 'hints' must be a list of non-empty strings, abstract to concrete"),
        ({"hints": ["add", 3]}, "field 'hints' must be a list of non-empty strings, abstract to concrete"),
        ({"solution": "x" * 50}, "solution has 50 characters (limit 40)"),
    ],
)
def test_bad_solution_or_hints_are_reported_by_line(tmp_path, extra, reason):
    path = write(
        tmp_path, {"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "What is 3+3?", "answer": "6", **extra}
    )
    prompts, problems = load_jsonl_prompts(path, verifier="math", max_prompt_chars=40)
    assert len(prompts) == 1
    assert problems == [f"{path}:2: {reason}"]
    with pytest.raises(SourceError, match=re.escape(reason)):
        load_jsonl_prompts(path, verifier="math", on_bad_line="error", max_prompt_chars=40)
