"""Prompt sources and the held-out split, as pure functions over files and generators."""

from __future__ import annotations

import json
import random

import pytest

from orchard.config import DataConfig
from orchard.verifiers.sources import PromptPool, SourceError, load_jsonl_prompts


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "1+1=", "answer": 2, "distribution": "easy"})


def test_jsonl_loads_fields_and_reports_bad_lines_with_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "tasks.jsonl",
        [
            GOOD,
            "{not json",
            json.dumps({"prompt": "2+2="}),
            json.dumps({"prompt": 5, "answer": "5"}),
            "",
            json.dumps({"prompt": "x" * 50, "answer": "1"}),
            json.dumps({"prompt": "3+3=", "answer": "6", "id": "six"}),
        ],
    )
    prompts, problems = load_jsonl_prompts(path, verifier="math", max_prompt_chars=40)
    assert [(p.id, p.text, p.answer, p.distribution) for p in prompts] == [
        ("tasks-1", "1+1=", "2", "easy"),
        ("six", "3+3=", "6", "tasks"),
    ]
    assert prompts[0].metadata["verifier"] == "math"
    assert [problem.split(": ", 1)[0] for problem in problems] == [f"{path}:{n}" for n in (2, 3, 4, 6)]
    assert "not valid JSON" in problems[0]
    assert "missing field 'answer'" in problems[1]
    assert "'prompt' must be a non-empty string" in problems[2]
    assert "limit 40" in problems[3]


def test_jsonl_error_mode_raises_at_the_first_bad_line(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(SourceError, match=r"t\.jsonl:2: expected a JSON object"):
        load_jsonl_prompts(path, verifier="math", on_bad_line="error")


def test_missing_or_empty_files_are_named(tmp_path):
    with pytest.raises(SourceError, match="nope.jsonl: prompt file not found"):
        load_jsonl_prompts(tmp_path / "nope.jsonl", verifier="math")
    with pytest.raises(SourceError, match="no usable prompts"):
        load_jsonl_prompts(write_lines(tmp_path / "bad.jsonl", ["{"]), verifier="math")


def test_procedural_training_prompts_never_include_held_out_ones():
    data = DataConfig(held_out_size=300, seed=5)
    pool = PromptPool.from_config(data)
    assert len(pool.held_out) == 300
    assert {p.distribution for p in pool.held_out} == set(pool.distributions)
    held = {p.text for p in pool.held_out}
    train = pool.sample_train(20_000, random.Random(0))
    assert not held & {p.text for p in train}
    assert {p.distribution for p in train} == set(pool.distributions)


def test_the_split_is_deterministic_under_the_seed():
    first = PromptPool.from_config(DataConfig(held_out_size=20, seed=1)).held_out
    again = PromptPool.from_config(DataConfig(held_out_size=20, seed=1)).held_out
    other = PromptPool.from_config(DataConfig(held_out_size=20, seed=2)).held_out
    assert first == again and first != other


def test_sources_share_the_held_out_set_by_weight(tmp_path):
    path = write_lines(
        tmp_path / "math.jsonl",
        [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "distribution": "plus"}) for i in range(40)],
    )
    data = DataConfig.model_validate(
        {
            "held_out_size": 20,
            "sources": [
                {"kind": "procedural", "families": ["addition"], "difficulties": [1], "weight": 1},
                {"kind": "jsonl", "path": str(path), "weight": 3},
            ],
        }
    )
    pool = PromptPool.from_config(data)
    assert sum(p.distribution == "plus" for p in pool.held_out) == 15
    assert pool.distributions == ["addition/d1", "plus"]
    train = pool.sample_train(400, random.Random(0))
    assert not {p.text for p in pool.held_out} & {p.text for p in train}
    assert 0.6 < sum(p.distribution == "plus" for p in train) / 400 < 0.9
    assert PromptPool.verifier_for(train[0]) in {"math", "procedural"}


def test_a_small_file_cannot_spare_its_held_out_set(tmp_path):
    path = write_lines(tmp_path / "few.jsonl", [GOOD])
    data = DataConfig.model_validate({"held_out_size": 5, "sources": [{"kind": "jsonl", "path": str(path)}]})
    with pytest.raises(SourceError, match="cannot spare 5"):
        PromptPool.from_config(data)


def test_size_limits_come_from_the_source_config(tmp_path):
    from orchard.config import JsonlSource

    path = tmp_path / "sized.jsonl"
    lines = [
        {"prompt": "q" * 50, "answer": "1", "distribution": "d"},
        {"prompt": "ok", "answer": "2" * 20, "distribution": "d"},
    ]
    lines += [{"prompt": f"p{i}", "answer": str(i), "distribution": "d"} for i in range(10)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = JsonlSource(path=str(path), max_prompt_chars=40, max_answer_chars=10)
    pool = PromptPool.from_config(DataConfig(sources=[source], held_out_size=2))
    assert [problem.split(": ", 1)[0] for problem in pool.problems] == [f"{path}:1", f"{path}:2"]
    assert "prompt has 50 characters (limit 40)" in pool.problems[0]
    assert "answer has 20 characters (limit 10)" in pool.problems[1]
    with pytest.raises(SourceError, match=r"sized.jsonl:1"):
        PromptPool.from_config(
            DataConfig(sources=[source.model_copy(update={"on_bad_line": "error"})], held_out_size=2)
        )
