"""Owns: the layermux requests behind one HTTP request (a `Job`: one queued request per choice) — how
they are submitted through the SDK, how their reply streams become OpenAI chunks or one response,
and how they are cancelled when the client goes away.
Changed by: the gateway; the event rules it relies on are docs/protocol.md's ("Reply events").
Thread-safety: event-loop only; a Job belongs to the HTTP request that made it.

The gateway keeps nothing a crash would lose: every choice is an ordinary queued request whose
reply stream lives in Redis. If the gateway dies mid-stream the request still runs to its one
terminal event (visible to `layermux status`); if the *client* goes away, the gateway asks the
worker to cancel (the SDK's `cancel()`), and the worker stops generating and frees the KV.

Streaming commits the HTTP status only after each choice's first event: a request the worker
refuses (prompt too long, KV beyond the budget) has a single `error` event and no `started`,
so it still gets a proper 4xx instead of a 200 followed by an error chunk. An error that comes
after tokens were sent travels as a `data: {"error": ...}` chunk before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel

from producer_sdk import AsyncHandle, AsyncProducer, LayermuxClientError, ProtocolError
from producer_sdk.protocol import MAX_SEED, CancelledEvent, DoneEvent, ErrorEvent, Event, StartedEvent, TokenEvent
from producer_sdk.reply import Result, error_for_terminal

from .errors import ApiError, api_error_for, error_body
from .openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChunk,
    TextChoice,
    UsageOut,
    finish_reason_out,
)

__all__ = ["Job", "JobSpec"]

Kind = Literal["chat", "completion"]
SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class JobSpec:
    """What one HTTP request asks for, already validated."""

    kind: Kind
    model: str
    prompts: list[dict[str, Any]]  # SDK prompt arguments: one entry per prompt ({"messages": ...} for chat)
    n: int
    sampling: dict[str, Any]  # SDK submit() keyword arguments shared by every choice
    seed: int | None
    request_id: str | None
    include_usage: bool
    retry_after_s: int

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


@dataclass
class _Choice:
    index: int
    prompt_index: int
    handle: AsyncHandle
    events: AsyncIterator[Event] | None = None
    first: Event | None = None
    finished: bool = False


@dataclass
class Job:
    """The queued requests of one HTTP request, choice i = prompt (i // n), sample (i % n)."""

    spec: JobSpec
    choices: list[_Choice]
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    on_first_token: Callable[[], None] | None = None
    n_completion_tokens: int = 0
    _chunk_head: bytes | None = None

    # -- submit ------------------------------------------------------------------------------------

    @classmethod
    async def submit(cls, producer: AsyncProducer, spec: JobSpec) -> Job:
        """Enqueue one request per choice; if one is refused, cancel the ones already queued."""
        base_seed = spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED + 1)
        n_total = len(spec.prompts) * spec.n
        choices: list[_Choice] = []
        try:
            for i in range(n_total):
                rid = spec.request_id if spec.request_id is None or n_total == 1 else f"{spec.request_id}:{i}"
                handle = await producer.submit(
                    spec.model, **spec.prompts[i // spec.n], **spec.sampling,
                    seed=(base_seed + i % spec.n) % (MAX_SEED + 1), request_id=rid)
                choices.append(_Choice(i, i // spec.n, handle))
        except ProtocolError as e:
            await _cancel_quietly(c.handle for c in choices)
            raise ApiError(400, e.message, param=_param_of(e.message)) from None
        except LayermuxClientError as e:
            await _cancel_quietly(c.handle for c in choices)
            raise api_error_for(e, prompt_param=spec.prompt_param, retry_after_s=spec.retry_after_s) from None
        prefix = "chatcmpl-" if spec.kind == "chat" else "cmpl-"
        return cls(spec, choices, prefix + (spec.request_id or choices[0].handle.request_id))

    @property
    def request_ids(self) -> list[str]:
        return [c.handle.request_id for c in self.choices]

    async def cancel_unfinished(self) -> None:
        """Ask the workers to stop every choice without a terminal event yet (the client left)."""
        await _cancel_quietly(c.handle for c in self.choices if not c.finished)

    def _api_error(self, e: LayermuxClientError) -> ApiError:
        return api_error_for(e, prompt_param=self.spec.prompt_param, retry_after_s=self.spec.retry_after_s)

    # -- one response ------------------------------------------------------------------------------

    async def response(self) -> ChatCompletion | Completion:
        """Wait for every choice's result; the typed error of the first failed one becomes an ApiError."""
        try:
            results = await asyncio.gather(*(c.handle.result() for c in self.choices))
        except LayermuxClientError as e:
            await self.cancel_unfinished()
            raise self._api_error(e) from None
        for c in self.choices:
            c.finished = True
        usage = self._usage(results)
        model, spec = self.spec.model, self.spec
        if spec.kind == "chat":
            return ChatCompletion(id=self.id, created=self.created, model=model, usage=usage, choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=r.text),
                           finish_reason=finish_reason_out(r.finish_reason))
                for c, r in zip(self.choices, results)])
        return Completion(id=self.id, created=self.created, model=model, usage=usage, choices=[
            TextChoice(index=c.index, text=r.text, finish_reason=finish_reason_out(r.finish_reason))
            for c, r in zip(self.choices, results)])

    def _usage(self, results: Sequence[Result]) -> UsageOut:
        # As OpenAI counts: each prompt once, however many choices sample it.
        prompt = sum(results[p * self.spec.n].usage.prompt_tokens for p in range(len(self.spec.prompts)))
        completion = sum(r.usage.completion_tokens for r in results)
        return UsageOut(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # -- streaming ---------------------------------------------------------------------------------

    async def start_stream(self) -> None:
        """Read each choice's first event; a refusal (error before `started`) raises its ApiError."""

        async def first(c: _Choice) -> None:
            c.events = c.handle.events()
            c.first = await anext(c.events)

        try:
            await asyncio.gather(*(first(c) for c in self.choices))
        except BaseException:
            await self.cancel_unfinished()
            raise
        for c in self.choices:
            if isinstance(c.first, ErrorEvent | CancelledEvent):
                await self.cancel_unfinished()
                raise self._api_error(error_for_terminal(c.first))

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The SSE body: a role chunk per choice (chat), text chunks, finish chunks, usage, [DONE]."""
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        if self.spec.kind == "chat":
            yield _sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.spec.model, choices=[
                ChunkChoice(index=c.index, delta={"role": "assistant", "content": ""}) for c in self.choices]))
        first_token_seen = False
        async for c, event in self._merged():
            if isinstance(event, StartedEvent):
                prompt_tokens.setdefault(c.prompt_index, event.prompt_tokens)
            elif isinstance(event, TokenEvent):
                self.n_completion_tokens += len(event.token_ids)
                if not first_token_seen:
                    first_token_seen = True
                    if self.on_first_token is not None:
                        self.on_first_token()
                if event.text:
                    yield self.content_chunk(c.index, event.text)
            elif isinstance(event, DoneEvent):
                c.finished = True
                prompt_tokens[c.prompt_index] = event.usage.prompt_tokens
                completion_tokens += event.usage.completion_tokens
                yield self._text_chunk(c.index, None, finish_reason_out(event.finish_reason))
            elif isinstance(event, ErrorEvent | CancelledEvent):
                c.finished = True
                await self.cancel_unfinished()
                yield b"data: " + orjson.dumps(error_body(self._api_error(error_for_terminal(event)))) + b"\n\n"
                yield SSE_DONE
                return
        if self.spec.include_usage:
            prompt = sum(prompt_tokens.values())
            usage = UsageOut(prompt_tokens=prompt, completion_tokens=completion_tokens,
                             total_tokens=prompt + completion_tokens)
            cls = ChatCompletionChunk if self.spec.kind == "chat" else CompletionChunk
            yield _sse(cls(id=self.id, created=self.created, model=self.spec.model, choices=[], usage=usage))
        yield SSE_DONE

    def content_chunk(self, index: int, text: str) -> bytes:
        """The SSE chunk of one token event's text: `_text_chunk(index, text, None)` byte for byte, without
        building models (this is the per-token path; tests/test_gateway_schema.py checks the equality)."""
        if self._chunk_head is None:
            kind = b"chat.completion.chunk" if self.spec.kind == "chat" else b"text_completion"
            self._chunk_head = (b'data: {"id":' + orjson.dumps(self.id) + b',"object":"' + kind + b'","created":'
                                + str(self.created).encode() + b',"model":' + orjson.dumps(self.spec.model)
                                + b',"choices":[{"index":')
        if self.spec.kind == "chat":
            return (self._chunk_head + str(index).encode() + b',"delta":{"content":' + orjson.dumps(text)
                    + b'},"logprobs":null,"finish_reason":null}]}\n\n')
        return (self._chunk_head + str(index).encode() + b',"text":' + orjson.dumps(text)
                + b',"logprobs":null,"finish_reason":null}]}\n\n')

    def _text_chunk(self, index: int, text: str | None, finish: Literal["stop", "length"] | None) -> bytes:
        if self.spec.kind == "chat":
            delta = {} if text is None else {"content": text}
            return _sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.spec.model,
                                            choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)]))
        return _sse(CompletionChunk(id=self.id, created=self.created, model=self.spec.model,
                                    choices=[TextChoice(index=index, text=text or "", finish_reason=finish)]))

    async def _merged(self) -> AsyncIterator[tuple[_Choice, Event]]:
        """Each choice's events (its first one included), interleaved as they arrive."""
        if len(self.choices) == 1:  # the common case, without a task per choice
            c = self.choices[0]
            assert c.events is not None and c.first is not None
            yield c, c.first
            if not isinstance(c.first, DoneEvent):
                async with contextlib.aclosing(c.events) as events:  # type: ignore[type-var]
                    async for event in events:
                        yield c, event
            return
        queue: asyncio.Queue[tuple[_Choice, Event | BaseException | None]] = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            assert c.events is not None and c.first is not None
            try:
                await queue.put((c, c.first))
                if not isinstance(c.first, DoneEvent):
                    async for event in c.events:
                        await queue.put((c, event))
                await queue.put((c, None))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                await queue.put((c, e))

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            open_ = len(tasks)
            while open_:
                c, item = await queue.get()
                if item is None:
                    open_ -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield c, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _sse(chunk: BaseModel) -> bytes:
    exclude = {"usage"} if getattr(chunk, "usage", None) is None else None
    return b"data: " + chunk.model_dump_json(exclude=exclude).encode() + b"\n\n"


async def _cancel_quietly(handles: Any) -> None:
    """Cancel requests even while this task is being cancelled (the client went away)."""
    targets = list(handles)
    if not targets:
        return
    task = asyncio.ensure_future(asyncio.gather(*(h.cancel() for h in targets), return_exceptions=True))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task  # the cancel requests go out first; then the cancellation goes on
        raise


def _param_of(message: str) -> str | None:
    head = message.split(":", 1)[0]
    return head if head and " " not in head else None
