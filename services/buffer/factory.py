"""`make_buffer`: the backend `BufferConfig` asks for, and the private redis-server it may need."""

from __future__ import annotations

from pathlib import Path

from orchard.config import BufferConfig
from orchard.protocols import Buffer
from orchard.services.buffer.memory import MemoryBuffer
from orchard.services.buffer.redis_buffer import RedisBuffer
from orchard.services.redis_server import INSTALL_HINT, RedisServer, find_redis_server


def make_buffer(
    config: BufferConfig, namespace: str, *, directory: Path | None = None
) -> tuple[Buffer, RedisServer | None]:
    """Build the buffer for a run; `config.namespace` wins over `namespace` (the run id).

    - `memory`: an in-process `MemoryBuffer`.
    - `redis`: a `RedisBuffer` on `redis_url`, or, without one, on a private redis-server started
      here with the append-only file on (an error if redis-server is not installed), its data in
      `directory` when given (a run's `redis/`, so that a resumed run finds its buffer again).
    - `auto`: `redis_url` if given, else a private redis-server if installed, else memory.

    The second value is the private server, or None; the caller stops it after closing the buffer.
    """
    namespace = config.namespace or namespace
    if config.backend == "memory":
        return MemoryBuffer(), None
    if config.redis_url:
        return _redis_buffer(config, config.redis_url, namespace), None
    if config.backend == "auto" and find_redis_server() is None:
        return MemoryBuffer(), None
    if find_redis_server() is None:
        raise FileNotFoundError(
            f"buffer.backend 'redis' without buffer.redis_url needs a redis-server executable, and none is on PATH; "
            f"{INSTALL_HINT}, or set buffer.redis_url, or buffer.backend: memory"
        )
    server = RedisServer(appendonly=True, directory=directory).start()
    try:
        return _redis_buffer(config, server.url, namespace), server
    except BaseException:
        server.stop()
        raise


def _redis_buffer(config: BufferConfig, url: str, namespace: str) -> RedisBuffer:
    return RedisBuffer(url, namespace, reconnect_seconds=config.reconnect_seconds)
