"""A private `redis-server` subprocess: the laptop default behind the Redis buffer, and the tests' Redis.

`RedisServer` binds 127.0.0.1 on a free port with its own directory, so it never touches a Redis the
machine already runs. With `appendonly=True` every write is fsynced to the append-only file before
it is acknowledged (`appendfsync always`), so `restart()` — stop, then start on the same port and
directory — brings back exactly what was acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"
LOG_NAME = "redis-server.log"
CONFIG_NAME = "redis-server.conf"
PID_NAME = "redis-server.pid"


class RedisServerError(RuntimeError):
    """The private redis-server did not start or stop as asked; the message carries its log tail."""


def find_redis_server(executable: str = "redis-server") -> str | None:
    """The path of the `redis-server` executable, or None when it is not installed."""
    if Path(executable).is_absolute():
        return executable if Path(executable).is_file() else None
    return shutil.which(executable)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _terminate(process: subprocess.Popen) -> None:
    """Last-resort cleanup when the owner never called `stop()` (runs at garbage collection or exit)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


class RedisServer:
    """A redis-server subprocess on 127.0.0.1 with its own port and directory.

    Use as a context manager, or call `start()` and `stop()`. A temporary directory created here is
    removed by `stop()`; a `directory` given by the caller is kept. `save` is a Redis `save` rule
    (e.g. "60 1000"); the default "" takes no RDB snapshots.
    """

    def __init__(
        self,
        port: int | None = None,
        directory: Path | None = None,
        appendonly: bool = False,
        executable: str = "redis-server",
        *,
        save: str = "",
        start_timeout: float = 30.0,
    ) -> None:
        found = find_redis_server(executable)
        if found is None:
            raise FileNotFoundError(
                f"redis-server executable {executable!r} not found on PATH; {INSTALL_HINT}, "
                "or set buffer.redis_url to an existing Redis, or buffer.backend: memory"
            )
        self.executable = found
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.save = save
        self.start_timeout = start_timeout
        self._given_directory = Path(directory) if directory is not None else None
        self.directory: Path | None = self._given_directory
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # ----------------------------------------------------------------------------- addresses
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING (and is this process, not another Redis)."""
        if self.running:
            return self
        created_directory = self.directory is None
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="orchard-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        _stop_orphan(self.directory / PID_NAME)
        config_path = self.directory / CONFIG_NAME
        config_path.write_text(self._config_text())
        self._log = open(self.directory / LOG_NAME, "ab")  # closed in _stop_process()
        # A session of its own: Ctrl-C in the terminal reaches the driver, which stops the server
        # after its last write, instead of killing Redis under a running driver.
        self._process = subprocess.Popen(
            [self.executable, str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._finalizer = weakref.finalize(self, _terminate, self._process)
        try:
            self._wait_until_ready()
        except BaseException:
            self._stop_process()
            if created_directory and self._given_directory is None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            raise
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 10 s) and remove a temporary directory made by `start()`."""
        self._stop_process()
        if self._given_directory is None and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port and directory, so the append-only file is replayed."""
        self._stop_process()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        if self.directory is None or not (self.directory / LOG_NAME).exists():
            return "(no log)"
        text = (self.directory / LOG_NAME).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    # ----------------------------------------------------------------------------- internals
    def _config_text(self) -> str:
        assert self.directory is not None
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f"dir {_quote(str(self.directory))}",
            f"pidfile {_quote(str(self.directory / PID_NAME))}",
            f"save {_quote(self.save)}",
            f"appendonly {'yes' if self.appendonly else 'no'}",
        ]
        if self.appendonly:
            lines.append("appendfsync always")
        return "\n".join(lines) + "\n"

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                status = self._process.poll()
                if status is not None:
                    raise RedisServerError(
                        f"redis-server exited with status {status} while starting on 127.0.0.1:{self.port} "
                        f"(directory {self.directory}); log tail:\n{self.log_tail()}"
                    )
                try:
                    if client.ping():
                        # Another Redis may hold the port (e.g. a given port that is taken): insist on ours.
                        pid = int(client.info("server")["process_id"])
                        if pid == self._process.pid:
                            return
                except redis.ConnectionError:  # not listening yet, or still loading the AOF
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on 127.0.0.1:{self.port} did not answer PING within "
                        f"{self.start_timeout:.0f} s (directory {self.directory}); log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _stop_process(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            # SIGTERM is Redis's clean shutdown (AOF fsynced, no RDB unless `save` asks for one), and
            # unlike a SHUTDOWN command it can only ever reach our own process, never a Redis that
            # took over the port.
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._process = None


def _stop_orphan(pid_file: Path) -> None:
    """Stop a redis-server still running on this directory (its driver was killed), so that its
    append-only file is closed cleanly before a new server replays it."""
    try:
        pid = int(pid_file.read_text().strip())
        name = Path(f"/proc/{pid}/comm").read_text().strip()  # redis rewrites its cmdline, not its name
    except (OSError, ValueError):
        return
    if name != "redis-server":
        return  # the pid was reused by another program
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
