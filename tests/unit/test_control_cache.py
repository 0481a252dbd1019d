"""The control plane's read snapshots: one read serves every reader for a while; a change of state
is seen at once."""

from __future__ import annotations

import json
import time

from orchard.config import load_config
from orchard.services.control.service import Cached, RunHandle
from orchard.services.run_dir import RunDirectory


def test_one_read_serves_every_caller_until_it_is_old_or_dropped():
    reads = []
    cached = Cached(lambda: reads.append(1) or len(reads), seconds=0.2)
    assert cached.fresh() is None  # nothing read yet, and asking does not read
    assert [cached.get() for _ in range(50)] == [1] * 50
    assert cached.fresh() == 1
    cached.drop()
    assert cached.fresh() is None and cached.get() == 2
    time.sleep(0.25)
    assert cached.fresh() is None and cached.get() == 3
    assert len(reads) == 3


def test_status_json_follows_state_and_weights_at_once_and_progress_within_the_interval(tmp_path):
    handle = RunHandle(load_config(None, []), RunDirectory(tmp_path, "run"))
    first = json.loads(handle.status_json())
    assert first["state"] == "pending" and first["weights"] is None
    assert handle.fresh_status_json() == handle.status_json()
    handle.control.announce_weights(3, "/ckpt/3")
    assert json.loads(handle.status_json())["weights"]["version"] == 3  # not the cached answer
    handle.control.request_pause()
    assert handle.fresh_status_json() is None
    assert json.loads(handle.status_json())["state"] == "pausing"
