"""Hostile programs, run for real in the sandbox: each one is contained, and the test names the limit
or the layer that stopped it.

Cases that two layers refuse (writes outside the directory, sockets) run twice: as shipped, and
with the Python audit hook left out of the prelude, to show that the kernel layer contains them on
its own. Those second runs are skipped, with the reason, where the machine refuses the namespace.
"""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

from orchard.verifiers import sandbox
from orchard.verifiers.sandbox import UID_POOL, Limit, SandboxLimits, run_sandboxed

FAST = SandboxLimits(wall_seconds=2, cpu_seconds=1, memory_bytes=256 * 2**20, output_bytes=4096)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's own uid (and RLIMIT_NPROC) needs root")


def sandbox_processes() -> list[int]:
    """Processes of any sandbox uid, zombies included."""
    found = []
    for status_path in glob.glob("/proc/[0-9]*/status"):
        with contextlib.suppress(OSError), open(status_path) as file:
            for line in file:
                if line.startswith("Uid:") and int(line.split()[1]) in UID_POOL:
                    found.append(int(status_path.split("/")[2]))
    return found


def my_children() -> set[int]:
    children = set()
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError), open(stat_path) as file:
            if int(file.read().rpartition(")")[2].split()[1]) == os.getpid():
                children.add(int(stat_path.split("/")[2]))
    return children


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Every test: no sandbox process, child process or working directory outlives the run."""
    directories = set(glob.glob(os.path.join(tempfile.gettempdir(), "orchard-sandbox-*")))
    children = my_children()
    yield
    assert sandbox_processes() == []
    assert my_children() <= children
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "orchard-sandbox-*"))) <= directories


@pytest.fixture(params=["as shipped", "kernel layers only"])
def layers(request, monkeypatch) -> str:
    """Run a test as shipped, then without the Python audit hook (the kernel layers alone)."""
    if request.param == "kernel layers only":
        monkeypatch.setattr(sandbox, "_PRELUDE", sandbox._PRELUDE.replace("_install(os.getcwd())", "pass"))
    return request.param


def has_layer(result, layer: str) -> bool:
    return any(entry.startswith(layer) for entry in result.isolation)


def require_layer(result, *layers: str) -> None:
    if not any(has_layer(result, layer) for layer in layers):
        pytest.skip(f"this machine gives no {' or '.join(layers)}: {'; '.join(result.missing)}")


def test_an_ordinary_program_reads_stdin_and_writes_stdout():
    result = run_sandboxed("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="1 2 39\n", limits=FAST)
    assert result.ok and result.stdout == "42\n" and result.stderr == ""
    assert result.limit is None and not result.stdout_truncated
    assert 0 < result.cpu_seconds < 1


def test_exit_status_and_exceptions_are_reported():
    assert run_sandboxed("print('a'); exit(3)", limits=FAST).exit_code == 3
    failed = run_sandboxed("raise ValueError('bad input')", limits=FAST)
    assert failed.exit_code == 1 and failed.limit is None and "ValueError: bad input" in failed.stderr


@as_root
def test_a_fork_bomb_is_stopped_by_the_process_limit_and_leaves_no_process():
    started = time.monotonic()
    result = run_sandboxed("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert result.limit == Limit.PROCESSES
    assert "Resource temporarily unavailable" in result.stderr
    assert time.monotonic() - started < FAST.wall_seconds + 1
    # the autouse fixture checks that no process of the sandbox is left


@as_root
def test_forked_sleepers_and_detached_daemons_are_killed():
    sleepers = "import os, time\nfor _ in range(50):\n    try:\n        os.fork()\n    except OSError:\n        pass\ntime.sleep(60)"
    assert run_sandboxed(sleepers, limits=FAST).limit == Limit.TIMEOUT
    daemon = (
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('main done')"
    )
    result = run_sandboxed(daemon, limits=FAST)
    assert result.ok and result.stdout == "main done\n"
    assert result.wall_seconds < FAST.wall_seconds  # the run ends with its main process, not the daemon


def test_an_infinite_loop_is_stopped_by_the_cpu_limit_or_the_wall_clock():
    limits = SandboxLimits(wall_seconds=3, cpu_seconds=1)
    result = run_sandboxed("while True:\n    pass", limits=limits)
    # on an idle machine RLIMIT_CPU fires after 1 s; on a busy one the wall clock may come first
    assert result.limit in (Limit.CPU, Limit.TIMEOUT)
    assert result.wall_seconds < limits.wall_seconds + 1
    if result.limit == Limit.CPU:
        assert result.signal == signal.SIGXCPU


def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_sandboxed("import time\ntime.sleep(60)", limits=SandboxLimits(wall_seconds=1))
    assert result.limit == Limit.TIMEOUT and result.signal == signal.SIGKILL
    assert 1 <= result.wall_seconds < 4


def test_a_program_that_ignores_sigterm_is_still_killed():
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring SIGTERM', flush=True)\n"
        "while True:\n"
        "    time.sleep(0.1)"
    )
    result = run_sandboxed(code, limits=SandboxLimits(wall_seconds=1))
    assert result.stdout == "ignoring SIGTERM\n"
    assert result.limit == Limit.TIMEOUT and result.signal == signal.SIGKILL


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(2**40)", "blocks = []\nwhile True:\n    blocks.append(bytearray(10**6))"],
    ids=["one huge allocation", "growing list"],
)
def test_a_memory_bomb_is_stopped_by_the_memory_limit(code):
    result = run_sandboxed(code, limits=FAST)
    assert result.limit == Limit.MEMORY and "MemoryError" in result.stderr


def test_huge_output_is_truncated_flagged_and_never_held_by_the_parent():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the program holds a 1 GB string (and its encoding): give it the memory and time to print it
    limits = SandboxLimits(wall_seconds=30, cpu_seconds=15, memory_bytes=3 * 2**30, output_bytes=65536)
    result = run_sandboxed("print('x' * 10**9)", limits=limits)
    assert result.limit == Limit.OUTPUT and result.signal == signal.SIGKILL
    assert result.stdout_truncated and result.stdout == "x" * 65536
    peak_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert peak_growth_mib < 100


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_endless_print_loop_is_truncated_and_stopped(stream):
    result = run_sandboxed(f"import sys\nwhile True:\n    print('x' * 100, file=sys.{stream})", limits=FAST)
    assert result.limit == Limit.OUTPUT and result.wall_seconds < FAST.wall_seconds
    assert getattr(result, f"{stream}_truncated") and len(getattr(result, stream)) == FAST.output_bytes


@pytest.mark.parametrize(
    "path",
    [
        os.path.join(tempfile.gettempdir(), f"orchard-evil-{uuid.uuid4().hex}"),
        f"/etc/orchard-test-{uuid.uuid4().hex}",
        f"/dev/shm/orchard-evil-{uuid.uuid4().hex}",
        "../evil",
    ],
)
def test_writes_outside_the_working_directory_are_refused(path, layers):
    code = (
        "import os\n"
        f"path = {path!r}\n"
        "try:\n"
        "    with open(path, 'w') as file:\n"
        "        file.write('escaped')\n"
        "except OSError as error:\n"
        "    print('refused:', error)\n"
        "print('exists:', os.path.exists(path))"
    )
    result = run_sandboxed(code, limits=FAST)
    if layers == "kernel layers only":
        require_layer(result, "read-only filesystem")
    assert result.ok, result.stderr
    assert "refused:" in result.stdout and "exists: False" in result.stdout
    if layers == "kernel layers only":  # in the view, a directory it does not hold (/dev/shm) is absent
        absent = has_layer(result, "filesystem view") and "No such file or directory" in result.stdout
        assert "Read-only file system" in result.stdout or absent
    else:
        assert "outside the working directory is not allowed" in result.stdout
    assert not os.path.isabs(path) or not os.path.exists(path)


def test_writes_inside_the_working_directory_work():
    code = "import os, tempfile\nopen('a.txt', 'w').write('hi')\ntempfile.TemporaryFile().write(b'x')\nprint(os.listdir('.'))"
    result = run_sandboxed(code, limits=FAST)
    assert result.ok and result.stdout == "['a.txt']\n"


def test_a_huge_file_is_stopped_by_the_file_size_limit():
    limits = SandboxLimits(wall_seconds=2, cpu_seconds=1, file_size_bytes=2**20)
    result = run_sandboxed("with open('big', 'wb') as file:\n    file.write(b'x' * 10**8)", limits=limits)
    assert result.limit == Limit.FILE_SIZE and result.signal == signal.SIGXFSZ


@as_root
def test_many_files_are_stopped_by_the_working_directory_size():
    limits = SandboxLimits(wall_seconds=2, cpu_seconds=1, file_size_bytes=2**20, disk_bytes=4 * 2**20)
    code = "for index in range(100):\n    with open(f'part-{index}', 'wb') as file:\n        file.write(b'x' * 2**19)"
    result = run_sandboxed(code, limits=limits)
    require_layer(result, "tmpfs working directory")
    assert result.limit == Limit.DISK and "No space left on device" in result.stderr


@pytest.fixture
def listener():
    """A TCP listener of the test's own on 127.0.0.1; yields (socket, port)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        yield server, server.getsockname()[1]


def test_connecting_to_the_host_is_refused_and_reaches_no_listener(listener, layers):
    server, port = listener
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    print('connected')\n"
        "except OSError as error:\n"
        "    print('refused:', error)"
    )
    result = run_sandboxed(code, limits=FAST)
    if layers == "kernel layers only":
        require_layer(result, "seccomp socket filter", "network namespace")
        if has_layer(result, "seccomp socket filter"):
            assert "Permission denied" in result.stdout  # socket(2) itself
        else:
            assert "Network is unreachable" in result.stdout
    else:
        assert "is not allowed (no network" in result.stdout
    assert result.ok and result.stdout.startswith("refused:")
    with pytest.raises(TimeoutError):
        server.accept()


def test_a_world_writable_unix_socket_of_the_host_is_not_reached(tmp_path, layers):
    # a network namespace does not cover sockets in the filesystem (like /run/mysqld/mysqld.sock)
    tmp_path.chmod(0o755)
    path = str(tmp_path / "service.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen()
        server.settimeout(0.2)
        code = (
            "import socket\n"
            "try:\n"
            "    client = socket.socket(socket.AF_UNIX)\n"
            f"    client.connect({path!r})\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print('refused:', error)"
        )
        result = run_sandboxed(code, limits=FAST)
        if layers == "kernel layers only":
            require_layer(result, "seccomp socket filter")
        assert result.ok and result.stdout.startswith("refused:")
        with pytest.raises(TimeoutError):
            server.accept()


def test_a_listening_socket_is_refused_or_invisible_to_the_host(layers):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import socket, time\n"
        "try:\n"
        "    server = socket.socket()\n"
        f"    server.bind(('127.0.0.1', {port}))\n"
        "    server.listen()\n"
        "    print('listening', flush=True)\n"
        "    time.sleep(1)\n"
        "except OSError as error:\n"
        "    print('refused:', error)"
    )
    attempts: list[str] = []

    def connect_while_it_runs() -> None:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                attempts.append("connected")
            except OSError:
                attempts.append("refused")
            time.sleep(0.05)

    prober = threading.Thread(target=connect_while_it_runs)
    prober.start()
    result = run_sandboxed(code, limits=FAST)
    prober.join()
    if layers == "kernel layers only":
        require_layer(result, "seccomp socket filter", "network namespace")
        if has_layer(result, "seccomp socket filter"):
            assert result.stdout.startswith("refused:") and "Permission denied" in result.stdout
        else:
            assert result.stdout == "listening\n"  # in a network namespace of its own, out of the host's reach
    else:
        assert result.stdout.startswith("refused:") and "not allowed" in result.stdout
    assert "connected" not in attempts and attempts


def test_the_parent_environment_and_other_processes_secrets_are_not_visible(monkeypatch):
    secret = f"orchard-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ORCHARD_TEST_SECRET", secret)
    holder = subprocess.Popen(["sleep", "30"], env={"ORCHARD_TEST_SECRET": secret})
    try:
        code = (
            "import os\n"
            "print(sorted(os.environ))\n"
            "for pid in (os.getppid(), " + str(os.getpid()) + ", " + str(holder.pid) + "):\n"
            "    try:\n"
            "        print(open(f'/proc/{pid}/environ').read())\n"
            "    except OSError as error:\n"
            "        print('refused:', error)"
        )
        result = run_sandboxed(code, limits=FAST)
    finally:
        holder.kill()
        holder.wait()
    assert result.ok
    assert result.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert secret not in result.stdout and secret not in result.stderr
    if os.geteuid() == 0:  # its own uid may not read other users' /proc/<pid>/environ
        assert result.stdout.count("refused:") == 3


def test_starting_programs_and_native_code_are_refused_by_the_audit_hook():
    result = run_sandboxed("import subprocess\nsubprocess.run(['id'])", limits=FAST)
    assert result.exit_code == 1 and "subprocess.Popen is not allowed" in result.stderr
    result = run_sandboxed("import os\nos.system('id')", limits=FAST)
    assert result.exit_code == 1 and "os.system is not allowed" in result.stderr
    result = run_sandboxed("import ctypes", limits=FAST)
    assert result.exit_code == 1 and "ctypes.dlopen is not allowed" in result.stderr


@as_root
def test_sandboxes_run_at_once_get_uids_of_their_own():
    results = []

    def run() -> None:
        results.append(run_sandboxed("import os\nprint(os.getuid())", limits=FAST))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    uids = {int(result.stdout) for result in results}
    assert len(uids) == 3 and uids <= set(UID_POOL)
    assert all(any(layer.startswith("own uid") for layer in result.isolation) for result in results)


@pytest.mark.parametrize(
    ("field", "value"),
    [("wall_seconds", 0), ("cpu_seconds", 1.5), ("memory_bytes", -1), ("open_files", 3), ("processes", True)],
)
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SandboxLimits.{field}"):
        SandboxLimits(**{field: value})
