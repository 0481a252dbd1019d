"""What the trainer tests share: the tokenizer, a tiny model's config, and DeepSpeed's environment kept
from leaking into other test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from orchard.config import ModelConfig, TinyModelConfig
from orchard.rollout.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()
MODEL_CONFIG = ModelConfig(
    tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
)


@pytest.fixture(scope="module", autouse=True)
def restore_environment() -> Iterator[None]:
    """The trainer sets DeepSpeed's rank variables in `os.environ`; put them back after the module."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
