"""The learner as a Ray actor: a thin shell around `learner.trainer.GRPOTrainer`.

With `cluster.learner_ranks` > 1 the learner is that many actors, DeepSpeed ranks of one process
group (`create_learner`). The driver talks to rank 0 only; rank 0 makes the same call on every other
rank (`collective`) since DeepSpeed's ZeRO-3 steps, gathers and checkpoints need all ranks, and only
rank 0 publishes weights. Every rank receives the whole batch and trains on its share of it (data
parallelism, `GRPOTrainer.train_step`), the loss normalised over the whole batch, so the step is the
single-rank one; ZeRO-3 also divides the memory of parameters, gradients and optimizer state among them.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from orchard.config import RunConfig
from orchard.learner.trainer import StepResult
from orchard.records import Group
from orchard.rollout.weight_broadcast import BroadcastStats, Rendezvous
from orchard.services.run.checkpoints import as_write_error
from orchard.services.weights import store as weight_store


@dataclass(frozen=True)
class LearnerStep:
    """What the learner actor returns for one step: the trainer's result, the policy version the
    learner holds after it (unchanged by a skipped step) and the call's own seconds."""

    result: StepResult
    policy_version: int
    actor_seconds: float


def collective(method: Callable[..., Any]) -> Callable[..., Any]:
    """On rank 0, run the same call on every other learner rank too and wait for them; the other ranks
    only take part in the collective operations (their return values are dropped)."""

    @functools.wraps(method)
    def run(self: LearnerCore, *args: Any, **kwargs: Any) -> Any:
        pending = [getattr(peer, method.__name__).remote(*args, **kwargs) for peer in self._peers]
        result = method(self, *args, **kwargs)
        ray.get([ref for refs in pending for ref in (refs if isinstance(refs, list) else [refs])])
        return result

    return run


class LearnerCore:
    """Builds the policy, loads the warm-start weights and trains with DeepSpeed.

    `rank`, `world_size` and `master` (host, port of rank 0's rendezvous) make it one rank of a
    multi-rank learner (`create_learner`); by default it is the only one.
    """

    def __init__(
        self,
        config: RunConfig,
        initial_weights: Mapping[str, Any],
        initial_version: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        master: tuple[str, int] | None = None,
    ) -> None:
        if world_size > 1:
            if master is None:
                raise ValueError("a learner of several ranks needs `master`, rank 0's rendezvous (host, port)")
            # each rank's actor sees its own GPU as device 0
            os.environ.update(
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK="0",
                MASTER_ADDR=master[0],
                MASTER_PORT=str(master[1]),
            )
        self.rank = rank
        self._peers: list[Any] = []
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(config.learner.torch_threads)
        from orchard.learner.trainer import GRPOTrainer
        from orchard.learner.weights import numpy_to_state_dict
        from orchard.rollout.model import build_model
        from orchard.rollout.prompts import PromptFormat, PromptRenderer
        from orchard.rollout.tokenizer import load_tokenizer

        self.tokenizer = tokenizer = load_tokenizer(config.model)
        model = build_model(config.model, tokenizer)
        model.load_state_dict(numpy_to_state_dict(initial_weights), strict=False)
        temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        self.trainer = GRPOTrainer(
            model,
            config.learner,
            pad_id=tokenizer.pad_id,
            seed=config.seed,
            temperature=temperature,
            max_length=config.rollout.max_new_tokens,
            solution_tokens=PromptRenderer(tokenizer, PromptFormat.from_config(config.data)).encode_answer,
        )
        self.version = self.trainer.policy_version = initial_version
        self.weight_transport_setting = config.weight_sync.transport
        self._weight_sync_settings = config.weight_sync
        self._step_delay_seconds = config.faults.learner_step_delay_seconds  # a slow learner, in tests
        self._num_readers = config.rollout.num_workers + 1
        self.weight_transport: str | None = None  # resolved at the first export
        self.weight_transport_error: str | None = None  # why `auto` fell back to the object store
        self._weight_store = None

    def set_peers(self, peers: Sequence[Any]) -> int:
        """Rank 0: the actors of ranks 1.. to which it forwards every collective call."""
        self._peers = list(peers)
        return len(self._peers)

    def _gather_on_peer(self) -> None:
        """What a rank other than 0 does for an export: take part in ZeRO-3's gather."""
        self.trainer.join_gather()

    @collective  # outermost: Ray reads num_returns from the unwrapped function
    @ray.method(num_returns=2)
    def train_step(self, groups: Sequence[Group], inject_nonfinite: bool = False) -> tuple[LearnerStep, Any]:
        """One step on `groups`, and the new weights for the rollout workers as a second return value (its
        own object, so the caller publishes it without fetching it): what `export_weights` gives, or
        None when the step was skipped (nothing changed) or transport 'nccl' broadcasts them instead."""
        started = time.perf_counter()
        if self._step_delay_seconds:
            time.sleep(self._step_delay_seconds)
        result = self.trainer.train_step(groups, inject_nonfinite=inject_nonfinite)
        weights = None
        if not result.skipped:
            self.version += 1
            if self.weight_transport_setting != "nccl":
                weights = self._export()
        return LearnerStep(result, self.version, time.perf_counter() - started), weights

    @collective
    def export_weights(self) -> Any:
        """The current weights for the rollout workers (after a restart; a step returns its own)."""
        return self._export()

    def _export(self) -> Any:
        """The current weights for the rollout workers, by the configured transport (every rank calls it).

        Shared memory: the parameters are copied straight into the learner's `SharedWeightStore`
        (checked finite on the way) and the return value is a small `WeightHandle`; CPU workers view
        the version it names without copying it (`TorchEngine.load_weights`). Object store: a
        dict of numpy arrays, which Ray stores once for every reader. Both are accepted by
        `RolloutWorkerCore.load_weights`. `auto` becomes shared memory on a single-node cluster and
        falls back to the object store when the segment cannot be created (say, a small /dev/shm).
        """
        from orchard.learner.weights import state_dict_to_numpy

        if self.rank:
            return self._gather_on_peer()
        if self._resolve_weight_transport() == "shared_memory":
            store = self._weight_store
            if store.latest is not None and store.latest.version == self.version:
                return store.latest  # no step since the last export: the same weights
            try:
                return store.write(self.version, self.trainer.live_weights())
            except weight_store.WeightStoreError as error:
                if (
                    self.weight_transport_setting != "auto"
                    or store.latest is not None
                    or isinstance(error, weight_store.NonFiniteWeightsError)
                ):
                    raise
                store.close()
                self._weight_store, self.weight_transport = None, "object_store"
                self.weight_transport_error = str(error)
        return state_dict_to_numpy(self.trainer.export_weights())

    # ------------------------------------------------------------------ transport 'nccl': broadcast

    @collective
    def open_weight_broadcast(self, world_size: int) -> Rendezvous | None:
        """Open the broadcast group's rendezvous on this node: its address and the weights' layout,
        for every member's `join_weight_broadcast` (all called at once; see `rollout/weight_broadcast.py`)."""
        from orchard.rollout.weight_broadcast import layout_of, open_store

        if self.rank:
            return self._gather_on_peer()
        settings = self._weight_sync_settings
        self._broadcast_store, host = open_store(world_size, timeout_s=settings.timeout_seconds)
        self._broadcast_layout = layout_of(self.trainer.live_weights())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return Rendezvous(host, self._broadcast_store.port, self._broadcast_layout, backend)

    def join_weight_broadcast(self, world_size: int, backend: str) -> int:
        """Join the group as rank 0 (the sender); blocks until every worker has joined."""
        from orchard.rollout.weight_broadcast import BroadcastGroup

        if getattr(self, "_broadcast", None) is not None:
            self._broadcast.close()
        self._broadcast = BroadcastGroup.join(
            "",
            self._broadcast_store.port,
            0,
            world_size,
            backend=backend,  # type: ignore[arg-type]
            timeout_s=self._weight_sync_settings.timeout_seconds,
            store=self._broadcast_store,
        )
        return 0

    @collective
    def broadcast_weights(self) -> BroadcastStats | None:
        """Send the current weights as `self.version` to every worker of the group (they must be
        receiving: the driver sends each a `BroadcastTicket`); returns what was sent and how fast."""
        if self.rank:
            return self._gather_on_peer()
        return self._broadcast.send(
            self.trainer.live_weights(), self.version, self._broadcast_layout, self._weight_sync_settings.bucket_bytes
        )

    @collective
    def export_weights_object_store(self) -> Any:
        """The current weights as numpy arrays for the object store, whatever the transport (the
        driver's evaluator and restarted workers under transport 'nccl')."""
        from orchard.learner.weights import state_dict_to_numpy

        if self.rank:
            return self._gather_on_peer()
        return state_dict_to_numpy(self.trainer.export_weights())

    def _resolve_weight_transport(self) -> str:
        if self.weight_transport is None:
            # 'nccl' broadcasts through `broadcast_weights`; what `export_weights` returns then goes through the object store
            setting = "object_store" if self.weight_transport_setting == "nccl" else self.weight_transport_setting
            self.weight_transport = weight_store.resolve_transport(setting)
            if self.weight_transport == "shared_memory":
                # A slot for each reader that pins a version (the workers and the driver's evaluator) + 2.
                self._weight_store = weight_store.SharedWeightStore(
                    num_slots=self._num_readers + 2, node_id=weight_store.current_node_id()
                )
        return self.weight_transport

    def close(self) -> None:
        """Remove the shared-memory segment (also done when the process exits or dies)."""
        if self._weight_store is not None:
            self._weight_store.close()

    @collective
    def save_checkpoint(self, path: str) -> str:
        """DeepSpeed state (weights, optimizer, counters; every rank writes its shards) under `path`, the
        policy as a Hugging Face model with its tokenizer under `path/model` (rank 0; merged with LoRA, whose
        adapter alone goes to `path/adapter`): loadable with `from_pretrained`, by vLLM, and as
        `model: {kind: hf, path: .../model}`.

        The driver gives a temporary directory and renames it into place once whole (see
        `services/run/checkpoints.py`). Any failure of these writes is raised as a `CheckpointWriteError`
        with the space left there, since a full disk does not always surface as an `OSError` (torch's
        writer raises a `RuntimeError`): the driver then applies `checkpoint.on_error`."""
        try:
            self.trainer.save_checkpoint(path)
            self.trainer.save_model(path)
            if self.rank == 0:
                self.tokenizer.save_pretrained(f"{path}/model")
        except Exception as error:
            raise as_write_error(error, path) from error
        return path

    @collective
    def load_checkpoint(self, path: str) -> int:
        """Restore what `save_checkpoint` wrote under `path` (weights, optimizer, counters); returns the
        policy version it holds."""
        self.trainer.load_checkpoint(path)
        self.version = self.trainer.policy_version
        return self.version

    @collective
    def renumber(self, version: int) -> int:
        """Carry on as policy `version` (> any version published before), keeping the weights.

        After a learner restarted from a checkpoint, versions published by the dead learner after
        that checkpoint exist already; the restored weights get a new, larger number so that
        versions only move forward for the workers, the buffer and the control plane.
        """
        if version < self.version:
            raise ValueError(f"renumber to {version}: versions only move forward (this learner is at {self.version})")
        self.version = self.trainer.policy_version = version
        return self.version

    def pid(self) -> int:
        """The process the learner runs in (for supervision and fault tests)."""
        return os.getpid()

    def ping(self) -> int:
        return self.version


LearnerActor = ray.remote(LearnerCore)


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """An address and a free port on the node this task runs on (learner rank 0's bundle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = int(probe.getsockname()[1])
    return ray.util.get_node_ip_address(), port


def create_learner(
    config: RunConfig, initial_weights: Any, placement: Any, initial_version: int = 0
) -> tuple[Any, list[Any]]:
    """The learner's actors: (rank 0, the other ranks), each in its own bundle of `placement` (one
    rank and no placement groups is allowed too). The driver calls rank 0 only."""
    from orchard.services.placement import learner_options

    ranks = config.cluster.learner_ranks
    if ranks == 1:
        actor = LearnerActor.options(**learner_options(config, placement)).remote(
            config, initial_weights, initial_version
        )
        return actor, []
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    master = ray.get(
        _rendezvous_address.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement.learner_group, placement_group_bundle_index=0
            )
        ).remote()
    )
    actors = [
        LearnerActor.options(**learner_options(config, placement, rank)).remote(
            config, initial_weights, initial_version, rank=rank, world_size=ranks, master=master
        )
        for rank in range(ranks)
    ]
    ray.get(actors[0].set_peers.remote(actors[1:]))
    return actors[0], actors[1:]
