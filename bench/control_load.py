"""The control plane under load: a run's learner steps/s with and without 50 clients reading it.

Starts `orchard run` (the embedded demo; `--set` overrides) as a subprocess serving its control plane
on loopback, waits for its first learner step, then measures its learner steps/s over consecutive
windows of `--seconds`, alternating: unloaded, loaded, unloaded, loaded, unloaded. A loaded window
runs `--clients` concurrent clients (`orchard.services.control.load`) reading the run's status and
`/metrics` in turn, first paced (each waits `--interval` seconds after every answer, a dashboard's
poll), then unpaced (each sends its next request as soon as it has an answer), then unpaced from a
process at nice 19 (so that what remains is the cost of serving, not of the clients). Prints each window,
each load's requests, errors and p50/p99 latency, and the loaded steps/s against the mean of the
unloaded windows on both sides (target: within 10 %). The clients run on the same machine and take
its CPU too; their own CPU seconds are printed, and the run process's CPU (driver and control
plane; the learner and workers are Ray actors of their own) as a share of one core.

Run: `python bench/control_load.py [--seconds 30] [--clients 50] [--interval 1.0]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from orchard.services.compare import PLAIN_GRPO
from orchard.services.control.load import LoadReport, read_load

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "loaded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each window")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="the paced clients' wait after each answer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, "-m", "orchard", "run", "--quiet", "--run-dir", f"{root}/{RUN_ID}"]
        for item in [*PLAIN_GRPO, "max_steps=1000000", "max_minutes=null", "control.port=0", *args.overrides]:
            command += ["--set", item]
        environment = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        try:
            url = control_url(process)
            http = httpx.Client(base_url=url, timeout=60)
            while step(http) == 0:
                time.sleep(0.5)
            windows: list[tuple[str, float, float]] = []  # name, learner steps/s, the run process's CPU share
            run_process = psutil.Process(process.pid)
            reports: dict[str, tuple[LoadReport, float]] = {}
            for name in ("unloaded", "paced", "unloaded", "unpaced", "unloaded", "unpaced-niced", "unloaded"):
                first, started, run_cpu = step(http), time.perf_counter(), sum(run_process.cpu_times()[:2])
                if name == "unloaded":
                    time.sleep(args.seconds)
                else:
                    cpu = resource.getrusage(resource.RUSAGE_SELF)
                    niceness = os.getpriority(os.PRIO_PROCESS, 0)
                    if name == "unpaced-niced":  # the clients yield the CPU to the run whenever it wants it
                        os.setpriority(os.PRIO_PROCESS, 0, 19)
                    try:
                        report = read_load(
                            url,
                            RUN_ID,
                            clients=args.clients,
                            seconds=args.seconds,
                            interval_seconds=args.interval if name == "paced" else 0.0,
                        )
                    finally:
                        with contextlib.suppress(PermissionError):  # lowering it back needs root
                            os.setpriority(os.PRIO_PROCESS, 0, niceness)
                    used = resource.getrusage(resource.RUSAGE_SELF)
                    reports[name] = (report, used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime)
                elapsed = time.perf_counter() - started
                rate = (step(http) - first) / elapsed
                cpu_share = (sum(run_process.cpu_times()[:2]) - run_cpu) / elapsed
                windows.append((name, rate, cpu_share))
                print(f"  {name:<9} {rate:.3f} learner steps/s, run process {cpu_share:.0%} of a core", flush=True)
            http.post(f"/v1/runs/{RUN_ID}/stop")
            process.wait(300)
        finally:
            if process.poll() is None:
                process.kill()

    print(f"\n{args.clients} clients reading status and /metrics, windows of {args.seconds:.0f} s")
    print(f"{'load':<14}{'steps/s':>9}{'vs unloaded':>13}{'run process CPU':>17}  requests")
    for index, (name, rate, cpu_share) in enumerate(windows):
        if name == "unloaded":
            print(f"{name:<14}{rate:>9.3f}{'':>13}{cpu_share:>17.0%}")
            continue
        around = (windows[index - 1][1] + windows[index + 1][1]) / 2
        report, cpu_seconds = reports[name]
        print(
            f"{name:<14}{rate:>9.3f}{rate / around:>12.1%}{cpu_share:>17.0%}   {report.line()}; "
            f"the clients used {cpu_seconds:.1f} CPU s"
        )
        for error in report.first_errors:
            print(f"               error: {error}")


def control_url(process: subprocess.Popen) -> str:
    """The URL the run prints; its later output is drained by a thread, so the run never blocks on it."""
    for line in process.stdout:
        if "control plane at " in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return line.split("control plane at ", 1)[1].split()[0]
    raise SystemExit(f"orchard run exited ({process.wait()}) before serving its control plane")


def step(http: httpx.Client) -> int:
    return int(http.get(f"/v1/runs/{RUN_ID}").json()["step"])


if __name__ == "__main__":
    main()
