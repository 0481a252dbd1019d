"""Bucketed weight broadcast (transport 'nccl') against an in-process copy of the same bytes.

Measured side by side in one run:
- baseline: `copy_` of every tensor of the state into preallocated tensors, in one process, on the
  sender's device;
- broadcast: `BroadcastGroup.send` from rank 0 into `--receivers` processes that each
  `receive_into` preallocated tensors (`rollout/weight_broadcast.py`), for every bucket size asked
  for; timed from the sender's call until every receiver has every byte (each round ends with a
  barrier-like small broadcast).

The backend is NCCL when there are at least 1 + receivers GPUs (one process per GPU), gloo on CPUs
otherwise. Prints seconds per GiB and GiB/s of each, the median of `--rounds` rounds after one
warm-up, and the ratio broadcast / copy.
Run: `python bench/weight_broadcast.py [--mib 256] [--receivers 2] [--bucket-mib 16 64 256]`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from orchard.rollout.weight_broadcast import BroadcastGroup, layout_of, open_store

TENSORS = 32


def make_state(total_bytes: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    count = max(1, total_bytes // 4 // TENSORS)
    return {f"layer{i}.weight": torch.randn(count, generator=generator, device=device) for i in range(TENSORS)}


def device_of(rank: int, backend: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def member(rank: int, world: int, port: int, args: argparse.Namespace, backend: str, results) -> None:
    torch.set_num_threads(1)
    device = device_of(rank, backend)
    state = make_state(args.mib << 20, device)
    layout = layout_of(state)
    store = None
    if rank == 0:  # the sender opens the rendezvous on a free port and hands the port to the receivers
        store, _ = open_store(world, host="127.0.0.1", timeout_s=600)
        port = store.port
        results.put(("port", port))
    group = BroadcastGroup.join("127.0.0.1", port, rank, world, backend=backend, store=store)
    fence = torch.zeros(1, device=device)
    targets = {name: torch.empty_like(tensor) for name, tensor in state.items()}
    version = 0
    for bucket_mib in args.bucket_mib:
        bucket = bucket_mib << 20
        times = []
        for round_index in range(args.rounds + 1):
            version += 1
            group._broadcast(fence)
            started = time.perf_counter()
            if rank == 0:
                group.send(state, version, layout, bucket)
            else:
                group.receive_into(targets, version, layout, bucket)
            group._broadcast(fence)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                times.append(time.perf_counter() - started)
        if rank == 1:
            exact = all(torch.equal(targets[name], state[name]) for name in state)
            results.put(("broadcast", bucket_mib, statistics.median(times), min(times), max(times), exact))


def copy_baseline(args: argparse.Namespace, backend: str) -> tuple[float, int]:
    torch.set_num_threads(1)
    device = device_of(0, backend)
    state = make_state(args.mib << 20, device)
    targets = {name: torch.empty_like(tensor) for name, tensor in state.items()}
    times = []
    for round_index in range(args.rounds + 1):
        started = time.perf_counter()
        for name, tensor in state.items():
            targets[name].copy_(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if round_index:
            times.append(time.perf_counter() - started)
    return statistics.median(times), sum(t.numel() * t.element_size() for t in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the weights in MiB")
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--bucket-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    world = 1 + args.receivers
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    copy_seconds, total = copy_baseline(args, backend)
    gib = total / 2**30
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    sender = context.Process(target=member, args=(0, world, 0, args, backend, results))
    sender.start()
    _, store_port = results.get(timeout=120)
    receivers = [
        context.Process(target=member, args=(rank, world, store_port, args, backend, results))
        for rank in range(1, world)
    ]
    for process in receivers:
        process.start()
    rows = [results.get(timeout=1800) for _ in args.bucket_mib]
    for process in [sender, *receivers]:
        process.join(timeout=120)

    device = torch.cuda.get_device_name(0) if backend == "nccl" else "CPU"
    print(
        f"weights: {total / 2**20:.0f} MiB in {TENSORS} float32 tensors; {args.receivers} receivers; {backend} on {device}"
    )
    print(f"{'what':<34}{'s/GiB':>10}{'GiB/s':>10}{'vs copy':>10}")
    print(f"{'in-process copy_ (baseline)':<34}{copy_seconds / gib:>10.3f}{gib / copy_seconds:>10.2f}{1.0:>9.2f}x")
    for _, bucket_mib, median, fastest, slowest, exact in rows:
        label = f"broadcast, {bucket_mib} MiB buckets"
        print(
            f"{label:<34}{median / gib:>10.3f}{gib / median:>10.2f}{median / copy_seconds:>9.2f}x"
            f"   (rounds {fastest / gib:.3f}-{slowest / gib:.3f} s/GiB; bit-exact: {exact})"
        )


if __name__ == "__main__":
    main()
