"""Owns: how the SDK (and the worker) talk to Redis: the one place that builds a client for each
Redis form (standalone, Cluster, Sentinel), the command retry policy, reader backoff.
Changed by: SDK maintainers; every timing constant of the SDK lives here, named.
Thread-safety: the factories are pure; the clients they build follow redis-py's rules.

Redis forms (`redis_mode`):

- "standalone": `redis_url` is the server (redis://, rediss:// for TLS, unix://).
- "cluster": `redis_url` and `redis_urls` are seed nodes of a Redis Cluster (any reachable one
  is enough; the client discovers the rest and follows MOVED/ASK and failovers). Username,
  password and TLS come from the first URL; the database must be 0 (Cluster has no others).
  Every key of one request or one model shares a hash tag (keys.py), so every script and
  multi-key command stays within one slot.
- "sentinel": `redis_url` and `redis_urls` are Sentinels; `sentinel_master` names the master
  set. The client asks the Sentinels for the current master and follows a failover.
  Username, password, database and TLS in the first URL are the master's.

A Cluster client is a redis-py RedisCluster, returned under the `Redis` type: layermux uses
only what both implement (single-slot commands and scripts, non-transactional pipelines).

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

import os
from collections.abc import Sequence
from typing import Any, Final, Literal, TypeAlias, cast, get_args
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.retry
import redis.sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
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
    "REDIS_MODES",
    "TRANSIENT_ERRORS",
    "RedisMode",
    "check_redis_target",
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

# Cluster: attempts of one command across a failover (each one re-reads the slot map; a
# connection attempt inside it has the COMMAND_RETRIES backoff above).
CLUSTER_ERROR_RETRIES: Final = 8
# A handle that has read nothing for this long checks that its request still exists
# (handle.py, "lost entries"); one HGET per interval of silence.
LIVENESS_CHECK_S: Final = 5.0

assert SOCKET_TIMEOUT_S * 1000 > 2 * READ_BLOCK_MS

RedisMode: TypeAlias = Literal["standalone", "cluster", "sentinel"]
REDIS_MODES: Final[tuple[str, ...]] = get_args(RedisMode)

# Errors after which a command (or a reader) may reconnect and try again. redis-py raises
# AuthenticationError/AuthorizationError as ConnectionError subclasses: see is_transient().
# OSError: a refused connection while the server restarts can surface unwrapped. The others
# are a failover in progress: a Cluster slot without a master (CLUSTERDOWN, TRYAGAIN, a slot
# map with a hole) or a Sentinel master that was demoted under our connection (READONLY).
TRANSIENT_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError,
                           SlotNotCoveredError, ReadOnlyError)

_READER_BACKOFF: Final = ExponentialWithJitterBackoff(cap=READER_BACKOFF_CAP_S, base=READER_BACKOFF_BASE_S)


def _client_options(password: str | None, timeout_s: float = SOCKET_TIMEOUT_S) -> dict[str, Any]:
    options: dict[str, Any] = {
        "retry_on_error": list(TRANSIENT_ERRORS),
        "socket_timeout": timeout_s,
        "socket_connect_timeout": min(timeout_s, SOCKET_CONNECT_TIMEOUT_S),
        # Dead peers are found by the socket timeout and TCP keepalive. No health_check_interval:
        # with it, redis-py 5.x recurses without end when the server refuses the password.
        "socket_keepalive": True,
    }
    if password is not None:  # a password in the URL wins (redis-py's rule)
        options["password"] = password
    return options


def _command_backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=COMMAND_BACKOFF_CAP_S, base=COMMAND_BACKOFF_BASE_S)


def check_redis_target(mode: str, urls: Sequence[str], sentinel_master: str | None) -> list[str]:
    """The URLs to use, first one first; raises ValueError saying what is expected for `mode`."""
    if mode not in REDIS_MODES:
        raise ValueError(f"redis_mode: expected one of {', '.join(REDIS_MODES)}, found {mode!r}")
    seeds = [u for u in urls if u]
    if not seeds:
        raise ValueError(f"redis_url: expected at least one URL for redis_mode {mode!r}, found none")
    if mode == "standalone" and len(seeds) > 1:
        raise ValueError(f"redis_urls: one server in standalone mode, found {len(seeds)} URLs; "
                         "set redis_mode to cluster or sentinel, or give one URL")
    for url in seeds:
        parts = urlsplit(url)
        if mode != "standalone" and (parts.scheme not in ("redis", "rediss") or not parts.hostname):
            raise ValueError(f"redis_url: redis_mode {mode!r} needs redis://host:port or rediss://host:port URLs, "
                             f"found {_redact(url)!r}")
    if mode == "cluster":
        db = urlsplit(seeds[0]).path.strip("/")
        if db not in ("", "0"):
            raise ValueError(f"redis_url: Redis Cluster has only database 0, found /{db} in {_redact(seeds[0])!r}")
    if mode == "sentinel" and not sentinel_master:
        raise ValueError("sentinel_master: expected the name of the Sentinel master set (e.g. mymaster), found none")
    if mode != "sentinel" and sentinel_master:
        raise ValueError(f"sentinel_master: only used with redis_mode sentinel, found it with {mode!r}")
    return seeds


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    return parts.hostname, parts.port or default_port


def _url_auth(url: str, password: str | None) -> dict[str, Any]:
    """username / password / ssl / db of a URL, as client keyword arguments (an explicit password wins)."""
    parts = urlsplit(url)
    out: dict[str, Any] = {}
    if parts.username:
        out["username"] = unquote(parts.username)
    if password is not None or parts.password:
        out["password"] = password if password is not None else unquote(parts.password or "")
    if parts.scheme == "rediss":
        out["ssl"] = True
    db = parts.path.strip("/")
    if db:
        out["db"] = int(db)
    return out


def make_async_client(
    redis_url: str,
    password: str | None = None,
    *,
    mode: str = "standalone",
    urls: Sequence[str] = (),
    sentinel_master: str | None = None,
) -> redis.asyncio.Redis:
    """An asyncio client with the SDK's retry policy: `redis_url` (plus `urls`) read by `mode`
    (see the module docstring). Raises ValueError for a bad combination."""
    seeds = check_redis_target(mode, [redis_url, *urls], sentinel_master)
    retry = redis.asyncio.retry.Retry(_command_backoff(), COMMAND_RETRIES)
    options = _client_options(None)
    if mode == "standalone":
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(seeds[0], retry=retry, **_client_options(password))
        return client
    auth = _url_auth(seeds[0], password)
    if mode == "cluster":
        auth.pop("db", None)
        nodes = [redis.asyncio.cluster.ClusterNode(*_host_port(u, 6379)) for u in seeds]
        cluster = redis.asyncio.RedisCluster(startup_nodes=nodes, retry=retry,
                                             cluster_error_retry_attempts=CLUSTER_ERROR_RETRIES, **options, **auth)
        return cast(redis.asyncio.Redis, cluster)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        [_host_port(u, 26379) for u in seeds],
        sentinel_kwargs={"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_S},
        **options)
    assert sentinel_master is not None
    master: redis.asyncio.Redis = sentinel.master_for(sentinel_master, retry=retry, **auth)
    return master


def make_sync_client(
    redis_url: str,
    password: str | None = None,
    *,
    mode: str = "standalone",
    urls: Sequence[str] = (),
    sentinel_master: str | None = None,
    timeout_s: float = SOCKET_TIMEOUT_S,
    retries: int | None = None,
) -> redis.Redis:
    """A blocking client (mirrors make_async_client). `timeout_s` (socket timeouts) and `retries`
    (attempts after the first, per command and across a Cluster failover; None: COMMAND_RETRIES and
    CLUSTER_ERROR_RETRIES) are for callers that must answer quickly, e.g. a liveness probe."""
    seeds = check_redis_target(mode, [redis_url, *urls], sentinel_master)
    retry = redis.retry.Retry(_command_backoff(), COMMAND_RETRIES if retries is None else retries)
    options = _client_options(None, timeout_s)
    if mode == "standalone":
        client: redis.Redis = redis.Redis.from_url(seeds[0], retry=retry, **_client_options(password, timeout_s))
        return client
    auth = _url_auth(seeds[0], password)
    if mode == "cluster":
        auth.pop("db", None)
        nodes = [redis.cluster.ClusterNode(*_host_port(u, 6379)) for u in seeds]  # type: ignore[no-untyped-call]
        attempts = CLUSTER_ERROR_RETRIES if retries is None else max(1, retries)
        cluster = redis.RedisCluster(startup_nodes=nodes, retry=retry, cluster_error_retry_attempts=attempts,
                                     **options, **auth)
        return cast(redis.Redis, cluster)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        [_host_port(u, 26379) for u in seeds],
        sentinel_kwargs={"socket_timeout": timeout_s,
                         "socket_connect_timeout": min(timeout_s, SOCKET_CONNECT_TIMEOUT_S)},
        **options)
    assert sentinel_master is not None
    master: redis.Redis = sentinel.master_for(sentinel_master, retry=retry, **auth)  # type: ignore[no-untyped-call]
    return master


def is_transient(error: BaseException) -> bool:
    """True for errors a reconnect may cure; a refused password or ACL never is."""
    if isinstance(error, AuthenticationError | AuthorizationError):
        return False
    return isinstance(error, TRANSIENT_ERRORS) or _redis_py_race(error)


def _redis_py_race(error: BaseException) -> bool:
    """An AttributeError raised inside redis-py itself: its asyncio Cluster client closes every
    connection when one node fails (redis-py 5.x), so a command running concurrently on another
    connection can find its socket or the default node already gone ('NoneType' object has no
    attribute 'writelines' / 'name'). A retry on a fresh connection succeeds."""
    if not isinstance(error, AttributeError) or error.__traceback__ is None:
        return False
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}redis{os.sep}" in tb.tb_frame.f_code.co_filename


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
