"""Weight sync through the Ray object store against a plain in-process copy of the same bytes.

Measured side by side in one run:
- baseline: `copy_` of every tensor of the state dict into preallocated tensors of one process;
- sync: `ray.put` of the exported numpy state dict (what the learner actor's return does), then every
  rollout worker actor's `load_weights(version, ref)` into its engine, until the last one confirms.

Prints the median of several repeats and the ratio (target: sync <= 3x the copy).
Run: `python bench/weight_sync.py [--workers 2] [--hidden 512 --layers 8]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from learner.weights import state_dict_to_numpy
from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
from rollout.model import build_model
from rollout.tokenizer import load_tokenizer
from rollout.worker import RolloutWorker
from services.weight_sync import WeightSync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model_config = ModelConfig(
        tiny=TinyModelConfig(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=4 * args.hidden,
        )
    )
    tokenizer = load_tokenizer(model_config)
    model = build_model(model_config, tokenizer)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    size_bytes = sum(t.numel() * t.element_size() for t in state.values())

    targets = {name: torch.empty_like(tensor) for name, tensor in state.items()}
    copy_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for name, tensor in state.items():
            targets[name].copy_(tensor)
        copy_times.append(time.perf_counter() - started)

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False, configure_logging=False)
    rollout_config = RolloutConfig(num_cpus_per_worker=max(2, args.workers) / args.workers)
    workers = {
        f"worker-{i}": RolloutWorker.options(num_cpus=rollout_config.num_cpus_per_worker).remote(
            f"worker-{i}", model_config, rollout_config
        )
        for i in range(args.workers)
    }
    ray.get([w.ping.remote() for w in workers.values()])
    sync = WeightSync()
    sync_times, put_times = [], []
    for version in range(1, args.repeats + 2):
        for tensor in state.values():
            tensor.add_(1e-3)  # new weights every version, as after a learner step
        started = time.perf_counter()
        numpy_state = state_dict_to_numpy(state)
        ref = ray.put(numpy_state)
        put_seconds = time.perf_counter() - started
        sync.publish(version, ref)
        sync.push_and_wait(workers)
        total = time.perf_counter() - started
        if version > 1:  # the first push warms up the workers' object store mappings
            sync_times.append(total)
            put_times.append(put_seconds)
        del ref, numpy_state
    ray.shutdown()

    copy = statistics.median(copy_times)
    total = statistics.median(sync_times)
    print(f"weights: {size_bytes / 2**20:.1f} MiB ({len(state)} tensors), {args.workers} rollout workers")
    print(f"{'in-process copy_':<34}{copy * 1e3:>9.1f} ms  {size_bytes / copy / 2**30:6.2f} GiB/s")
    print(f"{'object-store put':<34}{statistics.median(put_times) * 1e3:>9.1f} ms")
    print(f"{'sync to all workers (put+load)':<34}{total * 1e3:>9.1f} ms  {size_bytes / total / 2**30:6.2f} GiB/s")
    print(f"ratio sync/copy: {total / copy:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
