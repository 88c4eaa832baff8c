"""Owns: the producers: AsyncProducer and Producer (blocking), and how a submit() becomes a message.
Changed by: SDK maintainers; the two classes mirror each other and change together.
Thread-safety: a producer is as safe as its redis-py client: Producer may be shared by threads,
AsyncProducer by the tasks of one event loop. Handles are not shared (see handle.py).

    async with AsyncProducer("redis://localhost:6379/0") as producer:
        handle = await producer.submit("qwen2-0.5b", prompt="Hello", max_tokens=32)
        async for piece in handle.stream_text():
            print(piece, end="")

submit() runs the atomic enqueue script: it raises QueueFullError (backpressure) or
UnknownModelError, and a request id that is already queued or running yields a handle to
that request instead of a second run (`handle.duplicate` is then True).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio

from .connection import (
    COMMAND_RETRIES,
    DEFAULT_REDIS_URL,
    RedisMode,
    is_transient,
    make_async_client,
    make_sync_client,
    reader_backoff_s,
)
from .enqueue import EnqueueOutcome, enqueue_args, enqueue_keys, enqueue_script_source, parse_enqueue_reply
from .errors import ProtocolError, QueueFullError, UnknownModelError
from .handle import AsyncHandle, Handle
from .keys import Keys, check_model_name, check_request_id
from .protocol import MAX_SEED, ChatMessage, RequestMessage, encode_request, validate_request

__all__ = ["AsyncProducer", "Producer", "build_request"]

ChatInput = Sequence[ChatMessage | dict[str, str]]


def build_request(
    model: str,
    *,
    prompt: str | None = None,
    messages: ChatInput | None = None,
    prompt_ids: Sequence[int] | None = None,
    max_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    ignore_eos: bool = False,
    priority: int = 0,
    deadline_s: float | None = None,
    request_id: str | None = None,
) -> RequestMessage:
    """A validated RequestMessage; fills request_id (uuid4 hex), seed (random) and the timestamps.

    Raises ProtocolError("invalid_request") naming the first bad argument.
    """
    valid_deadline = (
        isinstance(deadline_s, int | float)
        and not isinstance(deadline_s, bool)
        and math.isfinite(deadline_s)
        and deadline_s > 0
    )
    if deadline_s is not None and not valid_deadline:
        raise ProtocolError("invalid_request", f"deadline_s: expected seconds > 0, found {deadline_s!r}")
    submitted_at = time.time()
    fields: dict[str, Any] = {
        "request_id": uuid.uuid4().hex if request_id is None else request_id,
        "model": model,
        "prompt": prompt,
        "messages": _as_list(messages),
        "prompt_ids": _as_list(prompt_ids),
        "params": {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            # Always explicit on the wire: a worker taking over must regenerate the same tokens.
            "seed": secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
            "stop": [] if stop is None else [stop] if isinstance(stop, str) else _as_list(stop),
            "ignore_eos": ignore_eos,
        },
        "priority": priority,
        "deadline_at": None if deadline_s is None else submitted_at + deadline_s,
        "submitted_at": submitted_at,
    }
    return validate_request(fields)


def _as_list(value: object) -> object:
    """Tuples, generators, arrays -> list (strict validation takes lists only); the rest unchanged."""
    if value is None or isinstance(value, list | str | bytes | dict):
        return value
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return value  # validation names the field and the type found


def _raise_for_outcome(outcome: EnqueueOutcome, model: str, request_id: str) -> None:
    if outcome.status == "unknown_model":
        raise UnknownModelError(
            "unknown_model",
            f"no worker serves model {model!r}",
            {"model": model},
            request_id=request_id,
        )
    if outcome.status == "queue_full":
        assert outcome.depth is not None and outcome.limit is not None
        raise QueueFullError(model, outcome.depth, outcome.limit, request_id=request_id)


class AsyncProducer:
    """Submits requests from asyncio code. Close it with `aclose()` or `async with`."""

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        prefix: str = "lmx",
        *,
        password: str | None = None,
        client: redis.asyncio.Redis | None = None,
        redis_mode: RedisMode = "standalone",
        redis_urls: Sequence[str] = (),
        sentinel_master: str | None = None,
    ) -> None:
        """`redis_url` may be rediss:// for TLS (ssl_* options go in its query string).

        `redis_mode` "cluster": `redis_url` (and `redis_urls`) are Redis Cluster seed nodes;
        "sentinel": they are Sentinels and `sentinel_master` names the master set
        (producer_sdk/connection.py). Pass `client` to use your own redis-py client; the
        producer then does not close it, and its retry policy is yours.
        """
        self.keys = Keys(prefix)
        self._owns_client = client is None
        self._redis = make_async_client(redis_url, password, mode=redis_mode, urls=redis_urls,
                                        sentinel_master=sentinel_master) if client is None else client
        self._enqueue = self._redis.register_script(enqueue_script_source())

    async def submit(
        self,
        model: str,
        prompt: str | None = None,
        messages: ChatInput | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        request_id: str | None = None,
        *,
        ignore_eos: bool = False,
    ) -> AsyncHandle:
        """Enqueue one request; give exactly one of prompt, messages, prompt_ids.

        Raises QueueFullError, UnknownModelError, or ProtocolError for bad arguments.
        """
        message = build_request(
            model, prompt=prompt, messages=messages, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
            priority=priority, deadline_s=deadline_s, request_id=request_id,
        )  # fmt: skip
        keys = enqueue_keys(self.keys, model)
        args = enqueue_args(message.request_id, encode_request(message), message.priority)
        failures = 0
        while True:  # the enqueue is idempotent on the request id: safe to repeat after any transient error
            try:
                reply = await self._enqueue(keys=keys, args=args)
                break
            except Exception as e:  # TRANSIENT_ERRORS, and redis-py races (connection.is_transient)
                failures += 1
                if failures > COMMAND_RETRIES or not is_transient(e):
                    raise
                await asyncio.sleep(reader_backoff_s(failures))
        outcome = parse_enqueue_reply(reply)
        _raise_for_outcome(outcome, model, message.request_id)

        async def resubmit() -> object:  # the entry was lost in a failover (handle.py, "Lost entries")
            return await self._enqueue(keys=keys, args=args)

        return AsyncHandle(
            self._redis, self.keys, model, message.request_id,
            entry_id=outcome.entry_id, duplicate=outcome.status == "exists", resubmit=resubmit,
        )  # fmt: skip

    def attach(self, model: str, request_id: str) -> AsyncHandle:
        """A handle to a request submitted elsewhere; it reads the reply stream from the start."""
        return AsyncHandle(self._redis, self.keys, check_model_name(model), check_request_id(request_id))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Producer:
    """Submits requests from blocking code (mirrors AsyncProducer). Close it with `close()` or `with`."""

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        prefix: str = "lmx",
        *,
        password: str | None = None,
        client: redis.Redis | None = None,
        redis_mode: RedisMode = "standalone",
        redis_urls: Sequence[str] = (),
        sentinel_master: str | None = None,
    ) -> None:
        """See AsyncProducer.__init__."""
        self.keys = Keys(prefix)
        self._owns_client = client is None
        self._redis = make_sync_client(redis_url, password, mode=redis_mode, urls=redis_urls,
                                       sentinel_master=sentinel_master) if client is None else client
        self._enqueue = self._redis.register_script(enqueue_script_source())

    def submit(
        self,
        model: str,
        prompt: str | None = None,
        messages: ChatInput | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        request_id: str | None = None,
        *,
        ignore_eos: bool = False,
    ) -> Handle:
        """See AsyncProducer.submit."""
        message = build_request(
            model, prompt=prompt, messages=messages, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
            priority=priority, deadline_s=deadline_s, request_id=request_id,
        )  # fmt: skip
        keys = enqueue_keys(self.keys, model)
        args = enqueue_args(message.request_id, encode_request(message), message.priority)
        failures = 0
        while True:  # see AsyncProducer.submit
            try:
                reply = self._enqueue(keys=keys, args=args)
                break
            except Exception as e:
                failures += 1
                if failures > COMMAND_RETRIES or not is_transient(e):
                    raise
                time.sleep(reader_backoff_s(failures))
        outcome = parse_enqueue_reply(reply)
        _raise_for_outcome(outcome, model, message.request_id)
        return Handle(
            self._redis, self.keys, model, message.request_id,
            entry_id=outcome.entry_id, duplicate=outcome.status == "exists",
            resubmit=lambda: self._enqueue(keys=keys, args=args),
        )  # fmt: skip

    def attach(self, model: str, request_id: str) -> Handle:
        """A handle to a request submitted elsewhere; it reads the reply stream from the start."""
        return Handle(self._redis, self.keys, check_model_name(model), check_request_id(request_id))

    def close(self) -> None:
        if self._owns_client:
            self._redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
