"""Policy weights in a shared-memory segment that persists between versions: the single-node fast path.

The learner owns one `SharedWeightStore`: a file in `/dev/shm` holding a header and a few slots, each
large enough for the whole state dict. `write(version, state_dict)` copies the learner's tensors
straight into a free slot and returns a `WeightHandle`, a small record (segment name, slot, version,
tensor layout) that crosses process boundaries cheaply. Readers (rollout workers, the driver's
evaluator) map the segment once per process. Nothing is allocated per version, so no page is faulted
in after the first write, unlike `ray.put` of a fresh object per version.

Two ways to read:
- `pin(handle)`: read-only views of a complete version that the writer will not overwrite until the
  pin is released (a shared `fcntl` lock on the slot, which dies with the reader's process). CPU
  engines run on those views directly, so a new version costs one copy (the learner's write) however
  many workers there are; on this kind of machine a single core's copy already uses most of the
  memory bandwidth, so copies per worker would not run in parallel. A store needs a slot per pinning
  reader plus two (the newest version and the one being written); `write` waits for a free slot.
  Stores of two slots (`pinnable` False) are for copying readers only.
- `read_into(handle, targets)`: a copy into the reader's own tensors, guarded by a seqlock: each
  slot's header holds a sequence number and a version; the writer makes the sequence odd before it
  touches the slot's bytes and even again, with the new version, once every tensor is in place; a
  reader notes the sequence, copies, and reads it again. A changed sequence means the writer started
  on that slot during the copy (a torn read): the reader copies again from the newest complete slot,
  at most `max_retries` times, then raises `TornReadError`. The writer never waits for such readers.

Versions only move forward. A reader that is slow to act on a handle (a worker still generating with
version v while v+1 and v+2 appear) may find the handle's slot reused by a newer version: it then
reads the newest complete version, and the version actually read is returned so that the caller
records the truth. A pinned version is never overwritten, so an engine running on it is never
disturbed. (Sequence words are aligned 8-byte loads and stores; the seqlock's ordering argument
assumes x86-64's store and load ordering, the machines this runs on.)

Finiteness is checked by the writer as it copies each tensor (a sum of the just-written bytes while
they are in cache, with an exact `isfinite` pass only when the sum is not finite): a version holding
a NaN or inf is never made visible, and its slot is left empty. Readers rely on that rather than
scanning the weights again.

dtypes are stored as they are, bfloat16 included (raw bytes need no numpy dtype); copying readers
cast into their own tensors' dtype, which gives the same values as the object-store path of
`learner/weights.py` (bf16 widened to float32 and cast back is exact); engines of another dtype than
the store's copy instead of pinning. Tensors an engine fuses (q/k/v, gate/up of a layer) are placed
back to back so that a pinning engine can view each group as one tensor.

Lifetime: `close()` (or garbage collection, or interpreter exit) marks the segment closed and
removes it; readers then get `WeightStoreError` naming the segment, while views already pinned stay
readable. A writer killed outright runs none of that. Then, in turn: Python's resource tracker
removes the segment once the writer is gone (when the tracker survives it; Ray kills an actor's
child processes with it), every reader process removes at its exit the segments it read whose writer
is gone (the driver, whose evaluator reads them, outlives the learner it `ray.kill`s), and a new
store removes the segments of writers that no longer exist. Segment names carry the writer's PID
namespace and PID for that. The object-store path stays for multi-node clusters: Ray actors on
different nodes do not share `/dev/shm` (`resolve_transport`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import os
import re
import secrets
import struct
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

#: Where segments live (tmpfs on Linux).
SEGMENT_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "orchard-weights"
NUM_SLOTS = 2
HEADER_BYTES = 4096
ALIGN = 64
_MAGIC = 0x3153544857484352  # b"RCHWHTS1" little-endian; any fixed value
_OPEN, _CLOSED = 1, 2
# header words (int64)
_W_MAGIC, _W_STATE, _W_SLOTS, _W_SLOT_BYTES, _W_DIGEST = 0, 1, 2, 3, 4
_W_SLOT0 = 8  # slot i: sequence at _W_SLOT0 + 2 i, version at _W_SLOT0 + 2 i + 1
_EMPTY = -1

Transport = Literal["shared_memory", "object_store"]


class WeightStoreError(RuntimeError):
    """The shared-memory store cannot serve a read or a write (gone, wrong layout, no space)."""


class LayoutMismatchError(WeightStoreError, ValueError):
    """A state dict or reader does not match the store's tensor layout."""


class TornReadError(WeightStoreError):
    """Every attempt to copy a consistent version was overwritten by the writer during the copy."""


class NonFiniteWeightsError(WeightStoreError, ValueError):
    """A tensor handed to `write` holds NaN or inf; the version is not published."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of a slot

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class WeightHandle:
    """Where version `version` of the weights lies: small, picklable, valid on the writer's node."""

    segment: str  # file name under SEGMENT_DIR
    slot: int
    version: int
    layout: tuple[TensorSpec, ...]
    slot_bytes: int
    node_id: str | None = None  # Ray node of the writer, for error messages
    num_slots: int = NUM_SLOTS

    @property
    def pinnable(self) -> bool:
        """Whether readers may `pin` versions: the store has slots beyond the two a writer needs."""
        return self.num_slots > 2

    @property
    def path(self) -> Path:
        return SEGMENT_DIR / self.segment

    @property
    def digest(self) -> int:
        return _layout_digest(self.layout, self.slot_bytes)

    def copy_into(self, targets: Mapping[str, torch.Tensor], *, max_retries: int = 8) -> int:
        """`read_into(self, targets)`: the weight-source interface `TorchEngine.load_weights` takes."""
        return read_into(self, targets, max_retries=max_retries)

    def pin(self) -> PinnedWeights:
        """`pin(self)`: read-only views of a version that the writer leaves alone until released."""
        return pin(self)

    def __repr__(self) -> str:
        return f"WeightHandle(segment={self.segment!r}, slot={self.slot}, version={self.version}, tensors={len(self.layout)})"


# ----------------------------------------------------------------------------------------------- writer


class SharedWeightStore:
    """The writer's side: one segment, written by one process (the learner)."""

    def __init__(
        self,
        *,
        num_slots: int = NUM_SLOTS,
        directory: Path | str | None = None,
        node_id: str | None = None,
        wait_seconds: float = 60.0,
    ) -> None:
        """`num_slots`: at least 2; readers that pin versions (`pin`) need one slot each beyond two,
        so that the writer always finds a slot nobody uses. `wait_seconds`: how long `write` waits
        for a free slot before it gives up."""
        if num_slots < 2:
            raise ValueError(f"a weight store needs at least 2 slots, got {num_slots}")
        self.directory = Path(directory) if directory is not None else SEGMENT_DIR
        self.node_id = node_id
        self.num_slots = num_slots
        self.wait_seconds = wait_seconds
        self._fd: int | None = None
        self.segment: str | None = None
        self.layout: tuple[TensorSpec, ...] | None = None
        self.slot_bytes = 0
        self.latest: WeightHandle | None = None
        self._mmap: mmap.mmap | None = None
        self._header: np.ndarray | None = None
        self._views: list[dict[str, torch.Tensor]] = []
        self._finalizer: weakref.finalize | None = None

    @property
    def path(self) -> Path | None:
        return self.directory / self.segment if self.segment else None

    @property
    def latest_version(self) -> int | None:
        return self.latest.version if self.latest else None

    def write(self, version: int, state_dict: Mapping[str, torch.Tensor]) -> WeightHandle:
        """Copy `state_dict` into the free slot, check it is finite, make it version `version`.

        The segment is created on the first write with that state dict's layout; later state dicts
        must have the same names, dtypes and shapes. Versions must increase. Tensors that share
        memory (tied embeddings) are stored once, under each of their names.
        """
        if self.latest is not None and version <= self.latest.version:
            raise WeightStoreError(
                f"cannot write policy version {version}: version {self.latest.version} is already in {self.segment}"
            )
        if self._header is None:
            self._create(state_dict)
        elif self._mmap is None:
            raise WeightStoreError(f"shared-memory segment {self.segment} is closed")
        tensors = self._match_layout(state_dict)
        header = self._header
        slot = self._claim_free_slot()
        seq_word, version_word = _W_SLOT0 + 2 * slot, _W_SLOT0 + 2 * slot + 1
        header[seq_word] += 1  # odd: being written
        views = self._views[slot]
        written: dict[tuple, str] = {}
        try:
            with torch.no_grad():
                for spec in self.layout:
                    tensor = tensors[spec.name]
                    key = _storage_key(tensor)
                    if key in written:
                        continue
                    written[key] = spec.name
                    view = views[spec.name]
                    view.copy_(tensor)
                    if not _all_finite(view):
                        raise NonFiniteWeightsError(
                            f"policy version {version} not published: {spec.name!r} holds NaN or inf values"
                        )
        except BaseException:
            header[version_word] = _EMPTY
            header[seq_word] += 1
            _lock(self._fd, slot, fcntl.F_UNLCK)
            raise
        header[version_word] = version
        header[seq_word] += 1  # even: complete
        _lock(self._fd, slot, fcntl.F_UNLCK)
        self.latest = WeightHandle(
            segment=self.segment,
            slot=slot,
            version=version,
            layout=self.layout,
            slot_bytes=self.slot_bytes,
            node_id=self.node_id,
            num_slots=self.num_slots,
        )
        return self.latest

    def close(self) -> None:
        """Mark the segment closed (readers get a clear error) and remove it. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._mmap = None
        self._views = []

    def __enter__(self) -> SharedWeightStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _claim_free_slot(self) -> int:
        """A slot other than the newest version's that no reader has pinned, locked for writing."""
        newest = self.latest.slot if self.latest is not None else self.num_slots - 1
        deadline = time.monotonic() + self.wait_seconds
        while True:
            for step in range(1, self.num_slots + (self.latest is None)):
                slot = (newest + step) % self.num_slots
                if _lock(self._fd, slot, fcntl.F_WRLCK):
                    return slot
            if time.monotonic() > deadline:
                raise WeightStoreError(
                    f"every slot of {self.segment} but the newest is pinned by a reader after "
                    f"{self.wait_seconds:.0f} s; a store needs a slot per pinning reader plus 2 "
                    f"(it has {self.num_slots})"
                )
            time.sleep(0.001)

    def _create(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.layout, self.slot_bytes = _plan_layout(state_dict)
        size = HEADER_BYTES + self.num_slots * self.slot_bytes
        if not self.directory.is_dir():
            raise WeightStoreError(f"no shared-memory directory {self.directory} on this machine")
        sweep_stale_segments(self.directory)
        name = f"{SEGMENT_PREFIX}-{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}"
        path = self.directory / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                # Reserve the pages now: a tmpfs that runs out of space later would kill the
                # writer with SIGBUS in the middle of a copy instead of raising here.
                os.posix_fallocate(fd, 0, size)
            except OSError as error:
                path.unlink(missing_ok=True)
                raise WeightStoreError(
                    f"cannot reserve {size / 2**20:.0f} MiB in {self.directory} for the weights "
                    f"({error.strerror}); free space there or use weight_sync.transport=object_store"
                ) from error
            buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            raise
        self.segment = name
        self._mmap = buffer
        self._fd = fd  # kept open: slot locks live on it
        self._finalizer = weakref.finalize(self, _remove_segment, path, buffer, fd, _register(name))
        self._header = np.frombuffer(buffer, dtype=np.int64, count=HEADER_BYTES // 8)
        self._views = [_slot_views(buffer, slot, self.layout, self.slot_bytes) for slot in range(self.num_slots)]
        header = self._header
        for slot in range(self.num_slots):
            header[_W_SLOT0 + 2 * slot] = 0
            header[_W_SLOT0 + 2 * slot + 1] = _EMPTY
        header[_W_SLOTS] = self.num_slots
        header[_W_SLOT_BYTES] = self.slot_bytes
        header[_W_DIGEST] = _layout_digest(self.layout, self.slot_bytes)
        header[_W_STATE] = _OPEN
        header[_W_MAGIC] = _MAGIC

    def _match_layout(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        problems = []
        expected = {spec.name: spec for spec in self.layout}
        for name, tensor in state_dict.items():
            spec = expected.get(name)
            if spec is None:
                problems.append(f"unknown tensor {name!r}")
            elif not isinstance(tensor, torch.Tensor):
                problems.append(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            elif tuple(tensor.shape) != spec.shape or tensor.dtype != spec.torch_dtype:
                problems.append(
                    f"{name!r} is {_dtype_name(tensor.dtype)} {tuple(tensor.shape)}, "
                    f"the store's is {spec.dtype} {spec.shape}"
                )
        problems += [f"missing tensor {name!r}" for name in expected if name not in state_dict]
        if problems:
            raise LayoutMismatchError(
                f"state dict does not match the layout of {self.segment}: " + "; ".join(problems[:8])
            )
        return dict(state_dict)


def _remove_segment(path: Path, buffer: mmap.mmap, fd: int, registered: str | None) -> None:
    with contextlib.suppress(ValueError, OSError):
        np.frombuffer(buffer, dtype=np.int64, count=HEADER_BYTES // 8)[_W_STATE] = _CLOSED
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        os.close(fd)
    if registered is not None:
        with contextlib.suppress(Exception):
            from multiprocessing import resource_tracker

            resource_tracker.unregister(registered, "shared_memory")
    # The mapping itself is released when the last view of it is garbage (torch tensors over it may
    # still be alive in the writer); closing it here would leave those views dangling.


def _register(name: str) -> str | None:
    """Let Python's resource tracker remove the segment if this process dies without closing it."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.register(f"/{name}", "shared_memory")
        return f"/{name}"
    except Exception:  # noqa: BLE001 - best effort; the stale-segment sweep is the second line
        return None


def sweep_stale_segments(directory: Path | str = SEGMENT_DIR) -> list[str]:
    """Remove segments left by writers of this PID namespace that no longer exist; returns their names."""
    removed = []
    namespace = _pid_namespace()
    for path in Path(directory).glob(f"{SEGMENT_PREFIX}-{namespace}-*"):
        if _remove_if_orphaned(path):
            removed.append(path.name)
    return removed


def _remove_if_orphaned(path: Path) -> bool:
    """Remove `path` when it names a segment of this PID namespace whose writer no longer exists."""
    parts = path.name.removeprefix(SEGMENT_PREFIX + "-").split("-")
    try:
        namespace, pid = parts[0], int(parts[1])
    except (IndexError, ValueError):
        return False
    if namespace != _pid_namespace() or pid == os.getpid() or _process_exists(pid):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False


def _remove_orphans_mapped_here() -> None:
    """At exit of a reader: the driver outlives a learner that `ray.kill` ended without cleanup."""
    for path in _MAPPED_PATHS:
        with contextlib.suppress(OSError):
            _remove_if_orphaned(path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


# ----------------------------------------------------------------------------------------------- reader


class _Mapping:
    """One reader process's read-only mapping of a segment, with tensor views of each slot."""

    def __init__(self, handle: WeightHandle) -> None:
        path = handle.path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _gone(handle, "does not exist") from None
        try:
            stat = os.fstat(fd)
            self.inode = stat.st_ino
            buffer = mmap.mmap(
                fd, stat.st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ
            )
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # kept open: this process's pins are locks on it (released if the process dies)
        self.pins: dict[int, int] = {}  # slot -> pins held in this process
        self.header = np.frombuffer(buffer, dtype=np.int64, count=HEADER_BYTES // 8)
        if self.header[_W_MAGIC] != _MAGIC or self.header[_W_STATE] not in (_OPEN, _CLOSED):
            raise WeightStoreError(f"{path} is not an Orchard weight segment")
        if self.header[_W_DIGEST] != handle.digest or self.header[_W_SLOT_BYTES] != handle.slot_bytes:
            raise LayoutMismatchError(f"the layout in handle {handle} does not match segment {handle.segment}")
        self.buffer = buffer
        self.slots = int(self.header[_W_SLOTS])
        self.views = [_slot_views(buffer, slot, handle.layout, handle.slot_bytes) for slot in range(self.slots)]

    def pin(self, slot: int) -> bool:
        if self.pins.get(slot, 0) == 0 and not _lock(self.fd, slot, fcntl.F_RDLCK):
            return False
        self.pins[slot] = self.pins.get(slot, 0) + 1
        return True

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            del self.pins[slot]
            with contextlib.suppress(OSError):
                _lock(self.fd, slot, fcntl.F_UNLCK)

    def slot_state(self, slot: int) -> tuple[int, int]:
        """(sequence, version) of `slot`, sequence read first."""
        seq = int(self.header[_W_SLOT0 + 2 * slot])
        version = int(self.header[_W_SLOT0 + 2 * slot + 1])
        return seq, version


_MAPPINGS: dict[str, _Mapping] = {}
_MAPPED_PATHS: set[Path] = set()  # every segment this process has read from


def _mapping(handle: WeightHandle) -> _Mapping:
    mapping = _MAPPINGS.get(handle.segment)
    if mapping is not None:
        try:
            same = os.stat(handle.path).st_ino == mapping.inode
        except FileNotFoundError:
            same = False
        if not same or mapping.header[_W_STATE] != _OPEN:
            del _MAPPINGS[handle.segment]
            with contextlib.suppress(OSError):
                os.close(mapping.fd)  # its pins go with it; pinned views stay readable
            raise _gone(handle, "was closed by its writer")
        return mapping
    mapping = _Mapping(handle)
    if mapping.header[_W_STATE] != _OPEN:
        raise _gone(handle, "was closed by its writer")
    _MAPPINGS[handle.segment] = mapping
    if not _MAPPED_PATHS:
        atexit.register(_remove_orphans_mapped_here)
    _MAPPED_PATHS.add(handle.path)
    return mapping


def _gone(handle: WeightHandle, what: str) -> WeightStoreError:
    where = f" (written on Ray node {handle.node_id})" if handle.node_id else ""
    return WeightStoreError(
        f"shared-memory weight segment {handle.path}{where} {what}: the learner that wrote policy version "
        f"{handle.version} has closed its store or exited, or this reader runs on another node; "
        "readers on other nodes need weight_sync.transport=object_store"
    )


def read_into(
    handle: WeightHandle,
    targets: Mapping[str, torch.Tensor],
    *,
    max_retries: int = 8,
    copy: Callable[[torch.Tensor, torch.Tensor], object] | None = None,
    wait_seconds: float = 10.0,
) -> int:
    """Copy a consistent version, `handle.version` or newer, into `targets`; returns the version copied.

    `targets` maps names of the handle's layout to tensors of the same shape (any dtype and device:
    the copy casts). The version `handle` names is read while its slot still holds it; once the
    writer has moved on, the newest complete version is read instead. A copy the writer overwrote
    midway is detected (the slot's sequence changed) and repeated, at most `max_retries` times; the
    targets then hold a mix and `TornReadError` is raised. `copy(target, source)` defaults to
    `target.copy_(source)`.
    """
    mapping = _mapping(handle)
    missing = [name for name in targets if name not in mapping.views[0]]
    if missing:
        raise LayoutMismatchError(f"segment {handle.segment} holds no tensor {missing[0]!r}")
    copy = copy or (lambda target, source: target.copy_(source))
    for _ in range(max_retries + 1):
        slot, seq, version = _pick_slot(mapping, handle, wait_seconds)
        views = mapping.views[slot]
        with torch.no_grad():
            for name, target in targets.items():
                copy(target, views[name])
        if mapping.slot_state(slot)[0] == seq:
            return version
    raise TornReadError(
        f"every copy from {handle.segment} was overwritten by the writer during the copy "
        f"({max_retries + 1} attempts); the target tensors hold a mix of versions"
    )


def _pick_slot(mapping: _Mapping, handle: WeightHandle, wait_seconds: float) -> tuple[int, int, int]:
    """(slot, sequence, version): the handle's own slot if it still holds its version, else the newest."""
    deadline = time.monotonic() + wait_seconds
    while True:
        if mapping.header[_W_STATE] != _OPEN:
            raise _gone(handle, "was closed by its writer")
        seq, version = mapping.slot_state(handle.slot)
        if seq % 2 == 0 and version == handle.version:
            return handle.slot, seq, version
        best = None
        for slot in range(mapping.slots):
            seq, version = mapping.slot_state(slot)
            if seq % 2 == 0 and version > handle.version and (best is None or version > best[2]):
                best = (slot, seq, version)
        if best is not None:
            return best
        if time.monotonic() > deadline:
            raise WeightStoreError(
                f"segment {handle.segment} holds no complete version >= {handle.version} "
                f"(slots: {[mapping.slot_state(s) for s in range(mapping.slots)]})"
            )
        time.sleep(0.001)


class PinnedWeights:
    """Read-only views of one complete version; the writer does not touch its slot until `release`.

    The views alias the shared segment (read-only memory: writing to them crashes the process). A
    pin is a shared lock on the slot, so it disappears with the process that holds it.
    """

    def __init__(self, handle: WeightHandle, mapping: _Mapping, slot: int, version: int) -> None:
        self.handle, self.slot, self.version = handle, slot, version
        self.views = mapping.views[slot]
        self._mapping: _Mapping | None = mapping
        self._specs = {spec.name: spec for spec in handle.layout}

    def span(self, names: Iterable[str]) -> torch.Tensor | None:
        """One view over the tensors `names`, concatenated along their first dimension, when the
        store placed them back to back with equal dtypes and trailing shapes; else None."""
        specs = [self._specs[name] for name in names]
        first = specs[0]
        end = first.offset
        for spec in specs:
            if spec.offset != end or spec.dtype != first.dtype or spec.shape[1:] != first.shape[1:] or not spec.shape:
                return None
            end += spec.nbytes
        start = self.views[first.name]
        rows = sum(spec.shape[0] for spec in specs)
        return torch.as_strided(start, (rows, *first.shape[1:]), start.stride())

    def release(self) -> None:
        if self._mapping is not None:
            self._mapping.unpin(self.slot)
            self._mapping = None

    def __repr__(self) -> str:
        return f"PinnedWeights({self.handle.segment}, slot={self.slot}, version={self.version})"


def pin(handle: WeightHandle, *, wait_seconds: float = 10.0) -> PinnedWeights:
    """Pin a complete version, `handle.version` or newer (as `read_into` chooses it), for zero-copy use."""
    if not handle.pinnable:
        raise WeightStoreError(f"{handle.segment} has {handle.num_slots} slots, none to spare for pinning readers")
    mapping = _mapping(handle)
    deadline = time.monotonic() + wait_seconds
    while True:
        slot, seq, version = _pick_slot(mapping, handle, wait_seconds)
        if mapping.pin(slot):
            if mapping.slot_state(slot) == (seq, version):
                return PinnedWeights(handle, mapping, slot, version)
            mapping.unpin(slot)  # overwritten between the pick and the pin
        if time.monotonic() > deadline:
            raise WeightStoreError(f"could not pin a version >= {handle.version} of {handle.segment}")
        time.sleep(0.0005)


def close_mappings() -> None:
    """Forget this process's mappings (they are unmapped once no tensor views them)."""
    _MAPPINGS.clear()


# ----------------------------------------------------------------------------------------------- helpers


def resolve_transport(setting: str) -> Transport:
    """`auto`: shared memory when the whole Ray cluster is one node (or Ray is not running) and
    `/dev/shm` exists; otherwise the object store.

    Every reader (the rollout workers and the driver's in-process evaluator) must be on the
    learner's node; a single-node cluster guarantees it without knowing where Ray placed them.
    """
    if setting in ("shared_memory", "object_store"):
        return setting  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"unknown weight transport {setting!r}; expected auto, shared_memory or object_store")
    if not SEGMENT_DIR.is_dir():
        return "object_store"
    import ray

    if ray.is_initialized():
        alive = [node for node in ray.nodes() if node.get("Alive")]
        if len(alive) != 1:
            return "object_store"
    return "shared_memory"


def current_node_id() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def _plan_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[TensorSpec, ...], int]:
    specs, offset, placed, previous_dtype = [], 0, {}, None
    for name, continues_group in _placement_order(list(state_dict)):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():
            raise TypeError(f"state dict entry {name!r} has dtype {tensor.dtype}; weights must be floating point")
        key = _storage_key(tensor)
        if key in placed:  # tied: same memory, stored once
            specs.append(TensorSpec(name, _dtype_name(tensor.dtype), tuple(tensor.shape), placed[key]))
            continue
        if not continues_group or tensor.dtype != previous_dtype:
            offset = -(-offset // ALIGN) * ALIGN
        previous_dtype = tensor.dtype
        spec = TensorSpec(name, _dtype_name(tensor.dtype), tuple(tensor.shape), offset)
        placed[key] = offset
        specs.append(spec)
        offset += spec.nbytes
    order = {name: index for index, name in enumerate(state_dict)}
    return tuple(sorted(specs, key=lambda spec: order[spec.name])), max(-(-offset // ALIGN) * ALIGN, ALIGN)


def _slot_views(buffer: mmap.mmap, slot: int, layout: Iterable[TensorSpec], slot_bytes: int) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # torch warns that a read-only buffer gives a tensor that must not be written; readers only read.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = torch.frombuffer(buffer, dtype=torch.uint8, offset=HEADER_BYTES + slot * slot_bytes, count=slot_bytes)
    return {
        spec.name: raw[spec.offset : spec.offset + spec.nbytes].view(spec.torch_dtype).view(spec.shape)
        for spec in layout
    }


def _lock(fd: int, slot: int, kind: int) -> bool:
    """Take (F_RDLCK, F_WRLCK) or drop (F_UNLCK) an open-file-description lock on byte `slot`.

    OFD locks belong to the open file, not the process: a writer and a reader in one process
    conflict as they would across processes, and a process that dies releases its locks."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, slot, 1, 0))
    except OSError as error:
        if error.errno in (11, 13):  # EAGAIN, EACCES: held by another open file
            return False
        raise
    return True


#: Tensors an engine fuses (Qwen2/Llama layout), placed back to back so that readers can view them as one.
_FUSED = (
    (re.compile(r"^(.*\.)([qkv])_proj\.(weight|bias)$"), "qkv"),
    (re.compile(r"^(.*\.)(gate|up)_proj\.weight$"), ("gate", "up")),
)


def _placement_order(names: list[str]) -> list[tuple[str, bool]]:
    """`names` with every group of fused tensors (q/k/v, gate/up of one layer) together, in order;
    each with whether it continues a group (placed right after the previous one, no alignment gap)."""
    groups: dict[tuple, list[str]] = {}
    keys: dict[str, tuple] = {}
    for name in names:
        for pattern, members in _FUSED:
            match = pattern.match(name)
            if match:
                key = (pattern.pattern, match.group(1), match.groups()[2:])
                groups.setdefault(key, []).append(name)
                keys[name] = (key, list(members).index(match.group(2)))
                break
    order, placed = [], set()
    for name in names:
        if name in placed:
            continue
        if name in keys:
            key = keys[name][0]
            members = sorted(groups[key], key=lambda member: keys[member][1])
        else:
            members = [name]
        order += [(member, index > 0) for index, member in enumerate(members)]
        placed.update(members)
    return order


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device.type, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layout_digest(layout: Iterable[TensorSpec], slot_bytes: int) -> int:
    text = repr((slot_bytes, [(s.name, s.dtype, s.shape, s.offset) for s in layout]))
    return zlib.crc32(text.encode())


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in `tensor`: a sum is finite unless an element is not (or the sum overflows,
    which the exact check then settles)."""
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())
