"""Owns: how the SDK talks to Redis: client construction, the command retry policy, reader backoff.
Changed by: SDK maintainers; every timing constant of the SDK lives here, named.
Thread-safety: the factories are pure; the clients they build follow redis-py's rules.

Two layers of resilience, both exponential with jitter so that many producers reconnecting
after a Redis restart do not arrive in lock-step:

- every command goes through one redis-py `Retry` (COMMAND_RETRIES attempts, backoff from
  COMMAND_BACKOFF_BASE_S doubling up to COMMAND_BACKOFF_CAP_S). Every SDK command is safe to
  repeat: enqueue is idempotent on the request id, SADD/EXPIRE are idempotent, and XREAD
  re-reads from the last entry id the reader has consumed.
- a reply-stream reader that still fails afterwards keeps reconnecting on its own
  (READER_RECONNECT_ATTEMPTS, backoff READER_BACKOFF_BASE_S .. READER_BACKOFF_CAP_S), then
  re-raises the redis-py error. A successful read resets its count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "COMMAND_BACKOFF_BASE_S",
    "COMMAND_BACKOFF_CAP_S",
    "COMMAND_RETRIES",
    "DEFAULT_REDIS_URL",
    "READER_BACKOFF_BASE_S",
    "READER_BACKOFF_CAP_S",
    "READER_RECONNECT_ATTEMPTS",
    "READ_BLOCK_MS",
    "READ_COUNT",
    "TRANSIENT_ERRORS",
    "is_transient",
    "make_async_client",
    "make_sync_client",
    "reader_backoff_s",
    "stream_entries",
]

DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"

COMMAND_RETRIES: Final = 5
COMMAND_BACKOFF_BASE_S: Final = 0.05
COMMAND_BACKOFF_CAP_S: Final = 2.0

READER_RECONNECT_ATTEMPTS: Final = 12  # with the cap below: about a minute of outage tolerated
READER_BACKOFF_BASE_S: Final = 0.1
READER_BACKOFF_CAP_S: Final = 5.0

READ_BLOCK_MS: Final = 1000  # XREAD BLOCK per call: a read returns at least this often
READ_COUNT: Final = 256  # entries per XREAD
SOCKET_TIMEOUT_S: Final = 10.0  # must exceed READ_BLOCK_MS, or every idle read would time out
SOCKET_CONNECT_TIMEOUT_S: Final = 5.0

assert SOCKET_TIMEOUT_S * 1000 > 2 * READ_BLOCK_MS

# Errors after which a command (or a reader) may reconnect and try again. redis-py raises
# AuthenticationError/AuthorizationError as ConnectionError subclasses: see is_transient().
# OSError: a refused connection while the server restarts can surface unwrapped.
TRANSIENT_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)

_READER_BACKOFF: Final = ExponentialWithJitterBackoff(cap=READER_BACKOFF_CAP_S, base=READER_BACKOFF_BASE_S)


def _client_options(password: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "retry_on_error": list(TRANSIENT_ERRORS),
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_S,
        # Dead peers are found by the socket timeout and TCP keepalive. No health_check_interval:
        # with it, redis-py 5.x recurses without end when the server refuses the password.
        "socket_keepalive": True,
    }
    if password is not None:  # a password in the URL wins (redis-py's rule)
        options["password"] = password
    return options


def _command_backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=COMMAND_BACKOFF_CAP_S, base=COMMAND_BACKOFF_BASE_S)


def make_async_client(redis_url: str, password: str | None = None) -> redis.asyncio.Redis:
    """An asyncio client for `redis_url` (redis:// or rediss:// for TLS) with the SDK's retry policy."""
    retry = redis.asyncio.retry.Retry(_command_backoff(), COMMAND_RETRIES)
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(redis_url, retry=retry, **_client_options(password))
    return client


def make_sync_client(redis_url: str, password: str | None = None) -> redis.Redis:
    """A blocking client for `redis_url` (redis:// or rediss:// for TLS) with the SDK's retry policy."""
    retry = redis.retry.Retry(_command_backoff(), COMMAND_RETRIES)
    client: redis.Redis = redis.Redis.from_url(redis_url, retry=retry, **_client_options(password))
    return client


def is_transient(error: BaseException) -> bool:
    """True for errors a reconnect may cure; a refused password or ACL never is."""
    return isinstance(error, TRANSIENT_ERRORS) and not isinstance(error, AuthenticationError | AuthorizationError)


def reader_backoff_s(failures: int) -> float:
    """Seconds a reader waits before its `failures`-th reconnect attempt (jittered, capped)."""
    return float(_READER_BACKOFF.compute(failures))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def stream_entries(reply: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    """Flatten an XREAD reply for one stream into [(entry_id, fields)]; empty on timeout."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3 shape: {stream: [[id, fields], ...]}
        streams: Sequence[Any] = [entries for entries in reply.values()]
    else:  # RESP2 shape: [[stream, [(id, fields), ...]]]
        streams = [entries for _stream, entries in reply]
    out: list[tuple[str, dict[bytes, bytes]]] = []
    for entries in streams:
        for entry_id, fields in entries:
            out.append((_text(entry_id), dict(fields or {})))
    return out
