"""Weight sync to every rollout worker against a plain in-process copy of the same bytes.

Measured side by side in one run (the baseline in every round):
- baseline: `copy_` of every tensor of the state dict into preallocated tensors of one process;
- shared memory (the single-node path): the learner's `SharedWeightStore.write` from its torch tensors
  (finiteness checked on the way), then every rollout worker actor's `load_weights(version, handle)`,
  until the last one confirms. With a slot per worker beyond two (the learner actor's sizing) the
  workers pin the version and view it without a copy; `--copy` gives the store two slots, so that
  every worker copies the version into its own tensors instead;
- object store (the multi-node path): `ray.put` of the exported numpy state dict (what the learner
  actor's return does), then every worker's `load_weights(version, ref)`, until the last one confirms;
- the same two paths into rollout workers whose engine is vLLM (`rollout.engine: vllm`, its CPU build,
  in-process): the version is live once vLLM's in-place reload (`reload_weights`, which repacks the
  linear weights for its CPU kernels) has loaded it and its prefix cache is reset. A vLLM worker pins a
  shared-memory version only while it loads from it. `--no-vllm` leaves them out.

This process plays the learner: each round changes its tensors in place (as a learner step does) and
the clock starts once the new weights are in them. Prints the median of the rounds, the spread, and
the ratios (target: sync <= 3x the copy).
Run: `python bench/weight_sync.py [--workers 2] [--hidden 512 --layers 8] [--no-vllm]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from orchard.config import ModelConfig, RolloutConfig, TinyModelConfig
from orchard.learner.weights import state_dict_to_numpy
from orchard.rollout.model import build_model
from orchard.rollout.tokenizer import load_tokenizer
from orchard.rollout.worker import RolloutWorker
from orchard.services.weights.store import SharedWeightStore
from orchard.services.weights.sync import WeightSync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--copy", action="store_true", help="two slots: workers copy instead of pinning")
    parser.add_argument("--no-vllm", action="store_true", help="leave the vLLM workers out")
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

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = max(2, args.workers) / args.workers / (1 if args.no_vllm else 2)
    engines = {"torch": RolloutConfig(num_cpus_per_worker=cpus)}
    if not args.no_vllm:
        engines["vllm"] = RolloutConfig(engine="vllm", num_cpus_per_worker=cpus)
    fleets = {
        engine: {
            f"{engine}-worker-{i}": RolloutWorker.options(num_cpus=rollout_config.num_cpus_per_worker).remote(
                f"{engine}-worker-{i}", model_config, rollout_config
            )
            for i in range(args.workers)
        }
        for engine, rollout_config in engines.items()
    }
    ray.get([w.ping.remote() for workers in fleets.values() for w in workers.values()])
    paths = [("object store", "torch"), ("shared memory", "torch")]
    if not args.no_vllm:
        paths += [("vllm: object store", "vllm"), ("vllm: shared memory", "vllm")]
    times: dict[str, list[float]] = {"copy": [], "put": [], "write": []} | {path: [] for path, _ in paths}
    version = 0
    with SharedWeightStore(num_slots=2 if args.copy else args.workers + 2) as store:
        # One block per path (a worker that pins shared memory must copy its weights back into memory
        # of its own before an object-store load, which is not what either path costs alone); the
        # baseline copy is measured in every round of every block.
        for path, engine in paths:
            workers = fleets[engine]
            sync = WeightSync(initial_version=version)
            for round_index in range(args.repeats + 1):  # round 0 warms up mappings and caches
                measured: dict[str, float] = {}
                started = time.perf_counter()
                for name, tensor in state.items():
                    targets[name].copy_(tensor)
                measured["copy"] = time.perf_counter() - started

                version += 1
                for tensor in state.values():
                    tensor.add_(1e-3)  # new weights every version, as after a learner step
                started = time.perf_counter()
                if path.endswith("object store"):
                    numpy_state = state_dict_to_numpy(state)
                    weights = ray.put(numpy_state)
                    measured["put"] = time.perf_counter() - started
                else:
                    weights = store.write(version, state)
                    measured["write"] = time.perf_counter() - started
                sync.publish(version, weights)
                sync.push_and_wait(workers)
                measured[path] = time.perf_counter() - started
                assert sync.worker_versions == dict.fromkeys(workers, version)
                del weights
                if round_index > 0:
                    for key, seconds in measured.items():
                        times[key].append(seconds)
    ray.shutdown()

    def row(label: str, key: str, rate: bool = False) -> str:
        values = times[key]
        median = statistics.median(values)
        text = f"{label:<40}{median * 1e3:>8.1f} ms  (min {min(values) * 1e3:.1f}, max {max(values) * 1e3:.1f})"
        return text + (f"  {size_bytes / median / 2**30:5.2f} GiB/s" if rate else "")

    copy = statistics.median(times["copy"])
    print(
        f"weights: {size_bytes / 2**20:.1f} MiB ({len(state)} tensors), {args.workers} rollout workers, "
        f"median of {args.repeats} rounds; workers {'copy' if args.copy else 'pin'} shared-memory versions"
    )
    print(row("in-process copy_", "copy", rate=True))
    print(row("shared memory: learner write", "write"))
    print(row("shared memory: sync to all workers", "shared memory", rate=True))
    print(row("object store: put", "put"))
    print(row("object store: sync to all workers", "object store", rate=True))
    if not args.no_vllm:
        print(row("vLLM workers, shared memory: live", "vllm: shared memory", rate=True))
        print(row("vLLM workers, object store: live", "vllm: object store", rate=True))
    print(f"ratio object-store sync/copy: {statistics.median(times['object store']) / copy:.2f}x")
    print(f"ratio shared-memory sync/copy: {statistics.median(times['shared memory']) / copy:.2f}x (target <= 3x)")
    if not args.no_vllm:
        for path in ("vllm: shared memory", "vllm: object store"):
            print(f"ratio {path} live/copy: {statistics.median(times[path]) / copy:.2f}x")


if __name__ == "__main__":
    main()
