import pytest

from orchard.services.weights.sync import WeightSync, WeightVersionError


def test_versions_only_move_forward():
    sync = WeightSync()
    sync.publish(1, "ref-1")
    with pytest.raises(WeightVersionError, match="version 1 is already published"):
        sync.publish(1, "again")
    with pytest.raises(WeightVersionError):
        sync.publish(0, "older")
    sync.publish(2, "ref-2")
    assert sync.version == 2 and sync.latest.ref == "ref-2"


def test_sync_completes_when_every_worker_confirms():
    sync = WeightSync()
    sync.worker_versions = {"a": 0, "b": 0}
    sync.publish(1, "ref")
    assert sync.confirm("a", 1) is None
    seconds = sync.confirm("b", 1)
    assert seconds is not None and seconds >= 0
    assert sync.sync_seconds == [seconds]


def test_a_late_confirmation_of_an_older_version_changes_nothing():
    """Replies to one worker's loads may be seen out of order; its engine itself never goes back."""
    sync = WeightSync()
    sync.worker_versions = {"a": 0}
    sync.publish(1, "ref-1")
    sync.publish(2, "ref-2")
    assert sync.confirm("a", 2) is not None
    assert sync.confirm("a", 1) is None
    assert sync.worker_versions == {"a": 2} and len(sync.sync_seconds) == 1


def test_push_without_publication_is_refused():
    with pytest.raises(WeightVersionError, match="no weights published"):
        WeightSync().push({})


# ------------------------------------------------------------------------------ either transport


def handle(version: int):
    from orchard.services.weights.store import TensorSpec, WeightHandle

    layout = (TensorSpec("w", "float32", (2, 3), 0),)
    return WeightHandle(segment="orchard-weights-test", slot=version % 2, version=version, layout=layout, slot_bytes=64)


def test_a_shared_memory_handle_is_published_like_a_ref():
    sync = WeightSync()
    publication = sync.publish(1, handle(1))
    assert publication.transport == "shared_memory"
    assert sync.publish(2, {"w": None}).transport == "object_store"
    with pytest.raises(WeightVersionError, match="version 3 with a handle to version 2"):
        sync.publish(3, handle(2))


def test_a_handle_is_small_and_survives_pickling():
    import pickle

    data = pickle.dumps(handle(7))
    assert pickle.loads(data) == handle(7) and len(data) < 1000


def test_a_worker_confirming_a_newer_version_completes_the_sync_once():
    """Shared memory: a worker may load a newer version than it was sent, and later confirm it again."""
    sync = WeightSync()
    sync.worker_versions = {"a": 0, "b": 0}
    sync.publish(1, handle(1))
    sync.confirm("a", 1)
    sync.publish(2, handle(2))
    assert sync.confirm("b", 3) is None  # b already read 3, not yet published here
    assert sync.confirm("a", 2) is not None
    assert sync.confirm("b", 3) is None and sync.confirm("a", 2) is None
    assert len(sync.sync_seconds) == 1 and sync.worker_versions == {"a": 2, "b": 3}


def test_auto_transport_is_shared_memory_only_on_one_node(monkeypatch, tmp_path):
    import ray

    from orchard.services.weights import store as weight_store

    monkeypatch.setattr(weight_store, "SEGMENT_DIR", tmp_path)
    assert weight_store.resolve_transport("object_store") == "object_store"
    assert weight_store.resolve_transport("shared_memory") == "shared_memory"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    assert weight_store.resolve_transport("auto") == "shared_memory"
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    assert weight_store.resolve_transport("auto") == "object_store"
    monkeypatch.setattr(weight_store, "SEGMENT_DIR", tmp_path / "missing")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    assert weight_store.resolve_transport("auto") == "object_store"
    with pytest.raises(ValueError, match="unknown weight transport 'nccl'"):
        weight_store.resolve_transport("nccl")
