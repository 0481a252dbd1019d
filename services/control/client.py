"""A small client of the control plane's REST API, used by `orchard status|pause|resume|stop|checkpoint`."""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8470"


class ControlClientError(RuntimeError):
    """The control plane could not be reached, or refused the request; the message says which."""


class ControlClient:
    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = (url or os.environ.get("ORCHARD_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("ORCHARD_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ControlClientError(f"cannot reach the control plane at {self.url}: {error}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if isinstance(detail, list):
                detail = "; ".join(
                    f"{item.get('field') or '.'.join(map(str, item.get('loc', [])))}: {item.get('msg')}"
                    for item in detail
                )
            raise ControlClientError(f"{method} {path}: {response.status_code} {detail}")
        return response.json()

    def runs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/runs")

    def status(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/runs/{run_id}")

    def resolve(self, run_id: str | None) -> str:
        """`run_id`, or when None the control plane's active run (else its newest)."""
        if run_id:
            return run_id
        runs = self.runs()
        if not runs:
            raise ControlClientError(f"the control plane at {self.url} has no runs")
        active = [run for run in runs if run["state"] not in ("stopped", "finished", "failed")]
        return (active or runs)[-1]["id"]

    def create(
        self, config: dict[str, Any] | None = None, overrides: list[str] | None = None, *, paused: bool = False
    ) -> dict[str, Any]:
        return self._call("POST", "/v1/runs", json={"config": config, "overrides": overrides or [], "paused": paused})

    def act(self, run_id: str, action: str) -> dict[str, Any]:
        if action not in ("pause", "resume", "stop", "checkpoint"):
            raise ValueError(f"unknown action {action!r}")
        return self._call("POST", f"/v1/runs/{run_id}/{action}")

    def scale(self, run_id: str, count: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{run_id}/workers", json={"count": count})

    def announce_weights(self, run_id: str, version: int, location: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{run_id}/weights", json={"version": version, "location": location})


def format_status(run: dict[str, Any]) -> str:
    """A run's status as a few readable lines."""

    def number(value: Any, pattern: str) -> str:
        return pattern.format(value) if isinstance(value, int | float) else "-"

    lines = [
        f"run {run['id']}  {run['state']}  step {run['step']}/{run['max_steps']}  policy v{run['policy_version']}  "
        f"reward {number(run.get('reward_mean'), '{:.3f}')}  held-out {number(run.get('eval_accuracy'), '{:.3f}')}"
    ]
    if run.get("reason"):
        lines.append(f"  reason: {run['reason']}")
    workers = ", ".join(f"{name} v{version}" for name, version in sorted(run.get("worker_versions", {}).items()))
    target = run.get("rollout_workers_target")
    scaling = f" (scaling to {target})" if target and target != run.get("rollout_workers") else ""
    lines.append(f"  workers: {workers or '-'}{scaling}")
    if run.get("scaling_refused"):
        lines.append(f"  {run['scaling_refused']}")
    buffer = run.get("buffer", {})
    lines.append(
        f"  buffer: ready {buffer.get('ready', '-')}, unacknowledged {buffer.get('pending', '-')}  "
        f"staleness {number(run.get('staleness_mean'), '{:.2f}')}  "
        f"{number(run.get('rollout_tokens_per_second'), '{:,.0f}')} tok/s  "
        f"{number(run.get('learner_steps_per_second'), '{:.2f}')} steps/s  "
        f"learner idle {number(run.get('learner_idle_fraction'), '{:.0%}')}"
    )
    if run.get("filtered"):
        lines.append(
            "  filtered: " + ", ".join(f"{reason} {count}" for reason, count in sorted(run["filtered"].items()))
        )
    if run.get("checkpoints"):
        lines.append(f"  last checkpoint: {run['checkpoints'][-1]}")
    lines.append(f"  run directory: {run['run_dir']}")
    return "\n".join(lines)
