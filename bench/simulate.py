"""Discrete-event simulation of Orchard's pipeline from 8 to 1024 GPUs.

What it models, per learner step: rollout engines (continuous batching over a fixed number of
sequence slots, each sequence decoding at a constant speed), a verifier pool, the Redis buffer
(one server, FIFO), the learner (DeepSpeed ZeRO-3 data parallel) and weight sync (the learner
sends each new version; every engine pauses to load it). Admission is the run loop's own
`services.run.admission.AdmissionGate`, asked before every group starts: an engine holding version w
starts a group only while the groups ready or in flight leave room in the batches that can still
train a group of w, within `capacity_groups` (by default (max_staleness + 1) * B); `max_staleness 0`
is the synchronous pipeline. Costs come from `Calibration`, every figure named with its source.

Prints the calibration inputs, a check against the demo's measured async/sync speed-up, and the
scaling table of docs/scaling.md. Runs in a few seconds; it is a model, not a measurement (see
docs/scaling.md for what it leaves out).

Run: `python bench/simulate.py [--steps 5] [--seed 0]`; `--calibrate` re-measures the two
inputs measured on this machine (Redis cost per byte, math-verify cost per answer).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from orchard.services.run.admission import AdmissionGate

GB = 1e9


# ------------------------------------------------------------------------------ calibration


@dataclass(frozen=True)
class Calibration:
    """Every input of the GPU-scale model. `SOURCES` names where each comes from."""

    # Hardware (NVIDIA H100 SXM5 80 GB, 8 per node, one 400 Gb/s NDR InfiniBand NIC per GPU).
    peak_bf16_flops: float = 989e12
    hbm_bytes: float = 80e9
    hbm_bandwidth: float = 3.35e12
    hbm_efficiency: float = 0.70
    kv_memory_fraction: float = 0.90
    gpus_per_node: int = 8
    nccl_bus_bandwidth_inter_node: float = 45 * GB
    nccl_bus_bandwidth_intra_node: float = 460 * GB
    nccl_hop_latency: float = 50e-6
    pcie_bandwidth: float = 25 * GB
    front_end_network_bandwidth: float = 12.5 * GB
    # Learner.
    learner_mfu: float = 0.35
    learner_micro_batch_tokens: int = 16_384
    # Rollout.
    engine_weight_load_seconds_per_gb: float = 0.07
    verifier_cpus_per_rollout_gpu: int = 4
    # Measured by Orchard's own benchmarks (README "Benchmarks"), on a 2-core CPU machine.
    redis_seconds_per_group_op: float = 30e-6
    redis_seconds_per_byte: float = 1 / 0.42e9
    object_store_bytes_per_second: float = 120 * 2**20 / 0.224
    math_verify_seconds_per_answer: float = 0.0009


SOURCES = {
    "peak_bf16_flops": "NVIDIA H100 SXM5 datasheet: 989 TFLOPS dense BF16",
    "hbm_bytes": "NVIDIA H100 SXM5 datasheet: 80 GB HBM3",
    "hbm_bandwidth": "NVIDIA H100 SXM5 datasheet: 3.35 TB/s",
    "hbm_efficiency": "assumption: share of HBM bandwidth a decode step reaches (gives 12.6k tok/s for 7B, "
    "against ~12.5k tok/s published for vLLM, Llama 3.1 8B BF16 on one H100)",
    "kv_memory_fraction": "vLLM default gpu_memory_utilization 0.9",
    "gpus_per_node": "HGX H100 node",
    "nccl_bus_bandwidth_inter_node": "nccl-tests across nodes with one 400 Gb/s NDR NIC per GPU (50 GB/s line rate; "
    "90% assumed)",
    "nccl_bus_bandwidth_intra_node": "nccl-tests all_reduce busbw on 8xH100 SXM NVLink: 460-480 GB/s",
    "nccl_hop_latency": "assumption: per-hop latency of a pipelined NCCL broadcast",
    "pcie_bandwidth": "PCIe Gen5 x16 host-to-device, ~25 GB/s achieved (assumption)",
    "front_end_network_bandwidth": "assumption: 100 GbE front-end network of the node that puts each version "
    "into the Ray object store",
    "learner_mfu": "assumption below Llama 3's 38-43% BF16 MFU on 8k-16k H100 (Llama 3 Herd of Models, 2024): "
    "ZeRO-3 with variable-length RL batches",
    "learner_micro_batch_tokens": "assumption: tokens per GPU per micro-batch (ZeRO-3 gathers the weights "
    "once per micro-batch forward and once per backward)",
    "engine_weight_load_seconds_per_gb": "assumption: vLLM load_weights from a GPU buffer, ~1 s for a 7B model",
    "verifier_cpus_per_rollout_gpu": "assumption: 4 of a node's ~100 cores per GPU run verifiers",
    "redis_seconds_per_group_op": "bench/simulate.py --calibrate: pipelined SET+GET of 16 KiB and 512 KiB values "
    "on a private redis-server with appendfsync always, this 2-core machine, 26-31 us per operation (consistent "
    "with bench/buffer.py's 19 664 put+take+ack of 2.3 KiB groups per second, 17 us per operation)",
    "redis_seconds_per_byte": "bench/simulate.py --calibrate: the same fit, 0.42 GB/s",
    "object_store_bytes_per_second": "bench/weight_sync.py: 120 MiB through the Ray object store to 2 workers "
    "in 224 ms (README Benchmarks)",
    "math_verify_seconds_per_answer": "bench/simulate.py --calibrate: verifiers.math_answer.MathVerifier on "
    "short LaTeX answers, this machine, 0.6-1.2 ms per answer",
}


@dataclass(frozen=True)
class Workload:
    """A GRPO run of a 7B model on long reasoning answers (DAPO-like batch)."""

    name: str = "7B, 16 x ~4k tokens"
    parameters: float = 7.6e9
    layers: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    prompt_tokens: int = 512
    mean_response_tokens: int = 4096
    response_sigma: float = 0.6
    max_response_tokens: int = 16_384
    group_size: int = 16
    groups_per_step: int = 256

    @property
    def weight_bytes(self) -> float:
        return 2 * self.parameters

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


@dataclass(frozen=True)
class Layout:
    rollout_gpus: int
    learner_gpus: int
    max_staleness: int = 4
    transport: str = "nccl"  # "nccl" or "object_store"
    gpus_per_engine: int = 1
    #: Every GPU generates, then every GPU trains (verl's hybrid engine); synchronous only.
    colocated: bool = False

    @property
    def label(self) -> str:
        if self.colocated:
            return "sync, colocated"
        if self.max_staleness == 0:
            return f"sync, split ({self.transport.replace('_', ' ')})"
        return f"async s={self.max_staleness}, {self.transport.replace('_', ' ')}"


# ------------------------------------------------------------------------------ the pipeline's costs


@dataclass(frozen=True)
class PipelineCosts:
    """What the event simulation needs, in seconds and counts; derived by `gpu_costs` or set directly.

    A decode step of an engine holding n sequences takes `step_seconds + n * step_seconds_per_sequence`
    and advances each of them by one token: memory-bound decode reads the weights once per step and
    each sequence's KV cache.
    """

    engines: int
    slots_per_engine: int
    step_seconds: float
    step_seconds_per_sequence: float
    groups_per_step: int
    group_size: int
    max_staleness: int
    learner_step_seconds: float
    publish_seconds: float  # the learner is busy sending a version
    arrival_seconds: float  # from the end of a step until the engines hold the version
    engine_pause_seconds: float  # each engine stops generating to load it
    verifier_servers: int = 1
    verify_seconds_per_completion: float = 0.0
    redis_seconds_per_group_op: float = 0.0
    redis_seconds_per_byte: float = 0.0
    group_bytes: float = 0.0
    mean_response_tokens: float = 16
    response_sigma: float = 0.0
    max_response_tokens: int = 1 << 30
    prompt_tokens: int = 0
    token_quantum: int = 1  # completion lengths rounded up to a multiple of this (fewer events)
    capacity_groups: int | None = None  # buffer.capacity_groups; None: (max_staleness + 1) * groups_per_step

    @property
    def gate(self) -> AdmissionGate:
        capacity = self.capacity_groups or (self.max_staleness + 1) * self.groups_per_step
        return AdmissionGate.of(self.groups_per_step, self.max_staleness, capacity)

    @property
    def full_speed_tokens_per_second(self) -> float:
        """An engine's token rate with every slot busy."""
        return self.slots_per_engine / (self.step_seconds + self.slots_per_engine * self.step_seconds_per_sequence)


def engine_slots_and_step(calibration: Calibration, workload: Workload) -> tuple[int, float, float]:
    """Sequences one engine holds (KV cache), and its decode step: a fixed part (reading the
    weights) and a part per sequence (reading its KV cache at the mean context)."""
    kv_budget = calibration.hbm_bytes * calibration.kv_memory_fraction - workload.weight_bytes
    mean_context = workload.prompt_tokens + workload.mean_response_tokens / 2
    slots = int(kv_budget / (workload.kv_bytes_per_token * mean_context))
    bandwidth = calibration.hbm_bandwidth * calibration.hbm_efficiency
    return slots, workload.weight_bytes / bandwidth, mean_context * workload.kv_bytes_per_token / bandwidth


def learner_step_seconds(calibration: Calibration, workload: Workload, gpus: int) -> float:
    """6·N·tokens at the assumed MFU, or ZeRO-3's weight traffic if that is longer (overlapped)."""
    tokens = workload.groups_per_step * workload.group_size * (workload.prompt_tokens + workload.mean_response_tokens)
    compute = 6 * workload.parameters * tokens / (gpus * calibration.peak_bf16_flops * calibration.learner_mfu)
    micro_batches = math.ceil(tokens / gpus / calibration.learner_micro_batch_tokens)
    bandwidth = (
        calibration.nccl_bus_bandwidth_intra_node
        if gpus <= calibration.gpus_per_node
        else calibration.nccl_bus_bandwidth_inter_node
    )
    # Per micro-batch: all-gather for forward and backward, reduce-scatter of gradients.
    communication = micro_batches * 3 * workload.weight_bytes * (gpus - 1) / gpus / bandwidth if gpus > 1 else 0.0
    return max(compute, communication)


def weight_sync_seconds(calibration: Calibration, workload: Workload, layout: Layout) -> tuple[float, float, float]:
    """(learner busy publishing, delay until engines hold it, each engine's pause) for one version."""
    size = workload.weight_bytes
    load = calibration.engine_weight_load_seconds_per_gb * size / GB
    if layout.colocated:
        # The same GPUs hold both: gather the ZeRO-3 shards, load them into the engine.
        gather = size / calibration.nccl_bus_bandwidth_intra_node
        return gather, gather, load
    nodes = math.ceil(layout.rollout_gpus / calibration.gpus_per_node)
    if layout.transport == "nccl":
        # ZeRO-3 shards gathered on the sending rank, then one pipelined broadcast that every engine joins.
        gather = size / calibration.nccl_bus_bandwidth_intra_node
        broadcast = size / calibration.nccl_bus_bandwidth_inter_node + math.ceil(math.log2(nodes + 1)) * (
            calibration.nccl_hop_latency
        )
        return gather + broadcast, gather + broadcast, broadcast + load
    if layout.transport == "object_store":
        # One put; every rollout node pulls it from the sender (star), deserialises, copies to the GPUs.
        put = size / calibration.object_store_bytes_per_second
        pulls = size * nodes / calibration.front_end_network_bandwidth
        arrival = put + pulls + size / calibration.object_store_bytes_per_second
        return put + pulls, arrival, size / calibration.pcie_bandwidth + load
    raise ValueError(f"transport must be 'nccl' or 'object_store', not {layout.transport!r}")


def gpu_costs(calibration: Calibration, workload: Workload, layout: Layout) -> PipelineCosts:
    if layout.colocated and layout.max_staleness != 0:
        raise ValueError("a colocated layout alternates generation and training: max_staleness must be 0")
    slots, step, per_sequence = engine_slots_and_step(calibration, workload)
    publish, arrival, pause = weight_sync_seconds(calibration, workload, layout)
    tokens_per_group = workload.group_size * (workload.prompt_tokens + workload.mean_response_tokens)
    return PipelineCosts(
        engines=layout.rollout_gpus // layout.gpus_per_engine,
        slots_per_engine=slots * layout.gpus_per_engine,
        step_seconds=step / layout.gpus_per_engine,
        step_seconds_per_sequence=per_sequence / layout.gpus_per_engine,
        groups_per_step=workload.groups_per_step,
        group_size=workload.group_size,
        max_staleness=layout.max_staleness,
        learner_step_seconds=learner_step_seconds(calibration, workload, layout.learner_gpus),
        publish_seconds=publish,
        arrival_seconds=arrival,
        engine_pause_seconds=pause,
        verifier_servers=layout.rollout_gpus * calibration.verifier_cpus_per_rollout_gpu,
        verify_seconds_per_completion=calibration.math_verify_seconds_per_answer,
        redis_seconds_per_group_op=calibration.redis_seconds_per_group_op,
        redis_seconds_per_byte=calibration.redis_seconds_per_byte,
        # token ids (int32) and behaviour logprobs (float32) of every completion
        group_bytes=tokens_per_group * 8,
        mean_response_tokens=workload.mean_response_tokens,
        response_sigma=workload.response_sigma,
        max_response_tokens=workload.max_response_tokens,
        prompt_tokens=workload.prompt_tokens,
        token_quantum=256,
    )


# ------------------------------------------------------------------------------ the event simulation


@dataclass
class Engine:
    """One vLLM engine. Every sequence it holds advances one token per decode step, so progress is
    kept as one clock of tokens decoded per sequence (`progress`): a sequence admitted at progress p
    with length L ends when progress reaches p + L, whatever the occupancy did meanwhile."""

    index: int
    free_slots: int
    version: int = 0
    progress: float = 0.0
    updated_at: float = 0.0
    paused_until: float = 0.0
    epoch: int = 0  # the engine's scheduled tick is valid only while its epoch is unchanged
    ends: list = field(default_factory=list)  # heap of (progress at end, sequence number, group)

    @property
    def running(self) -> int:
        return len(self.ends)


@dataclass
class Group:
    version: int
    generated_tokens: int
    remaining: int


@dataclass
class Result:
    step_seconds: float
    trained_tokens_per_second: float
    mean_staleness: float
    rollout_utilisation: float
    learner_busy: float
    learner_publish_share: float
    engine_pause_share: float
    redis_busy: float
    verifier_busy: float
    max_staleness: int
    steps: int
    events: int

    @property
    def bottleneck(self) -> str:
        weight_sync = max(self.engine_pause_share, self.learner_publish_share)
        if weight_sync >= 0.3:
            return "weight sync"
        # A single FIFO server half busy already makes the learner's take wait behind the puts.
        if self.redis_busy >= 0.5:
            return "redis"
        shares = {
            "learner": self.learner_busy,
            "rollout": self.rollout_utilisation,
            "redis": self.redis_busy,
            "verifiers": self.verifier_busy,
        }
        busiest = max(shares, key=shares.get)
        if shares[busiest] >= 0.8:
            return busiest
        if self.max_staleness == 0:
            return "sync: rollout tail, then learner"
        return "in-flight cap (s+1)·B"


class Simulation:
    """The event loop: a heap of (time, sequence number, handler, argument)."""

    def __init__(self, costs: PipelineCosts, *, steps: int, warmup: int, seed: int = 0) -> None:
        self.costs = costs
        self.steps, self.warmup = steps, warmup
        self.random = random.Random(seed)
        self.now = 0.0
        self.queue: list = []
        self.counter = 0
        self.engines = [Engine(i, costs.slots_per_engine) for i in range(costs.engines)]
        self.ready: deque[Engine] = deque(self.engines)
        self.gate = costs.gate
        self.in_flight = 0  # groups started and not yet in the buffer
        self.buffered = Counter()  # policy version -> groups of it in the buffer
        self.engine_version = 0
        self.learner_version = 0
        self.learner_free_at = 0.0
        self.learner_running = False
        self.buffer: deque[Group] = deque()
        self.redis_free_at = 0.0
        self.verifier_free: list[float] = [0.0] * costs.verifier_servers
        self.step_end_times: list[float] = [0.0]
        self.staleness: list[float] = []
        self.busy: dict[str, list] = {
            "learner": [],
            "publish": [],
            "redis": [],
            "verifiers": [],
            "pause": [],
            "tokens": [],
        }
        self.dispatch_wakeup_at: float | None = None

    # ---------------------------------------------------------------- machinery
    def at(self, when: float, handler, argument=None) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (when, self.counter, handler, argument))

    def run(self) -> Result:
        self.dispatch()
        while self.queue and self.learner_version < self.warmup + self.steps:
            self.now, _, handler, argument = heapq.heappop(self.queue)
            handler(argument)
        if self.learner_version < self.warmup + self.steps:
            raise RuntimeError(f"the pipeline stalled after {self.learner_version} learner steps")
        return self.result()

    def response_lengths(self) -> list[int]:
        costs = self.costs
        if costs.response_sigma == 0:
            lengths = [int(costs.mean_response_tokens)] * costs.group_size
        else:
            mu = math.log(costs.mean_response_tokens) - costs.response_sigma**2 / 2
            lengths = [
                max(1, min(costs.max_response_tokens, int(self.random.lognormvariate(mu, costs.response_sigma))))
                for _ in range(costs.group_size)
            ]
        quantum = costs.token_quantum
        return [-(-length // quantum) * quantum for length in lengths]

    # ---------------------------------------------------------------- rollout
    def admits(self, engine: Engine) -> bool:
        gate = self.gate
        target = gate.training_version(self.learner_version, learner_busy=self.learner_running)
        oldest = gate.oldest_trainable(target)
        fresh = sum(count for version, count in self.buffered.items() if version >= oldest)
        return gate.may_start(engine.version, target, fresh, self.in_flight)

    def dispatch(self, _=None) -> None:
        costs = self.costs
        while self.ready and self.admits(self.ready[0]):
            engine = self.ready[0]
            if engine.free_slots < costs.group_size:
                self.ready.popleft()
                continue
            if engine.paused_until > self.now:
                if self.dispatch_wakeup_at is None or self.dispatch_wakeup_at > engine.paused_until:
                    self.dispatch_wakeup_at = engine.paused_until
                    self.at(engine.paused_until, self.wake_dispatch)
                return
            # Round robin over engines with room: work spreads as a least-loaded router spreads it.
            self.ready.popleft()
            self.start_group(engine)
            if engine.free_slots >= costs.group_size:
                self.ready.append(engine)

    def wake_dispatch(self, _=None) -> None:
        self.dispatch_wakeup_at = None
        self.dispatch()

    def step_time(self, engine: Engine) -> float:
        return self.costs.step_seconds + engine.running * self.costs.step_seconds_per_sequence

    def advance(self, engine: Engine) -> None:
        """Bring the engine's progress up to now (no progress while it is paused)."""
        active = self.now - max(engine.updated_at, engine.paused_until)
        if active > 0 and engine.running:
            engine.progress += active / self.step_time(engine)
        engine.updated_at = self.now

    def schedule(self, engine: Engine) -> None:
        engine.epoch += 1
        if engine.ends:
            tokens_left = max(0.0, engine.ends[0][0] - engine.progress)
            start = max(self.now, engine.paused_until)
            self.at(start + tokens_left * self.step_time(engine), self.tick, (engine, engine.epoch))

    def start_group(self, engine: Engine) -> None:
        costs = self.costs
        self.advance(engine)
        lengths = self.response_lengths()
        engine.free_slots -= costs.group_size
        self.in_flight += 1
        group = Group(engine.version, sum(lengths), costs.group_size)
        for length in lengths:
            self.counter += 1
            heapq.heappush(engine.ends, (engine.progress + length, self.counter, group))
        self.schedule(engine)

    def tick(self, argument) -> None:
        engine, epoch = argument
        if epoch != engine.epoch:
            return
        self.advance(engine)
        was_full = engine.free_slots < self.costs.group_size
        while engine.ends and engine.ends[0][0] <= engine.progress + 1e-9:
            _, _, group = heapq.heappop(engine.ends)
            engine.free_slots += 1
            group.remaining -= 1
            if group.remaining == 0:
                self.generated(group)
        if was_full and engine.free_slots >= self.costs.group_size:
            self.ready.append(engine)
        self.schedule(engine)
        self.dispatch()

    def generated(self, group: Group) -> None:
        self.record("tokens", self.now, self.now, weight=group.generated_tokens)
        service = self.costs.group_size * self.costs.verify_seconds_per_completion
        free_at = heapq.heappop(self.verifier_free)
        start = max(self.now, free_at)
        heapq.heappush(self.verifier_free, start + service)
        self.record("verifiers", start, start + service)
        self.at(start + service, self.verified, group)

    # ---------------------------------------------------------------- buffer and learner
    def redis(self, operations: int, size: float) -> float:
        start = max(self.now, self.redis_free_at)
        self.redis_free_at = (
            start + operations * self.costs.redis_seconds_per_group_op + (size * self.costs.redis_seconds_per_byte)
        )
        self.record("redis", start, self.redis_free_at)
        return self.redis_free_at

    def verified(self, group: Group) -> None:
        self.at(self.redis(1, self.costs.group_bytes), self.stored, group)

    def stored(self, group: Group) -> None:
        self.in_flight -= 1
        self.buffer.append(group)
        self.buffered[group.version] += 1
        self.try_learner()
        self.dispatch()

    def try_learner(self, _=None) -> None:
        costs = self.costs
        if self.learner_running or self.now < self.learner_free_at:
            return
        # as the buffers take: stale groups dropped, then the oldest acceptable ones first
        oldest = self.gate.oldest_trainable(self.learner_version)
        if not self.gate.may_train(sum(n for version, n in self.buffered.items() if version >= oldest)):
            return
        kept = sorted((group for group in self.buffer if group.version >= oldest), key=lambda group: group.version)
        batch, self.buffer = kept[: costs.groups_per_step], deque(kept[costs.groups_per_step :])
        self.buffered = Counter(group.version for group in self.buffer)
        taken = self.redis(len(batch) * 2, len(batch) * costs.group_bytes)  # take, then acknowledge
        self.learner_running = True
        end = taken + costs.learner_step_seconds
        self.record("learner", taken, end)
        self.at(end, self.trained, batch)
        self.dispatch()

    def trained(self, batch: list[Group]) -> None:
        costs = self.costs
        self.learner_version += 1
        self.step_end_times.append(self.now)
        if self.learner_version > self.warmup:
            self.staleness.extend(self.learner_version - 1 - group.version for group in batch)
        self.learner_running = False
        self.learner_free_at = self.now + costs.publish_seconds
        self.record("publish", self.now, self.learner_free_at)
        self.at(self.now + costs.arrival_seconds, self.weights_arrive, self.learner_version)
        self.at(self.learner_free_at, self.try_learner)
        self.dispatch()

    def weights_arrive(self, version: int) -> None:
        pause = self.costs.engine_pause_seconds
        for engine in self.engines:
            if pause > 0:
                self.advance(engine)
                engine.paused_until = max(self.now, engine.paused_until) + pause
                self.schedule(engine)
            engine.version = version
        if pause > 0:
            self.record("pause", self.now, self.now + pause)
        self.engine_version = max(self.engine_version, version)
        self.dispatch()

    # ---------------------------------------------------------------- figures
    def record(self, what: str, start: float, end: float, weight: float = 1.0) -> None:
        self.busy[what].append((start, end, weight))

    def result(self) -> Result:
        costs = self.costs
        begin = self.step_end_times[self.warmup]
        end = self.step_end_times[-1]
        span = max(end - begin, 1e-12)

        def share(what: str) -> float:
            """Busy time of `what` inside the window, as a share of the window."""
            total = sum(
                max(0.0, min(stop, end) - max(start, begin)) * weight for start, stop, weight in self.busy[what]
            )
            return total / span

        generated_tokens = sum(weight for moment, _, weight in self.busy["tokens"] if begin < moment <= end)

        steps = len(self.step_end_times) - 1 - self.warmup
        step_seconds = span / steps
        tokens_per_step = costs.groups_per_step * costs.group_size * (costs.prompt_tokens + costs.mean_response_tokens)
        capacity = costs.engines * costs.full_speed_tokens_per_second
        return Result(
            step_seconds=step_seconds,
            trained_tokens_per_second=tokens_per_step / step_seconds,
            mean_staleness=sum(self.staleness) / len(self.staleness),
            rollout_utilisation=generated_tokens / span / capacity,
            learner_busy=share("learner"),
            learner_publish_share=share("publish"),
            engine_pause_share=share("pause"),
            redis_busy=share("redis"),
            verifier_busy=share("verifiers") / costs.verifier_servers,
            max_staleness=costs.max_staleness,
            steps=steps,
            events=self.counter,
        )


def simulate(costs: PipelineCosts, *, steps: int = 10, warmup: int = 4, seed: int = 0) -> Result:
    return Simulation(costs, steps=steps, warmup=warmup, seed=seed).run()


# ------------------------------------------------------------------------------ the demo, as measured

#: bench/async_vs_sync.py on the demo (README Benchmarks): synchronous 1.83 learner steps/s with the
#: learner idle 46 %; asynchronous (max_staleness 1) 3.05 steps/s, learner idle 8 %; one 120 MiB
#: version reaches both workers in 31.3 ms (bench/weight_sync.py).
DEMO_SYNC_STEPS_PER_SECOND = 1.83
DEMO_SYNC_LEARNER_IDLE = 0.46
DEMO_ASYNC_STEPS_PER_SECOND = 3.05
DEMO_WEIGHT_SYNC_SECONDS = 0.0313


def demo_costs(max_staleness: int) -> PipelineCosts:
    """The demo's pipeline with costs taken from its synchronous measurement: the learner's share of
    a synchronous step is its step time; the rest, less weight sync, is generating 16 groups."""
    period = 1 / DEMO_SYNC_STEPS_PER_SECOND
    learner = period * (1 - DEMO_SYNC_LEARNER_IDLE)
    generation = period - learner - DEMO_WEIGHT_SYNC_SECONDS
    tokens = 16  # rollout.max_new_tokens; all completions of a call end together in the torch engine
    return PipelineCosts(
        engines=1,
        slots_per_engine=16 * 8,
        step_seconds=generation / tokens,
        step_seconds_per_sequence=0.0,
        groups_per_step=16,
        group_size=8,
        max_staleness=max_staleness,
        learner_step_seconds=learner,
        publish_seconds=0.0,
        arrival_seconds=DEMO_WEIGHT_SYNC_SECONDS,
        engine_pause_seconds=0.0,
        mean_response_tokens=tokens,
    )


# ------------------------------------------------------------------------------ calibration runs


def measure_redis_costs(sizes: tuple[int, int] = (16 * 1024, 512 * 1024), rounds: int = 640) -> tuple[float, float]:
    """(seconds per operation, seconds per byte) of SET + GET on a private redis-server, fitted
    from two value sizes."""
    import redis

    from orchard.services.redis_server import RedisServer

    per_pair = []
    # Append-only with an fsync per write, as the buffer's own redis-server and the Helm chart's.
    with RedisServer(appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        for size in sizes:
            payload = random.randbytes(size)
            client.set("warm", payload)
            started = time.perf_counter()
            for _ in range(rounds // 16):
                # Pipelines of 16, as the buffer writes and takes batches: Redis fsyncs the append-only
                # file once per pipeline (and once per event-loop turn under many clients), so this is
                # the server's capacity rather than one client's latency.
                with client.pipeline(transaction=False) as pipe:
                    for index in range(16):
                        pipe.set(f"g{index}", payload)
                    pipe.execute()
                with client.pipeline(transaction=False) as pipe:
                    for index in range(16):
                        pipe.get(f"g{index}")
                    pipe.execute()
            per_pair.append((time.perf_counter() - started) / (rounds // 16 * 16))
    per_byte = (per_pair[1] - per_pair[0]) / (2 * (sizes[1] - sizes[0]))
    per_operation = per_pair[0] / 2 - per_byte * sizes[0]
    return per_operation, per_byte


def measure_math_verify_seconds(count: int = 200) -> float:
    from orchard.records import Prompt
    from orchard.verifiers.math_answer import MathVerifier

    verifier = MathVerifier()
    prompt = Prompt("p", "Compute the sum.", "\\frac{7}{3}", "math")
    answers = ["The answer is \\boxed{\\frac{7}{3}}.", "So we get \\boxed{2.3333}", "\\boxed{\\frac{14}{6}}"]
    verifier.verify(prompt, answers[0])
    started = time.perf_counter()
    for index in range(count):
        verifier.verify(prompt, answers[index % len(answers)])
    return (time.perf_counter() - started) / count


# ------------------------------------------------------------------------------ tables

SCALES = (8, 16, 32, 64, 128, 256, 512, 1024)


def balanced_split(calibration: Calibration, workload: Workload, gpus: int) -> tuple[int, int]:
    """(rollout GPUs, learner GPUs) whose full-speed token rates match: GPU-seconds per token of
    decoding against GPU-seconds per token of training. Whole nodes from 16 GPUs on."""
    slots, step, per_sequence = engine_slots_and_step(calibration, workload)
    decode = (step + slots * per_sequence) / slots
    train = 6 * workload.parameters / (calibration.peak_bf16_flops * calibration.learner_mfu)
    rollout = gpus * decode / (decode + train)
    unit = calibration.gpus_per_node if gpus >= 2 * calibration.gpus_per_node else 1
    rollout = min(gpus - unit, max(unit, round(rollout / unit) * unit))
    return rollout, gpus - rollout


def layouts_for(calibration: Calibration, workload: Workload, gpus: int) -> list[Layout]:
    rollout, learner = balanced_split(calibration, workload, gpus)
    return [
        Layout(gpus, gpus, max_staleness=0, colocated=True),
        Layout(rollout, learner, max_staleness=0, transport="nccl"),
        Layout(rollout, learner, max_staleness=4, transport="nccl"),
        Layout(rollout, learner, max_staleness=4, transport="object_store"),
    ]


def gpu_idle(layout: Layout, result: Result) -> float:
    """Share of all GPU time not spent decoding at full speed or training (sending weights counts as idle)."""
    if layout.colocated:
        return max(0.0, 1 - result.rollout_utilisation - result.learner_busy)
    rollout_idle = 1 - result.rollout_utilisation
    learner_idle = 1 - result.learner_busy
    total = layout.rollout_gpus + layout.learner_gpus
    return (layout.rollout_gpus * rollout_idle + layout.learner_gpus * learner_idle) / total


def format_row(gpus: int, batch: int, layout: Layout, result: Result, sync: Result | None) -> str:
    speedup = f"{result.trained_tokens_per_second / sync.trained_tokens_per_second:.2f}x" if sync else "1.00x"
    split = "–" if layout.colocated else None
    return (
        f"| {gpus} | {'all, in turn' if layout.colocated else f'{layout.rollout_gpus}+{layout.learner_gpus}'} | {batch} | {layout.label} | {result.step_seconds:,.1f} | "
        f"{result.trained_tokens_per_second / 1e3:,.0f}k | {speedup} | {result.mean_staleness:.2f} | "
        f"{gpu_idle(layout, result):.0%} | {split or f'{1 - result.rollout_utilisation:.0%}'} | "
        f"{split or f'{1 - result.learner_busy:.0%}'} | "
        f"{max(result.engine_pause_share, result.learner_publish_share):.0%} | {result.redis_busy:.1%} | "
        f"{result.bottleneck} |"
    )


TABLE_HEADER = (
    "| GPUs | rollout+learner | groups/step | pipeline | s/step | trained tok/s | vs colocated sync | staleness | "
    "GPU idle | rollout idle | learner idle | weight sync | Redis busy | bottleneck |\n"
    "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="learner steps measured after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="learner steps simulated before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", action="store_true", help="re-measure the inputs measured on this machine")
    args = parser.parse_args()
    started = time.perf_counter()
    calibration = Calibration()
    if args.calibrate:
        per_operation, per_byte = measure_redis_costs()
        per_answer = measure_math_verify_seconds()
        print(
            f"measured: Redis {per_operation * 1e6:.0f} us per operation + {1 / per_byte / GB:.2f} GB/s, "
            f"math-verify {per_answer * 1e3:.2f} ms per answer"
        )
        calibration = replace(
            calibration,
            redis_seconds_per_group_op=per_operation,
            redis_seconds_per_byte=per_byte,
            math_verify_seconds_per_answer=per_answer,
        )

    workload = Workload()
    slots, step, per_sequence = engine_slots_and_step(calibration, workload)
    full = slots / (step + slots * per_sequence)
    print("Calibration inputs")
    for name, source in SOURCES.items():
        print(f"  {name} = {getattr(calibration, name):.4g}  ({source})")
    print(
        f"Derived for {workload.name}: {slots} sequences per H100 engine, decode step {step * 1e3:.1f} ms + "
        f"{per_sequence * 1e6:.0f} us per sequence: {full:,.0f} tok/s per GPU when full, "
        f"{1 / (step + per_sequence):,.0f} tok/s for a lone sequence; weights {workload.weight_bytes / GB:.1f} GB; "
        f"learner step on 8 GPUs {learner_step_seconds(calibration, workload, 8):.0f} s"
    )

    rollout, learner = balanced_split(calibration, workload, 64)
    print(f"Balanced split at 64 GPUs: {rollout} rollout + {learner} learner")
    print("\nCheck against the demo (bench/async_vs_sync.py, CPU):")
    demo_sync = simulate(demo_costs(0), steps=20, warmup=3)
    demo_async = simulate(demo_costs(1), steps=20, warmup=3)
    predicted = demo_async.step_seconds and (1 / demo_async.step_seconds)
    print(
        f"  sync {1 / demo_sync.step_seconds:.2f} steps/s (input, measured {DEMO_SYNC_STEPS_PER_SECOND}); "
        f"async predicted {predicted:.2f} steps/s, measured {DEMO_ASYNC_STEPS_PER_SECOND}; "
        f"ratio predicted {demo_sync.step_seconds / demo_async.step_seconds:.2f}x, measured "
        f"{DEMO_ASYNC_STEPS_PER_SECOND / DEMO_SYNC_STEPS_PER_SECOND:.2f}x; "
        f"learner idle predicted {1 - demo_async.learner_busy:.0%} (measured 8%)"
    )

    events = 0
    for title, batch_for in (
        ("A. Fixed batch", lambda gpus: workload.groups_per_step),
        ("B. Batch grows with the cluster", lambda gpus: max(workload.groups_per_step, 2 * gpus)),
    ):
        print(
            f"\n{title}: {workload.name}, GRPO, groups of {workload.group_size}, "
            f"{'256' if title.startswith('A') else '2 x GPUs'} groups per step; split between rollout "
            f"and learner by balanced_split; one H100 per vLLM engine; max_staleness 4 when async"
        )
        print(TABLE_HEADER)
        for gpus in SCALES if title.startswith("A") else SCALES[-1:]:
            scaled = replace(workload, groups_per_step=batch_for(gpus))
            sync = None
            layouts = layouts_for(calibration, scaled, gpus)
            for layout in layouts if title.startswith("A") else [layouts[0], layouts[2]]:
                result = simulate(
                    gpu_costs(calibration, scaled, layout), steps=args.steps, warmup=args.warmup, seed=args.seed
                )
                events += result.events
                print(format_row(gpus, scaled.groups_per_step, layout, result, sync), flush=True)
                if layout.colocated:
                    sync = result

    small = Workload(
        name="1.5B, 16 x ~512 tokens",
        parameters=1.5e9,
        layers=28,
        kv_heads=2,
        head_dim=128,
        mean_response_tokens=512,
        max_response_tokens=4096,
        groups_per_step=2048,
    )
    print(f"\nC. Short answers: {small.name}, {small.groups_per_step} groups per step, async s=4, NCCL")
    print(TABLE_HEADER)
    for gpus in (256, 1024):
        rollout, learner = balanced_split(calibration, small, gpus)
        layout = Layout(rollout, learner, max_staleness=4)
        result = simulate(gpu_costs(calibration, small, layout), steps=args.steps, warmup=args.warmup, seed=args.seed)
        events += result.events
        print(format_row(gpus, small.groups_per_step, layout, result, None).replace("| 1.00x |", "| – |"), flush=True)
    slow = replace(calibration, hbm_efficiency=calibration.hbm_efficiency / 4)
    print(
        f"\nD. Sensitivity: decoding 4x slower than the roofline (hbm_efficiency {slow.hbm_efficiency:.3f}), "
        f"{workload.name}, {workload.groups_per_step} groups per step, split rebalanced"
    )
    print(TABLE_HEADER)
    for gpus in (64, 256):
        sync = None
        layouts = layouts_for(slow, workload, gpus)
        for layout in (layouts[0], layouts[2]):
            result = simulate(gpu_costs(slow, workload, layout), steps=args.steps, warmup=args.warmup, seed=args.seed)
            events += result.events
            print(format_row(gpus, workload.groups_per_step, layout, result, sync), flush=True)
            if layout.colocated:
                sync = result
    print(f"\n{events:,} events simulated in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
