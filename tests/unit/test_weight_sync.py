import pytest

from services.weight_sync import WeightSync, WeightVersionError


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


def test_a_worker_cannot_go_back():
    sync = WeightSync()
    sync.publish(2, "ref")
    sync.confirm("a", 2)
    with pytest.raises(WeightVersionError, match="went back"):
        sync.confirm("a", 1)


def test_push_without_publication_is_refused():
    with pytest.raises(WeightVersionError, match="no weights published"):
        WeightSync().push({})
