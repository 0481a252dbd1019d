"""Prompts from the dataset files people already have: JSONL, Parquet and Hugging Face datasets.

Each format is read with the library made for it (`json` line by line, `pyarrow.parquet` batch by
batch, `datasets.load_from_disk`); every row becomes a `Prompt` through one field mapping
(`FieldMapping`: dotted paths, a list tries each in turn), whose defaults read Orchard's layout
(`{"prompt", "answer", "distribution", "solution", "hints", "id"}`) and verl's preprocessed one as it is
(`prompt` as a list of chat messages, `reward_model.ground_truth`, `data_source`).

A row that cannot be used is a problem reported as `location: reason` (`file:line` for JSONL,
`file:row` for Parquet, `path[split]:row` for a saved dataset, rows counted from 1) and skipped, or
raised at once with `on_bad_line: error`. A file that cannot be read at all, a split that does not
exist or a source without one usable row is a `SourceError` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchard.config import FieldMapping, HFDatasetSource, JsonlSource, ParquetSource, TableSource
from orchard.records import CHAT_ROLES, ChatMessage, Prompt

#: Rows Parquet files are read in.
PARQUET_BATCH_ROWS = 4096


class SourceError(ValueError):
    """A prompt source that cannot be read or used; the message names the file (and row)."""


class RowProblem(ValueError):
    """One row that cannot become a prompt (the reason; the caller adds where)."""


_MISSING = object()


def lookup(record: Mapping[str, Any], path: str) -> Any:
    """The value at dotted `path` in nested mappings (`reward_model.ground_truth`), or `_MISSING`."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def mapped(record: Mapping[str, Any], fields: FieldMapping, part: str, *, required: bool) -> Any:
    """The first present value of `part`'s paths; None when absent and optional."""
    paths = fields.paths(part)
    for path in paths:
        value = lookup(record, path)
        if value is not _MISSING and value is not None:
            return value
    if required:
        tried = ", ".join(paths) or "no path"
        raise RowProblem(f"missing field {part!r} (looked for {tried})")
    return None


def chat_messages(value: Any) -> tuple[ChatMessage, ...]:
    """A list of `{role, content}` mappings as chat messages, or a `RowProblem` saying what is wrong."""
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("role"), str) or "content" not in item:
            raise RowProblem(f"prompt message {index} must be an object with 'role' and 'content'")
        if item["role"] not in CHAT_ROLES:
            raise RowProblem(f"prompt message {index} has role {item['role']!r}; expected one of {CHAT_ROLES}")
        if not isinstance(item["content"], str):
            raise RowProblem(f"prompt message {index} content must be a string, got {type(item['content']).__name__}")
        messages.append(ChatMessage(item["role"], item["content"]))
    if not any(message.role == "user" for message in messages):
        raise RowProblem("prompt messages hold no 'user' message")
    return tuple(messages)


def prompt_from_record(
    record: Any, source: TableSource, *, default_id: str, default_distribution: str, location: str = ""
) -> Prompt:
    """One row as a `Prompt`, or a `RowProblem` naming the field and what is wrong with it."""
    if not isinstance(record, Mapping):
        raise RowProblem(f"expected a JSON object, got {type(record).__name__}")
    fields = source.fields
    raw_prompt = mapped(record, fields, "prompt", required=True)
    if isinstance(raw_prompt, str):
        if not raw_prompt.strip():
            raise RowProblem("field 'prompt' must be a non-empty string or a list of chat messages")
        text, messages = raw_prompt, ()
    elif isinstance(raw_prompt, list | tuple):
        messages = chat_messages(raw_prompt)
        text = next(message.content for message in reversed(messages) if message.role == "user")
    else:
        raise RowProblem(
            f"field 'prompt' must be a non-empty string or a list of chat messages, got {type(raw_prompt).__name__}"
        )
    prompt_chars = sum(len(message.content) for message in messages) if messages else len(text)
    if prompt_chars > source.max_prompt_chars:
        raise RowProblem(f"prompt has {prompt_chars} characters (limit {source.max_prompt_chars})")
    answer = mapped(record, fields, "answer", required=True)
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise RowProblem(f"field 'answer' must be a string or a number, got {type(answer).__name__}")
    if len(str(answer)) > source.max_answer_chars:
        raise RowProblem(f"answer has {len(str(answer))} characters (limit {source.max_answer_chars})")
    distribution = mapped(record, fields, "distribution", required=False)
    if distribution is not None and not isinstance(distribution, str):
        raise RowProblem(f"field 'distribution' must be a string, got {type(distribution).__name__}")
    prompt_id = mapped(record, fields, "id", required=False)
    if prompt_id is not None and (isinstance(prompt_id, bool) or not isinstance(prompt_id, str | int)):
        raise RowProblem(f"field 'id' must be a string or an integer, got {type(prompt_id).__name__}")
    solution = mapped(record, fields, "solution", required=False)
    if solution is not None and (not isinstance(solution, str) or not solution.strip()):
        raise RowProblem("field 'solution' must be a non-empty string")
    if solution is not None and len(solution) > source.max_prompt_chars:
        raise RowProblem(f"solution has {len(solution)} characters (limit {source.max_prompt_chars})")
    hints = mapped(record, fields, "hints", required=False)
    if hints is not None and (
        not isinstance(hints, list | tuple) or not all(isinstance(hint, str) and hint.strip() for hint in hints)
    ):
        raise RowProblem("field 'hints' must be a list of non-empty strings, abstract to concrete")
    if hints is not None and sum(len(hint) for hint in hints) > source.max_prompt_chars:
        raise RowProblem(f"hints have {sum(len(hint) for hint in hints)} characters (limit {source.max_prompt_chars})")
    return Prompt(
        id=str(prompt_id) if prompt_id is not None else default_id,
        text=text,
        answer=str(answer),
        distribution=distribution or default_distribution,
        metadata={"verifier": source.verifier, "source": location},
        solution=solution,
        hints=tuple(hints or ()),
        messages=messages,
    )


# ------------------------------------------------------------------------------------------- formats


def jsonl_rows(path: Path) -> Iterator[tuple[str, str, Any]]:
    """`(location, default id, record)` per non-blank line; an unparseable line yields its `RowProblem`."""
    if not path.is_file():
        raise SourceError(f"{path}: prompt file not found")
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as error:
                record = RowProblem(f"not valid JSON ({error.msg} at column {error.colno})")
            yield f"{path}:{number}", f"{path.stem}-{number}", record


def parquet_files(path: Path) -> list[Path]:
    """The Parquet file, or a directory's `*.parquet` files in name order."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise SourceError(f"{path}: directory holds no *.parquet files")
        return files
    if not path.is_file():
        raise SourceError(f"{path}: Parquet file not found")
    return [path]


def parquet_rows(path: Path) -> Iterator[tuple[str, str, Any]]:
    """`(location, default id, record)` of every row of the Parquet file(s), read batch by batch."""
    import pyarrow.parquet as pq

    for file in parquet_files(path):
        try:
            reader = pq.ParquetFile(file)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for files it cannot read
            raise SourceError(f"{file}: not a readable Parquet file ({error})") from None
        number = 0
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                yield f"{file}:{number}", f"{file.stem}-{number}", record


def hf_dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, str, Any]]:
    """`(location, default id, record)` of a dataset written with `save_to_disk` (a `DatasetDict`'s
    `split`, or a single `Dataset`, whose rows are read whatever `split` says)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if not path.is_dir():
        raise SourceError(f"{path}: saved dataset directory not found")
    try:
        loaded = load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, ... for what it cannot read
        raise SourceError(f"{path}: not a dataset written by save_to_disk ({error})") from None
    if isinstance(loaded, DatasetDict):
        if split is None or split not in loaded:
            raise SourceError(f"{path}: split {split!r} not in the dataset; it has {sorted(loaded)}")
        dataset: Dataset = loaded[split]
        where, stem = f"{path}[{split}]", f"{path.name}-{split}"
    else:
        dataset, where, stem = loaded, str(path), path.name
    for number, record in enumerate(dataset, start=1):
        yield f"{where}:{number}", f"{stem}-{number}", record


def source_rows(source: JsonlSource | ParquetSource | HFDatasetSource) -> Iterator[tuple[str, str, Any]]:
    path = Path(source.path)
    if isinstance(source, JsonlSource):
        return jsonl_rows(path)
    if isinstance(source, ParquetSource):
        return parquet_rows(path)
    return hf_dataset_rows(path, source.split)


def load_table_prompts(source: JsonlSource | ParquetSource | HFDatasetSource) -> tuple[list[Prompt], list[str]]:
    """Prompts of a file-backed source and the problems found as `location: reason`; with
    `on_bad_line: error` the first problem raises. Ids must be unique within the source."""
    name = Path(source.path).stem
    prompts: list[Prompt] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    for location, default_id, record in source_rows(source):
        try:
            if isinstance(record, RowProblem):
                raise record
            prompt = prompt_from_record(
                record, source, default_id=default_id, default_distribution=name, location=location
            )
            if prompt.id in seen_ids:
                raise RowProblem(f"duplicate id {prompt.id!r}")
        except RowProblem as problem:
            message = f"{location}: {problem}"
            if source.on_bad_line == "error":
                raise SourceError(message) from None
            problems.append(message)
            continue
        seen_ids.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        first = f"; the first: {problems[0]}" if problems else ""
        raise SourceError(f"{source.path}: no usable prompts ({len(problems)} bad rows{first})")
    return prompts, problems
