"""`ControlService`: the runs a control plane knows, and what can be asked of them.

The FastAPI routes (`services/control/app.py`) only translate HTTP into calls of this object, so
everything here is usable, and tested, without a server. A run is a `RunHandle`: its config, run
directory, `RunControl` (state and requests), `RunMetrics` and, once launched, its `Driver`.

`orchard run` creates one run and executes it in its own main thread; `orchard serve` creates runs
from `POST /v1/runs` and executes each in a thread of its own (`launch_in_thread`). One run is
active at a time (a second create is a conflict), since a run sizes its Ray actors for the whole
cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from orchard.config import RunConfig
from orchard.services.control.run_control import ControlConflict, RunControl, RunState, WeightAnnouncement
from orchard.services.metrics import RunMetrics
from orchard.services.run.report import RunProgress
from orchard.services.run_dir import RunDirectory, new_run_id


class RunNotFound(KeyError):
    """No run has this id (HTTP 404)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no run with id {self.run_id!r}"


class WeightsInfo(BaseModel):
    version: int
    location: str
    announced_at: float


class RunStatus(RunProgress):
    """A run as `GET /v1/runs/{id}` shows it: its identity and state, and its progress."""

    id: str
    state: RunState
    reason: str | None = Field(None, description="Why the run stopped or failed.")
    run_dir: str
    created_at: float
    max_steps: int
    weights: WeightsInfo | None = Field(None, description="The newest announced policy version.")


class RunHandle:
    """One run: what it was created from, its control and metrics, and its driver once launched."""

    def __init__(self, config: RunConfig, run_dir: RunDirectory, *, resume: bool = False) -> None:
        self.id = run_dir.run_id
        self.resume = resume
        self.config = config
        self.run_dir = run_dir
        self.metrics = RunMetrics()
        self.control = RunControl(on_state=self._on_state)
        self.created_at = time.time()
        self.driver: Any | None = None  # services.driver.Driver, imported lazily (it imports Ray)
        self.summary: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None

    def _on_state(self, state: RunState) -> None:
        self.metrics.set_state(str(state))

    def execute(self, *, show_progress: bool = False) -> dict[str, Any]:
        """Run the driver to the end in this thread; returns the summary (raises what failed the run)."""
        from orchard.services.driver import Driver

        self.driver = Driver(
            self.config,
            self.run_dir,
            show_progress=show_progress,
            control=self.control,
            metrics=self.metrics,
            resume=self.resume,
        )
        self.summary = self.driver.run()
        return self.summary

    def status(self) -> RunStatus:
        progress = self.driver.progress() if self.driver is not None else RunProgress()
        weights: WeightAnnouncement | None = self.control.weights
        return RunStatus(
            id=self.id,
            state=self.control.state,
            reason=self.control.reason,
            run_dir=str(self.run_dir.path),
            created_at=self.created_at,
            max_steps=self.config.max_steps,
            weights=WeightsInfo(**vars(weights)) if weights else None,
            **dict(progress),
        )


def launch_in_thread(handle: RunHandle) -> None:
    """Execute `handle` in a daemon thread, joining (or starting) the Ray cluster first."""

    def target() -> None:
        from orchard.services.cluster import connect_ray

        try:
            connect_ray(handle.config)
            handle.execute()
        except BaseException as error:  # the run's state and events.log already say why
            handle.control.finish(RunState.FAILED, f"{type(error).__name__}: {error}")

    handle.thread = threading.Thread(target=target, name=f"run-{handle.id}", daemon=True)
    handle.thread.start()


class ControlService:
    """The runs of one control plane."""

    def __init__(self, *, launcher: Callable[[RunHandle], None] = launch_in_thread) -> None:
        self._launcher = launcher
        self._runs: dict[str, RunHandle] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ runs
    def create_run(
        self,
        config: RunConfig,
        *,
        run_dir: RunDirectory | None = None,
        paused: bool = False,
        launch: bool = True,
        resume: bool = False,
    ) -> RunHandle:
        """Register a run (paused before its first step if asked) and launch it unless `launch` is False."""
        with self._lock:
            active = [run for run in self._runs.values() if not run.control.state.is_terminal]
            if active:
                raise ControlConflict(
                    f"run {active[0].id} is {active[0].control.state}; stop it before creating another "
                    "(a run sizes its actors for the whole cluster, so one runs at a time)"
                )
            run_dir = run_dir or RunDirectory(config.runs_dir, new_run_id(config.name))
            if run_dir.run_id in self._runs:
                raise ControlConflict(f"a run with id {run_dir.run_id} exists already")
            handle = RunHandle(config, run_dir, resume=resume)
            if paused:
                handle.control.request_pause()
            self._runs[handle.id] = handle
        if launch:
            self._launcher(handle)
        return handle

    def get(self, run_id: str) -> RunHandle:
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFound(run_id) from None

    def runs(self) -> list[RunHandle]:
        return sorted(self._runs.values(), key=lambda run: run.created_at)

    def latest(self) -> RunHandle | None:
        runs = self.runs()
        return runs[-1] if runs else None

    # ------------------------------------------------------------------------------ requests
    def pause(self, run_id: str) -> RunState:
        return self.get(run_id).control.request_pause()

    def resume(self, run_id: str) -> RunState:
        return self.get(run_id).control.request_resume()

    def stop(self, run_id: str) -> RunState:
        return self.get(run_id).control.request_stop()

    def checkpoint(self, run_id: str) -> RunState:
        return self.get(run_id).control.request_checkpoint()

    def announce_weights(self, run_id: str, version: int, location: str) -> WeightAnnouncement:
        return self.get(run_id).control.announce_weights(version, location)

    def render_metrics(self) -> bytes:
        """The Prometheus exposition of the newest run (empty before the first run)."""
        latest = self.latest()
        return latest.metrics.render() if latest is not None else b""
