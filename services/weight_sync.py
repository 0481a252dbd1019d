"""Weight sync through the Ray object store, with a version protocol.

The learner's `export_weights` returns a dict of numpy arrays; Ray stores that return value in the
object store once, and every worker's `load_weights(version, ref)` reads it zero-copy before
copying into its engine's tensors. Versions only move forward: publishing an older or equal
version is refused, and each worker's confirmed version is tracked so that status can show it and
the driver knows which version produced each sample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray


class WeightVersionError(ValueError):
    """A version was published or confirmed out of order."""


@dataclass
class Publication:
    version: int
    ref: Any  # ray.ObjectRef of dict[str, np.ndarray]
    published_at: float
    confirmed: dict[str, float] = field(default_factory=dict)  # worker -> seconds from publish to loaded


class WeightSync:
    """Tracks the newest published weights and the version every worker has loaded."""

    def __init__(self, initial_version: int = 0) -> None:
        self.latest: Publication | None = None
        self.worker_versions: dict[str, int] = {}
        self._initial_version = initial_version
        self.sync_seconds: list[float] = []

    @property
    def version(self) -> int:
        return self.latest.version if self.latest else self._initial_version

    def publish(self, version: int, ref: Any) -> Publication:
        if self.latest is not None and version <= self.latest.version:
            raise WeightVersionError(
                f"cannot publish policy version {version}: version {self.latest.version} is already published"
            )
        self.latest = Publication(version=version, ref=ref, published_at=time.perf_counter())
        return self.latest

    def push(self, workers: Mapping[str, Any]) -> dict[Any, str]:
        """Send the latest weights to every worker; returns the pending calls by worker name."""
        if self.latest is None:
            raise WeightVersionError("no weights published yet")
        return {
            actor.load_weights.remote(self.latest.version, self.latest.ref): name for name, actor in workers.items()
        }

    def confirm(self, worker: str, version: int) -> float | None:
        """Record that `worker` loaded `version`; returns the full sync time once every worker has it."""
        previous = self.worker_versions.get(worker, -1)
        if version < previous:
            raise WeightVersionError(f"worker {worker} went back from version {previous} to {version}")
        self.worker_versions[worker] = version
        publication = self.latest
        if publication is None or version != publication.version:
            return None
        publication.confirmed[worker] = time.perf_counter() - publication.published_at
        if all(v >= publication.version for v in self.worker_versions.values()):
            seconds = max(publication.confirmed.values())
            self.sync_seconds.append(seconds)
            return seconds
        return None

    def push_and_wait(self, workers: Mapping[str, Any]) -> float:
        """Blocking push to every worker; returns seconds from publish to the last worker loaded."""
        pending = self.push(workers)
        for ref, name in pending.items():
            self.confirm(name, ray.get(ref)["version"])
        return max(self.latest.confirmed.values()) if self.latest and self.latest.confirmed else 0.0
