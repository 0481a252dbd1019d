"""A bounded load on the control plane: concurrent clients reading a run's status and `/metrics`.

`read_load(url, run_id, clients=50, ...)` runs `clients` concurrent clients over one event loop; each
alternates `GET /v1/runs/{id}` and `GET /metrics`, waiting `interval_seconds` after every answer
(0: as fast as the server answers), until each has made `requests_per_client` requests or
`seconds` have passed, whichever comes first. Every answer that is not 200, and every transport
error, is counted and kept (the first few) for the report. Used by the load test and by
`bench/control_load.py`; it only reads, so it never changes a run.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadReport:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    first_errors: list[str] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        """The `q` quantile of request latency in seconds (nearest rank)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.1f} s ({self.per_second:.0f}/s), {self.errors} errors, "
            f"latency p50 {1e3 * self.quantile(0.5):.1f} ms, p99 {1e3 * self.quantile(0.99):.1f} ms, "
            f"max {1e3 * max(self.latencies, default=math.nan):.1f} ms"
        )


def read_load(
    url: str,
    run_id: str,
    *,
    clients: int = 50,
    seconds: float = 30.0,
    requests_per_client: int | None = None,
    interval_seconds: float = 0.0,
    timeout_seconds: float = 30.0,
) -> LoadReport:
    """Load the control plane at `url` as the module docstring says; the report of every request."""
    if clients < 1 or seconds <= 0 or (requests_per_client is not None and requests_per_client < 1):
        raise ValueError("clients, seconds and requests_per_client must be positive")
    return asyncio.run(
        _load(url.rstrip("/"), run_id, clients, seconds, requests_per_client, interval_seconds, timeout_seconds)
    )


async def _load(
    url: str,
    run_id: str,
    clients: int,
    seconds: float,
    requests_per_client: int | None,
    interval: float,
    timeout: float,
) -> LoadReport:
    report = LoadReport()
    paths = [f"/v1/runs/{run_id}", "/metrics"]
    started = time.perf_counter()
    deadline = started + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(number: int, http: httpx.AsyncClient) -> None:
        made = 0
        while time.perf_counter() < deadline and (requests_per_client is None or made < requests_per_client):
            path = paths[(number + made) % len(paths)]
            sent = time.perf_counter()
            try:
                response = await http.get(path)
                failure = None if response.status_code == 200 else f"{path}: HTTP {response.status_code}"
            except httpx.HTTPError as error:
                failure = f"{path}: {type(error).__name__}: {error}"
            report.latencies.append(time.perf_counter() - sent)
            report.requests += 1
            made += 1
            if failure is not None:
                report.errors += 1
                if len(report.first_errors) < 5:
                    report.first_errors.append(failure)
            if interval:
                await asyncio.sleep(interval)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(number, http) for number in range(clients)))
    report.seconds = time.perf_counter() - started
    return report
