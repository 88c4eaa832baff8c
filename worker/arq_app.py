"""Owns: the worker as an arq worker — `WorkerSettings` (for `arq worker.arq_app.WorkerSettings`),
the `generate` job, `run(config_path)` (for `layermux worker --config FILE`), the checks `run` makes
before it starts (model files, then Redis), and the client helpers of the job path.
Changed by: the worker; the CLI (worker/cli.py) calls `run` only.
Thread-safety: one worker per process (it owns the device); `run` blocks until shutdown.

    # async job pipeline, any process (orjson on the wire, never pickle):
    from worker.arq_app import create_job_pool, enqueue_generate, job_result
    pool = await create_job_pool(url)
    job = await enqueue_generate(pool, "smol", prompt="Hello", max_tokens=32, temperature=0.0)
    result = await job_result(job, timeout=60)   # {text, token_ids, finish_reason, usage}
                                                 # or a typed producer_sdk error (RejectedError, ...)

One arq queue per model. arq's queue is one sorted set that every arq worker on the server
polls, whatever it serves; a `generate` job for a model must reach a worker that serves it. So
the jobs of model M wait in `P:{m:M}:arq` (producer_sdk.keys.Keys.arq_queue), and a worker runs
one arq `Worker` per model it serves inside its process: the first is the process's main arq
worker (it owns the signals and the startup/shutdown hooks), the others are started by
on_startup and stopped by on_shutdown, all sharing the one Runtime (one engine, one device).
`enqueue_generate` puts a job on its model's queue and answers UnknownModelError at once when no
worker serves the model; `job_result` turns a failed job into the SDK's typed error.

Settings: `run(path)` loads that TOML file; the arq CLI loads env LAYERMUX_CONFIG (plus LAYERMUX_*
variables) when this module is imported. With redis_url unset, `run` starts an embedded
redis-server for the worker's lifetime (on 127.0.0.1:6379 when that port is free) and prints its
URL and the `export LAYERMUX_REDIS_URL=...` line; the arq CLI, which connects before any hook runs,
then uses arq's default redis://localhost:6379.

Before touching Redis, `run` checks every model's files (folder, config.json, architecture,
safetensors headers and sizes; a .gguf file's header): a bad one is ModelFileError / UnsupportedModelError. Then one
PING with a short timeout: an unreachable server is RedisUnreachableError, not arq's retries.

Shutdown: the first SIGTERM/SIGINT stops arq (running `generate` jobs are cancelled and run again
elsewhere), then on_shutdown drains the stream path (runtime.py). A second signal while draining
forces the exit at once (after saying so): running requests stay pending for another worker.
`run` returns the signal that stopped it; `layermux worker` exits 130 after SIGINT, 0 after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson
import redis
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job, SerializationError
from arq.worker import Worker, func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer_sdk.errors import LayermuxClientError, UnknownModelError
from producer_sdk.keys import Keys
from producer_sdk.protocol import MAX_SEED
from producer_sdk.reply import error_for_code

from . import request_path
from .admission import Denial
from .runtime import Runtime
from .settings import ConfigError, Settings, load_settings

__all__ = ["GenerationError", "RedisUnreachableError", "WorkerSettings", "check_model_files", "check_redis",
           "create_job_pool", "enqueue_generate", "generate", "job_result", "on_shutdown", "on_startup", "run"]

log = logging.getLogger("layermux.worker")

CTX_SETTINGS: Final = "layermux_settings"
CTX_RUNTIME: Final = "layermux"
CTX_MODEL_WORKERS: Final = "layermux_model_workers"
# arq's own limit on one generate job; long completions on a slow device take a while.
JOB_TIMEOUT_S: Final = 3600
# The one PING before start: an unreachable server is reported, not retried for seconds.
REDIS_CHECK_TIMEOUT_S: Final = 3.0
# The port an embedded redis-server takes when it is free (the README's examples use it).
EMBEDDED_REDIS_PORT: Final = 6379


class RedisUnreachableError(RuntimeError):
    """The configured Redis did not answer one PING; the message names the URL (password hidden)."""


def _redact(url: str) -> str:
    import re

    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


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


def _max_jobs(max_running: int) -> int:
    return max(10, max_running)


def _queue_of_first_model(settings: Settings | None) -> str:
    if settings is None or not settings.models:
        return "arq:queue"  # arq's default; on_startup then fails with the configuration error
    return Keys(settings.key_prefix).arq_queue(settings.models[0].name)


# -- checks before start ------------------------------------------------------------------------------


def _check_safetensors(path: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file (a truncated copy fails here)."""
    from engine.errors import ModelFileError

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated: {size} bytes, shorter than the 8-byte safetensors header size")
        n_header = int.from_bytes(head, "little")
        if 8 + n_header > size:
            raise ModelFileError(f"{path}: truncated: the header needs {8 + n_header} bytes, the file has {size}")
        try:
            header = orjson.loads(f.read(n_header))
        except orjson.JSONDecodeError as e:
            raise ModelFileError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the safetensors header is not a JSON object")
    end, last = 0, ""
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (name != "__metadata__" and isinstance(offsets, list) and len(offsets) == 2
                and isinstance(offsets[1], int) and offsets[1] > end):
            end, last = offsets[1], name
    if 8 + n_header + end > size:
        raise ModelFileError(f"{path}: truncated: tensor '{last}' ends at byte {8 + n_header + end}, the file has "
                             f"{size} bytes; copy or download the file again")


def check_model_files(settings: Settings) -> None:
    """Every configured model's files, before anything touches Redis or the device.

    Raises ConfigError (no model), ModelFileError (missing folder or file, bad JSON, truncated
    safetensors) or UnsupportedModelError (an architecture or setting layermux does not run).
    """
    from engine.errors import ModelFileError
    from engine.hf_config import load_spec

    if not settings.models:
        raise ConfigError("models: no model configured; add at least one [[models]] table (name, path)")
    for m in settings.models:
        path = Path(m.path)
        if not path.exists():
            raise ModelFileError(f"model {m.name!r}: path not found: {path} (expected a Hugging Face model folder "
                                 "or a .gguf file)")
        spec = load_spec(path, m.name, m.weights)  # a folder's config.json, or a .gguf file's metadata
        for file in spec.get("files", []):
            if str(file).endswith(".safetensors"):
                _check_safetensors(Path(file))


def check_redis(url: str) -> None:
    """One PING with a short timeout; raises RedisUnreachableError naming the URL."""
    client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_CHECK_TIMEOUT_S,
                                  socket_timeout=REDIS_CHECK_TIMEOUT_S, retry_on_timeout=False)
    try:
        client.ping()
    except redis.RedisError as e:
        raise RedisUnreachableError(
            f"cannot reach Redis at {_redact(url)} ({e}); start one (`layermux redis`), fix redis_url, "
            "or leave redis_url unset to start an embedded server") from e
    finally:
        client.close()


# -- arq hooks and the job ------------------------------------------------------------------------------


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
    # The main arq worker serves the first model's queue; one more arq worker per other model.
    keys = Keys(settings.key_prefix)
    workers: list[_Worker] = []
    for m in settings.models[1:]:
        w = _Worker(functions=WorkerSettings.functions, queue_name=keys.arq_queue(m.name),
                    redis_settings=redis_settings_for(settings), handle_signals=False, job_timeout=JOB_TIMEOUT_S,
                    max_jobs=_max_jobs(m.max_running), keep_result=WorkerSettings.keep_result,
                    job_serializer=job_serializer, job_deserializer=job_deserializer, ctx={CTX_RUNTIME: runtime})
        w.main_task = asyncio.create_task(w.main(), name=f"arq:{m.name}")
        workers.append(w)
    ctx[CTX_MODEL_WORKERS] = workers


async def on_shutdown(ctx: dict[str, Any]) -> None:
    for w in ctx.pop(CTX_MODEL_WORKERS, []):
        try:
            await w.close()  # cancels its polling and its running jobs (arq runs them again elsewhere)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            log.warning("arq: closing a model's job queue failed (%s)", e)
        if w.main_task is not None:
            await asyncio.gather(w.main_task, return_exceptions=True)
    runtime = ctx.get(CTX_RUNTIME)
    if isinstance(runtime, Runtime):
        await runtime.drain()


class GenerationError(Exception):
    """A `generate` job that did not produce a result: a protocol error code, a message, numbers.

    Stored by job_serializer as {"error", "message", "code", "details"}; every constructor argument
    is in `args`.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(code, message, details or {})
        self.code = code
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


async def generate(
    ctx: dict[str, Any],
    model: str,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    prompt_ids: list[int] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """arq job: generate and return {text, token_ids, finish_reason, usage}; raises GenerationError
    with the codes and numbers an error event of the stream path carries (request_path.py).

    params are the sampling parameters of the wire protocol (max_tokens, temperature, top_p,
    top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop, ignore_eos).
    """
    runtime = ctx.get(CTX_RUNTIME)
    if not isinstance(runtime, Runtime):
        raise GenerationError("worker_failure", "the layermux runtime is not running in this arq worker")
    if runtime.draining:
        raise GenerationError("worker_failure", "the worker is shutting down")
    params.setdefault("seed", secrets.randbelow(MAX_SEED + 1))
    msg = request_path.validate({
        "request_id": f"arq:{ctx.get('job_id') or secrets.token_hex(8)}", "model": model, "prompt": prompt,
        "messages": messages, "prompt_ids": prompt_ids, "params": params, "submitted_at": time.time()})
    prepared = msg if isinstance(msg, Denial) else await request_path.prepare(runtime.driver, msg)
    if isinstance(prepared, Denial):
        if model in runtime.driver.info:
            runtime.metrics[model].refused[prepared.code] += 1
        raise GenerationError(prepared.code, prepared.message, dict(prepared.details))
    counters = runtime.metrics[model]
    counters.admitted += 1
    outcome = await request_path.complete(runtime.driver, prepared)
    if isinstance(outcome, Denial):
        counters.errors += 1
        raise GenerationError(outcome.code, outcome.message, dict(outcome.details))
    if outcome.kind == "done":
        counters.done += 1
        return {"text": outcome.text, "token_ids": outcome.token_ids, "finish_reason": outcome.finish_reason,
                "usage": outcome.usage}
    counters.errors += 1
    if outcome.kind == "cancelled":
        raise GenerationError("cancelled", "the job was cancelled", {"completion_tokens": len(outcome.token_ids)})
    raise GenerationError(outcome.code, outcome.message, outcome.details)


# Called at a forced exit (a second signal while draining): e.g. stop the embedded redis-server.
_AT_FORCED_EXIT: list[Callable[[], None]] = []


class _Worker(Worker):
    """arq's Worker, kept alive through a Redis restart or failover, with a second signal that forces exit.

    arq ends its main loop at the first poll whose Redis command fails, and its close() then
    skips on_shutdown when Redis is still away: the worker would exit without draining, and a
    restart of Redis would stop every worker. The stream path reconnects on its own (runtime.py
    supervises its tasks), so a failed poll is logged and the next poll tries again.
    """

    stop_signal: int | None = None

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            log.warning("arq: polling Redis failed (%s); trying again at the next poll", e)

    def handle_sig(self, signum: signal.Signals) -> None:
        if signum not in (signal.SIGINT, signal.SIGTERM):
            # close() of a model's arq worker (no signal handling of its own): stop it without arq's
            # "shutdown on SIGUSR1" line; the process's main arq worker already logged the real signal.
            for t in self.tasks.values():
                if not t.done():
                    t.cancel()
            if self.main_task is not None:
                self.main_task.cancel()
            return
        if self.stop_signal is not None:
            sys.stderr.write(f"layermux worker: {signal.Signals(signum).name} again: stopping now without "
                             "draining; running requests stay pending and another worker takes them over\n")
            sys.stderr.flush()
            for fn in _AT_FORCED_EXIT:
                with contextlib.suppress(Exception):  # exiting anyway
                    fn()
            os._exit(128 + int(signum))
        self.stop_signal = int(signum)
        sys.stderr.write(f"layermux worker: {signal.Signals(signum).name}: draining (running requests get up to "
                         "drain_timeout_s to finish); press Ctrl-C again to stop at once\n")
        sys.stderr.flush()
        super().handle_sig(signum)


def _encode_default(obj: object) -> object:
    if isinstance(obj, BaseException):  # a failed job's result: its type, code and numbers, not a pickle
        out: dict[str, object] = {"error": type(obj).__name__, "message": str(obj)}
        for field in ("code", "details"):
            if hasattr(obj, field):
                out[field] = getattr(obj, field)
        if isinstance(obj, GenerationError):
            out["message"] = obj.message
        return out
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def job_serializer(obj: Any) -> bytes:
    """arq's job and result encoding: orjson, so no pickle ever crosses the wire.

    A failed job's result is stored as {"error", "message", "code", "details"}; `job_result`
    turns it into the SDK's typed error (arq's own `job.result()` raises SerializationError
    with that dict as its argument).
    """
    return orjson.dumps(obj, default=_encode_default)


def job_deserializer(data: bytes) -> Any:
    return orjson.loads(data)


# -- the client side of the job path ---------------------------------------------------------------------


async def create_job_pool(redis_url: str) -> ArqRedis:
    """An arq pool that speaks layermux's job encoding (orjson). Close it with `await pool.aclose()`."""
    return await create_pool(RedisSettings.from_dsn(redis_url), job_serializer=job_serializer,
                             job_deserializer=job_deserializer)


async def enqueue_generate(pool: ArqRedis, model: str, *, prefix: str = "lmx", job_id: str | None = None,
                           **kwargs: Any) -> Job:
    """Put a `generate` job on the model's own queue (see the module docstring).

    kwargs: one of prompt / messages / prompt_ids, and sampling parameters. Raises
    UnknownModelError when no worker serves the model (its limits hash is absent), as submit does.
    """
    keys = Keys(prefix)
    if not await pool.exists(keys.limits(model)):
        raise UnknownModelError("unknown_model", f"no worker serves model {model!r}", {"model": model})
    job = await pool.enqueue_job("generate", model, _queue_name=keys.arq_queue(model), _job_id=job_id, **kwargs)
    if job is None:
        raise LayermuxClientError("invalid_request", f"a job with id {job_id!r} exists already", {"job_id": job_id})
    return job


async def job_result(job: Job, timeout: float | None = None) -> dict[str, Any]:
    """The job's {text, token_ids, finish_reason, usage}; a failure raises the SDK's typed error
    (RejectedError, WorkerFailureError, ...), a timeout asyncio.TimeoutError (the job keeps running)."""
    try:
        result = await job.result(timeout=timeout)
    except SerializationError as e:
        failure = e.args[0] if e.args else None
        if isinstance(failure, dict) and isinstance(failure.get("code"), str):
            details = failure.get("details")
            raise error_for_code(failure["code"], str(failure.get("message", "")),
                                 details if isinstance(details, dict) else None,
                                 request_id=f"arq:{job.job_id}") from None
        raise
    if not isinstance(result, dict):
        raise LayermuxClientError("invalid_reply", f"job {job.job_id}: expected a result object, found {result!r}")
    return result


class WorkerSettings:
    """`arq worker.arq_app.WorkerSettings`: settings from env LAYERMUX_CONFIG / LAYERMUX_* at import.

    arq's CLI runs this worker on the first model's queue; on_startup adds one for each other model.
    """

    job_serializer = staticmethod(job_serializer)
    job_deserializer = staticmethod(job_deserializer)

    functions = (func(generate, name="generate", max_tries=3),)
    on_startup = on_startup
    on_shutdown = on_shutdown
    redis_settings = redis_settings_for(_IMPORT_SETTINGS)
    queue_name = _queue_of_first_model(_IMPORT_SETTINGS)
    job_timeout = JOB_TIMEOUT_S
    max_jobs = _max_jobs(_IMPORT_SETTINGS.models[0].max_running if _IMPORT_SETTINGS and _IMPORT_SETTINGS.models
                         else 10)
    keep_result = 3600


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run(config_path: str | None = None, *, settings: Settings | None = None) -> int | None:
    """Run the worker until SIGTERM/SIGINT (`layermux worker --config FILE`); returns the signal number
    that stopped it. Raises ConfigError, ModelFileError / UnsupportedModelError (checked before Redis),
    RedisUnreachableError, CapacityError (the models do not fit the budget)."""
    if settings is None:
        settings = load_settings(config_path)
    check_model_files(settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embedded = None
    if settings.redis_url is None:
        from tools.embedded_redis import EmbeddedRedis

        port = EMBEDDED_REDIS_PORT if _port_free(EMBEDDED_REDIS_PORT) else None
        embedded = EmbeddedRedis(port=port).start()
        _AT_FORCED_EXIT.append(embedded.close)
        settings = settings.model_copy(update={"redis_url": embedded.url})
        print(f"layermux: started an embedded redis-server at {embedded.url} (it stops with this worker);\n"
              f"layermux: to reach it from another shell: export LAYERMUX_REDIS_URL={embedded.url}", flush=True)
    else:
        check_redis(settings.redis_url)
    if settings.redis_mode != "standalone":  # Cluster / Sentinel: the stream path only (arq needs one server)
        from .runtime import serve_until_signal

        return asyncio.run(serve_until_signal(settings))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        first = settings.models[0]
        worker = _Worker(
            functions=WorkerSettings.functions,
            queue_name=Keys(settings.key_prefix).arq_queue(first.name),
            on_startup=on_startup,
            on_shutdown=on_shutdown,
            redis_settings=redis_settings_for(settings),
            job_timeout=JOB_TIMEOUT_S,
            max_jobs=_max_jobs(first.max_running),
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
        return worker.stop_signal
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        if embedded is not None:
            _AT_FORCED_EXIT.remove(embedded.close)
            embedded.close()


if __name__ == "__main__":  # python -m worker.arq_app [config.toml]
    run(sys.argv[1] if len(sys.argv) > 1 else None)
