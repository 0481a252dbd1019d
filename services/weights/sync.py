"""Weight sync with a version protocol, over either transport.

What is published for a version is a `WeightHandle` to the learner's shared-memory store (one node:
each CPU worker pins the version and runs on it without a copy, or copies it straight from the
segment into its engine, see `services/weights/store.py`), a
dict of numpy arrays in the Ray object store (any number of nodes: Ray stores it once and every
worker reads it zero-copy before copying into its engine), or an `ObjectRef` of either (what the
learner actor's `export_weights` returns; `weight_sync.transport` in the config picks which). Every
worker's `load_weights(version, weights)` takes both. With transport 'nccl' what is published is a
`BroadcastTicket`: the learner broadcasts the version (`broadcast_weights`) while every worker,
handed the ticket, receives it (`rollout/weight_broadcast.py`; the group is formed by
`form_broadcast_group`). Versions only move forward: publishing an older
or equal version is refused, and each worker's confirmed version is tracked so that status can show
it and the driver knows which version produced each sample. A worker that acts on a shared-memory
handle only after newer versions have taken its slot loads the newest and confirms that version.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from orchard.rollout.weight_broadcast import BroadcastTicket, Rendezvous
from orchard.services.weights.store import WeightHandle


class WeightVersionError(ValueError):
    """A version was published or confirmed out of order."""


@dataclass
class Publication:
    version: int
    ref: Any  # WeightHandle, dict[str, np.ndarray], or a ray.ObjectRef of either

    @property
    def transport(self) -> str:
        """'shared_memory', 'broadcast' or 'object_store' when known here; 'ref' for an unresolved ObjectRef."""
        if isinstance(self.ref, WeightHandle):
            return "shared_memory"
        if isinstance(self.ref, BroadcastTicket):
            return "broadcast"
        return "ref" if isinstance(self.ref, ray.ObjectRef) else "object_store"

    published_at: float
    confirmed: dict[str, float] = field(default_factory=dict)  # worker -> seconds from publish to loaded
    completed: bool = False  # every worker holds this version (or a newer one)


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
        if isinstance(ref, WeightHandle) and ref.version != version:
            raise WeightVersionError(f"cannot publish policy version {version} with a handle to version {ref.version}")
        if isinstance(ref, BroadcastTicket) and ref.version != version:
            raise WeightVersionError(f"cannot publish policy version {version} with a ticket for version {ref.version}")
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
        """Record that `worker` loaded `version`; returns the full sync time once every worker has it.

        A worker may confirm a newer version than the one it was sent (shared memory: the writer had
        moved on) or the same one twice. A confirmation older than one already recorded is a late
        reply (the replies to one worker's loads can reach the caller out of order; its engine never
        goes back, it refuses older versions) and changes nothing.
        """
        previous = self.worker_versions.get(worker, -1)
        if version < previous:
            return None
        self.worker_versions[worker] = version
        publication = self.latest
        if publication is None or version < publication.version:
            return None
        publication.confirmed.setdefault(worker, time.perf_counter() - publication.published_at)
        if not publication.completed and all(v >= publication.version for v in self.worker_versions.values()):
            publication.completed = True
            seconds = max(publication.confirmed.values())
            self.sync_seconds.append(seconds)
            return seconds
        return None

    def forget(self, worker: str) -> None:
        """`worker` was removed: the versions of the others alone complete a publication from now on."""
        self.worker_versions.pop(worker, None)
        publication = self.latest
        if publication is not None and not publication.completed and self.worker_versions:
            if all(v >= publication.version for v in self.worker_versions.values()):
                publication.completed = True

    def push_and_wait(self, workers: Mapping[str, Any]) -> float:
        """Blocking push to every worker; returns seconds from publish to the last worker loaded."""
        pending = self.push(workers)
        for ref, name in pending.items():
            self.confirm(name, ray.get(ref).version)
        return max(self.latest.confirmed.values()) if self.latest and self.latest.confirmed else 0.0


@dataclass(frozen=True)
class FormedGroup:
    """A weight-broadcast group as formed: where it met, its backend and its size."""

    host: str
    port: int
    backend: str
    world_size: int


def form_broadcast_group(
    learner: Any, workers: Mapping[str, Any], *, ranks_per_worker: int, bucket_bytes: int, timeout_s: float
) -> FormedGroup:
    """Transport 'nccl': put the learner (rank 0) and every worker in a new weight-broadcast group.

    Every member joins at once (the group forms only when all have joined); a worker running a
    rollout joins when that call returns. A vLLM worker takes `ranks_per_worker` ranks, one per
    tensor-parallel GPU. Called at the start and again after any member was replaced. The backend is
    'nccl' when the learner has a GPU, else 'gloo'.
    """
    world_size = 1 + ranks_per_worker * len(workers)
    meeting: Rendezvous = ray.get(learner.open_weight_broadcast.remote(world_size))
    calls = [learner.join_weight_broadcast.remote(world_size, meeting.backend)]
    for index, actor in enumerate(workers.values()):
        calls.append(
            actor.join_weight_broadcast.remote(
                meeting.host,
                meeting.port,
                1 + index * ranks_per_worker,
                world_size,
                meeting.layout,
                bucket_bytes,
                backend=meeting.backend,
                timeout_s=timeout_s,
            )
        )
    ray.get(calls)
    return FormedGroup(meeting.host, meeting.port, meeting.backend, world_size)
