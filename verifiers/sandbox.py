"""Runs untrusted (model-written) Python in a contained child process.

`run_sandboxed(code, stdin=..., limits=...)` starts a supervisor (this file, run as a script by the
parent's interpreter) that sets up the isolation, forks the program's process, which sets its
limits, drops its privileges and execs a fresh `python -I -S -B`; the supervisor is the subreaper of
everything the program starts, and when the program ends, or when the parent asks (wall clock, too
much output) or dies, it kills and reaps every process of the run, daemons included. Which layer
stops what:

| fault | stopped by the kernel | also refused by the Python audit hook |
| --- | --- | --- |
| endless computation | RLIMIT_CPU (SIGXCPU), the parent's wall clock | — |
| sleeping, or ignoring SIGTERM | the parent's wall clock: SIGKILL to every process of the run | — |
| memory bomb | RLIMIT_AS (MemoryError, or the process dies) | — |
| fork bomb, thread bomb | RLIMIT_NPROC, on a uid of the run's own (root only) | — |
| huge output | none needed: the parent keeps `output_bytes` per stream, then kills | — |
| huge file | RLIMIT_FSIZE (SIGXFSZ) | — |
| many files | a tmpfs of `disk_bytes` as the working directory (root only) | — |
| writes outside the directory | every mount read-only in a private mount namespace (root only); the run's uid owns nothing else | open, rename, remove, mkdir, chmod ... outside |
| reading files outside the working directory | a filesystem view (root only): the program's root is pivoted to a read-only tmpfs of read-only binds of /usr, /bin, /lib*, the interpreter's prefix (its site-packages covered by empty mounts), /etc/ld.so.cache, /dev/{null,zero,full,random,urandom}, its own source and its working directory; the old root is unmounted, and there is no /proc or /sys | — |
| network, unix sockets | a seccomp filter: socket(2) fails; a new network namespace with no interface up | every `socket.*` event |
| new programs, native code | NO_NEW_PRIVS (setuid programs gain nothing) | `os.exec*`, `os.system`, `subprocess`, `os.posix_spawn`, `ctypes` |
| the parent's secrets | an environment of PATH, LANG, HOME, TMPDIR only; no inherited descriptors; another uid cannot read /proc/<pid>/environ; the view has no /proc | — |

Run as root (CI, containers), each run gets a uid of its own from `UID_POOL`, claimed with an
abstract unix socket, so RLIMIT_NPROC is enforced (the kernel never enforces it for root) and runs
at the same time cannot signal or read one another. Without root, the program runs as the caller's
user: its process limit is set above the caller's own process count, the network namespace needs
unprivileged user namespaces, and there is neither a read-only filesystem, which leaves the audit
hook as the only guard against writes outside the directory (the seccomp filter needs no
privilege), nor a filesystem view, so the program reads every file the caller can: run directories,
datasets and the answers in them. A layer the machine refuses (no CAP_SYS_ADMIN, a seccomp profile,
an interpreter whose prefix is /) is named in `SandboxResult.missing` with the reason.

The view is what keeps a policy from reading its answers: the run directory, the datasets, the
project and its virtual environment, home directories, other runs' sandboxes and other processes
simply have no path in it. The supervisor builds it in its own mount namespace before the program
starts (so a failure is reported, not hidden) and keeps the real root and /proc for itself; the
program enters it in a mount namespace of its own, as root, before it drops to its uid. What the
interpreter needs is asked of the interpreter itself (`_interpreter_layout`), so a pyenv or /opt
build is shown at its own path.

Which limit ended a run: timeout and output are the parent's own decisions; cpu and file_size come
from the signal; memory, disk and processes from the exit status that the prelude gives to
MemoryError, ENOSPC and EAGAIN (so a program can claim them falsely, and still fails).

Not contained: reading what the view holds (the system's /usr, e.g. /usr/share, and the program's
own source); without root, reading world-readable files and other processes' command lines in /proc;
total CPU time of a fork bomb (each process has its own limit, the wall clock bounds them all), and
anything that escapes the Linux kernel. The audit hook is not a security boundary (Python code can
get round it, e.g. with `dir_fd`); the kernel layers are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

#: uids handed to sandboxes when the parent runs as root; none of them may belong to a real user.
UID_POOL = range(2_000_000_000, 2_000_000_000 + 1024)
#: Exit statuses the program's prelude uses to say which limit ended it.
_MEMORY_EXIT, _FILE_SIZE_EXIT, _PROCESSES_EXIT, _DISK_EXIT = 121, 122, 123, 124
#: How long the supervisor may take to kill and reap everything once asked.
_SUPERVISOR_GRACE_SECONDS = 5.0
_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 0x20, 0x400, 0x800, 0x1000
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 0x4000, 0x40000, 0x200000
_MNT_DETACH = 2
#: What the program's filesystem view shows besides the interpreter's own prefix and the working
#: directory: the system directories the dynamic loader and a system Python live in (a symlink, as in
#: merged /usr, is copied as a symlink), the loader's cache, and the harmless devices.
_VIEW_SYSTEM_PATHS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
_VIEW_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_VIEW = "filesystem view"
_MOUNT_OPTION_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
}


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not: the program failed); the message names what to fix."""


class Limit(enum.StrEnum):
    """The limit that ended a program."""

    TIMEOUT = "timeout"
    CPU = "cpu"
    MEMORY = "memory"
    OUTPUT = "output"
    FILE_SIZE = "file_size"
    DISK = "disk"
    PROCESSES = "processes"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What one run of a program may use."""

    wall_seconds: float = 5.0
    """Wall-clock time until every process of the program is killed."""
    cpu_seconds: int = 2
    """CPU time of each process (RLIMIT_CPU, whole seconds)."""
    memory_bytes: int = 512 * 2**20
    """Address space of each process (RLIMIT_AS)."""
    file_size_bytes: int = 16 * 2**20
    """Largest file a process may write (RLIMIT_FSIZE)."""
    disk_bytes: int = 64 * 2**20
    """Size of the working directory's tmpfs (root only; otherwise bounded by CPU time alone)."""
    processes: int = 16
    """Processes and threads at once, the first included (RLIMIT_NPROC)."""
    open_files: int = 64
    """Open file descriptors of each process (RLIMIT_NOFILE)."""
    output_bytes: int = 64 * 2**10
    """Bytes kept of stdout and of stderr each; one more byte ends the program."""

    def __post_init__(self) -> None:
        wall = self.wall_seconds
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not 0 < wall < float("inf"):
            raise ValueError(f"SandboxLimits.wall_seconds: {wall!r} must be a positive number of seconds")
        for name in [field.name for field in dataclasses.fields(self) if field.name != "wall_seconds"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SandboxLimits.{name}: {value!r} must be a positive whole number")
        if self.open_files < 8:
            raise ValueError(
                f"SandboxLimits.open_files: {self.open_files} is too few for the interpreter; use 8 or more"
            )


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """How a program ended: its exit, its (truncated) output, what it used and which limit hit it."""

    exit_code: int | None
    """The exit status, or None when a signal ended the program."""
    signal: int | None
    """The signal that ended the program, if one did."""
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_seconds: float
    cpu_seconds: float
    """CPU time of the program and every process it started."""
    limit: Limit | None
    """The limit that ended the program, or None."""
    isolation: tuple[str, ...] = ()
    """The layers in effect (e.g. 'network namespace')."""
    missing: tuple[str, ...] = ()
    """The layers that were not, each with the reason."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None


def run_sandboxed(code: str, *, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program with `stdin`; raises `SandboxError` only if no sandbox can be set up."""
    limits = limits or SandboxLimits()
    privileged = os.geteuid() == 0
    interpreter = _unprivileged_interpreter() if privileged else sys.executable
    claim = _claim_uid() if privileged else contextlib.nullcontext(None)
    with claim as uid, tempfile.TemporaryDirectory(prefix="orchard-sandbox-") as root:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        program = os.path.join(root, "solution.py")
        with open(program, "w", encoding="utf-8", errors="surrogatepass") as file:
            file.write(code)
        os.chmod(program, 0o444)
        if uid is not None:
            os.chmod(root, 0o711)
            os.chown(workdir, uid, uid)
            os.mkdir(os.path.join(root, "view"), 0o700)
            _kill_processes_of(uid)  # left by a supervisor that was itself killed
        try:
            return _run(interpreter, program, workdir, uid, stdin, limits)
        finally:
            if uid is not None:
                _kill_processes_of(uid)


def _run(
    interpreter: str, program: str, workdir: str, uid: int | None, stdin: str, limits: SandboxLimits
) -> SandboxResult:
    status_read, status_write = os.pipe()
    lifeline_read, lifeline_write = os.pipe()
    config = {
        "interpreter": interpreter,
        "program": program,
        "workdir": workdir,
        "uid": uid,
        "processes_running": 0 if uid is not None else len(_processes_of(os.getuid())),
        "status_fd": status_write,
        "lifeline_fd": lifeline_read,
        "limits": dataclasses.asdict(limits),
        "prelude": _PRELUDE,
        "environment": {**_ENVIRONMENT, "HOME": workdir, "TMPDIR": workdir},
        "view": os.path.join(os.path.dirname(workdir), "view") if uid is not None else None,
        "layout": dataclasses.asdict(_interpreter_layout(interpreter)) if uid is not None else None,
    }
    started = time.monotonic()
    try:
        supervisor = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_ENVIRONMENT,
            start_new_session=True,
            pass_fds=(status_write, lifeline_read),
        )
    except BaseException:
        os.close(status_read)
        os.close(lifeline_write)
        raise
    finally:
        os.close(status_write)
        os.close(lifeline_read)
    lifeline = _Lifeline(lifeline_write)
    try:
        streams, killed_for = _exchange(supervisor, status_read, lifeline, stdin.encode(errors="replace"), limits)
    finally:
        lifeline.cut()  # the supervisor kills everything it started when this closes
        try:
            supervisor.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
    wall_seconds = time.monotonic() - started
    stdout, stdout_truncated = streams["stdout"]
    stderr, stderr_truncated = streams["stderr"]
    reports = [json.loads(line) for line in streams["status"][0].splitlines() if line.strip()]
    problems = [report["error"] for report in reports if "error" in report]
    setup = next((report for report in reports if "isolation" in report), None)
    finish = next((report for report in reports if "wait_status" in report), None)
    if problems or setup is None or finish is None:
        problem = "; ".join(problems) or f"the supervisor ended with status {supervisor.returncode}: {stderr[-2000:]}"
        raise SandboxError(f"sandbox could not run the program: {problem}")
    returncode = os.waitstatus_to_exitcode(finish["wait_status"])
    exit_code, ended_by = (returncode, None) if returncode >= 0 else (None, -returncode)
    return SandboxResult(
        exit_code=exit_code,
        signal=ended_by,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=stdout_truncated,
        stderr_truncated=stderr_truncated,
        wall_seconds=wall_seconds,
        cpu_seconds=finish["cpu_seconds"],
        limit=killed_for or _limit_of(exit_code, ended_by, finish["main_cpu_seconds"], limits),
        isolation=tuple(setup["isolation"]),
        missing=tuple(setup["missing"]),
    )


class _Lifeline:
    """The pipe whose closing tells the supervisor to kill the program; closed once."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor: int | None = descriptor

    def cut(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _exchange(
    supervisor: subprocess.Popen, status_read: int, lifeline: _Lifeline, stdin: bytes, limits: SandboxLimits
) -> tuple[dict[str, tuple[str, bool]], Limit | None]:
    """Feed stdin, keep at most `output_bytes` of each stream, and enforce the wall clock."""
    assert supervisor.stdin and supervisor.stdout and supervisor.stderr
    names = {supervisor.stdout.fileno(): "stdout", supervisor.stderr.fileno(): "stderr", status_read: "status"}
    kept: dict[str, bytearray] = {name: bytearray() for name in names.values()}
    truncated = {name: False for name in names.values()}
    killed_for: Limit | None = None
    selector = selectors.DefaultSelector()
    for descriptor in names:
        os.set_blocking(descriptor, False)
        selector.register(descriptor, selectors.EVENT_READ)
    stdin_fd = supervisor.stdin.fileno()
    if stdin:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        supervisor.stdin.close()
    deadline = time.monotonic() + limits.wall_seconds
    try:
        while any(key.fd in names for key in selector.get_map().values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if killed_for is not None:
                    with contextlib.suppress(ProcessLookupError):  # the supervisor did not finish: last resort
                        os.killpg(supervisor.pid, signal.SIGKILL)
                    break
                killed_for = Limit.TIMEOUT
                lifeline.cut()
                deadline = time.monotonic() + _SUPERVISOR_GRACE_SECONDS
                continue
            for key, _ in selector.select(remaining):
                if key.fd == stdin_fd:
                    try:
                        stdin = stdin[os.write(stdin_fd, stdin[:65536]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        stdin = b""
                    if not stdin:
                        selector.unregister(stdin_fd)
                        supervisor.stdin.close()
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                name = names[key.fd]
                if not data:
                    selector.unregister(key.fd)
                    continue
                cap = limits.output_bytes if name != "status" else 2**20
                room = max(cap - len(kept[name]), 0)
                kept[name] += data[:room]
                if len(data) > room:
                    truncated[name] = True
                    if killed_for is None:
                        killed_for = Limit.OUTPUT
                        lifeline.cut()
                        deadline = time.monotonic() + _SUPERVISOR_GRACE_SECONDS
    finally:
        selector.close()
        with contextlib.suppress(BrokenPipeError):
            supervisor.stdin.close()
        os.close(status_read)
    streams = {name: (kept[name].decode("utf-8", errors="replace"), truncated[name]) for name in names.values()}
    return streams, killed_for


def _limit_of(exit_code: int | None, ended_by: int | None, main_cpu: float, limits: SandboxLimits) -> Limit | None:
    if ended_by == signal.SIGXCPU or (ended_by == signal.SIGKILL and main_cpu >= limits.cpu_seconds):
        return Limit.CPU
    if ended_by == signal.SIGXFSZ or exit_code == _FILE_SIZE_EXIT:
        return Limit.FILE_SIZE
    if exit_code == _DISK_EXIT:
        return Limit.DISK
    if exit_code == _MEMORY_EXIT:
        return Limit.MEMORY
    if exit_code == _PROCESSES_EXIT:
        return Limit.PROCESSES
    return None


@contextlib.contextmanager
def _claim_uid() -> Iterator[int]:
    """A uid of `UID_POOL` that no other sandbox on this machine holds, held until the block ends."""
    import socket

    offset = random.randrange(len(UID_POOL))
    for index in range(len(UID_POOL)):
        uid = UID_POOL[(offset + index) % len(UID_POOL)]
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0orchard-sandbox-uid-{uid}")
        except OSError:
            claim.close()
            continue
        try:
            yield uid
        finally:
            claim.close()
        return
    raise SandboxError(f"all {len(UID_POOL)} sandbox uids are in use; run fewer sandboxes at once")


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as file:
                lines = file.read().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(entry))
    return found


def _kill_processes_of(uid: int) -> None:
    for _ in range(100):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


_INTERPRETER_CANDIDATES = ("/usr/local/bin/python3", "/usr/bin/python3")


@functools.cache
def _unprivileged_interpreter() -> str:
    """An interpreter that a uid of no group can run (sys.executable may lie under /root)."""
    probe_uid = UID_POOL.start - 1
    tried = []
    for candidate in dict.fromkeys([os.path.realpath(sys.executable), *_INTERPRETER_CANDIDATES]):
        if not os.path.exists(candidate):
            continue
        tried.append(candidate)
        try:
            probe = subprocess.run(
                [candidate, "-I", "-S", "-c", "import sys; sys.exit(sys.version_info < (3, 8))"],
                user=probe_uid,
                group=probe_uid,
                extra_groups=[],
                env=_ENVIRONMENT,
                cwd="/",
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate
    raise SandboxError(
        f"no Python 3.8+ interpreter can be run by an unprivileged uid (tried {', '.join(tried)});"
        " install one outside any private directory such as /root (e.g. apt-get install python3)"
    )


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where an interpreter's files lie, for the program's filesystem view."""

    directories: tuple[str, ...]
    """Directories outside the system ones (`_VIEW_SYSTEM_PATHS`) that it runs from: its prefixes."""
    hidden: tuple[str, ...]
    """Its site-packages directories inside those shown: `-S` never reads them, so none is shown."""


# Asked of the interpreter itself, with the program's flags, so a venv, pyenv or /opt build is seen as it runs.
_LAYOUT_PROBE = """
import json, os, site, sys, sysconfig
paths = sysconfig.get_paths()
needed = [sys.base_prefix, sys.base_exec_prefix, paths["stdlib"], paths["platstdlib"]]
needed += [os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]
sites = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
print(json.dumps({"needed": needed, "sites": sites}))
"""


@functools.cache
def _interpreter_layout(interpreter: str) -> _Layout:
    """The directories the program's view must show for `interpreter`, and the site-packages it hides."""
    probe = subprocess.run(
        [interpreter, "-I", "-S", "-B", "-c", _LAYOUT_PROBE],
        env=_ENVIRONMENT,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        raise SandboxError(f"{interpreter} could not say where its files lie: {probe.stderr[-1000:]}")
    found = json.loads(probe.stdout)
    needed = {os.path.realpath(path) for path in found["needed"] if path}
    directories = sorted(
        path
        for path in needed
        if not any(_within(path, shown) for shown in _VIEW_SYSTEM_PATHS)
        and not any(_within(path, other) and path != other for other in needed)
    )
    shown = [*_VIEW_SYSTEM_PATHS, *directories]
    hidden = sorted(
        path
        for path in {os.path.realpath(path) for path in found["sites"]}
        if os.path.isdir(path)
        and any(_within(path, directory) for directory in shown)
        and not any(_within(other, path) for other in needed)  # never hide the standard library
    )
    return _Layout(directories=tuple(directories), hidden=tuple(hidden))


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


# The program's first lines, run by its own interpreter before the model's code. It restores the
# default action of SIGXFSZ (Python ignores it), installs the audit hook, and turns the exceptions
# that a limit raises into the exit statuses above.
_PRELUDE = r"""
import errno, os, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)

def _install(root):
    refused = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
               "os.fork_exec", "_posixsubprocess", "pty.", "os.startfile")
    path_events = {"os.remove": 1, "os.rename": 2, "os.replace": 2, "os.mkdir": 1, "os.rmdir": 1,
                   "os.symlink": 2, "os.link": 2, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                   "os.utime": 1, "shutil.rmtree": 1}
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def inside(path):
        if path is None or isinstance(path, int):
            return True
        path = realpath(fsdecode(path))
        return path == root or path.startswith(root + "/") or path == "/dev/null"

    def hook(event, args):
        if event.startswith(refused):
            raise PermissionError(f"sandbox: {event} is not allowed (no network, no new programs)")
        if event == "open" and args[2] & writing and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
        count = path_events.get(event)
        if count and not all(inside(path) for path in args[:count]):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)

def _run():
    with open(sys.argv[1], encoding="utf-8") as file:
        code = compile(file.read(), "solution.py", "exec")
    sys.argv = ["solution.py"]
    _install(os.getcwd())
    import builtins
    builtins.exit = builtins.quit = sys.exit  # -S skips the site module that defines them
    exec(code, {"__name__": "__main__", "__builtins__": builtins})

try:
    _run()
    sys.stdout.flush()
except SystemExit:
    raise
except BaseException as error:
    status = 1
    try:
        if isinstance(error, MemoryError):
            status = MEMORY_EXIT
        elif isinstance(error, OSError) and error.errno == errno.EFBIG:
            status = FILE_SIZE_EXIT
        elif isinstance(error, OSError) and error.errno == errno.ENOSPC:
            status = DISK_EXIT
        elif isinstance(error, OSError) and error.errno == errno.EAGAIN:
            status = PROCESSES_EXIT
        elif isinstance(error, RuntimeError) and "can't start new thread" in str(error):
            status = PROCESSES_EXIT
        sys.excepthook(type(error), error, error.__traceback__)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status)
"""
_PRELUDE = (
    _PRELUDE.replace("MEMORY_EXIT", str(_MEMORY_EXIT))
    .replace("FILE_SIZE_EXIT", str(_FILE_SIZE_EXIT))
    .replace("PROCESSES_EXIT", str(_PROCESSES_EXIT))
    .replace("DISK_EXIT", str(_DISK_EXIT))
)


# ---- the supervisor: this file run as a script, as the parent's user, before the program starts ----


def _supervise(config: dict) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    status_fd, lifeline_fd = config["status_fd"], config["lifeline_fd"]
    uid = config["uid"]
    isolation: list[str] = []
    missing: list[str] = []

    def report(message: dict) -> None:
        os.write(status_fd, (json.dumps(message) + "\n").encode())

    try:
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # orphans come to us, so none outlive the run
            missing.append(f"subreaper: prctl failed: {os.strerror(ctypes.get_errno())}; orphans go to init")
        _enter_namespaces(libc, config, uid, isolation, missing)
        _deny_sockets(libc, isolation, missing)
    except Exception as error:
        report({"error": f"{type(error).__name__}: {error}"})
        return 1
    report({"isolation": isolation, "missing": missing})
    program = os.fork()
    if program == 0:
        try:
            _become_program(libc, config)
        except BaseException as error:
            with contextlib.suppress(BaseException):
                report({"error": f"starting the program: {type(error).__name__}: {error}"})
        os._exit(126)
    devnull = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):  # only the program may hold the parent's pipes
        os.dup2(devnull, descriptor)
    _wait_for_exit_or_lifeline(program, lifeline_fd)
    _, wait_status, usage = os.wait4(program, 0)
    main_cpu = usage.ru_utime + usage.ru_stime
    cpu_seconds = main_cpu + _kill_and_reap_descendants()
    report({"wait_status": wait_status, "cpu_seconds": cpu_seconds, "main_cpu_seconds": main_cpu})
    return 0


def _enter_namespaces(libc, config: dict, uid: int | None, isolation: list[str], missing: list[str]) -> None:
    import ctypes

    def unshare(flags: int) -> str | None:
        if libc.unshare(flags) == 0:
            return None
        return os.strerror(ctypes.get_errno())

    if uid is None:
        problem = unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        if problem is None:
            isolation.append("network namespace (in a user namespace)")
        else:
            missing.append(f"network namespace: unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {problem}")
        missing.append("own uid: not running as root, so the process limit counts the caller's processes too")
        missing.append("read-only filesystem: not running as root")
        missing.append(f"{_VIEW}: not running as root, so the program reads every file the caller can")
        return
    isolation.append(f"own uid {uid}")
    problem = unshare(_CLONE_NEWNET)
    if problem is None:
        isolation.append("network namespace")
    else:
        missing.append(f"network namespace: unshare(CLONE_NEWNET) failed: {problem}")
    problem = _private_mount_namespace(libc, unshare)
    if problem is not None:
        missing.append(f"read-only filesystem: {problem}")
        missing.append(f"{_VIEW}: {problem}")
        config["view"] = None
        return
    failed = _remount_read_only(libc)
    if "/" in failed:
        missing.append(f"read-only filesystem: remounting / failed: {failed['/']}")
    else:
        isolation.append("read-only filesystem")
        if failed:
            missing.append("read-only mounts: " + ", ".join(f"{path} ({problem})" for path, problem in failed.items()))
    limits = config["limits"]
    options = f"size={limits['disk_bytes']},mode=0700,uid={uid},gid={uid}"
    try:
        _mount(libc, "tmpfs", config["workdir"], "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    except OSError as error:
        missing.append(f"tmpfs working directory: {error.strerror}")
    else:
        isolation.append(f"tmpfs working directory of {limits['disk_bytes']} bytes")
    try:
        _build_view(libc, config)
    except (OSError, ValueError) as error:
        missing.append(f"{_VIEW}: {error}")
        config["view"] = None  # the program then sees the whole (read-only) filesystem
    else:
        isolation.append(f"{_VIEW}: the interpreter and the working directory only")


def _private_mount_namespace(libc, unshare) -> str | None:
    """Enter a mount namespace whose mounts reach nobody else's; returns the problem, or None."""
    before = os.readlink("/proc/self/ns/mnt")
    problem = unshare(_CLONE_NEWNS)
    if problem is not None:
        return f"unshare(CLONE_NEWNS) failed: {problem}"
    if os.readlink("/proc/self/ns/mnt") == before:  # never mount anything in the caller's namespace
        raise SandboxError("unshare(CLONE_NEWNS) returned success but the mount namespace did not change")
    try:
        _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below reaches the caller's mounts
    except OSError as error:
        return f"making the mounts private failed: {error.strerror}"
    return None


def _build_view(libc, config: dict) -> None:
    """Mount the program's future root: a tmpfs of read-only binds of only what the interpreter needs.

    Built here, before the program starts, so that a failure is reported as a missing layer; the
    program enters it with `_enter_view`. Everything else (the caller's home, the project, run
    directories, datasets, other sandboxes' files, /proc) has no path in it at all.
    """
    view, layout = config["view"], config["layout"]
    if "/" in layout["directories"]:
        raise ValueError("the interpreter's prefix is /, so a view holding it would hold everything")
    os.umask(0o022)  # the directories made for mount points must be traversable by the program's uid
    _mount(libc, "tmpfs", view, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    for path in (*_VIEW_SYSTEM_PATHS, *layout["directories"]):
        _show(libc, view, path, _MS_NOSUID | _MS_NODEV)
    for path in layout["hidden"]:
        _mount(libc, "tmpfs", view + path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k")
    for path in _VIEW_DEVICES:
        _show(libc, view, path, _MS_NOSUID | _MS_NOEXEC)
    _show(libc, view, config["program"], _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _show(libc, view, config["workdir"], None)  # the only writable place
    _mount(libc, None, view, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _show(libc, view: str, path: str, read_only_flags: int | None) -> None:
    """Make `path` appear at the same path in the view: a bind mount (read-only unless flags are None),
    or for a symlink the same symlink. A path this machine lacks is left out."""
    if not os.path.lexists(path):
        return
    target = view + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
        return
    if os.path.isdir(path):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    _mount(libc, path, target, None, _MS_BIND | _MS_REC)
    if read_only_flags is not None:  # a bind keeps the source's flags until it is remounted
        _mount(libc, None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | read_only_flags)


#: pivot_root(2) has no libc wrapper: its number per machine.
_PIVOT_ROOT_SYSCALLS = {"x86_64": 155, "aarch64": 41}


def _enter_view(libc, view: str) -> None:
    """Make the view the whole filesystem of this process: a mount namespace of its own (the
    supervisor keeps the real root and /proc), the view pivoted to /, the old root unmounted."""
    import ctypes

    def check(result: int, call: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"{call}: {os.strerror(ctypes.get_errno())}")

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    os.chdir(view)
    machine = os.uname().machine
    if machine in _PIVOT_ROOT_SYSCALLS:
        # the old root is stacked on the view at the same place; unmounting it leaves the view alone
        check(libc.syscall(ctypes.c_long(_PIVOT_ROOT_SYSCALLS[machine]), b".", b"."), "pivot_root")
        check(libc.umount2(b".", _MNT_DETACH), "umount2(old root)")
    else:
        os.chroot(".")  # the program's uid has no CAP_SYS_CHROOT to leave it
    os.chdir("/")


# seccomp: socket(2) and io_uring_setup(2) (which could open sockets past the filter) fail with
# EACCES; a syscall of another ABI (i386 on x86_64, x32) kills the process. Per machine: the audit
# arch, socket's number; io_uring_setup is 425 on both.
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO, _SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_BPF_LOAD_WORD, _BPF_JUMP_EQUAL, _BPF_JUMP_ANY_BIT, _BPF_RETURN = 0x20, 0x15, 0x45, 0x06


def _deny_sockets(libc, isolation: list[str], missing: list[str]) -> None:
    """Install a seccomp filter, kept across fork and exec, that refuses to create sockets."""
    import ctypes
    import errno
    import struct

    machine = os.uname().machine
    if machine not in _SECCOMP_ARCHES:
        missing.append(f"seccomp socket filter: no syscall table for {machine}")
        return
    arch, socket_number = _SECCOMP_ARCHES[machine]
    refuse = _SECCOMP_RET_ERRNO | errno.EACCES
    instructions = [
        (_BPF_LOAD_WORD, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JUMP_EQUAL, 1, 0, arch),
        (_BPF_RETURN, 0, 0, _SECCOMP_RET_KILL_PROCESS),
        (_BPF_LOAD_WORD, 0, 0, 0),  # seccomp_data.nr
        (_BPF_JUMP_ANY_BIT, 3, 0, 0x40000000),  # x32 ABI
        (_BPF_JUMP_EQUAL, 2, 0, socket_number),
        (_BPF_JUMP_EQUAL, 1, 0, 425),  # io_uring_setup
        (_BPF_RETURN, 0, 0, _SECCOMP_RET_ALLOW),
        (_BPF_RETURN, 0, 0, refuse),
    ]
    # a jump skips that many instructions: each one that refuses lands on the last instruction
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in instructions)
    filters = ctypes.create_string_buffer(code, len(code))

    class Program(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = Program(len(instructions), ctypes.addressof(filters))
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # needed to install a filter without CAP_SYS_ADMIN
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        missing.append(f"seccomp socket filter: {os.strerror(ctypes.get_errno())}")
    else:
        isolation.append("seccomp socket filter")


def _mount(libc, source: str | None, target: str, kind: str | None, flags: int, options: str | None = None) -> None:
    import ctypes

    def encoded(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    if libc.mount(encoded(source), encoded(target), encoded(kind), ctypes.c_ulong(flags), encoded(options)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _remount_read_only(libc) -> dict[str, str]:
    """Make every mount of this (private) namespace read-only; returns the mount points that refused."""
    failed: dict[str, str] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        lines = file.read().splitlines()
    for line in lines:
        fields = line.split()
        mount_point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4])  # \040: space
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in fields[5].split(","):
            flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
        try:
            _mount(libc, None, mount_point, None, flags)
        except OSError as error:
            failed[mount_point] = error.strerror or str(error)
    return failed


def _become_program(libc, config: dict) -> None:
    import resource

    os.close(config["lifeline_fd"])
    limits = config["limits"]
    cpu = int(limits["cpu_seconds"])
    # the kernel counts every process of the uid: without a uid of its own, leave room for the caller's
    processes = limits["processes"] + config["processes_running"]
    for kind, soft, hard in (
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"]),
        (resource.RLIMIT_FSIZE, limits["file_size_bytes"], limits["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_NPROC, processes, processes),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
    ):
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:  # only root may raise a hard limit
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))
    if config["view"] is not None:
        _enter_view(libc, config["view"])
    uid = config["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(config["workdir"])
    os.umask(0o077)
    os.set_inheritable(config["status_fd"], False)
    interpreter = config["interpreter"]
    os.execve(
        interpreter, [interpreter, "-I", "-S", "-B", "-c", config["prelude"], config["program"]], config["environment"]
    )


def _wait_for_exit_or_lifeline(program: int, lifeline_fd: int) -> None:
    """Wait for the program to end; kill it when the parent closes the lifeline (or dies)."""
    import select

    try:
        exited = os.pidfd_open(program)
    except (AttributeError, OSError):
        exited = None
    while True:
        watched = [lifeline_fd] + ([exited] if exited is not None else [])
        ready, _, _ = select.select(watched, [], [], None if exited is not None else 0.02)
        if exited is not None and exited in ready:
            return
        if exited is None and os.waitid(os.P_PID, program, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        if lifeline_fd in ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(program, signal.SIGKILL)
            return


def _kill_and_reap_descendants() -> float:
    """Kill every process left (all are ours, as the subreaper) and reap them; returns their CPU seconds."""
    me = str(os.getpid())
    cpu_seconds = 0.0
    while True:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                    parent = file.read().rpartition(")")[2].split()[1]
            except (OSError, IndexError):
                continue
            if parent == me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
        try:
            _, _, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return cpu_seconds
        cpu_seconds += usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(_supervise(json.loads(sys.argv[1])))
