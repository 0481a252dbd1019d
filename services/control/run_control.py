"""`RunControl`: a run's state machine, shared by the control plane (which asks) and the driver (which acts).

States (ARCHITECTURE.md §3):

    pending → running ⇄ pausing → paused → running … → stopping → stopped | finished | failed

The control plane only *requests*: pause, resume, stop, checkpoint. The driver acts on requests at
step boundaries: while the state is not `running` it starts no rollout and no learner step; once
nothing is in flight it settles `pausing` into `paused` and waits; `stopping` drains what is in
flight and ends the run. A request that makes no sense in the current state raises
`ControlConflict` (HTTP 409), naming the state.

Thread-safe: the control plane's server thread and the driver's thread share one instance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class RunState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (RunState.STOPPED, RunState.FINISHED, RunState.FAILED)


#: Every allowed transition. Anything else is a bug in the caller, or a conflicting request.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.RUNNING, RunState.PAUSING, RunState.STOPPING, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.PAUSING, RunState.STOPPING, RunState.FINISHED, RunState.FAILED}),
    RunState.PAUSING: frozenset(
        {RunState.PAUSED, RunState.RUNNING, RunState.STOPPING, RunState.FINISHED, RunState.FAILED}
    ),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.STOPPING, RunState.FAILED}),
    RunState.STOPPING: frozenset({RunState.STOPPED, RunState.FAILED}),
    RunState.STOPPED: frozenset(),
    RunState.FINISHED: frozenset(),
    RunState.FAILED: frozenset(),
}


class ControlConflict(RuntimeError):
    """A request conflicts with the run's current state (HTTP 409)."""


class WeightVersionConflict(ControlConflict):
    """A weight announcement does not move the policy version forward."""


@dataclass(frozen=True)
class WeightAnnouncement:
    """A policy version the learner has published, and where its weights can be fetched."""

    version: int
    location: str
    announced_at: float


class RunControl:
    """The state of one run and the requests pending on it."""

    def __init__(self, *, on_state: Callable[[RunState], None] | None = None) -> None:
        self._condition = threading.Condition()
        self._state = RunState.PENDING
        self._checkpoint_requested = False
        self._reason: str | None = None
        self._pending_reason: str | None = None
        self._workers_requested: int | None = None
        self._on_state = on_state
        self._weights: WeightAnnouncement | None = None
        self.history: list[tuple[float, RunState]] = [(time.time(), RunState.PENDING)]

    # ------------------------------------------------------------------------------ reading
    @property
    def state(self) -> RunState:
        with self._condition:
            return self._state

    @property
    def reason(self) -> str | None:
        """Why the run stopped or failed (None while it runs)."""
        with self._condition:
            return self._reason

    @property
    def pending_reason(self) -> str | None:
        """Why a pending run has not started yet (e.g. the cluster cannot place it yet); None otherwise."""
        with self._condition:
            return self._pending_reason if self._state is RunState.PENDING else None

    @property
    def weights(self) -> WeightAnnouncement | None:
        with self._condition:
            return self._weights

    def may_start_work(self) -> bool:
        """True while rollouts and learner steps may be issued."""
        return self.state is RunState.RUNNING

    def stop_requested(self) -> bool:
        return self.state is RunState.STOPPING

    # ------------------------------------------------------------------------------ requests
    def request_pause(self) -> RunState:
        with self._condition:
            if self._state not in (RunState.PENDING, RunState.RUNNING):
                raise ControlConflict(f"cannot pause a run that is {self._state}")
            return self._move(RunState.PAUSING)

    def request_resume(self) -> RunState:
        with self._condition:
            if self._state not in (RunState.PAUSING, RunState.PAUSED):
                raise ControlConflict(
                    f"cannot resume a run that is {self._state}; only a paused or pausing run resumes"
                )
            return self._move(RunState.RUNNING)

    def request_stop(self, reason: str = "stopped by request") -> RunState:
        with self._condition:
            if self._state.is_terminal or self._state is RunState.STOPPING:
                raise ControlConflict(f"cannot stop a run that is {self._state}")
            self._reason = reason
            return self._move(RunState.STOPPING)

    def request_checkpoint(self) -> RunState:
        with self._condition:
            if self._state.is_terminal or self._state is RunState.STOPPING:
                raise ControlConflict(f"cannot checkpoint a run that is {self._state} (stopping writes a final one)")
            self._checkpoint_requested = True
            return self._state

    def request_workers(self, count: int) -> RunState:
        """Ask for `count` rollout workers, applied by the driver at its next step boundary (a newer request
        replaces one not yet applied)."""
        with self._condition:
            if self._state.is_terminal or self._state is RunState.STOPPING:
                raise ControlConflict(f"cannot scale a run that is {self._state}")
            self._workers_requested = count
            return self._state

    def announce_weights(self, version: int, location: str) -> WeightAnnouncement:
        with self._condition:
            if self._state.is_terminal:
                raise ControlConflict(f"cannot announce weights to a run that is {self._state}")
            if self._weights is not None and version <= self._weights.version:
                raise WeightVersionConflict(
                    f"policy version {version} is not newer than the announced version {self._weights.version}"
                )
            self._weights = WeightAnnouncement(version=version, location=location, announced_at=time.time())
            return self._weights

    # ------------------------------------------------------------------------------ the driver's side
    def start(self) -> RunState:
        """The driver is set up: `pending` becomes `running` (a pause requested meanwhile stays)."""
        with self._condition:
            if self._state is RunState.PENDING:
                self._move(RunState.RUNNING)
            return self._state

    def settle_pause(self) -> bool:
        """Nothing is in flight: `pausing` becomes `paused`. True when the run is now paused."""
        with self._condition:
            if self._state is RunState.PAUSING:
                self._move(RunState.PAUSED)
            return self._state is RunState.PAUSED

    def wait_while_paused(self, timeout: float) -> RunState:
        """Block up to `timeout` seconds while paused; returns the state then."""
        with self._condition:
            if self._state is RunState.PAUSED:
                self._condition.wait(timeout)
            return self._state

    def set_pending_reason(self, reason: str | None) -> None:
        with self._condition:
            self._pending_reason = reason

    def take_workers_request(self) -> int | None:
        """The number of workers asked for since the last call, once."""
        with self._condition:
            count, self._workers_requested = self._workers_requested, None
            return count

    def take_checkpoint_request(self) -> bool:
        """True once per checkpoint request."""
        with self._condition:
            requested, self._checkpoint_requested = self._checkpoint_requested, False
            return requested

    def finish(self, state: RunState, reason: str | None = None) -> RunState:
        """End the run: `stopped` after a stop request, `finished` at its limit, `failed` with a reason."""
        if not state.is_terminal:
            raise ValueError(f"finish() needs a terminal state, got {state}")
        with self._condition:
            if self._state.is_terminal:
                return self._state
            if reason is not None:
                self._reason = reason
            return self._move(state)

    # ------------------------------------------------------------------------------ internals
    def _move(self, state: RunState) -> RunState:
        if state is not self._state:
            if state not in TRANSITIONS[self._state]:
                raise ControlConflict(f"a run that is {self._state} cannot become {state}")
            self._state = state
            self.history.append((time.time(), state))
            self._condition.notify_all()
            if self._on_state is not None:
                self._on_state(state)
        return self._state
