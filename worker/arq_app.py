"""Owns: the worker as an arq worker — `WorkerSettings` (for `arq worker.arq_app.WorkerSettings`),
the `generate` job, and `run(config_path)` (for `layermux worker --config FILE`).
Changed by: the worker; the CLI (worker/cli.py) calls `run` only.
Thread-safety: one worker per process (it owns the device); `run` blocks until shutdown.

    # async job pipeline, any process (orjson on the wire, never pickle):
    from worker.arq_app import job_deserializer, job_serializer
    pool = await arq.create_pool(RedisSettings.from_dsn(url), job_serializer=job_serializer,
                                 job_deserializer=job_deserializer)
    job = await pool.enqueue_job("generate", "smol", prompt="Hello", max_tokens=32, temperature=0.0)
    result = await job.result()        # {text, token_ids, finish_reason, usage}

Settings: `run(path)` loads that TOML file; the arq CLI loads env LAYERMUX_CONFIG (plus LAYERMUX_*
variables) when this module is imported. With redis_url unset, `run` starts an embedded
redis-server for the worker's lifetime and prints its URL; the arq CLI, which connects before
any hook runs, then uses arq's default redis://localhost:6379.

Shutdown: arq handles SIGTERM/SIGINT. It cancels running `generate` jobs (arq runs them again
elsewhere), then calls on_shutdown, which drains the stream path (runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from typing import Any, Final

import orjson

from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .runtime import GenerationError, Runtime
from .settings import ConfigError, Settings, load_settings

__all__ = ["GenerationError", "WorkerSettings", "generate", "on_shutdown", "on_startup", "run"]

log = logging.getLogger("layermux.worker")

CTX_SETTINGS: Final = "layermux_settings"
CTX_RUNTIME: Final = "layermux"
# arq's own limit on one generate job; long completions on a slow device take a while.
JOB_TIMEOUT_S: Final = 3600


def _settings_at_import() -> tuple[Settings | None, ConfigError | None]:
    try:
        return load_settings(), None
    except ConfigError as e:  # reported by on_startup, so importing this module never fails
        return None, e


_IMPORT_SETTINGS, _IMPORT_ERROR = _settings_at_import()


def redis_settings_for(settings: Settings | None) -> RedisSettings:
    """arq's connection settings from our redis_url (redis://, rediss:// with TLS, password in the URL)."""
    if settings is None or settings.redis_url is None:
        return RedisSettings()
    return RedisSettings.from_dsn(settings.redis_url)


def _max_jobs(settings: Settings | None) -> int:
    if settings is None or not settings.models:
        return 10
    return max(10, sum(m.max_running for m in settings.models))


async def on_startup(ctx: dict[str, Any]) -> None:
    settings = ctx.get(CTX_SETTINGS)
    if settings is None:
        if _IMPORT_ERROR is not None:
            raise _IMPORT_ERROR
        settings = _IMPORT_SETTINGS
        if settings is not None and settings.redis_url is None:
            settings = settings.model_copy(update={"redis_url": "redis://localhost:6379"})
    assert isinstance(settings, Settings)
    runtime = Runtime(settings)
    await runtime.start()
    ctx[CTX_RUNTIME] = runtime


async def on_shutdown(ctx: dict[str, Any]) -> None:
    runtime = ctx.get(CTX_RUNTIME)
    if isinstance(runtime, Runtime):
        await runtime.drain()


async def generate(
    ctx: dict[str, Any],
    model: str,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    prompt_ids: list[int] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """arq job: generate and return {text, token_ids, finish_reason, usage}; raises GenerationError.

    params are the sampling parameters of the wire protocol (max_tokens, temperature, top_p,
    top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop, ignore_eos).
    """
    runtime = ctx.get(CTX_RUNTIME)
    if not isinstance(runtime, Runtime):
        raise GenerationError("worker_failure", "the layermux runtime is not running in this arq worker")
    return await runtime.generate(model, prompt=prompt, messages=messages, prompt_ids=prompt_ids,
                                  params=params, request_id=f"arq:{ctx.get('job_id', '')}")


class _Worker(Worker):
    """arq's Worker, kept alive through a Redis restart or failover.

    arq ends its main loop at the first poll whose Redis command fails, and its close() then
    skips on_shutdown when Redis is still away: the worker would exit without draining, and a
    restart of Redis would stop every worker. The stream path reconnects on its own (runtime.py
    supervises its tasks), so a failed poll is logged and the next poll tries again.
    """

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            log.warning("arq: polling Redis failed (%s); trying again at the next poll", e)


def _encode_default(obj: object) -> object:
    if isinstance(obj, BaseException):  # a failed job's result: its type, code and numbers, not a pickle
        out: dict[str, object] = {"error": type(obj).__name__, "message": str(obj)}
        for field in ("code", "details"):
            if hasattr(obj, field):
                out[field] = getattr(obj, field)
        return out
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def job_serializer(obj: Any) -> bytes:
    """arq's job and result encoding: orjson, so no pickle ever crosses the wire.

    A failed job's result comes back to `job.result()` as arq's SerializationError whose
    argument is {"error", "message", "code", "details"}.
    """
    return orjson.dumps(obj, default=_encode_default)


def job_deserializer(data: bytes) -> Any:
    return orjson.loads(data)


class WorkerSettings:
    """`arq worker.arq_app.WorkerSettings`: settings from env LAYERMUX_CONFIG / LAYERMUX_* at import."""

    job_serializer = staticmethod(job_serializer)
    job_deserializer = staticmethod(job_deserializer)

    functions = (func(generate, name="generate", max_tries=3),)
    on_startup = on_startup
    on_shutdown = on_shutdown
    redis_settings = redis_settings_for(_IMPORT_SETTINGS)
    job_timeout = JOB_TIMEOUT_S
    max_jobs = _max_jobs(_IMPORT_SETTINGS)
    keep_result = 3600


def run(config_path: str | None = None) -> None:
    """Run the worker until SIGTERM/SIGINT (`layermux worker --config FILE`). Raises ConfigError."""
    settings = load_settings(config_path)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embedded = None
    if settings.redis_url is None:
        from .embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis().start()
        settings = settings.model_copy(update={"redis_url": embedded.url})
        print(f"layermux: started an embedded redis-server at {embedded.url}", flush=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        worker = _Worker(
            functions=WorkerSettings.functions,
            on_startup=on_startup,
            on_shutdown=on_shutdown,
            redis_settings=redis_settings_for(settings),
            job_timeout=JOB_TIMEOUT_S,
            max_jobs=_max_jobs(settings),
            keep_result=WorkerSettings.keep_result,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            ctx={CTX_SETTINGS: settings},
        )
        try:
            worker.run()
        finally:
            # arq's close() runs on_shutdown only after its own Redis calls succeed; if they failed
            # (Redis still away), drain the stream path anyway (a no-op if on_shutdown did).
            runtime = worker.ctx.get(CTX_RUNTIME)
            if isinstance(runtime, Runtime):
                loop.run_until_complete(runtime.drain())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        if embedded is not None:
            embedded.close()


if __name__ == "__main__":  # python -m worker.arq_app [config.toml]
    run(sys.argv[1] if len(sys.argv) > 1 else None)
