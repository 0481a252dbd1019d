"""The broadcast's pure parts: how bytes are cut into buckets, the layout and its digest."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from orchard.rollout.weight_broadcast import BroadcastSpec, BroadcastTicket, layout_digest, layout_of, plan_buckets
from orchard.services.weights.sync import WeightSync, WeightVersionError

specs = st.lists(
    st.builds(
        BroadcastSpec,
        name=st.text("abc", min_size=1, max_size=3),
        dtype=st.sampled_from(["float32", "bfloat16", "float16", "float64"]),
        shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    ),
    max_size=8,
)


@given(layout=specs, bucket_bytes=st.integers(1, 300))
def test_every_byte_lies_in_exactly_one_bucket_and_buckets_are_bounded(layout, bucket_bytes):
    plan = plan_buckets(layout, bucket_bytes)
    total = sum(spec.nbytes for spec in layout)
    assert len(plan) == math.ceil(total / bucket_bytes)
    covered = [set() for _ in layout]
    for index, pieces in enumerate(plan):
        size = sum(piece.nbytes for piece in pieces)
        assert 0 < size <= bucket_bytes
        if index < len(plan) - 1:
            assert size == bucket_bytes  # every bucket but the last is full
        offset = 0
        for piece in pieces:
            assert piece.bucket_offset == offset and piece.nbytes > 0
            offset += piece.nbytes
            new = set(range(piece.tensor_offset, piece.tensor_offset + piece.nbytes))
            assert not covered[piece.tensor] & new
            covered[piece.tensor] |= new
    assert [len(bytes_) for bytes_ in covered] == [spec.nbytes for spec in layout]


def test_layout_leaves_out_tied_aliases_and_keeps_dtypes():
    embedding = torch.zeros(5, 3)
    state = {"embed.weight": embedding, "norm.weight": torch.ones(3, dtype=torch.bfloat16), "lm_head.weight": embedding}
    layout = layout_of(state)
    assert [(s.name, s.dtype, s.shape) for s in layout] == [
        ("embed.weight", "float32", (5, 3)),
        ("norm.weight", "bfloat16", (3,)),
    ]
    assert layout[1].nbytes == 6


def test_digest_changes_with_any_name_dtype_or_shape():
    base = (BroadcastSpec("a", "float32", (2, 3)),)
    others = [
        (BroadcastSpec("b", "float32", (2, 3)),),
        (BroadcastSpec("a", "bfloat16", (2, 3)),),
        (BroadcastSpec("a", "float32", (3, 2)),),
    ]
    assert len({layout_digest(base), *(layout_digest(other) for other in others)}) == 4


def test_a_ticket_is_published_as_a_broadcast_of_its_own_version():
    sync = WeightSync()
    assert sync.publish(1, BroadcastTicket(1)).transport == "broadcast"
    with pytest.raises(WeightVersionError, match="ticket for version 3"):
        sync.publish(2, BroadcastTicket(3))
