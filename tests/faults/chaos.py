"""Chaos: a seeded fault injector for one long run, and the ledger that checks what the run kept.

`plan(seed, steps, each)` places `each` faults of every kind (`FaultKind`) at random moments of a
run of `steps` learner steps; `Chaos` is a thread that, watching a running `Driver`, injects them
with real signals: SIGKILL to a random rollout worker's process, SIGKILL to the learner's, a stop
and start of the run's redis-server, and an operator's request through the run's control (a
checkpoint, or a pause held for a moment, then a resume). Moments count learner steps of progress (a learner
restart takes the step counter back to its checkpoint; the steps trained again count as progress),
plus a random delay inside a step, so a fault lands in generation, training, a weight push or a
checkpoint alike.

`AckLedger` records every group id the run acknowledges, so that `group_ledger` can check the
conservation law group by group on the Redis buffer after the run: every group ever stored is
acknowledged exactly once, still ready, or dropped (stale, or set aside as corrupt), and the buffer
holds the bytes of exactly the groups not yet acknowledged.
"""

from __future__ import annotations

import enum
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import ray
import redis

from orchard.services.buffer.redis_buffer import RedisBuffer
from orchard.services.control.run_control import ControlConflict, RunState
from orchard.services.redis_server import RedisServer

#: How long the injector waits for an actor's pid before trying the fault again later.
PID_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.02


class FaultKind(enum.StrEnum):
    WORKER = "worker"  # SIGKILL to one rollout worker's process
    LEARNER = "learner"  # SIGKILL to the learner's process
    REDIS = "redis"  # redis-server stopped and started again (its append-only file replayed)
    CONTROL = "control"  # an operator's request: a checkpoint, or a pause held briefly then a resume


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    #: Learner steps of progress after which the fault is injected.
    at_progress: int
    #: Seconds after that step is seen, so that faults do not all land at step boundaries.
    delay_seconds: float
    #: Which rollout worker (an index into the run's workers, taken modulo their number); for a
    #: control request, even asks a checkpoint and odd a pause.
    worker: int = 0


def plan(seed: int, steps: int, each: int, *, workers: int) -> list[Fault]:
    """`each` faults of every kind, in a seeded random order, at distinct random moments of the first
    80 % of `steps` (the rest lets the last fault's recovery finish within the run)."""
    if steps < 10 * each:
        raise ValueError(f"{steps} steps are too few for {each} faults of each kind; use at least {10 * each}")
    rng = random.Random(seed)
    kinds = [kind for kind in FaultKind for _ in range(each)]
    rng.shuffle(kinds)
    moments = sorted(rng.sample(range(2, int(0.8 * steps)), len(kinds)))
    return [
        Fault(kind, at, delay_seconds=rng.uniform(0.0, 0.3), worker=rng.randrange(workers))
        for kind, at in zip(kinds, moments, strict=True)
    ]


@dataclass
class Chaos:
    """Injects `faults` into the run of `driver` from a thread of its own; `survived` counts by kind.

    `pids` collects every actor process the run had (each seen at a poll), so a test can check that
    none is left behind after the run."""

    driver: Any
    server: RedisServer
    faults: list[Fault]
    log: Callable[[str], None] = print
    injected: Counter[str] = field(default_factory=Counter)
    pids: set[int] = field(default_factory=set)
    error: BaseException | None = None
    _progress: int = 0
    _last_step: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Chaos:
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PID_TIMEOUT_SECONDS)

    @property
    def remaining(self) -> int:
        return len(self.faults) - sum(self.injected.values())

    def _run(self) -> None:
        try:
            for fault in self.faults:
                if not self._wait_for(fault.at_progress):
                    return
                time.sleep(fault.delay_seconds)
                while not self._inject(fault):
                    if self._stop.wait(0.2):
                        return
                self.injected[fault.kind] += 1
        except BaseException as error:  # reported by the test
            self.error = error

    def _wait_for(self, progress: int) -> bool:
        """Poll the driver until `progress` learner steps were taken; False when stopped first."""
        next_pids = 0.0
        while not self._stop.is_set():
            step = self.driver.step
            if step > self._last_step:
                self._progress += step - self._last_step
            self._last_step = step
            if self._progress >= progress:
                return True
            if time.monotonic() > next_pids:
                self._note_pids()
                next_pids = time.monotonic() + 0.5
            time.sleep(POLL_SECONDS)
        return False

    def _note_pids(self) -> None:
        for actor in self._actors():
            pid = _pid(actor, timeout=2.0)
            if pid is not None:
                self.pids.add(pid)

    def _actors(self) -> list[Any]:
        pool, learners = getattr(self.driver, "pool", None), getattr(self.driver, "learners", None)
        actors = list(pool.actors.values()) if pool is not None else []
        if learners is not None:
            actors.append(learners.actor)
        return actors

    def _inject(self, fault: Fault) -> bool:
        """True once injected; False when the target is not there yet (say, a worker being replaced)."""
        if fault.kind is FaultKind.CONTROL:
            return self._request(checkpoint=fault.worker % 2 == 0)
        if fault.kind is FaultKind.REDIS:
            self.server.restart()
            self.log(f"chaos: redis-server restarted at progress {self._progress}")
            return True
        if fault.kind is FaultKind.LEARNER:
            name, actor = "learner", self.driver.learners.actor
        else:
            names = sorted(self.driver.pool.actors)
            name = names[fault.worker % len(names)]
            actor = self.driver.pool.actors[name]
        pid = _pid(actor, timeout=PID_TIMEOUT_SECONDS)
        if pid is None:
            return False
        self.pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        self.log(f"chaos: {name} (pid {pid}) killed at progress {self._progress}")
        return True

    def _request(self, *, checkpoint: bool) -> bool:
        """A checkpoint request, or a pause held until the run is paused (or a minute), then a resume;
        False when the run's state refuses it now."""
        control = self.driver.control
        try:
            if checkpoint:
                control.request_checkpoint()
                self.log(f"chaos: checkpoint requested at progress {self._progress}")
                return True
            control.request_pause()
        except ControlConflict:
            return False
        deadline = time.monotonic() + PID_TIMEOUT_SECONDS
        while control.state is not RunState.PAUSED and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(POLL_SECONDS)
        paused_at = control.state
        control.request_resume()
        self.log(f"chaos: paused ({paused_at}) and resumed at progress {self._progress}")
        return True


def _pid(actor: Any, *, timeout: float) -> int | None:
    """The actor's process id, or None when it is dead or does not answer in time."""
    try:
        return int(ray.get(actor.pid.remote(), timeout=timeout))
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None


def running(pids: set[int]) -> list[int]:
    """The pids of `pids` still running (zombies count as gone: they hold nothing but their entry)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def redis_servers_on(port: int) -> list[int]:
    """Pids of redis-server processes serving `port`."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        name, cmdline = process.info["name"] or "", " ".join(process.info["cmdline"] or [])
        if "redis-server" in name + cmdline and f":{port}" in cmdline:
            found.append(process.pid)
    return found


class AckLedger:
    """Every group id acknowledged in `RedisBuffer`, in order (the buffer's own `ack`, observed)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    @contextmanager
    def observing(self) -> Iterator[AckLedger]:
        original = RedisBuffer.ack

        def ack(buffer: RedisBuffer, group_ids: Any) -> None:
            original(buffer, group_ids)
            self.ids.extend(group_ids)  # recorded once the acknowledgement is in Redis

        RedisBuffer.ack = ack  # type: ignore[method-assign]
        try:
            yield self
        finally:
            RedisBuffer.ack = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class GroupLedger:
    stored: int
    acknowledged: int
    ready: int
    pending: int
    dropped: int


def group_ledger(url: str, namespace: str, acknowledged: list[str]) -> GroupLedger:
    """Check the conservation law for every group of `namespace`; raise AssertionError naming a group
    that breaks it. `acknowledged`: the ids the run acknowledged, in order."""
    client = redis.Redis.from_url(url, decode_responses=True)
    prefix = f"orchard:{namespace}:"
    try:
        seen = client.smembers(prefix + "seen")
        ready = set(client.zrange(prefix + "ready", 0, -1))
        pending = set(client.hkeys(prefix + "pending"))
        held = set(client.hkeys(prefix + "groups"))
        corrupt = set(client.hkeys(prefix + "corrupt"))
        stats = {key: int(value) for key, value in client.hgetall(prefix + "stats").items()}
    finally:
        client.close()
    twice = [group for group, count in Counter(acknowledged).items() if count > 1]
    assert not twice, f"groups acknowledged more than once: {twice[:5]}"
    acked = set(acknowledged)
    assert acked <= seen, f"acknowledged groups never stored: {sorted(acked - seen)[:5]}"
    for name, part in (("ready", ready), ("pending", pending), ("corrupt", corrupt)):
        assert not acked & part, f"groups both acknowledged and {name}: {sorted(acked & part)[:5]}"
    assert not ready & pending, f"groups both ready and pending: {sorted(ready & pending)[:5]}"
    assert held == ready | pending, (
        f"bytes without a ready or pending group: {sorted(held - ready - pending)[:5]}; "
        f"ready or pending groups without bytes: {sorted((ready | pending) - held)[:5]}"
    )
    dropped = seen - acked - ready - pending
    assert len(seen) == stats.get("put", 0), f"{len(seen)} ids seen, {stats.get('put')} groups put"
    assert len(acked) == stats.get("acked", 0), f"{len(acked)} groups acknowledged, the buffer counted {stats}"
    assert len(dropped) == stats.get("stale", 0) + stats.get("corrupt", 0), (
        f"{len(dropped)} groups neither acknowledged, ready nor pending; the buffer counted {stats}"
    )
    return GroupLedger(len(seen), len(acked), len(ready), len(pending), len(dropped))
