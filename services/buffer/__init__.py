"""The replay buffer behind the `Buffer` protocol: Redis (`redis_buffer`) or in-process (`memory`).

Both backends share these semantics, and the same integration tests hold them to it:

- a group is stored whole, as its `Group.to_bytes()` value, and handed out whole;
- `take` first drops every ready group older than `min_policy_version` (counted `stale`; never
  trained on), then moves the oldest-version groups to *pending* and returns them;
- `ack` removes pending groups for good; `requeue_pending` puts unacknowledged ones back (after a
  learner restart), so delivery is at-least-once;
- `put` is idempotent by group id: an id that is ready, pending or already finished (acknowledged,
  stale or corrupt) is ignored and counted as a `duplicate`;
- bytes that no longer decode are moved aside and counted `corrupt`, never returned;
- per-prompt and per-distribution pass-rate statistics live beside the groups.

`make_buffer` in `factory` picks the backend from `BufferConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchard.records import Group, RecordError

#: The keys of `Buffer.stats()`, identical for every backend.
STAT_KEYS = ("ready", "pending", "put", "taken", "acked", "stale", "requeued", "duplicates", "corrupt")


@dataclass(frozen=True)
class PassRateStats:
    """Pass rates recorded for one prompt or one distribution (`record_prompt_stats`)."""

    distribution: str
    count: int
    pass_rate_sum: float
    last_policy_version: int  # the newest policy version recorded

    @property
    def mean_pass_rate(self) -> float:
        return self.pass_rate_sum / self.count if self.count else 0.0


def decode_group(group_id: str, data: bytes | None) -> Group:
    """Read a stored group, raising `RecordError` when its bytes are missing, unreadable or not `group_id`'s."""
    if data is None:
        raise RecordError(f"group {group_id} has no stored bytes")
    group = Group.from_bytes(data)
    if group.id != group_id:
        raise RecordError(f"group stored under id {group_id} holds id {group.id}")
    return group
