"""Helpers for tests that run `orchard` in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

CONTROL_URL = re.compile(r"control plane at (http://[0-9.]+:\d+)")
REPO = Path(__file__).resolve().parents[1]
ORCHARD = [sys.executable, "-m", "orchard"]


def overrides(*pairs: str) -> list[str]:
    """`--set` arguments, one per `key.path=value` pair."""
    return [item for pair in pairs for item in ("--set", pair)]


def start_orchard(*arguments: str) -> subprocess.Popen:
    """`orchard ARGUMENTS` from the repository, its output on one text pipe, in a session of its own (so
    that a test can signal its whole process group)."""
    return subprocess.Popen(
        [*ORCHARD, *arguments],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_control_url(process: subprocess.Popen, lines: list[str] | None = None, timeout: float = 120.0) -> str:
    """The control plane URL the process prints; the output read up to it is kept in `lines`."""
    lines = [] if lines is None else lines
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = CONTROL_URL.search(line)
        if found:
            return found.group(1)
    raise AssertionError(f"no control plane URL in the output: {''.join(lines)}")
