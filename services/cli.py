"""The `orchard` command line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from orchard.config import ConfigError, RunConfig, dump_config, load_config

if TYPE_CHECKING:
    from orchard.services.control.server import ControlServer
    from orchard.services.control.service import RunHandle

EXIT_BAD_CONFIG = 2
EXIT_FAILED = 1


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def _run_path(config: RunConfig, run_dir: str | None) -> Path:
    """Where the run's directory is: `--run-dir` (or `--resume`) when given, else a new id under runs_dir."""
    from orchard.services.run_dir import new_run_id

    return Path(run_dir) if run_dir else Path(config.runs_dir) / new_run_id(config.name)


def _resolve_resume(args: argparse.Namespace) -> None:
    """`--resume DIR` means DIR's config.yaml and DIR itself as the run directory."""
    resumed = Path(args.resume)
    if args.config or args.run_dir:
        raise ConfigError(
            [("--resume", "takes the config and run directory of the run it resumes; drop CONFIG and --run-dir")]
        )
    if not (resumed / "config.yaml").is_file():
        raise ConfigError([("--resume", f"{resumed} is not a run directory (no config.yaml)")])
    args.config, args.run_dir = str(resumed / "config.yaml"), str(resumed)


def command_run(args: argparse.Namespace) -> int:
    """Serve the control plane, create the run, execute it here, exit when it ends.

    Before anything is written, the run directory must be free (no other process runs it) and the
    control port must be bindable; either conflict ends the command with a message and the
    directory untouched. The directory's lock is then held until the command ends, so a second
    `orchard run --resume` of it fails instead of interleaving its writes with this run's.
    """
    if args.resume:
        _resolve_resume(args)
    config = _load(args)
    from orchard.services.control.app import create_app
    from orchard.services.control.server import ControlPlaneError, ControlServer
    from orchard.services.control.service import ControlService
    from orchard.services.run_dir import RunDirectory, RunDirectoryLocked, ensure_unlocked

    path = _run_path(config, args.run_dir)
    token = config.control.resolved_token()
    service = ControlService()
    try:
        # the directory first: a resumed run has the port of the run that holds it, and the port
        # conflict would hide the real one
        ensure_unlocked(path)
        app = create_app(service, token=token, max_body_bytes=config.control.max_body_bytes)
        server = ControlServer(app, config.control.host, config.control.port, token=token)
    except RunDirectoryLocked as error:
        print(f"orchard: {error}", file=sys.stderr)
        return EXIT_FAILED
    except ControlPlaneError as error:
        print(f"orchard: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    run_dir = RunDirectory(path.parent, path.name)
    try:
        lock = run_dir.lock()
    except RunDirectoryLocked as error:  # taken between the check and now
        server.stop()
        print(f"orchard: {error}", file=sys.stderr)
        return EXIT_FAILED
    with lock:
        run = service.create_run(config, run_dir=run_dir, paused=args.paused, launch=False, resume=bool(args.resume))
        return _execute(run, server, args)


def _execute(run: RunHandle, server: ControlServer, args: argparse.Namespace) -> int:
    """Execute `run` in this thread with the control plane served beside it; the command's exit status."""
    from orchard.services.buffer.redis_buffer import BufferUnavailable
    from orchard.services.cluster import connect_ray
    from orchard.services.control.run_control import RunState
    from orchard.services.driver import DriverError

    print(f"orchard: run {run.id} in {run.run_dir.path}", flush=True)
    server.start()
    print(f"orchard: control plane at {server.url}", flush=True)
    if args.paused:
        print(f"orchard: the run starts paused; resume it with `orchard resume --url {server.url}`", flush=True)
    try:
        connect_ray(run.config)
        summary = run.execute(show_progress=not args.quiet)
    except (DriverError, ConfigError, BufferUnavailable) as error:
        print(f"orchard: run failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("orchard: interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        server.stop()
    print(
        f"orchard: run {summary['state']} after {summary['steps']} steps in {summary['rl_seconds']:.0f} s; "
        f"held-out accuracy {summary['held_out_accuracy_initial']:.3f} -> {summary['held_out_accuracy_final']:.3f} "
        f"({summary['held_out_accuracy_gain']:+.3f}); learner idle {summary['learner_idle_fraction']:.0%}"
    )
    print(f"orchard: wrote {run.run_dir.path}/summary.json, metrics.jsonl, reward.png")
    return 0 if run.control.state in (RunState.FINISHED, RunState.STOPPED) else EXIT_FAILED


def launch_holding_lock(handle: RunHandle, launch: Callable[[RunHandle], None] | None = None) -> None:
    """Launch a run created over REST holding its directory's lock until the run's thread ends.

    While `orchard serve` runs it, an `orchard run --resume` of the directory is refused as for
    a run of `orchard run`. A directory already held (another process chose the same run id)
    fails the run at once with 409, before anything is written.
    """
    from orchard.services.control.run_control import ControlConflict, RunState
    from orchard.services.control.service import launch_in_thread
    from orchard.services.run_dir import RunDirectoryLocked

    try:
        lock = handle.run_dir.lock()
    except RunDirectoryLocked as error:
        handle.control.finish(RunState.FAILED, str(error))
        raise ControlConflict(str(error)) from None
    try:
        (launch or launch_in_thread)(handle)
    except BaseException:
        lock.release()
        raise
    if handle.thread is None:  # nothing runs in the background: nothing to hold the directory for
        lock.release()
        return

    def release_when_done(thread: threading.Thread) -> None:
        thread.join()
        lock.release()

    threading.Thread(target=release_when_done, args=(handle.thread,), name=f"lock-{handle.id}", daemon=True).start()


def command_serve(args: argparse.Namespace) -> int:
    """The control plane alone; runs are created with `POST /v1/runs`. Its settings are the `control`
    section of `--config` (the demo's when omitted), which `--host`, `--port` and `--max-active-runs` override."""
    from orchard.services.control.app import create_app
    from orchard.services.control.server import ControlPlaneError, ControlServer
    from orchard.services.control.service import ControlService

    settings = _load(args).control
    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    max_active_runs = args.max_active_runs if args.max_active_runs is not None else settings.max_active_runs
    if max_active_runs < 1:
        print(f"orchard: --max-active-runs must be at least 1, got {max_active_runs}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    token = settings.resolved_token()
    service = ControlService(launcher=launch_holding_lock, max_active_runs=max_active_runs)
    try:
        app = create_app(service, token=token, max_body_bytes=settings.max_body_bytes)
        server = ControlServer(app, host, port, token=token)
    except ControlPlaneError as error:
        print(f"orchard: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(
        f"orchard: control plane at {server.url} (API docs at {server.url}/docs), up to {max_active_runs} active "
        f"run{'s' if max_active_runs > 1 else ''}",
        flush=True,
    )
    server.serve_forever()
    return 0


def command_client(args: argparse.Namespace) -> int:
    """`status|pause|resume|stop|checkpoint`: one call of the control plane's REST API."""
    from orchard.services.control.client import ControlClient, ControlClientError, format_status

    try:
        with ControlClient(args.url, token=args.token) as client:
            if args.command == "status" and not args.run:
                runs = client.runs()
                if args.json:
                    print(json.dumps(runs, indent=2))
                else:
                    print("\n".join(format_status(run) for run in runs) or f"no runs at {client.url}")
                return 0
            run_id = client.resolve(args.run)
            if args.command == "status":
                result = client.status(run_id)
            elif args.command == "scale":
                result = client.scale(run_id, args.count)
            else:
                result = client.act(run_id, args.command)
    except ControlClientError as error:
        print(f"orchard: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "status":
        print(format_status(result))
    elif args.command == "scale":
        print(
            f"run {result['id']}: {result['state']}, {result['rollout_workers']} rollout workers, "
            f"{result['requested']} requested (applied at the next step boundary)"
        )
    else:
        print(f"run {result['id']}: {result['state']}")
    return 0


def command_samples(args: argparse.Namespace) -> int:
    """The latest rollouts of a run as the model saw them (runs/<id>/samples.jsonl)."""
    from orchard.services.run_dir import read_jsonl
    from orchard.services.samples import format_samples

    path = Path(args.run_dir) / "samples.jsonl"
    if not (Path(args.run_dir) / "config.yaml").is_file():
        print(f"orchard: {args.run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    records = read_jsonl(path)
    if not records:
        print(f"orchard: {path} holds no samples yet (they are written at every evaluation)", file=sys.stderr)
        return EXIT_FAILED
    latest = records[-args.count :] if args.count > 0 else records
    if args.json:
        print("\n".join(json.dumps(record) for record in latest))
    else:
        print(format_samples(latest))
    return 0


def command_compare(args: argparse.Namespace) -> int:
    """Plain GRPO against the config, per seed, in the same wall-clock budget; figure and table."""
    from orchard.services import compare

    out = Path(args.out)
    args.config = args.config or str(compare.DEFAULT_CONFIG)
    if args.report_only:
        try:
            runs = compare.collect(out)
        except ValueError as error:
            print(f"orchard: compare: {error}", file=sys.stderr)
            return EXIT_FAILED
        minutes = args.minutes
    else:
        config = _load(args)  # refused here, before any run starts
        minutes = args.minutes if args.minutes is not None else config.max_minutes
        if minutes is None:
            print("orchard: compare needs a budget: --minutes, or max_minutes in the config", file=sys.stderr)
            return EXIT_BAD_CONFIG
        plain = load_config(args.config, [*args.overrides, *compare.PLAIN_GRPO])  # the plain arm must be valid too
        if plain == config:
            print(
                f"orchard: compare: {args.config} is plain GRPO already (no curriculum, tree search or hints):"
                " nothing to compare it with",
                file=sys.stderr,
            )
            return EXIT_BAD_CONFIG
        try:
            runs = compare.execute(args.config, args.overrides, args.seeds, minutes, out)
        except (RuntimeError, ValueError) as error:
            print(f"orchard: compare: {error}", file=sys.stderr)
            return EXIT_FAILED
    table = compare.report(runs, out, minutes)
    print(compare.markdown(table, minutes), end="")
    print(f"orchard: wrote {out}/compare.png, compare.md, compare.json")
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
    run.add_argument("--paused", action="store_true", help="set up, then wait for `orchard resume`")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="continue runs/<id> from its newest checkpoint (with its config and --set)"
    )
    run.set_defaults(handler=command_run)

    serve = commands.add_parser("serve", help="serve the control plane alone; create runs over REST")
    serve.add_argument("--config", help="YAML config whose `control` section sets the plane (default: the demo's)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    serve.add_argument("--host", help="bind address (default control.host; non-loopback needs ORCHARD_TOKEN)")
    serve.add_argument("--port", type=int, help="port (default control.port; 0: any free port)")
    serve.add_argument("--max-active-runs", type=int, help="runs trained at once (default control.max_active_runs, 1)")
    serve.set_defaults(handler=command_serve)

    for name, text in [
        ("status", "show a run (all runs when RUN is omitted)"),
        ("pause", "pause a run at its next step boundary"),
        ("resume", "resume a paused run"),
        ("stop", "stop a run with a final checkpoint and summary"),
        ("checkpoint", "checkpoint a run at its next step boundary"),
    ]:
        client = commands.add_parser(name, help=text)
        client.add_argument("run", nargs="?", help="run id (default: the active run, else the newest)")
        client.add_argument("--url", help="control plane URL (default: $ORCHARD_URL or http://127.0.0.1:8470)")
        client.add_argument("--token", help="bearer token (default: $ORCHARD_TOKEN)")
        client.add_argument("--json", action="store_true", help="print the JSON answer")
        client.set_defaults(handler=command_client)

    scale = commands.add_parser("scale", help="change the number of a run's rollout workers")
    scale.add_argument("run", help="run id")
    scale.add_argument("count", type=int, help="rollout workers wanted (at least 1, within the run's quota)")
    scale.add_argument("--url", help="control plane URL (default: $ORCHARD_URL or http://127.0.0.1:8470)")
    scale.add_argument("--token", help="bearer token (default: $ORCHARD_TOKEN)")
    scale.add_argument("--json", action="store_true", help="print the JSON answer")
    scale.set_defaults(handler=command_client)

    samples = commands.add_parser("samples", help="show a run's latest rollouts as the model saw them")
    samples.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (runs/<id>)")
    samples.add_argument("-n", "--count", type=int, default=4, help="how many of the latest (0: all)")
    samples.add_argument("--json", action="store_true", help="one JSON record per line")
    samples.set_defaults(handler=command_samples)

    compare = commands.add_parser(
        "compare", help="run plain GRPO and a config side by side per seed; figure and table of held-out accuracy"
    )
    compare.add_argument("config", nargs="?", help="YAML config; omitted: configs/demo.yaml")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    compare.add_argument("--minutes", type=float, help="minutes of RL per run (default: the config's max_minutes)")
    compare.add_argument("--out", default="runs/compare", help="directory of the runs and figures")
    compare.add_argument(
        "--report-only", action="store_true", help="only redraw the figure and table from the runs under --out"
    )
    compare.set_defaults(handler=command_compare)

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
