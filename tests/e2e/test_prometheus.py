"""A real run's `/metrics` feeds the dashboards, and a real Prometheus server scrapes it.

One `orchard run` (the tiny demo, control plane on a free port) runs for the whole module. The
first test checks that every metric and label the Grafana dashboards query is in the scraped
exposition of that running service. The second starts Prometheus the way `make dashboards` does
(`deploy/dashboards.sh`, Debian's `prometheus` binary, a 1 s scrape interval, storage in a temporary
directory, a free port), checks that Prometheus accepts every dashboard query, pauses the run and
waits until the PromQL query `orchard_learner_step` returns exactly the step the run reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.tiny_run import TINY
from tests.unit.test_dashboards import all_dashboard_queries, exposed_labels, missing_from_exposition

REPO = Path(__file__).resolve().parents[2]
ORCHARD = [sys.executable, "-m", "orchard"]
CONTROL_LINE = re.compile(r"orchard: control plane at (http://\S+)")
#: Apt package of the Prometheus server binary (Debian, Ubuntu).
PROMETHEUS_PACKAGE = "prometheus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_json(url: str) -> Any:
    code, body = http("GET", url)
    assert code == 200, f"GET {url}: {code} {body[:500]!r}"
    return json.loads(body)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5, context=lambda: "") -> Any:
    """Call `probe` until it returns something truthy (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, ValueError, KeyError, AssertionError) as error:
            last_error, result = error, None
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r}){context()}")


@dataclass
class LiveRun:
    process: subprocess.Popen
    url: str
    run_id: str
    run_dir: Path
    output: list[str]

    def tail(self) -> str:
        return "\n--- orchard run output (tail) ---\n" + "".join(self.output[-60:])

    def status(self) -> dict:
        return get_json(f"{self.url}/v1/runs/{self.run_id}")

    def exposition(self) -> str:
        code, body = http("GET", f"{self.url}/metrics")
        assert code == 200, f"/metrics answered {code}"
        return body.decode()


def _drain(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _stop_process_group(process: subprocess.Popen, first: int, wait: float) -> bool:
    if process.poll() is not None:
        return True
    try:
        os.killpg(process.pid, first)
    except ProcessLookupError:
        return True
    try:
        process.wait(timeout=wait)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, warm_cache) -> Iterator[LiveRun]:
    """`orchard run` of the tiny demo with a step budget it will not reach; stopped at the end."""
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    run_dir = tmp / "run"
    sets = [
        *TINY,
        "control.port=0",
        "max_steps=1000000",
        "max_minutes=15",  # a bound on the run even if every way of stopping it below failed
        f"warmstart.cache_dir={warm_cache}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [*ORCHARD, "run", "--quiet", "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the local Ray it starts is stopped with it
    )
    output: list[str] = []
    threading.Thread(target=_drain, args=(process.stdout, output), daemon=True).start()
    run = None
    try:

        def control_url() -> str | None:
            if process.poll() is not None:
                pytest.fail(f"orchard run exited with {process.returncode} before serving its control plane" + tail())
            match = next((m for m in map(CONTROL_LINE.search, list(output)) if m), None)
            return match.group(1) if match else None

        def tail() -> str:
            return "\n--- orchard run output (tail) ---\n" + "".join(output[-60:])

        url = wait_for("the 'control plane at' line of orchard run", control_url, 120, context=tail)
        wait_for("GET /healthz", lambda: http("GET", f"{url}/healthz")[0] == 200, 60, context=tail)
        (summary,) = wait_for("the run in GET /v1/runs", lambda: get_json(f"{url}/v1/runs"), 60, context=tail)
        run = LiveRun(process, url, summary["id"], run_dir, output)

        def learning() -> bool:
            if process.poll() is not None:
                pytest.fail(f"orchard run exited with {process.returncode}" + tail())
            status = run.status()
            if status["state"] in ("failed", "finished", "stopped"):
                pytest.fail(f"the run ended early: {status}" + tail())
            return status["state"] == "running" and status["step"] >= 2

        # Ray start-up and the warm-start SFT (cached for the session) come first.
        wait_for("the run to reach learner step 2", learning, 420, interval=1, context=tail)
        yield run
    finally:
        if run is not None and process.poll() is None:
            http("POST", f"{run.url}/v1/runs/{run.run_id}/stop")
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        # SIGINT first (the CLI ends the run and Ray shuts down), then harder.
        if not _stop_process_group(process, signal.SIGINT, 60):
            if not _stop_process_group(process, signal.SIGTERM, 30):
                _stop_process_group(process, signal.SIGKILL, 30)


def test_every_dashboard_metric_is_exported_by_the_running_run(live_run):
    # Label values (distributions, workers, filter reasons) appear once the run has produced them.
    problems: list[str] = []

    def complete() -> bool:
        problems[:] = missing_from_exposition(live_run.exposition())
        return not problems

    wait_for("every dashboard metric in /metrics", complete, 120, context=lambda: "\n" + "\n".join(problems))
    exposed = exposed_labels(live_run.exposition())
    assert "orchard_learner_step" in exposed and "orchard_sample_staleness_bucket" in exposed


def prometheus_query(base: str, query: str) -> dict:
    answer = get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert answer["status"] == "success", answer
    return answer["data"]


@pytest.fixture
def prometheus(request, tmp_path) -> Iterator[tuple[str, LiveRun]]:
    """Prometheus started by deploy/dashboards.sh against the live run, scraping every second: its URL
    and the run. (The run is requested here, after the check for the binary, because pytest sets up
    module fixtures such as `live_run` before function fixtures.)"""
    if shutil.which("prometheus") is None:
        pytest.skip(
            f"the prometheus server binary is not installed (apt-get install {PROMETHEUS_PACKAGE}, "
            "or run `make dashboards` once as root)"
        )
    live_run: LiveRun = request.getfixturevalue("live_run")
    port = free_port()
    log = tmp_path / "prometheus.log"
    env = {**os.environ, "PROM_HOST": "127.0.0.1", "PROM_PORT": str(port), "SCRAPE_INTERVAL": "1s"}
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["bash", str(REPO / "deploy" / "dashboards.sh"), live_run.url],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        return "\n--- prometheus output ---\n" + log.read_text()[-4000:]

    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"deploy/dashboards.sh exited with {process.returncode}" + log_tail())
            return http("GET", f"{base}/-/ready")[0] == 200

        wait_for("Prometheus to be ready", ready, 60, context=log_tail)
        yield base, live_run
    finally:
        if not _stop_process_group(process, signal.SIGTERM, 30):
            _stop_process_group(process, signal.SIGKILL, 30)


def test_prometheus_scrapes_the_run_and_returns_its_step(prometheus):
    base, live_run = prometheus
    target = urllib.parse.urlsplit(live_run.url).netloc

    def scraped() -> list:
        result = prometheus_query(base, 'orchard_learner_step{job="orchard"}')["result"]
        return result if result and float(result[0]["value"][1]) >= 1 else []

    (sample,) = wait_for("orchard_learner_step >= 1 in Prometheus", scraped, 60, context=live_run.tail)
    assert sample["metric"]["instance"] == target
    assert prometheus_query(base, 'up{job="orchard"}')["result"][0]["value"][1] == "1"

    # Prometheus parses and evaluates every dashboard query (Grafana's variables filled in).
    for where, expr in all_dashboard_queries():
        query = expr.replace("$instance", target).replace("${instance}", target)
        query = query.replace("$__rate_interval", "15s").replace("$__interval", "1s")
        code, body = http("GET", f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        assert code == 200 and json.loads(body)["status"] == "success", f"{where}: {query}: {body[:500]!r}"

    # Pause the run so that its step holds still, then compare the two.
    code, body = http("POST", f"{live_run.url}/v1/runs/{live_run.run_id}/pause")
    assert code == 202, f"pause answered {code}: {body[:300]!r}"

    def paused() -> dict | None:
        status = live_run.status()
        return status if status["state"] == "paused" else None

    status = wait_for("the run to be paused", paused, 120, context=live_run.tail)
    step = status["step"]
    assert step >= 2

    values: list[str] = []

    def matches() -> bool:
        result = prometheus_query(base, "orchard_learner_step")["result"]
        values[:] = [r["value"][1] for r in result]
        return [float(value) for value in values] == [float(step)]

    wait_for(
        f"Prometheus to return step {step}",
        matches,
        30,
        context=lambda: f"\nPrometheus returned {values}",
    )
    lines = (live_run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == step
    assert live_run.status()["step"] == step  # still paused


def test_shipped_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed (apt-get install {PROMETHEUS_PACKAGE})")
    result = subprocess.run(
        [promtool, "check", "config", str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
