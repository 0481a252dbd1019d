"""The shared-memory weight store: real /dev/shm segments, real reader processes (local Ray actors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
from orchard.learner.weights import numpy_to_state_dict, state_dict_to_numpy
from orchard.protocols import PinnableWeightSource
from orchard.rollout.engines.torch_engine import TorchEngine
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import load_tokenizer
from orchard.rollout.worker import RolloutWorker
from orchard.services.weights.store import (
    SEGMENT_DIR,
    SEGMENT_PREFIX,
    LayoutMismatchError,
    NonFiniteWeightsError,
    SharedWeightStore,
    TornReadError,
    WeightStoreError,
    read_into,
    sweep_stale_segments,
)
from orchard.services.weights.sync import WeightSync

pytestmark = pytest.mark.skipif(not SEGMENT_DIR.is_dir(), reason="needs /dev/shm")

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
MODEL = ModelConfig(tiny=TINY)


def our_segments() -> set[str]:
    return {path.name for path in SEGMENT_DIR.glob(f"{SEGMENT_PREFIX}-*-{os.getpid()}-*")}


@pytest.fixture(autouse=True)
def no_leak():
    before = our_segments()
    yield
    assert our_segments() == before, "a test left a shared-memory segment behind"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def weights(tokenizer, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(MODEL, tokenizer)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return {name: tensor.detach() for name, tensor in model.to(dtype).state_dict().items()}  # tied stay tied


def empty_like(state):
    return {name: torch.zeros_like(tensor) for name, tensor in state.items()}


def engine(tokenizer, dtype: str = "float32") -> TorchEngine:
    return TorchEngine(build_model(ModelConfig(tiny=TINY, dtype=dtype), tokenizer), tokenizer)


def assert_holds(engine_: TorchEngine, state) -> None:
    for name, parameter in engine_.model.named_parameters():
        assert torch.equal(parameter, state[name].to(parameter.dtype)), name


# ------------------------------------------------------------------------------------------ the store


def test_a_handle_reads_back_exactly_what_was_written(tokenizer):
    state = weights(tokenizer, 1)
    with SharedWeightStore() as store:
        handle = store.write(1, state)
        assert handle.version == 1 and (SEGMENT_DIR / handle.segment).exists()
        assert isinstance(handle, PinnableWeightSource)  # what the engines accept (orchard/protocols.py)
        targets = empty_like(state)
        assert read_into(handle, targets) == 1
        for name in state:
            assert torch.equal(targets[name], state[name]), name
        # tied embeddings are stored once, under both names
        specs = {spec.name: spec for spec in handle.layout}
        assert specs["lm_head.weight"].offset == specs["model.embed_tokens.weight"].offset


def test_versions_only_move_forward(tokenizer):
    state = weights(tokenizer, 1)
    with SharedWeightStore() as store:
        store.write(3, state)
        with pytest.raises(WeightStoreError, match="version 3 is already"):
            store.write(3, state)
        with pytest.raises(WeightStoreError, match="cannot write policy version 2"):
            store.write(2, state)
        assert store.write(4, state).version == 4


def test_a_handle_overwritten_by_two_newer_versions_reads_the_newest(tokenizer):
    """A worker still generating with v while v+1 and v+2 are written: its later read gets v+2."""
    states = [weights(tokenizer, seed) for seed in range(3)]
    with SharedWeightStore() as store:
        old = store.write(1, states[0])
        store.write(2, states[1])
        targets = empty_like(states[0])
        assert read_into(old, targets) == 1  # v+1 went to the other slot: v is intact
        store.write(3, states[2])
        assert read_into(old, targets) == 3
        for name in targets:
            assert torch.equal(targets[name], states[2][name]), name


def test_a_read_torn_by_the_writer_is_detected_and_repeated(tokenizer):
    states = [weights(tokenizer, seed) for seed in range(3)]
    with SharedWeightStore() as store:
        handle = store.write(1, states[0])
        writes = iter([2, 3])

        def copy_while_the_writer_overwrites(target, source):
            version = next(writes, None)
            if version is not None:  # mid-read of the first attempt: v+1, then v+2 over the slot being read
                store.write(version, states[version - 1])
                store.write(next(writes), states[2])
            target.copy_(source)

        targets = empty_like(states[0])
        assert read_into(handle, targets, copy=copy_while_the_writer_overwrites) == 3
        for name in targets:
            assert torch.equal(targets[name], states[2][name]), name

        handle = store.latest
        writes = iter([4, 5])
        with pytest.raises(TornReadError, match="overwritten by the writer"):
            read_into(
                handle,
                empty_like(states[0]),
                max_retries=0,
                copy=lambda t, s: (next(writes, None) and store.write(store.latest.version + 1, states[0]), t.copy_(s)),
            )


def test_a_removed_segment_is_named_in_the_error(tokenizer):
    state = weights(tokenizer, 1)
    store = SharedWeightStore()
    handle = store.write(1, state)
    read_into(handle, empty_like(state))  # mapped in this process
    store.close()
    assert not (SEGMENT_DIR / handle.segment).exists()
    with pytest.raises(WeightStoreError, match=f"{handle.segment}.*closed"):
        read_into(handle, empty_like(state))
    with pytest.raises(WeightStoreError, match=f"{handle.segment}.*does not exist"):
        read_into(handle, empty_like(state))  # a process that never mapped it


def test_a_state_dict_of_another_layout_is_refused(tokenizer):
    state = weights(tokenizer, 1)
    with SharedWeightStore() as store:
        store.write(1, state)
        wrong = dict(state)
        wrong["model.norm.weight"] = torch.ones(7)
        with pytest.raises(LayoutMismatchError, match=r"'model\.norm\.weight' is float32 \(7,\)"):
            store.write(2, wrong)
        assert store.latest.version == 1


def test_non_finite_weights_are_never_published(tokenizer):
    state = weights(tokenizer, 1)
    with SharedWeightStore() as store:
        good = store.write(1, state)
        bad = dict(state)
        bad["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"].clone()
        bad["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        with pytest.raises(NonFiniteWeightsError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' holds NaN"):
            store.write(2, bad)
        targets = empty_like(state)
        assert read_into(good, targets) == 1
        assert all(torch.equal(targets[name], state[name]) for name in state)
        assert store.write(2, state).version == 2


def test_a_writer_that_dies_leaves_no_segment(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys, torch
        from orchard.services.weights.store import SharedWeightStore
        store = SharedWeightStore()
        store.write(1, {"w": torch.ones(1000)})
        print(store.segment, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    segment = result.stdout.strip()
    assert segment.startswith(SEGMENT_PREFIX)
    deadline = time.monotonic() + 10
    while (SEGMENT_DIR / segment).exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # Python's resource tracker removes it once the writer is gone
    sweep_stale_segments()  # and a new store would sweep it if the tracker had been killed too
    assert not (SEGMENT_DIR / segment).exists()


# ------------------------------------------------------------------------------------------ the engine


@pytest.mark.parametrize("num_slots", [2, 4], ids=["copying", "pinning"])
def test_the_engine_loads_a_handle_and_matches_a_fresh_engine(tokenizer, num_slots):
    states = [weights(tokenizer, seed) for seed in range(3)]
    target = engine(tokenizer)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with SharedWeightStore(num_slots=num_slots) as store:
        for version, state in enumerate(states, start=1):
            assert target.load_weights(store.write(version, state), version) == version
            assert (target._pinned is not None) == (num_slots > 2)
            fresh = engine(tokenizer)
            fresh.model.load_state_dict(state)
            fresh.refresh()
            # the fused tensors the forward reads were updated by the copy itself (no refresh)
            assert torch.equal(target.logits(ids), fresh.logits(ids))
            assert_holds(target, state)
    assert target.policy_version == 3


def test_a_pinned_version_is_never_overwritten_while_the_engine_uses_it(tokenizer):
    """A worker still generating with v is not disturbed by v+1, v+2, ...: the writer skips its slot."""
    states = [weights(tokenizer, seed) for seed in range(4)]
    target = engine(tokenizer)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with SharedWeightStore(num_slots=3, wait_seconds=0.2) as store:
        target.load_weights(store.write(1, states[0]), 1)
        logits = target.logits(ids)
        for version in range(2, 6):
            store.write(version, states[version % 4])
        assert torch.equal(target.logits(ids), logits)
        assert_holds(target, states[0])
        # a second engine pins version 5; 6 takes the last free slot, and then every slot but the
        # newest is pinned: the writer waits, then gives up
        other = engine(tokenizer)
        other.load_weights(store.latest, 5)
        store.write(6, states[2])
        with pytest.raises(WeightStoreError, match="pinned by a reader"):
            store.write(7, states[3])
        assert_holds(target, states[0])
        assert_holds(other, states[1])
        # loading a newer version releases the old pin
        assert target.load_weights(store.latest, 6) == 6
        store.write(7, states[3])
        assert_holds(target, states[2])
        # a copy into the engine (the object-store path) gives it memory of its own again
        other.load_weights(states[0], 8)
        assert other._pinned is None
        assert_holds(other, states[0])
        fresh = engine(tokenizer)
        fresh.load_weights(states[0], 1)
        assert torch.equal(other.logits(ids), fresh.logits(ids))
        store.write(8, states[0])  # the slot `other` held is free again


def test_a_reader_that_dies_releases_its_pin(tokenizer, tmp_path):
    import pickle

    state = weights(tokenizer, 1)
    with SharedWeightStore(num_slots=3, wait_seconds=0.2) as store:
        handles = [store.write(1, state), store.write(2, state)]
        (tmp_path / "handles").write_bytes(pickle.dumps(handles))
        script = textwrap.dedent(
            f"""
            import pickle
            handles = pickle.loads(open({str(tmp_path / "handles")!r}, "rb").read())
            pins = [handle.pin() for handle in handles]
            print(*[pinned.version for pinned in pins], flush=True)
            input()
            """
        )
        repo = Path(__file__).resolve().parents[2]
        reader = subprocess.Popen(
            [sys.executable, "-c", script], cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert reader.stdout.readline().split() == ["1", "2"]
            store.write(3, state)
            with pytest.raises(WeightStoreError, match="pinned by a reader"):
                store.write(4, state)  # slots of 1 and 2 pinned by the reader, that of 3 the newest
        finally:
            reader.kill()
            reader.wait()
        assert store.write(4, state).version == 4


def test_a_handle_of_another_layout_is_refused_and_the_engine_is_unchanged(tokenizer):
    target = engine(tokenizer)
    state = weights(tokenizer, 1)
    target.load_weights(state, 1)
    ids = torch.tensor([[1, 5, 9]])
    logits = target.logits(ids)
    other = TinyModelConfig(hidden_size=32, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    other_state = {n: t.detach() for n, t in build_model(ModelConfig(tiny=other), tokenizer).state_dict().items()}
    with SharedWeightStore() as store:
        handle = store.write(2, other_state)
        with pytest.raises(
            ValueError, match=r"refused version 2.*'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"
        ):
            target.load_weights(handle, 2)
    assert target.policy_version == 1
    assert torch.equal(target.logits(ids), logits)
    assert_holds(target, state)


def test_a_handle_must_carry_the_version_it_is_loaded_as(tokenizer):
    target = engine(tokenizer)
    with SharedWeightStore() as store:
        handle = store.write(2, weights(tokenizer, 1))
        with pytest.raises(ValueError, match="version 3 with weights of version 2"):
            target.load_weights(handle, 3)
    assert target.policy_version == 0


@pytest.mark.parametrize("num_slots", [2, 4], ids=["copying", "pinning"])
@pytest.mark.parametrize("engine_dtype", ["float32", "bfloat16"])
def test_bfloat16_weights_load_as_through_the_object_store_path(tokenizer, engine_dtype, num_slots):
    """bf16 is stored as bf16 (raw bytes); the object-store path widens it to float32. Same result."""
    state = weights(tokenizer, 1, dtype=torch.bfloat16)
    by_numpy, by_handle = engine(tokenizer, engine_dtype), engine(tokenizer, engine_dtype)
    by_numpy.load_weights(numpy_to_state_dict(state_dict_to_numpy(state)), 1)
    with SharedWeightStore(num_slots=num_slots) as store:
        handle = store.write(1, state)
        assert {spec.dtype for spec in handle.layout} == {"bfloat16"}
        by_handle.load_weights(handle, 1)
        # a bf16 engine views a pinnable store's version; a float32 one copies (and casts)
        assert (by_handle._pinned is not None) == (num_slots > 2 and engine_dtype == "bfloat16")
    for (name, a), (_, b) in zip(by_numpy.model.named_parameters(), by_handle.model.named_parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


# ------------------------------------------------------------------------------------------ Ray workers


@pytest.mark.parametrize("num_slots", [2, 4], ids=["copying", "pinning"])
def test_two_worker_actors_load_through_handles(ray_local, tokenizer, num_slots):
    rollout = RolloutConfig(num_cpus_per_worker=1)
    workers = {f"w{i}": RolloutWorker.options(num_cpus=1).remote(f"w{i}", MODEL, rollout) for i in range(2)}
    states = [weights(tokenizer, seed) for seed in range(4)]
    sync = WeightSync()
    with SharedWeightStore(num_slots=num_slots) as store:
        for version in (1, 2):
            sync.publish(version, store.write(version, states[version - 1]))
            assert sync.push_and_wait(workers) >= 0
            assert sync.worker_versions == {"w0": version, "w1": version}
            assert sync.latest.completed and sync.latest.transport == "shared_memory"
        # a worker that only gets to version 3's handle once newer versions took its slot loads the newest ...
        stale = store.write(3, states[2])
        while store.latest is stale or store.latest.slot != stale.slot:
            store.write(store.latest.version + 1, states[store.latest.version % 4])
        assert store.latest.version >= 5
        newest = store.latest.version
        replies = ray_local.get([w.load_weights.remote(3, stale) for w in workers.values()])
        assert [r.version for r in replies] == [newest, newest]
        # ... and the later requests for the versions in between cost nothing
        late = ray_local.get([w.load_weights.remote(newest, store.latest) for w in workers.values()])
        assert [(r.version, r.skipped) for r in late] == [(newest, True), (newest, True)]
        node = ray_local.get_runtime_context().get_node_id()
        assert store.latest.node_id in (None, node)
    for worker in workers.values():
        ray_local.kill(worker)
