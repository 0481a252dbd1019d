"""Give-up rules of a run, as small pure objects the driver consults."""

from __future__ import annotations

from dataclasses import dataclass, field


def is_non_finite(skip_reason: str | None) -> bool:
    """True for a learner step skipped because its loss or gradients were NaN or infinite."""
    return skip_reason is not None and skip_reason.startswith("non-finite")


@dataclass
class NonFiniteGuard:
    """Counts learner steps skipped for non-finite loss or gradients; `limit` in a row end the run.

    A skipped step leaves the weights unchanged, so one bad batch costs nothing; a run of them means
    the policy or the data is broken, and training on would only hide it.
    """

    limit: int
    consecutive: int = 0
    total: int = 0
    reasons: list[str] = field(default_factory=list)

    def observe(self, skip_reason: str | None) -> bool:
        """Record one learner step's outcome; True when the run must give up."""
        if not is_non_finite(skip_reason):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        self.reasons.append(skip_reason)
        return self.limit > 0 and self.consecutive >= self.limit
