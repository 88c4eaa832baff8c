"""Shared fixtures: one real redis-server per test session (tools.embedded_redis), flushed per test.
Owned by the tests; no mocks: every Redis test talks to this server.
Not thread-safe across xdist workers by design: each pytest process starts its own server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tools.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server on a free 127.0.0.1 port for the whole session."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The session server's URL, emptied (FLUSHALL) before the test."""
    redis_server.start()  # no-op unless a fault test stopped it
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client of the session server (already flushed by redis_url)."""
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        c.close()
