"""Fixtures for integration tests that need a real Redis: a private redis-server on a free port.

The machine's own Redis (if any) is never used. Tests that need Redis are skipped with the install
hint when no redis-server executable is found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from orchard.services.redis_server import INSTALL_HINT, RedisServer, find_redis_server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for a test module (namespaces keep the tests apart)."""
    if find_redis_server() is None:
        pytest.skip(f"redis-server not found; {INSTALL_HINT}")
    with RedisServer() as server:
        yield server


@pytest.fixture
def start_redis_server(tmp_path) -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers of a test's own (e.g. to restart them); all stopped afterwards."""
    if find_redis_server() is None:
        pytest.skip(f"redis-server not found; {INSTALL_HINT}")
    servers: list[RedisServer] = []

    def start(**options) -> RedisServer:
        options.setdefault("directory", tmp_path / f"redis-{len(servers)}")
        server = RedisServer(**options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
