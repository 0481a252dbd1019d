"""The learner as a Ray actor: a thin shell around `learner.trainer.GRPOTrainer`."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from orchard.config import RunConfig
from orchard.records import Group
from services import weight_store


class LearnerCore:
    """Builds the policy, loads the warm-start weights and trains with DeepSpeed."""

    def __init__(self, config: RunConfig, initial_weights: Mapping[str, Any], initial_version: int = 0) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(config.learner.torch_threads)
        from learner.trainer import GRPOTrainer
        from learner.weights import numpy_to_state_dict
        from rollout.model import build_model
        from rollout.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.model)
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
            solution_tokens=lambda solution: tokenizer.encode(solution) + [tokenizer.eos_id],
        )
        self.version = initial_version
        self.weight_transport_setting = config.weight_sync.transport
        self._weight_sync_settings = config.weight_sync
        self._num_readers = config.rollout.num_workers + 1
        self.weight_transport: str | None = None  # resolved at the first export
        self.weight_transport_error: str | None = None  # why `auto` fell back to the object store
        self._weight_store = None

    def train_step(self, groups: Sequence[Group]) -> dict[str, Any]:
        started = time.perf_counter()
        result = self.trainer.train_step(groups)
        if not result.skipped:
            self.version += 1
        record = dict(vars(result))
        record["policy_version"] = self.version
        record["actor_seconds"] = time.perf_counter() - started
        return record

    def export_weights(self) -> Any:
        """The current weights for the rollout workers, by the configured transport.

        Shared memory: the parameters are copied straight into the learner's `SharedWeightStore`
        (checked finite on the way) and the return value is a small `WeightHandle`; CPU workers view
        the version it names without copying it (`TorchEngine.load_weights`). Object store: a
        dict of numpy arrays, which Ray stores once for every reader. Both are accepted by
        `RolloutWorkerCore.load_weights`. `auto` becomes shared memory on a single-node cluster and
        falls back to the object store when the segment cannot be created (say, a small /dev/shm).
        """
        from learner.weights import state_dict_to_numpy

        if self._resolve_weight_transport() == "shared_memory":
            store = self._weight_store
            if store.latest is not None and store.latest.version == self.version:
                return store.latest  # no step since the last export: the same weights
            try:
                return store.write(self.version, self._live_weights())
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

    def open_weight_broadcast(self, world_size: int) -> dict[str, Any]:
        """Open the broadcast group's rendezvous on this node: its address and the weights' layout,
        for every member's `join_weight_broadcast` (all called at once; see `rollout/weight_broadcast.py`)."""
        from rollout.weight_broadcast import layout_of, open_store

        settings = self._weight_sync_settings
        self._broadcast_store, host = open_store(world_size, timeout_s=settings.timeout_seconds)
        self._broadcast_layout = layout_of(self._live_weights())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return {"host": host, "port": self._broadcast_store.port, "layout": self._broadcast_layout, "backend": backend}

    def join_weight_broadcast(self, world_size: int, backend: str) -> int:
        """Join the group as rank 0 (the sender); blocks until every worker has joined."""
        from rollout.weight_broadcast import BroadcastGroup

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

    def broadcast_weights(self) -> dict[str, Any]:
        """Send the current weights as `self.version` to every worker of the group (they must be
        receiving: the driver sends each a `BroadcastTicket`); returns what was sent and how fast."""
        stats = self._broadcast.send(
            self._live_weights(), self.version, self._broadcast_layout, self._weight_sync_settings.bucket_bytes
        )
        return {"version": stats.version, "bytes": stats.bytes, "buckets": stats.buckets, "seconds": stats.seconds}

    def export_weights_object_store(self) -> Any:
        """The current weights as numpy arrays for the object store, whatever the transport (the
        driver's evaluator and restarted workers under transport 'nccl')."""
        from learner.weights import state_dict_to_numpy

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

    def _live_weights(self) -> dict[str, torch.Tensor]:
        """The module's own parameter tensors (no copy), gathered first under ZeRO-3."""
        if self.trainer.config.zero_stage == 3:
            return self.trainer.export_weights()
        return self.trainer.engine.module.state_dict()

    def close(self) -> None:
        """Remove the shared-memory segment (also done when the process exits or dies)."""
        if self._weight_store is not None:
            self._weight_store.close()

    def save_checkpoint(self, path: str) -> str:
        """DeepSpeed state (weights, optimizer, counters) under `path`, the policy as a Hugging Face model
        under `path/model` (loadable with `from_pretrained`)."""
        self.trainer.save_checkpoint(path)
        self.trainer.engine.module.save_pretrained(f"{path}/model", state_dict=self.trainer.export_weights())
        return path

    def load_checkpoint(self, path: str) -> int:
        """Restore what `save_checkpoint` wrote under `path` (weights, optimizer, counters); returns the
        policy version it holds."""
        self.trainer.load_checkpoint(path)
        self.version = self.trainer.policy_version
        return self.version

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
