"""Helpers for tests that run `orchard` in a subprocess."""

from __future__ import annotations

import re
import subprocess
import time

CONTROL_URL = re.compile(r"control plane at (http://[0-9.]+:\d+)")


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
