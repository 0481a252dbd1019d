"""Serving the control plane with uvicorn: beside a run (a background thread) or alone (foreground).

The listening socket is bound here, before uvicorn starts, so that a busy port or a bad address
is a clear error at once, and port 0 yields the port actually chosen.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

#: How long `start` waits for uvicorn to accept connections.
STARTUP_SECONDS = 30.0


class ControlPlaneError(RuntimeError):
    """The control plane cannot be served as configured; the message says what to change."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the control plane beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ControlPlaneError(
            f"refusing to serve the control plane on {host} without a token: anyone who can reach it could "
            "stop or change the run. Set ORCHARD_TOKEN (or control.token), or bind 127.0.0.1."
        )


def address(host: str, port: int) -> str:
    """`host:port` as in a URL (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_failure(host: str, port: int, error: OSError) -> str:
    """Why `host:port` cannot be bound, and what to change."""
    where = address(host, port)
    if error.errno == errno.EADDRINUSE:
        return (
            f"cannot serve the control plane on {where}: another process is already listening there "
            "(another `orchard run` or `orchard serve`?). Stop it, or choose another port "
            "(control.port for `orchard run`, --port for `orchard serve`; 0 picks any free port)"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot serve the control plane on {where}: {host} is not an address of this machine"
    if error.errno == errno.EACCES:
        return f"cannot serve the control plane on {where}: permission denied (ports below 1024 need privileges)"
    return f"cannot serve the control plane on {where}: {error.strerror or error}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port`; `ControlPlaneError` naming the address when it cannot be bound.

    SO_REUSEADDR lets a restarted run rebind while the old connections linger in TIME_WAIT; it
    does not let two processes listen on one port (Linux refuses a second listener), so a busy
    port is still an error here.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ControlPlaneError(_bind_failure(host, port, error)) from None
    sock.set_inheritable(True)
    return sock


class ControlServer:
    """uvicorn serving `app` on `host:port`; `url` is known once bound."""

    def __init__(self, app: FastAPI, host: str, port: int, *, token: str | None = None) -> None:
        check_bind(host, token)
        self.host = host
        self._socket = bind_socket(host, port)
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{address(self.host, self.port)}"

    def start(self) -> ControlServer:
        """Serve in a daemon thread; returns once connections are accepted."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="control-plane", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ControlPlaneError(f"the control plane did not start on {self.url}")
            time.sleep(0.02)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (SIGINT/SIGTERM)."""
        self._server.run(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
