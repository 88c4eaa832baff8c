"""Producer SDK against a real redis-server (tests/conftest.py): enqueue, idempotency, backpressure,
event streaming, resume after a dropped connection, typed errors, cancel, sync mirror.

The worker side is played by plain XADDs written here, following docs/protocol.md: key names and
payloads are spelled out literally so that these tests also pin the wire format.
Async tests are plain functions that call asyncio.run (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import redis
import redis.asyncio

from producer_sdk import (
    AsyncHandle,
    AsyncProducer,
    CancelledEvent,
    DeadlineExceededError,
    DoneEvent,
    ErrorEvent,
    LayermuxClientError,
    Producer,
    ProtocolError,
    QueueFullError,
    RejectedError,
    RequestCancelledError,
    RequestMessage,
    RequestTimeoutError,
    StartedEvent,
    TokenEvent,
    UnknownModelError,
    WorkerFailureError,
    decode_request,
)
from producer_sdk.connection import COMMAND_BACKOFF_BASE_S, COMMAND_BACKOFF_CAP_S, COMMAND_RETRIES
from tools.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.timeout(60)

MODEL = "qwen2-0.5b"
T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


# -- the worker's side, by hand --------------------------------------------------------------


def req_key(model: str = MODEL, band: str = "normal") -> str:
    return f"lmx:{{m:{model}}}:req" + ("" if band == "normal" else f":{band}")


def events_key(request_id: str) -> str:
    return f"lmx:{{r:{request_id}}}:events"


def serve(r: redis.Redis, model: str = MODEL, max_backlog: int = 100) -> None:
    """What a worker does at startup: write the model's limits hash."""
    r.hset(
        f"lmx:{{m:{model}}}:limits",
        mapping={
            "max_backlog": max_backlog,
            "max_tokens": 4096,
            "max_prompt_tokens": 2048,
            "n_ctx": 4096,
            "schema_version": 1,
        },
    )


def started(attempt: int = 1) -> dict[str, Any]:
    return {"type": "started", "worker": "w-test", "attempt": attempt, "prompt_tokens": 4}


def token(index: int, *ids: int) -> dict[str, Any]:
    return {"type": "token", "index": index, "token_ids": list(ids), "text": "".join(f"<{i}>" for i in ids)}


def done(*ids: int, finish_reason: str = "length") -> dict[str, Any]:
    usage = {
        "prompt_tokens": 4,
        "completion_tokens": len(ids),
        "queue_ms": 1.0,
        "prefill_ms": 2.0,
        "decode_ms": 3.0,
        "total_ms": 6.0,
    }
    return {
        "type": "done",
        "finish_reason": finish_reason,
        "text": "".join(f"<{i}>" for i in ids),
        "token_ids": list(ids),
        "usage": usage,
    }


def error(code: str, **details: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": f"{code} happened", "details": details}


def cancelled(n_tokens: int) -> dict[str, Any]:
    return {"type": "cancelled", "completion_tokens": n_tokens}


def publish(r: redis.Redis, request_id: str, *events: dict[str, Any]) -> None:
    for event in events:
        r.xadd(events_key(request_id), {"data": orjson.dumps({"v": 1, "request_id": request_id, **event})})


async def apublish(r: redis.asyncio.Redis, request_id: str, *events: dict[str, Any]) -> None:
    for event in events:
        await r.xadd(events_key(request_id), {"data": orjson.dumps({"v": 1, "request_id": request_id, **event})})


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def producer(redis_url: str) -> Iterator[Producer]:
    with Producer(redis_url) as sync_producer:
        yield sync_producer


def queued_entries(r: redis.Redis, model: str = MODEL) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for band in ("high", "normal", "low"):
        entries += r.xrange(req_key(model, band))  # type: ignore[arg-type]
    return entries


def queued_messages(r: redis.Redis, model: str = MODEL) -> list[RequestMessage]:
    return [decode_request(fields[b"data"]) for _, fields in queued_entries(r, model)]


def token_indices(events: list[Any]) -> list[int]:
    return [i for e in events if isinstance(e, TokenEvent) for i in range(e.index, e.index + len(e.token_ids))]


# -- submit ----------------------------------------------------------------------------------


def test_submit_enqueues_one_v1_message_and_records_its_id(redis_url: str, r: redis.Redis) -> None:
    serve(r)

    async def main() -> AsyncHandle:
        async with AsyncProducer(redis_url) as producer:
            return await producer.submit(MODEL, prompt="Hello", max_tokens=16, temperature=0.0, stop=["\n"], priority=3)

    handle = run(main)
    assert (r.xlen(req_key(band="high")), r.xlen(req_key())) == (1, 0)  # priority 3: the high band
    [(entry_id, fields)] = queued_entries(r)
    assert entry_id.decode() == handle.entry_id and not handle.duplicate
    message = decode_request(fields[b"data"])
    assert (message.request_id, message.model, message.prompt) == (handle.request_id, MODEL, "Hello")
    assert (message.params.max_tokens, message.params.temperature, message.params.stop) == (16, 0.0, ["\n"])
    assert message.priority == 3 and abs(message.submitted_at - time.time()) < 60
    stored_id: object = r.hget(f"lmx:{{m:{MODEL}}}:ids", handle.request_id)
    assert stored_id == entry_id
    assert len(handle.request_id) == 32  # uuid4 hex


def test_priority_picks_the_band_stream_and_the_backlog_counts_every_band(producer: Producer, r: redis.Redis) -> None:
    serve(r, max_backlog=4)
    for i, priority in enumerate([5, 0, -2, 100]):
        producer.submit(MODEL, prompt="x", request_id=f"p{i}", priority=priority)
    assert [r.xlen(req_key(band=b)) for b in ("high", "normal", "low")] == [2, 1, 1]
    with pytest.raises(QueueFullError) as e:
        producer.submit(MODEL, prompt="x", request_id="p-over", priority=-100)
    assert (e.value.depth, e.value.limit) == (4, 4)
    assert producer.submit(MODEL, prompt="x", request_id="p0").duplicate  # an id already queued in another band


def test_submit_fills_a_random_seed_unless_one_is_given(producer: Producer, r: redis.Redis) -> None:
    serve(r)
    producer.submit(MODEL, prompt="a", request_id="with-seed", seed=7)
    producer.submit(MODEL, prompt="a", request_id="no-seed-1")
    producer.submit(MODEL, prompt="a", request_id="no-seed-2")
    seeds = {m.request_id: m.params.seed for m in queued_messages(r)}
    assert seeds["with-seed"] == 7
    assert seeds["no-seed-1"] != seeds["no-seed-2"]


def test_resubmitting_a_request_id_returns_a_handle_to_the_same_request(redis_url: str, r: redis.Redis) -> None:
    serve(r)

    async def main() -> tuple[AsyncHandle, AsyncHandle]:
        async with AsyncProducer(redis_url) as producer:
            first = await producer.submit(MODEL, prompt="once", request_id="job-42")
            second = await producer.submit(MODEL, prompt="different text", request_id="job-42")
            return first, second

    first, second = run(main)
    assert (first.request_id, second.request_id) == ("job-42", "job-42")
    assert first.entry_id == second.entry_id
    assert (first.duplicate, second.duplicate) == (False, True)
    assert r.xlen(req_key()) == 1
    assert [m.prompt for m in queued_messages(r)] == ["once"]


def test_queue_full_carries_depth_and_limit_and_enqueues_nothing(producer: Producer, r: redis.Redis) -> None:
    serve(r, max_backlog=2)
    producer.submit(MODEL, prompt="1", request_id="r1")
    producer.submit(MODEL, prompt="2", request_id="r2")
    with pytest.raises(QueueFullError) as info:
        producer.submit(MODEL, prompt="3", request_id="r3")
    assert (info.value.depth, info.value.limit, info.value.code) == (2, 2, "queue_full")
    assert info.value.details == {"model": MODEL, "depth": 2, "limit": 2}
    assert r.xlen(req_key()) == 2 and not r.hexists(f"lmx:{{m:{MODEL}}}:ids", "r3")
    # An id that is already queued is still answered, even though the queue is full.
    assert producer.submit(MODEL, prompt="1", request_id="r1").duplicate


def test_queue_full_async(redis_url: str, r: redis.Redis) -> None:
    serve(r, max_backlog=1)

    async def main() -> None:
        async with AsyncProducer(redis_url) as producer:
            await producer.submit(MODEL, prompt="1")
            with pytest.raises(QueueFullError) as info:
                await producer.submit(MODEL, prompt="2")
            assert (info.value.depth, info.value.limit) == (1, 1)

    run(main)


def test_unknown_model_is_refused_and_nothing_is_written(redis_url: str, r: redis.Redis, producer: Producer) -> None:
    async def main() -> None:
        async with AsyncProducer(redis_url) as async_producer:
            with pytest.raises(UnknownModelError) as info:
                await async_producer.submit("no-such-model", prompt="hi")
            assert info.value.code == "unknown_model" and "no-such-model" in info.value.message

    run(main)
    with pytest.raises(UnknownModelError):
        producer.submit("no-such-model", prompt="hi")
    assert r.keys("*") == []


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"prompt": "x", "top_p": 0.0}, "params.top_p"),
        ({"prompt": "x", "max_tokens": 0}, "params.max_tokens"),
        ({"prompt": "x", "stop": ["s"] * 17}, "params.stop"),
        ({"prompt": "x", "priority": 1000}, "priority"),
        ({"prompt": "x", "request_id": "bad id"}, "request_id"),
        ({"prompt": "x", "deadline_s": -1}, "deadline_s"),
        ({}, "message"),
        ({"prompt": "x", "prompt_ids": (1, 2)}, "message"),
    ],
)
def test_invalid_arguments_raise_protocol_error_naming_the_field(
    producer: Producer, r: redis.Redis, kwargs: dict[str, Any], where: str
) -> None:
    serve(r)
    with pytest.raises(ProtocolError) as info:
        producer.submit(MODEL, **kwargs)
    assert info.value.code == "invalid_request" and info.value.message.startswith(where + ":"), info.value.message
    assert r.xlen(req_key()) == 0


def test_bad_model_name_is_an_invalid_request(producer: Producer) -> None:
    with pytest.raises(ProtocolError, match="model"):
        producer.submit("not a model name", prompt="x")


def test_messages_and_prompt_ids_forms_are_accepted(producer: Producer, r: redis.Redis) -> None:
    serve(r)
    producer.submit(MODEL, messages=[{"role": "user", "content": "hi"}], request_id="chat")
    producer.submit(MODEL, prompt_ids=(1, 2, 3), request_id="ids")
    messages = {m.request_id: m for m in queued_messages(r)}
    assert messages["chat"].messages is not None and messages["chat"].messages[0].content == "hi"
    assert messages["ids"].prompt_ids == [1, 2, 3]


def test_deadline_s_sets_deadline_at(producer: Producer, r: redis.Redis) -> None:
    serve(r)
    producer.submit(MODEL, prompt="x", deadline_s=2.5, request_id="with-deadline")
    producer.submit(MODEL, prompt="x", request_id="no-deadline")
    messages = {m.request_id: m for m in queued_messages(r)}
    with_deadline = messages["with-deadline"]
    assert with_deadline.deadline_at is not None
    assert with_deadline.deadline_at - with_deadline.submitted_at == pytest.approx(2.5)
    assert messages["no-deadline"].deadline_at is None


def test_custom_prefix_changes_every_key(redis_url: str, r: redis.Redis) -> None:
    r.hset(f"prod:{{m:{MODEL}}}:limits", "max_backlog", "5")
    with Producer(redis_url, prefix="prod") as producer:
        producer.submit(MODEL, prompt="x", request_id="p1")
    assert r.xlen(f"prod:{{m:{MODEL}}}:req") == 1 and r.xlen(req_key()) == 0


# -- events and results ------------------------------------------------------------------------


def test_events_arrive_in_order_and_stop_after_the_terminal(redis_url: str, r: redis.Redis) -> None:
    serve(r)

    async def main() -> list[Any]:
        async with AsyncProducer(redis_url) as producer:
            handle = await producer.submit(MODEL, prompt="hi", request_id="ev-1")
            publish(r, "ev-1", started(), token(0, 11, 12), token(2, 13), done(11, 12, 13))
            publish(r, "ev-1", token(3, 99))  # after the terminal: never read
            return [event async for event in handle.events()]

    events = run(main)
    assert [type(e) for e in events] == [StartedEvent, TokenEvent, TokenEvent, DoneEvent]
    assert token_indices(events) == [0, 1, 2]
    assert events[-1].text == "<11><12><13>"


def test_events_published_while_the_reader_waits_are_delivered(redis_url: str) -> None:
    async def main() -> list[Any]:
        publisher = redis.asyncio.Redis.from_url(redis_url)
        try:
            await publisher.hset(f"lmx:{{m:{MODEL}}}:limits", "max_backlog", 10)
            async with AsyncProducer(redis_url) as producer:
                handle = await producer.submit(MODEL, prompt="hi", request_id="live")
                reader = asyncio.create_task(collect(handle))
                for i, step in enumerate([started(), token(0, 1), token(1, 2, 3), token(3, 4), done(1, 2, 3, 4)]):
                    await asyncio.sleep(0.05 if i else 0.2)
                    await apublish(publisher, "live", step)
                return await asyncio.wait_for(reader, 10)
        finally:
            await publisher.aclose()

    events = run(main)
    assert token_indices(events) == [0, 1, 2, 3] and isinstance(events[-1], DoneEvent)


async def collect(handle: AsyncHandle) -> list[Any]:
    return [event async for event in handle.events()]


def test_result_returns_text_tokens_reason_and_usage(producer: Producer, r: redis.Redis) -> None:
    serve(r)
    handle = producer.submit(MODEL, prompt="hi", request_id="res-1")
    publish(r, "res-1", started(), token(0, 5, 6), done(5, 6, finish_reason="stop"))
    result = handle.result(timeout=10)
    assert (result.text, result.token_ids, result.finish_reason) == ("<5><6>", [5, 6], "stop")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_ms) == (4, 2, 6.0)
    assert handle.result() == result  # the terminal event is kept


ERROR_CODES = [
    ("deadline_exceeded", DeadlineExceededError),
    ("worker_failure", WorkerFailureError),
    ("dead_letter", WorkerFailureError),
    ("unknown_model", UnknownModelError),
    ("prompt_too_long", RejectedError),
    ("kv_exceeds_budget", RejectedError),
    ("max_tokens_over_limit", RejectedError),
    ("invalid_request", RejectedError),
    ("unsupported_version", RejectedError),
    ("some_future_code", RejectedError),
]


@pytest.mark.parametrize(("code", "exception"), ERROR_CODES)
def test_result_raises_the_typed_error_for_each_error_code(
    redis_url: str, r: redis.Redis, code: str, exception: type[LayermuxClientError]
) -> None:
    serve(r)

    async def main() -> LayermuxClientError:
        async with AsyncProducer(redis_url) as producer:
            handle = await producer.submit(MODEL, prompt="hi", request_id="err-1")
            publish(r, "err-1", started(), error(code, needed=5000, available=4096))
            with pytest.raises(exception) as info:
                await handle.result(timeout=10)
            return info.value

    raised = run(main)
    assert type(raised) is exception
    assert (raised.code, raised.request_id) == (code, "err-1")
    assert raised.details == {"needed": 5000, "available": 4096}
    assert raised.message == f"{code} happened"


@pytest.mark.parametrize(("code", "exception"), ERROR_CODES[:5])
def test_sync_result_raises_the_typed_error_for_each_error_code(
    producer: Producer, r: redis.Redis, code: str, exception: type[LayermuxClientError]
) -> None:
    serve(r)
    handle = producer.submit(MODEL, prompt="hi", request_id="err-2")
    publish(r, "err-2", error(code, limit=3))
    with pytest.raises(exception) as info:
        handle.result(timeout=10)
    assert info.value.code == code and info.value.details == {"limit": 3}


def test_cancelled_event_raises_request_cancelled_error(redis_url: str, r: redis.Redis, producer: Producer) -> None:
    serve(r)
    publish(r, "can-1", started(), token(0, 1), cancelled(1))

    async def main() -> None:
        async with AsyncProducer(redis_url) as async_producer:
            with pytest.raises(RequestCancelledError) as info:
                await async_producer.attach(MODEL, "can-1").result(timeout=10)
            assert info.value.details == {"completion_tokens": 1}

    run(main)
    with pytest.raises(RequestCancelledError):
        producer.attach(MODEL, "can-1").result(timeout=10)
    events = list(producer.attach(MODEL, "can-1").events())
    assert isinstance(events[-1], CancelledEvent)


def test_result_timeout_raises_request_timeout_error(redis_url: str, r: redis.Redis, producer: Producer) -> None:
    serve(r)
    handle = producer.submit(MODEL, prompt="hi", request_id="slow")
    publish(r, "slow", started(), token(0, 1))
    began = time.monotonic()
    with pytest.raises(RequestTimeoutError) as info:
        handle.result(timeout=0.3)
    assert 0.25 < time.monotonic() - began < 5
    assert info.value.details["next_index"] == 1

    async def main() -> None:
        async with AsyncProducer(redis_url) as async_producer:
            async_handle = async_producer.attach(MODEL, "slow")
            with pytest.raises(RequestTimeoutError):
                await async_handle.result(timeout=0.3)
            publish(r, "slow", done(1))  # the same handle goes on after a timeout
            assert (await async_handle.result(timeout=10)).token_ids == [1]

    run(main)


def test_result_with_zero_timeout_still_returns_a_finished_request(producer: Producer, r: redis.Redis) -> None:
    publish(r, "finished", started(), token(0, 1), done(1))
    assert producer.attach(MODEL, "finished").result(timeout=0).text == "<1>"


def test_stream_text_yields_pieces_and_raises_on_error(redis_url: str, r: redis.Redis, producer: Producer) -> None:
    publish(r, "txt-ok", started(), token(0, 1), token(1, 2, 3), done(1, 2, 3))
    publish(r, "txt-bad", started(), token(0, 1), error("worker_failure"))

    async def main() -> list[str]:
        async with AsyncProducer(redis_url) as async_producer:
            pieces = [piece async for piece in async_producer.attach(MODEL, "txt-ok").stream_text()]
            with pytest.raises(WorkerFailureError):
                async for _ in async_producer.attach(MODEL, "txt-bad").stream_text():
                    pass
            return pieces

    assert run(main) == ["<1>", "<2><3>"]
    assert list(producer.attach(MODEL, "txt-ok").stream_text()) == ["<1>", "<2><3>"]
    with pytest.raises(WorkerFailureError):
        list(producer.attach(MODEL, "txt-bad").stream_text())


def test_handle_position_is_shared_by_events_and_result(producer: Producer, r: redis.Redis) -> None:
    publish(r, "pos", started(), token(0, 1), token(1, 2), done(1, 2))
    handle = producer.attach(MODEL, "pos")
    events = handle.events()
    assert isinstance(events, Generator)
    assert isinstance(next(events), StartedEvent)
    assert isinstance(next(events), TokenEvent)
    events.close()
    assert token_indices(list(handle.events())) == [1]  # continues, nothing repeated
    assert handle.result().token_ids == [1, 2]
    assert list(handle.events()) == []


# -- exactly-once view -------------------------------------------------------------------------


def test_tokens_replayed_by_a_takeover_are_dropped(producer: Producer, r: redis.Redis) -> None:
    publish(r, "tk", started(), token(0, 1, 2), token(2, 3))
    # worker died; another one takes over, regenerates and (defensively) republishes old chunks
    publish(r, "tk", started(attempt=2), token(0, 1, 2), token(2, 3), token(3, 4), done(1, 2, 3, 4))
    events = list(producer.attach(MODEL, "tk").events())
    assert token_indices(events) == [0, 1, 2, 3]
    assert [e.attempt for e in events if isinstance(e, StartedEvent)] == [1, 2]


def test_token_gap_is_a_protocol_error(producer: Producer, r: redis.Redis) -> None:
    publish(r, "gap", started(), token(0, 1), token(2, 3))
    with pytest.raises(ProtocolError, match="token index: expected 1, found 2"):
        list(producer.attach(MODEL, "gap").events())


def test_event_of_another_request_is_a_protocol_error(producer: Producer, r: redis.Redis) -> None:
    r.xadd(events_key("mine"), {"data": orjson.dumps({"v": 1, "request_id": "theirs", **started()})})
    with pytest.raises(ProtocolError, match="request_id"):
        list(producer.attach(MODEL, "mine").events())


def test_reader_resumes_after_its_connection_is_killed_without_gap_or_repeat(redis_url: str) -> None:
    async def main() -> tuple[list[Any], int]:
        admin = redis.asyncio.Redis.from_url(redis_url)
        try:
            await admin.hset(f"lmx:{{m:{MODEL}}}:limits", "max_backlog", 10)
            async with AsyncProducer(redis_url) as producer:
                handle = await producer.submit(MODEL, prompt="hi", request_id="resume")
                seen: list[Any] = []
                first_half = asyncio.Event()

                async def read() -> None:
                    async for event in handle.events():
                        seen.append(event)
                        if token_indices(seen)[-1:] == [4]:
                            first_half.set()

                reader = asyncio.create_task(read())
                await apublish(admin, "resume", started(), *(token(i, 100 + i) for i in range(5)))
                await asyncio.wait_for(first_half.wait(), 10)
                killed = await kill_blocked_readers(admin)
                # the same worker goes on; then it dies and a second worker replays from 0
                await apublish(admin, "resume", token(5, 105), token(6, 106))
                await apublish(
                    admin, "resume", started(attempt=2), token(0, 100, 101, 102), token(3, 103, 104, 105, 106)
                )
                await apublish(admin, "resume", token(7, 107), done(*range(100, 108)))
                await asyncio.wait_for(reader, 20)
                return seen, killed
        finally:
            await admin.aclose()

    events, killed = run(main)
    assert killed >= 1
    assert token_indices(events) == list(range(8))
    assert [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids] == list(range(100, 108))
    assert isinstance(events[-1], DoneEvent) and sum(isinstance(e, DoneEvent) for e in events) == 1


async def kill_blocked_readers(admin: redis.asyncio.Redis) -> int:
    """CLIENT KILL every connection blocked in XREAD (waits until there is one)."""
    for _ in range(200):
        blocked = [c for c in await admin.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", "")]
        if blocked:
            for client in blocked:
                await admin.client_kill_filter(_id=client["id"])
            return len(blocked)
        await asyncio.sleep(0.01)
    return 0


def test_sync_reader_resumes_after_its_connection_is_killed(redis_url: str, r: redis.Redis, producer: Producer) -> None:
    publish(r, "sync-resume", started(), token(0, 1))
    handle = producer.attach(MODEL, "sync-resume")
    events = handle.events()
    assert isinstance(events, Generator)
    assert isinstance(next(events), StartedEvent) and isinstance(next(events), TokenEvent)
    clients: list[dict[str, str]] = r.client_list()  # type: ignore[assignment]
    for client in clients:  # kill the reader's (idle) pooled connection
        if client.get("cmd") == "xread":
            r.client_kill_filter(_id=client["id"])
    publish(r, "sync-resume", token(0, 1), token(1, 2), done(1, 2))
    rest = list(events)
    assert token_indices(rest) == [1] and isinstance(rest[-1], DoneEvent)


def test_reader_survives_a_redis_outage_longer_than_the_command_retries() -> None:
    # The outage outlasts the longest backoff of the per-command Retry against a refused
    # connection, so the reader's own reconnect loop has to carry it.
    outage_s = 0.5 + sum(
        min(COMMAND_BACKOFF_CAP_S, COMMAND_BACKOFF_BASE_S * 2**k) for k in range(1, COMMAND_RETRIES + 1)
    )

    def outage(server: EmbeddedRedis) -> None:
        server.stop()
        time.sleep(outage_s)
        server.start()  # same port and directory; AOF brings the stream back

    with EmbeddedRedis(appendonly=True) as server:

        async def main() -> list[Any]:
            admin = redis.asyncio.Redis.from_url(server.url)
            try:
                async with AsyncProducer(server.url) as producer:
                    handle = producer.attach(MODEL, "restart")
                    await apublish(admin, "restart", started(), token(0, 1))
                    reader = asyncio.create_task(collect(handle))
                    await asyncio.sleep(0.3)  # the reader consumed both and is blocked in XREAD
                    await asyncio.to_thread(outage, server)
                    await admin.connection_pool.disconnect()
                    await apublish(admin, "restart", token(1, 2), done(1, 2))
                    return await asyncio.wait_for(reader, 30)
            finally:
                await admin.aclose()

        events = run(main)
    assert token_indices(events) == [0, 1] and isinstance(events[-1], DoneEvent)


# -- cancel, attach, auth ----------------------------------------------------------------------


def test_cancel_adds_the_request_id_to_the_model_cancel_set(redis_url: str, r: redis.Redis, producer: Producer) -> None:
    serve(r)

    async def main() -> None:
        async with AsyncProducer(redis_url) as async_producer:
            handle = await async_producer.submit(MODEL, prompt="hi", request_id="stop-me")
            await handle.cancel()
            await handle.cancel()  # idempotent

    run(main)
    producer.submit(MODEL, prompt="hi", request_id="stop-me-too").cancel()
    cancel_key = f"lmx:{{m:{MODEL}}}:cancel"
    assert r.smembers(cancel_key) == {b"stop-me", b"stop-me-too"}
    ttl_s: int = r.ttl(cancel_key)  # type: ignore[assignment]
    assert 86000 < ttl_s <= 86400


def test_password_from_keyword_or_url() -> None:
    with EmbeddedRedis(requirepass="s3cret") as server:
        bare_url = f"redis://127.0.0.1:{server.port}/0"
        with Producer(bare_url, password="s3cret") as producer, pytest.raises(UnknownModelError):
            producer.submit(MODEL, prompt="hi")
        with Producer(server.url) as producer, pytest.raises(UnknownModelError):
            producer.submit(MODEL, prompt="hi")
        with Producer(bare_url) as producer, pytest.raises(redis.AuthenticationError):
            producer.submit(MODEL, prompt="hi")


def test_caller_supplied_client_is_used_and_left_open(redis_url: str, r: redis.Redis) -> None:
    serve(r)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with Producer(client=client) as producer:
            handle = producer.submit(MODEL, prompt="hi", request_id="own-client")
            publish(r, "own-client", token(0, 1), done(1))
            assert handle.result(timeout=10).token_ids == [1]
        assert client.ping()
    finally:
        client.close()


def test_sync_producer_full_round_trip(producer: Producer, r: redis.Redis) -> None:
    serve(r)
    handle = producer.submit(MODEL, prompt="hi", max_tokens=3, seed=1, request_id="sync-1")
    assert producer.submit(MODEL, prompt="hi", request_id="sync-1").duplicate
    assert r.xlen(req_key()) == 1
    publish(r, "sync-1", started(), token(0, 1), token(1, 2, 3), done(1, 2, 3))
    events = list(handle.events())
    assert [type(e) for e in events] == [StartedEvent, TokenEvent, TokenEvent, DoneEvent]
    assert handle.result(timeout=5).text == "<1><2><3>"
    assert isinstance(handle.terminal, DoneEvent) and not isinstance(handle.terminal, ErrorEvent)


def test_cancelling_a_waiting_task_propagates_and_the_handle_stays_usable(redis_url: str, r: redis.Redis) -> None:
    publish(r, "wait", started(), token(0, 1))

    async def main() -> list[int]:
        async with AsyncProducer(redis_url) as producer:
            handle = producer.attach(MODEL, "wait")
            waiter = asyncio.create_task(handle.result())
            await asyncio.sleep(0.3)  # blocked in XREAD after the first two events
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            publish(r, "wait", token(1, 2), done(1, 2))
            return (await handle.result(timeout=10)).token_ids

    assert run(main) == [1, 2]


def test_the_producer_acl_user_of_deploy_can_submit_in_every_priority_band(client: redis.Redis, redis_url: str) -> None:
    """deploy/redis/users.acl's `producer` user, loaded into the test's Redis, enqueues in all three
    bands and cancels; Redis logs no refused key or command (priority streams are `req:high` / `req:low`)."""
    line = next(ln for ln in (Path(__file__).parents[1] / "deploy/redis/users.acl").read_text().splitlines()
                if ln.startswith("user producer "))
    rules = [">producer-test-password" if r.startswith(">") else r for r in line.split()[2:]]
    client.execute_command("ACL", "SETUSER", "producer", *rules)
    client.execute_command("ACL", "LOG", "RESET")
    serve(client)
    host_port = redis_url.split("//", 1)[1]
    with Producer(f"redis://producer:producer-test-password@{host_port}") as producer:
        for priority in (1, 0, -1):
            handle = producer.submit(MODEL, prompt="hello", max_tokens=4, priority=priority)
            handle.cancel()
    assert [client.xlen(req_key(band=b)) for b in ("high", "normal", "low")] == [1, 1, 1]
    refused = [dict(zip(e[::2], e[1::2])) for e in client.execute_command("ACL", "LOG")]
    # Redis 6.2 lacks CLIENT SETINFO, which redis-py sends on connect (deploy/README.md, "ACL users").
    assert [e for e in refused if e[b"object"] != b"client"] == [], refused
