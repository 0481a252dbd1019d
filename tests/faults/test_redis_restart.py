"""redis-server restarted under a running demo: the run reconnects and loses no acknowledged group."""

from __future__ import annotations

import threading
import time

from orchard.services.driver import Driver
from orchard.services.redis_server import RedisServer
from orchard.services.run_dir import RunDirectory
from tests.integration.test_driver import conservation, small_config


def test_redis_restart_mid_run_loses_no_acknowledged_group(ray_local, tmp_path, warm_cache):
    with RedisServer(appendonly=True) as server:
        config = small_config(
            tmp_path, warm_cache, "max_steps=8", "buffer.backend=redis", f"buffer.redis_url={server.url}"
        )
        run_dir = RunDirectory(tmp_path, "restart")
        restarted = threading.Event()

        def restart_when_training_started():
            deadline = time.time() + 300
            while time.time() < deadline and len(run_dir.read_metrics()) < 2:
                time.sleep(0.2)
            server.restart()
            restarted.set()

        thread = threading.Thread(target=restart_when_training_started, daemon=True)
        thread.start()
        summary = Driver(config, run_dir, show_progress=False).run()
        thread.join(timeout=60)
        assert restarted.is_set()
        assert summary["steps"] == 8
        conservation(summary)
