"""The control plane under a bounded load: 50 concurrent clients read a live run's status and
`/metrics` (a fixed number of requests, loopback only) while it trains; every answer is 200 and the
run goes on training. The throughput figures are `bench/control_load.py`'s."""

from __future__ import annotations

import json

import httpx

from orchard.services.control.load import read_load
from tests.e2e.test_control_plane import wait_for
from tests.e2e.tiny_run import TINY
from tests.processes import overrides, read_control_url, start_orchard

CLIENTS, REQUESTS_EACH = 50, 20


def test_fifty_clients_reading_a_live_run_get_every_answer(tmp_path, capsys):
    run_path = tmp_path / "runs" / "loaded"
    settings = [*TINY, f"warmstart.cache_dir={tmp_path / 'cache'}", "max_steps=100000"]
    process = start_orchard("run", "--quiet", "--run-dir", str(run_path), *overrides(*settings))
    lines: list[str] = []
    try:
        url = read_control_url(process, lines)
        http = httpx.Client(base_url=url, timeout=30)

        def step() -> int:
            return http.get("/v1/runs/loaded").json()["step"]

        wait_for(lambda: step() > 0, "the run's first learner step")
        before = step()
        report = read_load(url, "loaded", clients=CLIENTS, requests_per_client=REQUESTS_EACH, seconds=120)
        after = step()
        with capsys.disabled():
            print(
                f"\ncontrol plane, {CLIENTS} clients during a run: {report.line()}; learner steps {before} -> {after}"
            )
        assert report.errors == 0, report.first_errors
        assert report.requests == CLIENTS * REQUESTS_EACH
        assert after > before, "the run made no learner step while it was read"
        assert http.post("/v1/runs/loaded/stop").status_code == 202
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(lines) + output
    assert json.loads((run_path / "summary.json").read_text())["state"] == "stopped"
