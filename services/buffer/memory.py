"""`MemoryBuffer`: the in-process backend, with the Redis buffer's semantics (see `services.buffer`).

Used when no redis-server is installed and in single-process tests. Groups are kept as their
serialised bytes, exactly as in Redis, so a caller can never mutate a stored group and corrupt
records are handled the same way. Thread-safe: one lock guards every structure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchard.records import Group, RecordError
from orchard.services.buffer import STAT_KEYS, PassRateStats, decode_group

log = logging.getLogger(__name__)

#: How many recent `take` answers are remembered for a retry with the same request token.
REMEMBERED_TAKES = 1024


@dataclass(frozen=True)
class _Pending:
    policy_version: int
    data: bytes
    since: float  # time.time() when taken


class MemoryBuffer:
    """The replay buffer in this process's memory; lost when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: dict[int, dict[str, bytes]] = {}  # policy version -> group id -> bytes, in put order
        self._ready_version: dict[str, int] = {}  # group id -> policy version, for every ready group
        self._pending: dict[str, _Pending] = {}
        self._finished: set[str] = set()  # acknowledged, stale or corrupt ids: a later put is a duplicate
        self._corrupt: dict[str, bytes] = {}
        self._counts = dict.fromkeys(STAT_KEYS, 0)
        self._answers: OrderedDict[str, list[str]] = OrderedDict()  # request token -> ids taken
        self._prompts: dict[str, PassRateStats] = {}
        self._distributions: dict[str, PassRateStats] = {}
        self._states: dict[str, bytes] = {}

    # ----------------------------------------------------------------------------- groups
    def put(self, group: Group) -> None:
        self.put_many([group])

    def put_many(self, groups: Iterable[Group]) -> int:
        """Store groups; returns how many were new (the others are counted as duplicates)."""
        encoded = [(group.id, group.policy_version, group.to_bytes()) for group in groups]
        added = 0
        with self._lock:
            for group_id, version, data in encoded:
                if group_id in self._ready_version or group_id in self._pending or group_id in self._finished:
                    self._counts["duplicates"] += 1
                    continue
                self._ready.setdefault(version, {})[group_id] = data
                self._ready_version[group_id] = version
                added += 1
            self._counts["put"] += added
        return added

    def take(self, count: int, *, min_policy_version: int, request_token: str | None = None) -> list[Group]:
        """Drop stale groups, then move up to `count` of the oldest acceptable ones to pending.

        A repeated call with the same `request_token` returns the groups the first call took (those
        still pending) instead of taking more, so a caller may retry a call whose answer it lost.
        """
        with self._lock:
            if request_token is not None and request_token in self._answers:
                ids = [group_id for group_id in self._answers[request_token] if group_id in self._pending]
                return [Group.from_bytes(self._pending[group_id].data) for group_id in ids]
            self._drop_stale(min_policy_version)
            now = time.time()
            taken: list[Group] = []
            while len(taken) < count and self._ready:
                version = min(self._ready)
                group_id, data = self._pop_ready(version)
                try:
                    group = decode_group(group_id, data)
                except RecordError as error:
                    log.warning("buffer: group %s is corrupt and was moved aside: %s", group_id, error)
                    self._corrupt[group_id] = data
                    self._finished.add(group_id)
                    self._counts["corrupt"] += 1
                    continue
                self._pending[group_id] = _Pending(version, data, now)
                taken.append(group)
            self._counts["taken"] += len(taken)
            if request_token is not None:
                self._answers[request_token] = [group.id for group in taken]
                while len(self._answers) > REMEMBERED_TAKES:
                    self._answers.popitem(last=False)
            return taken

    def ack(self, group_ids: Sequence[str]) -> None:
        """Remove groups for good (normally pending ones; a ready one, e.g. requeued, goes too)."""
        with self._lock:
            for group_id in group_ids:
                if self._pending.pop(group_id, None) is None:
                    version = self._ready_version.get(group_id)
                    if version is None:
                        continue  # already acknowledged, or never here: acks are idempotent
                    self._remove_ready(version, group_id)
                self._finished.add(group_id)
                self._counts["acked"] += 1

    def requeue_pending(self, older_than_seconds: float | None = None) -> int:
        """Return pending groups (all, or those taken at least `older_than_seconds` ago) to ready."""
        cutoff = None if older_than_seconds is None else time.time() - older_than_seconds
        with self._lock:
            due = [gid for gid, entry in self._pending.items() if cutoff is None or entry.since <= cutoff]
            for group_id in due:
                entry = self._pending.pop(group_id)
                self._ready.setdefault(entry.policy_version, {})[group_id] = entry.data
                self._ready_version[group_id] = entry.policy_version
            self._counts["requeued"] += len(due)
            return len(due)

    def ready_count(self, *, min_policy_version: int = 0) -> int:
        with self._lock:
            return sum(len(groups) for version, groups in self._ready.items() if version >= min_policy_version)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "ready": len(self._ready_version), "pending": len(self._pending)}

    # ----------------------------------------------------------------------------- prompt statistics
    def record_prompt_stats(self, prompt_id: str, distribution: str, pass_rate: float, policy_version: int) -> None:
        with self._lock:
            self._prompts[prompt_id] = _add(self._prompts.get(prompt_id), distribution, pass_rate, policy_version)
            self._distributions[distribution] = _add(
                self._distributions.get(distribution), distribution, pass_rate, policy_version
            )

    def prompt_stats(self, prompt_id: str) -> PassRateStats | None:
        with self._lock:
            return self._prompts.get(prompt_id)

    def distribution_stats(self) -> dict[str, PassRateStats]:
        with self._lock:
            return dict(sorted(self._distributions.items()))

    def save_state(self, name: str, payload: bytes) -> None:
        with self._lock:
            self._states[name] = bytes(payload)

    def load_state(self, name: str) -> bytes | None:
        with self._lock:
            return self._states.get(name)

    def close(self) -> None:
        """Nothing to release; present for the `Buffer` protocol."""

    # ----------------------------------------------------------------------------- internals
    def _drop_stale(self, min_policy_version: int) -> None:
        for version in [v for v in self._ready if v < min_policy_version]:
            groups = self._ready.pop(version)
            for group_id in groups:
                del self._ready_version[group_id]
                self._finished.add(group_id)
            self._counts["stale"] += len(groups)

    def _pop_ready(self, version: int) -> tuple[str, bytes]:
        groups = self._ready[version]
        group_id = next(iter(groups))
        data = groups.pop(group_id)
        del self._ready_version[group_id]
        if not groups:
            del self._ready[version]
        return group_id, data

    def _remove_ready(self, version: int, group_id: str) -> None:
        groups = self._ready[version]
        del groups[group_id]
        del self._ready_version[group_id]
        if not groups:
            del self._ready[version]


def _add(current: PassRateStats | None, distribution: str, pass_rate: float, policy_version: int) -> PassRateStats:
    if current is None:
        return PassRateStats(distribution, 1, pass_rate, policy_version)
    return PassRateStats(
        distribution,
        current.count + 1,
        current.pass_rate_sum + pass_rate,
        max(current.last_policy_version, policy_version),
    )
