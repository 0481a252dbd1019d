"""The declared weight-source protocols the engines check (orchard/protocols.py) instead of probing
attributes: what each transport hands an engine satisfies them, and anything else is refused."""

import pytest

from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
from orchard.protocols import PinnableWeightSource, WeightSource
from orchard.rollout.weight_broadcast import BroadcastSource
from orchard.rollout.worker import RolloutWorkerCore


def test_a_broadcast_source_is_a_weight_source_that_cannot_be_pinned():
    source = BroadcastSource(group=None, version=1, layout=(), bucket_bytes=1)
    assert isinstance(source, WeightSource) and not isinstance(source, PinnableWeightSource)


def test_an_engine_refuses_what_is_neither_a_mapping_nor_a_weight_source():
    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    worker = RolloutWorkerCore("w", ModelConfig(tiny=tiny), RolloutConfig(max_new_tokens=2), seed=0)

    class Layout:  # a layout and a version, but nothing to copy from
        version = 1
        layout = ()

    with pytest.raises(TypeError, match="weight source with `version`, `layout` and `copy_into`, not a Layout"):
        worker.engine.load_weights(Layout(), 1)
