"""`ray job submit` against a real `ray start --head` cluster, exactly as the README shows."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.tiny_run import TINY

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    gcs_port, dashboard_port = free_port(), free_port()
    # Short: Ray's Unix socket paths under it must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Ray >= 2.59 authenticates local clusters with a token; give head and client a private one.
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=3",
            f"--port={gcs_port}",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            # Free ports for the agents too: Ray's fixed defaults (e.g. 52365) may still be held by a
            # cluster another test just shut down, and a head whose job agent cannot bind takes no jobs.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(request, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        pytest.fail("ray head did not start within 120 s")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_demo(ray_head, tmp_path):
    address, env = ray_head
    sets = [
        *TINY,
        f"warmstart.cache_dir={tmp_path / 'cache'}",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        ".",
        "--",
        "orchard",
        "run",
        "configs/demo.yaml",
        "--quiet",
        *[x for s in sets for x in ("--set", s)],
    ]
    # The head answers before its job agent is up; Ray then refuses with "No available agent".
    for _attempt in range(12):
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(5)
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output
    assert "held-out accuracy" in output
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
