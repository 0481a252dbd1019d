"""Prompts from Parquet files, saved Hugging Face datasets and JSONL with a field mapping, in verl's
preprocessed layout and in others, with every bad row and file named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from orchard.config import DataConfig, HFDatasetSource, JsonlSource, ParquetSource, load_config
from orchard.records import ChatMessage, Completion, Group
from orchard.verifiers.datasets import SourceError, load_table_prompts
from orchard.verifiers.sources import PromptPool


def verl_row(index: int, *, source: str = "openai/gsm8k") -> dict:
    """One row as verl's examples/data_preprocess/gsm8k.py writes it."""
    question = f"Natalia sold {index} clips. How many?"
    return {
        "data_source": source,
        "prompt": [
            {"role": "system", "content": "You are a careful solver."},
            {"role": "user", "content": question + " Let's think step by step and output the final answer after ####."},
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(index * 2)},
        "extra_info": {"split": "train", "index": index, "question": question},
    }


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_reads_as_it_is_with_the_default_mapping(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [verl_row(i) for i in range(3)] + [verl_row(9, source="math")])
    prompts, problems = load_table_prompts(ParquetSource(path=str(path)))
    assert problems == []
    first = prompts[0]
    assert first.answer == "0" and first.distribution == "openai/gsm8k" and first.id == "train-1"
    assert first.messages == (
        ChatMessage("system", "You are a careful solver."),
        ChatMessage(
            "user", "Natalia sold 0 clips. How many? Let's think step by step and output the final answer after ####."
        ),
    )
    assert first.text == first.messages[-1].content  # the question the verifier and hints read
    assert first.metadata == {"verifier": "math", "source": f"{path}:1"}
    assert [p.distribution for p in prompts] == ["openai/gsm8k"] * 3 + ["math"]


def test_a_parquet_directory_is_read_file_by_file_in_name_order(tmp_path):
    write_parquet(tmp_path / "part-1.parquet", [verl_row(10), verl_row(11)])
    write_parquet(tmp_path / "part-0.parquet", [verl_row(0)])
    (tmp_path / "notes.txt").write_text("not data")
    prompts, _ = load_table_prompts(ParquetSource(path=str(tmp_path)))
    assert [p.answer for p in prompts] == ["0", "20", "22"]
    assert [p.metadata["source"] for p in prompts] == [
        f"{tmp_path / 'part-0.parquet'}:1",
        f"{tmp_path / 'part-1.parquet'}:1",
        f"{tmp_path / 'part-1.parquet'}:2",
    ]


def test_a_saved_dataset_dict_is_read_by_split(tmp_path):
    rows = {"question": ["2+2?", "3+3?"], "final": [4, 6], "topic": ["add", "add"]}
    DatasetDict(
        {"train": Dataset.from_dict(rows), "test": Dataset.from_dict({k: v[:1] for k, v in rows.items()})}
    ).save_to_disk(str(tmp_path / "saved"))
    fields = {"prompt": "question", "answer": "final", "distribution": "topic"}
    prompts, _ = load_table_prompts(HFDatasetSource(path=str(tmp_path / "saved"), split="train", fields=fields))
    assert [(p.text, p.answer, p.distribution) for p in prompts] == [("2+2?", "4", "add"), ("3+3?", "6", "add")]
    assert prompts[1].metadata["source"] == f"{tmp_path / 'saved'}[train]:2"
    test, _ = load_table_prompts(HFDatasetSource(path=str(tmp_path / "saved"), split="test", fields=fields))
    assert len(test) == 1
    with pytest.raises(SourceError, match=r"split 'validation' not in the dataset; it has \['test', 'train'\]"):
        load_table_prompts(HFDatasetSource(path=str(tmp_path / "saved"), split="validation", fields=fields))


def test_a_saved_single_dataset_and_verl_layout_through_datasets(tmp_path):
    Dataset.from_list([verl_row(i) for i in range(2)]).save_to_disk(str(tmp_path / "one"))
    prompts, _ = load_table_prompts(HFDatasetSource(path=str(tmp_path / "one"), split=None))
    assert [p.answer for p in prompts] == ["0", "2"] and prompts[0].messages[0].role == "system"


def test_jsonl_with_its_own_field_names_and_nested_paths(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "".join(
            json.dumps({"q": f"{i}*2?", "meta": {"gold": i * 2, "level": "l1"}, "uid": f"u{i}"}) + "\n"
            for i in range(3)
        )
    )
    fields = {"prompt": "q", "answer": "meta.gold", "distribution": "meta.level", "id": "uid"}
    prompts, problems = load_table_prompts(JsonlSource(path=str(path), fields=fields))
    assert problems == [] and [(p.id, p.text, p.answer, p.distribution) for p in prompts][0] == (
        "u0",
        "0*2?",
        "0",
        "l1",
    )


def test_bad_rows_are_named_with_the_field_and_skipped_or_refused(tmp_path):
    rows = [
        verl_row(1),
        {**verl_row(2), "reward_model": {"style": "rule"}},  # no ground truth
        {**verl_row(3), "prompt": [{"role": "robot", "content": "hi"}]},
        {**verl_row(4), "prompt": [{"role": "system", "content": "only a system message"}]},
        {**verl_row(5), "reward_model": {"style": "rule", "ground_truth": ["a", "b"]}},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts, problems = load_table_prompts(JsonlSource(path=str(path)))
    assert [p.answer for p in prompts] == ["2"]
    assert problems == [
        f"{path}:2: missing field 'answer' (looked for answer, reward_model.ground_truth)",
        f"{path}:3: prompt message 0 has role 'robot'; expected one of ('system', 'user', 'assistant')",
        f"{path}:4: prompt messages hold no 'user' message",
        f"{path}:5: field 'answer' must be a string or a number, got list",
    ]
    with pytest.raises(SourceError, match=r"mixed\.jsonl:2: missing field 'answer'"):
        load_table_prompts(JsonlSource(path=str(path), on_bad_line="error"))


def test_a_mapped_field_absent_from_every_row_names_field_and_file(tmp_path):
    path = write_parquet(tmp_path / "wrong.parquet", [{"question": "1+1?", "label": "2"}] * 3)
    with pytest.raises(SourceError) as raised:
        load_table_prompts(ParquetSource(path=str(path), fields={"prompt": "question"}))
    message = str(raised.value)
    assert "wrong.parquet: no usable prompts (3 bad rows" in message
    assert "missing field 'answer' (looked for answer, reward_model.ground_truth)" in message


def test_unreadable_and_empty_sources_are_named(tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_text("this is not parquet")
    with pytest.raises(SourceError, match=r"fake\.parquet: not a readable Parquet file"):
        load_table_prompts(ParquetSource(path=str(fake)))
    with pytest.raises(SourceError, match=r"missing\.parquet: Parquet file not found"):
        load_table_prompts(ParquetSource(path=str(tmp_path / "missing.parquet")))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(SourceError, match="holds no \\*.parquet files"):
        load_table_prompts(ParquetSource(path=str(tmp_path / "empty-dir")))
    empty = write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(SourceError, match=r"empty\.parquet: no usable prompts \(0 bad rows\)"):
        load_table_prompts(ParquetSource(path=str(empty)))
    (tmp_path / "not-saved").mkdir()
    with pytest.raises(SourceError, match="not a dataset written by save_to_disk"):
        load_table_prompts(HFDatasetSource(path=str(tmp_path / "not-saved")))


def test_a_parquet_source_in_a_run_config_joins_the_pool(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [verl_row(i) for i in range(20)])
    config = load_config(None, [f"data.sources=[{{kind: parquet, path: '{path}'}}]", "data.held_out_size=5"])
    pool = PromptPool.from_config(config.data)
    assert len(pool.held_out) == 5 and pool.distributions == ["openai/gsm8k"]
    assert isinstance(config.data, DataConfig)


def test_a_group_of_a_chat_prompt_round_trips_through_msgpack(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [verl_row(3)])
    [prompt], _ = load_table_prompts(ParquetSource(path=str(path)))
    group = Group(prompt=prompt, prompt_token_ids=[1, 2], completions=[Completion("6", [5], [-0.1], 0, reward=1.0)])
    again = Group.from_bytes(group.to_bytes())
    assert again.prompt == prompt and again.prompt.messages[1].content.startswith("Natalia sold 3")
