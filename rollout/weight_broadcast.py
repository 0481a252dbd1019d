"""Weight broadcast from the learner into the rollout engines over a `torch.distributed` group.

The learner (rank 0) and every rollout worker (ranks 1..N) join a process group of their own,
separate from the learner's DeepSpeed group, built from a `TCPStore` the learner opens
(`open_store`, then `BroadcastGroup.join` on every member at once). A version travels as

1. a header: `[version, total bytes, bucket bytes, layout digest, status]` (int64), then
2. the weights' bytes, in buckets of at most `bucket_bytes`: tensors are laid end to end in the
   layout's order and cut into consecutive byte ranges (`plan_buckets`), so a tensor may span
   buckets and each side holds one bucket buffer at a time besides the weights themselves.

Receivers copy each bucket's bytes straight into the engine's tensors (`BroadcastSource.copy_into`,
the weight-source interface `TorchEngine.load_weights` takes) or, for engines that load by name
(vLLM), assemble one tensor at a time (`BroadcastGroup.receive_tensors`). The bytes are copied
as they are, so what arrives is bit-exact.

The backend is `nccl` on GPUs (buckets on the current CUDA device) and `gloo` on CPUs; the code is
the same. A broadcast is a collective: the learner's `send` returns once every worker has entered
`receive` and taken every bucket, and a member that never calls in makes the others wait until
the group's timeout.
"""

from __future__ import annotations

import datetime
import json
import math
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

Backend = Literal["nccl", "gloo"]
HEADER_FIELDS = 5  # version, total bytes, bucket bytes, layout digest, status
STATUS_OK, STATUS_REFUSED = 0, 1


class BroadcastError(RuntimeError):
    """A broadcast was refused or did not match what the receiver expected."""


@dataclass(frozen=True)
class BroadcastSpec:
    """One tensor of the broadcast layout."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Piece:
    """Bytes `[tensor_offset, tensor_offset + nbytes)` of layout tensor `tensor` sit at `bucket_offset`."""

    tensor: int
    tensor_offset: int
    bucket_offset: int
    nbytes: int


@dataclass(frozen=True)
class BroadcastTicket:
    """What the driver sends a worker for a version that arrives by broadcast: only its number."""

    version: int


@dataclass
class BroadcastStats:
    version: int
    bytes: int
    buckets: int
    largest_bucket_bytes: int  # the largest bucket buffer this member allocated
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rendezvous:
    """Where a broadcast group meets (rank 0's store), what it carries, and over which backend."""

    host: str
    port: int
    layout: tuple[BroadcastSpec, ...]
    backend: str


def layout_of(state_dict: Mapping[str, torch.Tensor]) -> tuple[BroadcastSpec, ...]:
    """The broadcast layout of `state_dict`: every floating-point tensor in key order, a tensor that
    shares its storage with an earlier one (tied embeddings) left out, since engines accept a tied
    alias missing."""
    specs, seen = [], set()
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise TypeError(f"state dict entry {name!r} has dtype {tensor.dtype}; weights must be floating point")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        specs.append(BroadcastSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)))
    return tuple(specs)


def layout_digest(layout: Sequence[BroadcastSpec]) -> int:
    """A 31-bit checksum of names, dtypes and shapes: sender and receivers must agree on it."""
    text = json.dumps([[spec.name, spec.dtype, list(spec.shape)] for spec in layout])
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def plan_buckets(layout: Sequence[BroadcastSpec], bucket_bytes: int) -> list[list[Piece]]:
    """Cut the layout's bytes, laid end to end, into consecutive buckets of at most `bucket_bytes`.

    Every byte of every tensor lies in exactly one piece; every bucket but the last is full.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for index, spec in enumerate(layout):
        offset = 0
        while offset < spec.nbytes:
            length = min(spec.nbytes - offset, bucket_bytes - used)
            current.append(Piece(index, offset, used, length))
            offset += length
            used += length
            if used == bucket_bytes:
                buckets.append(current)
                current, used = [], 0
    if current:
        buckets.append(current)
    return buckets


def open_store(world_size: int, *, host: str | None = None, timeout_s: float = 600.0) -> tuple[dist.TCPStore, str]:
    """The rendezvous store, opened by the learner on a free port of its node: (store, host)."""
    if host is None:
        import ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    store = dist.TCPStore(
        host,
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return store, host


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


class BroadcastGroup:
    """One member of the weight-broadcast group: rank 0 sends, every other rank receives."""

    def __init__(self, process_group: dist.ProcessGroup, rank: int, world_size: int, backend: Backend) -> None:
        self.process_group = process_group
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._store: dist.Store | None = None

    @classmethod
    def join(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        backend: Backend,
        timeout_s: float = 600.0,
        store: dist.Store | None = None,
        name: str = "orchard-weights",
    ) -> BroadcastGroup:
        """Join the group whose store listens at host:port; blocks until all `world_size` members join.

        Rank 0 passes the store `open_store` gave it; the others connect to it. `name` separates the
        keys of successive groups on one store.
        """
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(f"{name}/", store)
        if backend == "gloo":
            group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        elif backend == "nccl":
            if not torch.cuda.is_available():
                raise BroadcastError("weight_sync.transport 'nccl' needs a CUDA device in every member")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected 'nccl' or 'gloo'")
        member = cls(group, rank, world_size, backend)
        member._store = store
        # The first collective completes the rendezvous (NCCL creates its communicator lazily).
        probe = torch.zeros(1, device=member.device)
        member._broadcast(probe)
        return member

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        self.process_group.broadcast([tensor], options).wait()

    # ------------------------------------------------------------------------------------- sending

    def send(
        self, state_dict: Mapping[str, torch.Tensor], version: int, layout: Sequence[BroadcastSpec], bucket_bytes: int
    ) -> BroadcastStats:
        """Broadcast `state_dict` (the tensors of `layout`, by name) as policy `version` (rank 0 only).

        Every tensor is checked finite first; a non-finite one is announced to the receivers as a refused
        version (they raise `BroadcastError`) and raised here, so no one is left waiting.
        """
        if self.rank != 0:
            raise BroadcastError(f"rank {self.rank} cannot send; the learner is rank 0")
        started = time.perf_counter()
        sources = [state_dict[spec.name].detach() for spec in layout]
        bad = [
            spec.name for spec, tensor in zip(layout, sources, strict=True) if not bool(torch.isfinite(tensor).all())
        ]
        total = sum(spec.nbytes for spec in layout)
        status = STATUS_REFUSED if bad else STATUS_OK
        header = torch.tensor(
            [version, total, bucket_bytes, layout_digest(layout), status], dtype=torch.int64, device=self.device
        )
        self._broadcast(header)
        if bad:
            raise BroadcastError(f"version {version} not broadcast: non-finite values in {', '.join(bad[:8])}")
        views = [_byte_view(tensor.contiguous()) for tensor in sources]
        plan = plan_buckets(layout, bucket_bytes)
        largest = 0
        bucket = torch.empty(min(bucket_bytes, total), dtype=torch.uint8, device=self.device) if plan else None
        for pieces in plan:
            size = pieces[-1].bucket_offset + pieces[-1].nbytes
            largest = max(largest, bucket.numel())
            for piece in pieces:
                bucket[piece.bucket_offset : piece.bucket_offset + piece.nbytes].copy_(
                    views[piece.tensor][piece.tensor_offset : piece.tensor_offset + piece.nbytes]
                )
            self._broadcast(bucket[:size])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return BroadcastStats(version, total, len(plan), largest, time.perf_counter() - started)

    # ------------------------------------------------------------------------------------ receiving

    def _receive_header(self, version: int, layout: Sequence[BroadcastSpec], bucket_bytes: int) -> tuple[int, int]:
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        sent_version, total, sent_bucket, digest, status = (int(value) for value in header.tolist())
        if status == STATUS_REFUSED:
            raise BroadcastError(f"the learner refused to broadcast version {sent_version} (non-finite weights)")
        expected = (version, sum(spec.nbytes for spec in layout), bucket_bytes, layout_digest(layout))
        if (sent_version, total, sent_bucket, digest) != expected:
            self._drain(total, sent_bucket)
            raise BroadcastError(
                f"broadcast mismatch: the learner sent version {sent_version}, {total} bytes in buckets of "
                f"{sent_bucket}, layout {digest}; this worker expected version {expected[0]}, {expected[1]} bytes "
                f"in buckets of {expected[2]}, layout {expected[3]} (the group's members disagree on the weights)"
            )
        return total, sent_bucket

    def _drain(self, total: int, bucket_bytes: int) -> None:
        """Take (and drop) every bucket of a broadcast, so the group stays usable."""
        if total <= 0 or bucket_bytes <= 0:
            return
        bucket = torch.empty(min(total, bucket_bytes), dtype=torch.uint8, device=self.device)
        for start in range(0, total, bucket_bytes):
            self._broadcast(bucket[: min(bucket_bytes, total - start)])

    def receive_into(
        self,
        targets: Mapping[str, torch.Tensor],
        version: int,
        layout: Sequence[BroadcastSpec],
        bucket_bytes: int,
    ) -> BroadcastStats:
        """Receive version `version` straight into `targets` (shapes must match the layout's).

        A target of the spec's dtype that is contiguous gets the bytes directly; any other (another
        dtype, a strided view) is filled through a staging tensor of the spec's dtype, one at a time.
        A layout tensor without a target is received and dropped: an engine leaves out a tied alias
        such as `lm_head.weight` (it checks itself that it holds every parameter).
        """
        started = time.perf_counter()
        names = {spec.name for spec in layout}
        unknown = [name for name in targets if name not in names]
        wrong = [spec.name for spec in layout if spec.name in targets and tuple(targets[spec.name].shape) != spec.shape]
        total, sent_bucket = self._receive_header(version, layout, bucket_bytes)
        if unknown or wrong:
            self._drain(total, sent_bucket)
            raise BroadcastError(
                f"cannot receive version {version}: targets not broadcast {unknown[:8]}, wrong shape {wrong[:8]}"
            )
        largest = 0
        direct: dict[int, torch.Tensor] = {}
        for index, spec in enumerate(layout):
            target = targets.get(spec.name)
            if (
                target is not None
                and target.dtype == spec.torch_dtype
                and target.is_contiguous()
                and target.device == self.device
            ):
                direct[index] = _byte_view(target)
        staging: tuple[int, torch.Tensor] | None = None
        plan = plan_buckets(layout, sent_bucket)
        bucket = torch.empty(min(sent_bucket, total), dtype=torch.uint8, device=self.device) if plan else None
        with torch.no_grad():
            for pieces in plan:
                size = pieces[-1].bucket_offset + pieces[-1].nbytes
                largest = max(largest, bucket.numel())
                self._broadcast(bucket[:size])
                for piece in pieces:
                    chunk = bucket[piece.bucket_offset : piece.bucket_offset + piece.nbytes]
                    end = piece.tensor_offset + piece.nbytes
                    if piece.tensor in direct:
                        direct[piece.tensor][piece.tensor_offset : end].copy_(chunk)
                        continue
                    spec = layout[piece.tensor]
                    if spec.name not in targets:
                        continue
                    if staging is None or staging[0] != piece.tensor:
                        staging = (piece.tensor, torch.empty(spec.shape, dtype=spec.torch_dtype, device=self.device))
                    _byte_view(staging[1])[piece.tensor_offset : end].copy_(chunk)
                    if end == spec.nbytes:
                        targets[spec.name].copy_(staging[1])
                        staging = None
        return BroadcastStats(version, total, len(plan), largest, time.perf_counter() - started)

    def receive_tensors(
        self, version: int, layout: Sequence[BroadcastSpec], bucket_bytes: int
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive version `version` as `(name, tensor)` pairs, each yielded once all its bytes arrived.

        For engines that load weights by name (vLLM's `load_weights(weights=...)`); the consumer must
        exhaust the iterator, since the broadcast goes on until the last bucket. Memory: one bucket
        plus the tensors the consumer keeps.
        """
        total, sent_bucket = self._receive_header(version, layout, bucket_bytes)
        plan = plan_buckets(layout, sent_bucket)
        bucket = torch.empty(min(sent_bucket, total), dtype=torch.uint8, device=self.device) if plan else None
        for spec in layout:
            if spec.nbytes == 0:  # no bytes travel for an empty tensor
                yield spec.name, torch.empty(spec.shape, dtype=spec.torch_dtype, device=self.device)
        partial: dict[int, torch.Tensor] = {}
        for pieces in plan:
            size = pieces[-1].bucket_offset + pieces[-1].nbytes
            self._broadcast(bucket[:size])
            finished = []
            for piece in pieces:
                spec = layout[piece.tensor]
                if piece.tensor not in partial:
                    partial[piece.tensor] = torch.empty(spec.shape, dtype=spec.torch_dtype, device=self.device)
                end = piece.tensor_offset + piece.nbytes
                _byte_view(partial[piece.tensor])[piece.tensor_offset : end].copy_(
                    bucket[piece.bucket_offset : piece.bucket_offset + piece.nbytes]
                )
                if end == spec.nbytes:
                    finished.append(piece.tensor)
            for index in finished:
                yield layout[index].name, partial.pop(index)

    def close(self) -> None:
        """Leave the group (the process group is released with this object)."""
        self.process_group = None  # type: ignore[assignment]
        self._store = None


@dataclass
class BroadcastSource:
    """A weight source for `TorchEngine.load_weights`: `copy_into` receives the broadcast into its targets."""

    group: BroadcastGroup
    version: int
    layout: tuple[BroadcastSpec, ...]
    bucket_bytes: int
    consumed: bool = False
    stats: BroadcastStats | None = None

    def copy_into(self, targets: Mapping[str, torch.Tensor]) -> int:
        self.consumed = True
        self.stats = self.group.receive_into(targets, self.version, self.layout, self.bucket_bytes)
        return self.version

    def drain(self) -> None:
        """Take the broadcast without keeping it (the engine refused the version before copying)."""
        if not self.consumed:
            self.consumed = True
            self.group._receive_header(self.version, self.layout, self.bucket_bytes)
            self.group._drain(sum(spec.nbytes for spec in self.layout), self.bucket_bytes)
