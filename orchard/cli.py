"""The `orchard` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchard.config import ConfigError, RunConfig, dump_config, load_config

EXIT_BAD_CONFIG = 2
EXIT_FAILED = 1


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def connect_ray(config: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    show_actor_logs = os.environ.get("ORCHARD_ACTOR_LOGS", "0") == "1"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    needed = config.learner.num_cpus + config.rollout.num_workers * config.rollout.num_cpus_per_worker
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=False,
        log_to_driver=show_actor_logs,
        configure_logging=False,
    )


def command_run(args: argparse.Namespace) -> int:
    config = _load(args)
    from services.buffer.redis_buffer import BufferUnavailable
    from services.driver import Driver, DriverError
    from services.run_dir import RunDirectory, new_run_id

    if args.run_dir:
        run_path = Path(args.run_dir)
        run_dir = RunDirectory(run_path.parent, run_path.name)
    else:
        run_dir = RunDirectory(config.runs_dir, new_run_id(config.name))
    print(f"orchard: run {run_dir.run_id} in {run_dir.path}", flush=True)
    connect_ray(config)
    try:
        summary = Driver(config, run_dir, show_progress=not args.quiet).run()
    except (DriverError, ConfigError, BufferUnavailable) as error:
        print(f"orchard: run failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("orchard: interrupted", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"orchard: {summary['steps']} steps in {summary['rl_seconds']:.0f} s; held-out accuracy "
        f"{summary['held_out_accuracy_initial']:.3f} -> {summary['held_out_accuracy_final']:.3f} "
        f"({summary['held_out_accuracy_gain']:+.3f}); learner idle {summary['learner_idle_fraction']:.0%}"
    )
    print(f"orchard: wrote {run_dir.path}/summary.json, metrics.jsonl, reward.png")
    return 0


def command_check(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchard", description="Distributed RL on verifiable rewards.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a config (default: the embedded CPU demo)")
    run.add_argument("config", nargs="?", help="YAML config; omitted: configs/demo.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    run.add_argument("--run-dir", help="directory of this run (default: <runs_dir>/<run-id>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=command_run)

    check = commands.add_parser("check", help="validate a config and print the resolved one")
    check.add_argument("config", help="YAML config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    check.set_defaults(handler=command_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"orchard: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
