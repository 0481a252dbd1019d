"""Give-up rules of a run, as small pure objects the driver consults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchard.learner.trainer import StepResult


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

    def observe(self, result: StepResult) -> bool:
        """Record one learner step's outcome; True when the run must give up."""
        if not result.non_finite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        self.reasons.append(result.skip_reason or "non-finite")
        return self.limit > 0 and self.consecutive >= self.limit
