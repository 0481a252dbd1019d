"""`ControlService`: the runs a control plane knows, and what can be asked of them.

The FastAPI routes (`services/control/app.py`) only translate HTTP into calls of this object, so
everything here is usable, and tested, without a server. A run is a `RunHandle`: its config, run
directory, `RunControl` (state and requests), `RunMetrics` and, once launched, its `Driver`.

`orchard run` creates one run and executes it in its own main thread; `orchard serve` creates runs
from `POST /v1/runs` and executes each in a thread of its own (`launch_in_thread`). Up to
`max_active_runs` runs are active at once (`control.max_active_runs`, `orchard serve
--max-active-runs`; one more is a conflict). With more than one, each run must reserve its actors in
placement groups of its own (`cluster.placement_groups`): a run the cluster cannot hold yet waits in
`pending`, saying why, instead of taking another's resources. Each run has its own buffer namespace,
run directory, `RunControl` and `RunMetrics`; `/metrics` serves every run's series with a `run` label.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from pydantic import BaseModel, Field

from orchard.config import ConfigError, RunConfig
from orchard.services.control.run_control import ControlConflict, RunControl, RunState, WeightAnnouncement
from orchard.services.metrics import RunMetrics
from orchard.services.run.report import RunProgress
from orchard.services.run_dir import RunDirectory, new_run_id

T = TypeVar("T")


#: How long one read of a run's progress, and one rendering of its metrics, serve every reader: a
#: crowd of clients polling status and /metrics costs the run one read per interval, not one per
#: request (each read takes the GIL from the run's own threads, and progress asks the buffer). A
#: change of the run's state is seen at once: it drops both.
READ_CACHE_SECONDS = 0.5


class Cached(Generic[T]):
    """`read()`'s value, read again once it is `seconds` old; concurrent callers wait for one read."""

    def __init__(self, read: Callable[[], T], seconds: float = READ_CACHE_SECONDS) -> None:
        self._read, self.seconds = read, seconds
        self._lock = threading.Lock()
        self._value: T | None = None
        self._read_at = -math.inf

    def get(self) -> T:
        with self._lock:
            now = time.monotonic()
            if self._value is None or now - self._read_at >= self.seconds:
                self._value, self._read_at = self._read(), now
            return self._value

    def fresh(self) -> T | None:
        """The value if it is younger than `seconds`, else None (without reading, so without blocking)."""
        value, read_at = self._value, self._read_at
        return value if value is not None and time.monotonic() - read_at < self.seconds else None

    def drop(self) -> None:
        with self._lock:
            self._value = None


class RunNotFound(KeyError):
    """No run has this id (HTTP 404)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no run with id {self.run_id!r}"


class ScaleRefused(ValueError):
    """A scale request the run's config does not allow (HTTP 422): too few workers, or over a quota."""


class WeightsInfo(BaseModel):
    version: int
    location: str
    announced_at: float


class RunStatus(RunProgress):
    """A run as `GET /v1/runs/{id}` shows it: its identity and state, and its progress."""

    id: str
    state: RunState
    reason: str | None = Field(None, description="Why the run stopped or failed, or why it is still pending.")
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
        self._progress = Cached(self._read_progress)
        self._status_lock = threading.Lock()
        self._status_json: tuple[Any, float, bytes] | None = None  # (state, reason, weights), when, JSON
        self.state_listeners: list[Callable[[], None]] = []  # called after each change of state

    def _on_state(self, state: RunState) -> None:
        self.metrics.set_state(str(state))
        self._progress.drop()
        for listener in self.state_listeners:
            listener()

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

    def _read_progress(self) -> RunProgress:
        return self.driver.progress() if self.driver is not None else RunProgress()

    def fresh_status_json(self) -> bytes | None:
        """`status_json()` when it needs no new read (None otherwise): served without leaving the event loop."""
        cached = self._status_json
        key = (self.control.state, self.control.reason, self.control.pending_reason, self.control.weights)
        if cached is not None and cached[0] == key and time.monotonic() - cached[1] < READ_CACHE_SECONDS:
            return cached[2]
        return None

    def status_json(self) -> bytes:
        """`status()` as JSON, built again when the state, reason or announced weights change, or once
        it is `READ_CACHE_SECONDS` old: what a crowd of pollers is served."""
        key = (self.control.state, self.control.reason, self.control.pending_reason, self.control.weights)
        with self._status_lock:
            now = time.monotonic()
            cached = self._status_json
            if cached is None or cached[0] != key or now - cached[1] >= READ_CACHE_SECONDS:
                cached = self._status_json = (key, now, self.status().model_dump_json().encode())
            return cached[2]

    def status(self) -> RunStatus:
        """State, reason and weights as they are now; progress at most `READ_CACHE_SECONDS` old."""
        progress = self._progress.get()
        weights: WeightAnnouncement | None = self.control.weights
        return RunStatus(
            id=self.id,
            state=self.control.state,
            reason=self.control.reason or self.control.pending_reason,
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


class RunLabelled:
    """A Prometheus collector of every run's metrics, each sample labelled with its run's id."""

    def __init__(self, runs: Callable[[], list[RunHandle]]) -> None:
        self._runs = runs

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for run in self._runs():
            for family in run.metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(
                    Sample(
                        sample.name, {"run": run.id, **sample.labels}, sample.value, sample.timestamp, sample.exemplar
                    )
                    for sample in family.samples
                )
        return list(families.values())


class ControlService:
    """The runs of one control plane."""

    def __init__(self, *, launcher: Callable[[RunHandle], None] = launch_in_thread, max_active_runs: int = 1) -> None:
        if max_active_runs < 1:
            raise ValueError(f"max_active_runs must be at least 1, got {max_active_runs}")
        self._launcher = launcher
        self.max_active_runs = max_active_runs
        self._runs: dict[str, RunHandle] = {}
        self._lock = threading.Lock()
        self._registry = CollectorRegistry()
        self._registry.register(RunLabelled(self.runs))
        self._exposition = Cached(lambda: generate_latest(self._registry))

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
            if len(active) >= self.max_active_runs:
                listed = ", ".join(f"{run.id} ({run.control.state})" for run in active)
                raise ControlConflict(
                    f"{len(active)} runs are active ({listed}), the most this control plane trains at once "
                    f"(control.max_active_runs={self.max_active_runs}); stop one before creating another"
                )
            if self.max_active_runs > 1 and not config.cluster.placement_groups:
                raise ConfigError(
                    [
                        (
                            "cluster.placement_groups",
                            f"this control plane trains up to {self.max_active_runs} runs at once, so each run must "
                            "reserve its actors in placement groups of its own: set cluster.placement_groups: true",
                        )
                    ]
                )
            run_dir = run_dir or RunDirectory(config.runs_dir, new_run_id(config.name))
            if run_dir.run_id in self._runs:
                raise ControlConflict(f"a run with id {run_dir.run_id} exists already")
            handle = RunHandle(config, run_dir, resume=resume)
            handle.state_listeners.append(self._exposition.drop)
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

    def scale(self, run_id: str, count: int) -> RunState:
        """Ask run `run_id` for `count` rollout workers, within its config's quota."""
        run = self.get(run_id)
        if count < 1:
            raise ScaleRefused(
                f"count {count}: a run needs at least 1 rollout worker (worker-0 also evaluates); stop the run instead"
            )
        try:
            run.config.check_quota(count, field="count")
        except ValueError as error:
            raise ScaleRefused(str(error)) from None
        return run.control.request_workers(count)

    def fresh_metrics(self) -> bytes | None:
        """`render_metrics()` when it needs no new rendering, else None."""
        return self._exposition.fresh()

    def render_metrics(self) -> bytes:
        """The Prometheus exposition of every run, each series labelled with its run (empty before the first)."""
        return self._exposition.get()
