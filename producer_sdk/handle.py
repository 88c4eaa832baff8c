"""Owns: request handles: stream events, wait for the result, cancel (AsyncHandle and Handle).
Changed by: SDK maintainers; the two classes mirror each other and change together.
Thread-safety: a handle keeps one read position; use it from one task/thread at a time.

A handle has a single position in the reply stream, shared by events(), stream_text() and
result(): each event is delivered once across them, and result() always works because the
terminal event is kept. To read the same request twice, attach a second handle
(`producer.attach(model, request_id)`).

Reads are blocking XREADs of at most READ_BLOCK_MS, never a polling loop. A `timeout` is
checked between reads; the block time is cut to the time left, so a healthy connection is
never interrupted mid-command. If a read is interrupted anyway (task cancelled, Ctrl-C),
redis-py drops that connection, the exception propagates (CancelledError is never
swallowed), and the next read resumes from the cursor on a fresh connection.

Lost entries. Redis replicates asynchronously: when a master dies (Cluster or Sentinel
failover), writes it acknowledged just before can be missing on the promoted replica, among
them a request's entry. A handle that has read nothing for LIVENESS_CHECK_S checks that its
request still exists (its field in the model's ids hash, which lives until the terminal event
is written). If it is gone and the reply stream has no terminal event, a handle from submit()
enqueues the same message again (idempotent on the request id: `resubmits` counts it) and the
worker that takes it resumes from what the reply stream still holds; a handle from attach(),
which has no message, raises WorkerFailureError("request_lost"). Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import redis
import redis.asyncio

from .connection import (
    LIVENESS_CHECK_S,
    READ_BLOCK_MS,
    READ_COUNT,
    READER_RECONNECT_ATTEMPTS,
    is_transient,
    reader_backoff_s,
    stream_entries,
)
from .errors import RequestTimeoutError, WorkerFailureError
from .keys import Keys
from .protocol import CANCEL_TTL_S, CancelledEvent, DoneEvent, ErrorEvent, Event, TokenEvent
from .reply import ReplyCursor, Result, error_for_terminal, result_from_terminal

__all__ = ["AsyncHandle", "Handle"]

Entries = list[tuple[str, dict[bytes, bytes]]]


class _Deadline:
    """Time left of an optional timeout, as XREAD block milliseconds."""

    __slots__ = ("_at", "timeout")

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout: expected None or seconds >= 0, found {timeout!r}")
        self.timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def block_ms(self) -> int:
        if self._at is None:
            return READ_BLOCK_MS
        left_ms = int((self._at - time.monotonic()) * 1000)
        return max(1, min(READ_BLOCK_MS, left_ms))  # BLOCK 0 would mean "forever"

    def left_s(self) -> float | None:
        return None if self._at is None else max(0.0, self._at - time.monotonic())

    def expired(self) -> bool:
        return self._at is not None and time.monotonic() >= self._at


class _HandleBase:
    __slots__ = ("_cursor", "_heard_at", "_keys", "_stream", "duplicate", "entry_id", "model", "request_id",
                 "resubmits")

    def __init__(self, keys: Keys, model: str, request_id: str, entry_id: str | None, duplicate: bool) -> None:
        self.model = model
        self.request_id = request_id
        self.entry_id = entry_id  # request stream entry id, when known (None after attach())
        self.duplicate = duplicate  # the id was already queued: this submit added nothing
        self.resubmits = 0  # times the request was enqueued again because its entry was lost (module doc)
        self._keys = keys
        self._stream = keys.events(request_id)
        self._cursor = ReplyCursor(request_id)
        self._heard_at = time.monotonic()  # last read that returned entries (or the last liveness check)

    def _silent_too_long(self, got_entries: bool) -> bool:
        now = time.monotonic()
        if got_entries:
            self._heard_at = now
            return False
        if now - self._heard_at < LIVENESS_CHECK_S:
            return False
        self._heard_at = now
        return True

    def _lost_error(self) -> WorkerFailureError:
        return WorkerFailureError(
            "request_lost",
            f"request {self.request_id}: its queue entry is gone and its reply stream has no terminal event "
            "(writes lost in a Redis failover); submit it again with the same request_id",
            {"next_index": self._cursor.next_index}, request_id=self.request_id)

    def __repr__(self) -> str:
        state = "finished" if self._cursor.done else f"next_index={self._cursor.next_index}"
        return f"{type(self).__name__}(model={self.model!r}, request_id={self.request_id!r}, {state})"

    @property
    def terminal(self) -> DoneEvent | ErrorEvent | CancelledEvent | None:
        """The terminal event, once it has been read."""
        return self._cursor.terminal

    def _timeout_error(self, deadline: _Deadline) -> RequestTimeoutError:
        return RequestTimeoutError(
            "timeout",
            f"request {self.request_id} did not finish within {deadline.timeout} s (it was not cancelled)",
            {"timeout_s": deadline.timeout, "next_index": self._cursor.next_index},
            request_id=self.request_id,
        )

    def _finish(self) -> Result:
        assert self._cursor.terminal is not None
        return result_from_terminal(self._cursor.terminal)


class AsyncHandle(_HandleBase):
    """A submitted request, for asyncio code."""

    __slots__ = ("_redis", "_resubmit")

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        model: str,
        request_id: str,
        *,
        entry_id: str | None = None,
        duplicate: bool = False,
        resubmit: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        super().__init__(keys, model, request_id, entry_id, duplicate)
        self._redis = client
        self._resubmit = resubmit  # enqueue the same message again (submit() handles only)

    async def events(self) -> AsyncIterator[Event]:
        """Yield StartedEvent(s), TokenEvents, then the terminal event, and stop."""
        while not self._cursor.done:
            for entry_id, fields in await self._read(READ_BLOCK_MS, None):
                event = self._cursor.accept(entry_id, fields)
                if event is not None:
                    yield event
                if self._cursor.done:
                    return

    async def stream_text(self) -> AsyncIterator[str]:
        """Yield the text of each token event; raise the typed error if the request fails."""
        async for event in self.events():
            if isinstance(event, TokenEvent):
                yield event.text
            elif isinstance(event, ErrorEvent | CancelledEvent):
                raise error_for_terminal(event)

    async def result(self, timeout: float | None = None) -> Result:
        """Wait for the terminal event; return the Result or raise its typed error.

        RequestTimeoutError after `timeout` seconds; the request keeps running.
        """
        deadline = _Deadline(timeout)
        while not self._cursor.done:
            for entry_id, fields in await self._read(deadline.block_ms(), deadline):
                self._cursor.accept(entry_id, fields)
                if self._cursor.done:
                    break
            else:
                if deadline.expired():
                    raise self._timeout_error(deadline)
        return self._finish()

    async def cancel(self) -> None:
        """Ask the workers to cancel the request (idempotent); its stream ends with `cancelled`."""
        key = self._keys.cancel(self.model)
        async with self._redis.pipeline(transaction=False) as pipe:  # one key; Cluster has no MULTI here
            pipe.sadd(key, self.request_id)
            pipe.expire(key, CANCEL_TTL_S)
            await pipe.execute()

    async def _read(self, block_ms: int, deadline: _Deadline | None) -> Entries:
        """One XREAD after the cursor; reconnects with jittered backoff on transient errors."""
        failures = 0
        while True:
            try:
                reply = await self._redis.xread({self._stream: self._cursor.last_id}, count=READ_COUNT, block=block_ms)
                entries = stream_entries(reply)
                if self._silent_too_long(bool(entries)):
                    entries = await self._check_alive()
                return entries
            except Exception as e:  # TRANSIENT_ERRORS, and redis-py races (connection.is_transient)
                failures += 1
                if failures > READER_RECONNECT_ATTEMPTS or not is_transient(e):
                    raise
                delay_s = reader_backoff_s(failures)
                if deadline is not None:
                    left_s = deadline.left_s()
                    assert left_s is not None
                    if left_s <= 0:
                        return []  # the caller reports the timeout
                    delay_s = min(delay_s, left_s)
                    block_ms = deadline.block_ms()
                await asyncio.sleep(delay_s)


    async def _check_alive(self) -> Entries:
        """After a silence: entries that arrived meanwhile, or [] once the request is known to exist
        (re-enqueued if its entry was lost). See "Lost entries" in the module docstring."""
        if await self._redis.hexists(self._keys.ids(self.model), self.request_id):  # type: ignore[misc]
            return []
        # Gone from the ids hash: finished (its terminal is already in the reply stream) or lost.
        entries = stream_entries(await self._redis.xread({self._stream: self._cursor.last_id}, count=READ_COUNT))
        if entries:
            return entries
        if self._resubmit is None:
            raise self._lost_error()
        await self._resubmit()
        self.resubmits += 1
        return []


class Handle(_HandleBase):
    """A submitted request, for blocking code (mirrors AsyncHandle)."""

    __slots__ = ("_redis", "_resubmit")

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        model: str,
        request_id: str,
        *,
        entry_id: str | None = None,
        duplicate: bool = False,
        resubmit: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(keys, model, request_id, entry_id, duplicate)
        self._redis = client
        self._resubmit = resubmit  # enqueue the same message again (submit() handles only)

    def events(self) -> Iterator[Event]:
        """Yield StartedEvent(s), TokenEvents, then the terminal event, and stop."""
        while not self._cursor.done:
            for entry_id, fields in self._read(READ_BLOCK_MS, None):
                event = self._cursor.accept(entry_id, fields)
                if event is not None:
                    yield event
                if self._cursor.done:
                    return

    def stream_text(self) -> Iterator[str]:
        """Yield the text of each token event; raise the typed error if the request fails."""
        for event in self.events():
            if isinstance(event, TokenEvent):
                yield event.text
            elif isinstance(event, ErrorEvent | CancelledEvent):
                raise error_for_terminal(event)

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the terminal event; return the Result or raise its typed error.

        RequestTimeoutError after `timeout` seconds; the request keeps running.
        """
        deadline = _Deadline(timeout)
        while not self._cursor.done:
            for entry_id, fields in self._read(deadline.block_ms(), deadline):
                self._cursor.accept(entry_id, fields)
                if self._cursor.done:
                    break
            else:
                if deadline.expired():
                    raise self._timeout_error(deadline)
        return self._finish()

    def cancel(self) -> None:
        """Ask the workers to cancel the request (idempotent); its stream ends with `cancelled`."""
        key = self._keys.cancel(self.model)
        with self._redis.pipeline(transaction=False) as pipe:  # one key; Cluster has no MULTI here
            pipe.sadd(key, self.request_id)
            pipe.expire(key, CANCEL_TTL_S)
            pipe.execute()

    def _read(self, block_ms: int, deadline: _Deadline | None) -> Entries:
        """One XREAD after the cursor; reconnects with jittered backoff on transient errors."""
        failures = 0
        while True:
            try:
                reply = self._redis.xread({self._stream: self._cursor.last_id}, count=READ_COUNT, block=block_ms)
                entries = stream_entries(reply)
                if self._silent_too_long(bool(entries)):
                    entries = self._check_alive()
                return entries
            except Exception as e:  # TRANSIENT_ERRORS, and redis-py races (connection.is_transient)
                failures += 1
                if failures > READER_RECONNECT_ATTEMPTS or not is_transient(e):
                    raise
                delay_s = reader_backoff_s(failures)
                if deadline is not None:
                    left_s = deadline.left_s()
                    assert left_s is not None
                    if left_s <= 0:
                        return []  # the caller reports the timeout
                    delay_s = min(delay_s, left_s)
                    block_ms = deadline.block_ms()
                time.sleep(delay_s)

    def _check_alive(self) -> Entries:
        """See AsyncHandle._check_alive."""
        if self._redis.hexists(self._keys.ids(self.model), self.request_id):
            return []
        entries = stream_entries(self._redis.xread({self._stream: self._cursor.last_id}, count=READ_COUNT))
        if entries:
            return entries
        if self._resubmit is None:
            raise self._lost_error()
        self._resubmit()
        self.resubmits += 1
        return []
