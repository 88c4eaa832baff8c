"""The reply publisher against a real Redis: order, coalescing, ack after the terminal event, the
one-terminal guard, replay idempotence, dead letters, and a Redis outage that loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from producer_sdk.connection import make_async_client
from producer_sdk.keys import CONSUMER_GROUP, Keys
from producer_sdk.protocol import (
    DoneEvent,
    ErrorEvent,
    StartedEvent,
    TokenEvent,
    Usage,
    decode_event,
)
from tools.embedded_redis import EmbeddedRedis
from worker.publisher import _APPEND_SCRIPT, AckEntry, DeadLetter, Publisher, owner_key, read_reply_state

KEYS = Keys("t")
USAGE = Usage(prompt_tokens=3, completion_tokens=0, queue_ms=0.0, prefill_ms=0.0, decode_ms=0.0, total_ms=0.0)

Body = Callable[[Publisher, aioredis.Redis], Awaitable[None]]


async def _with_publisher(url: str, body: Body, *, start: bool = True, sdk_retry: bool = True) -> Publisher:
    # sdk_retry=False: a plain client with no command retries, so the publisher's own loop retries.
    client = make_async_client(url) if sdk_retry else aioredis.Redis.from_url(url)
    pub = Publisher(client, KEYS, reply_ttl_s=600)
    task = asyncio.create_task(pub.run()) if start else None
    try:
        await body(pub, client)
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.aclose()
    return pub


async def _events(client: aioredis.Redis, request_id: str) -> list[object]:
    return [decode_event(f[b"data"]) for _, f in await client.xrange(KEYS.events(request_id))]


async def _enqueue_entry(client: aioredis.Redis, model: str, request_id: str) -> str:
    """A request entry delivered to consumer 'w' (pending), as a worker would hold it."""
    stream = KEYS.req(model)
    with contextlib.suppress(Exception):
        await client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry_id = (await client.xadd(stream, {"data": b"{}"})).decode()
    await client.hset(KEYS.ids(model), request_id, entry_id)
    await client.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=100)
    return entry_id


async def _start_run_a1(a: Publisher, client: aioredis.Redis, request_id: str) -> str:
    """Run A#1 of a request queued on model "m": fence taken, started, tokens 0-1 ("ab")
    written. Returns the request's entry id."""
    entry_id = await _enqueue_entry(client, "m", request_id)
    await a.take_fence(request_id, "A#1")
    a.set_fence(request_id, "A#1")
    a.publish(StartedEvent(request_id=request_id, worker="A", attempt=1, prompt_tokens=1))
    a.publish_tokens(request_id, 0, [1, 2], "ab")
    assert await a.flush(60)
    return entry_id


def done(request_id: str, ids: list[int], text: str) -> DoneEvent:
    return DoneEvent(request_id=request_id, finish_reason="length", text=text, token_ids=ids, usage=USAGE)


def test_tokens_queued_together_become_one_event_and_the_entry_is_acked_after_done(redis_url: str) -> None:
    async def body(pub: Publisher, client: aioredis.Redis) -> None:
        entry_id = await _enqueue_entry(client, "m", "r1")
        pub.publish(StartedEvent(request_id="r1", worker="w", attempt=1, prompt_tokens=3))
        for i in range(10):
            pub.publish_tokens("r1", i, [100 + i], f"<{i}>")
        pub.publish(done("r1", [100 + i for i in range(10)], "".join(f"<{i}>" for i in range(10))),
                    ack=AckEntry("m", entry_id, "r1"))
        task = asyncio.create_task(pub.run())
        try:
            assert await pub.flush(60)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        events = await _events(client, "r1")
        assert [type(e).__name__ for e in events] == ["StartedEvent", "TokenEvent", "DoneEvent"]
        token = events[1]
        assert isinstance(token, TokenEvent)
        assert token.index == 0 and token.token_ids == [100 + i for i in range(10)]
        assert token.text == "".join(f"<{i}>" for i in range(10))
        assert pub.stats.tokens_coalesced == 9
        # Acked, deleted, and the idempotence field gone: the backlog is empty.
        assert await client.xlen(KEYS.req("m")) == 0
        assert (await client.xpending(KEYS.req("m"), CONSUMER_GROUP))["pending"] == 0
        assert await client.hget(KEYS.ids("m"), "r1") is None
        assert 0 < await client.ttl(KEYS.events("r1")) <= 600

    asyncio.run(_with_publisher(redis_url, body, start=False))


def test_many_requests_stay_ordered_and_contiguous_while_the_writer_runs(redis_url: str) -> None:
    n_requests, n_tokens = 20, 50

    async def body(pub: Publisher, client: aioredis.Redis) -> None:
        for r in range(n_requests):
            pub.publish(StartedEvent(request_id=f"q{r}", worker="w", attempt=1, prompt_tokens=1))
        for i in range(n_tokens):
            for r in range(n_requests):
                pub.publish_tokens(f"q{r}", i, [i], chr(ord("a") + i % 26))
            await asyncio.sleep(0)  # let the writer take partial rounds
        for r in range(n_requests):
            pub.publish(done(f"q{r}", list(range(n_tokens)), ""))
        assert await pub.flush(60)
        for r in range(n_requests):
            events = await _events(client, f"q{r}")
            assert isinstance(events[0], StartedEvent) and isinstance(events[-1], DoneEvent)
            tokens = [e for e in events[1:-1] if isinstance(e, TokenEvent)]
            assert len(tokens) == len(events) - 2
            expected = 0
            for e in tokens:
                assert e.index == expected
                expected += len(e.token_ids)
            assert [t for e in tokens for t in e.token_ids] == list(range(n_tokens))
            assert "".join(e.text for e in tokens) == "".join(chr(ord("a") + i % 26) for i in range(n_tokens))

    asyncio.run(_with_publisher(redis_url, body))


def test_a_stream_that_ended_takes_no_second_terminal_or_more_tokens(redis_url: str) -> None:
    async def body(pub: Publisher, client: aioredis.Redis) -> None:
        pub.publish(done("r2", [1], "x"))
        assert await pub.flush(60)
        # A second worker that raced on the same request:
        pub.publish_tokens("r2", 0, [1], "x")
        pub.publish(ErrorEvent(request_id="r2", code="worker_failure", message="late"))
        assert await pub.flush(60)
        events = await _events(client, "r2")
        assert len(events) == 1 and isinstance(events[0], DoneEvent)

    asyncio.run(_with_publisher(redis_url, body))


def test_a_replayed_round_is_written_once(redis_url: str) -> None:
    async def main() -> None:
        client = make_async_client(redis_url)
        try:
            script = client.register_script(_APPEND_SCRIPT)
            payloads = [b'{"v":1,"type":"token","request_id":"r3","index":0,"token_ids":[5],"text":"a"}',
                        b'{"v":1,"type":"token","request_id":"r3","index":1,"token_ids":[6],"text":"b"}']
            keys = [KEYS.events("r3"), owner_key(KEYS, "r3")]
            assert await script(keys=keys, args=[60, "", *payloads]) == 2
            assert await script(keys=keys, args=[60, "", *payloads]) == 0
            assert await client.xlen(KEYS.events("r3")) == 2
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_terminal_tail_is_recognised_whatever_the_order_of_its_fields(redis_url: str) -> None:
    """The append script reads the type off the tail's first bytes when it is written {"v":1,"type":..}
    and decodes the event otherwise; a token whose text quotes a terminal type is not one."""
    async def main() -> None:
        client = make_async_client(redis_url)
        try:
            script = client.register_script(_APPEND_SCRIPT)
            token = b'{"v":1,"type":"token","request_id":"r9","index":1,"token_ids":[6],"text":"b"}'
            tails = {b'{"v":1,"type":"done","request_id":"r9"}': -1,
                     b'{"request_id":"r9","type":"error","v":1}': -1,
                     b'{"type":"cancelled","v":1}': -1,
                     b'{"v":1,"type":"token","request_id":"r9","index":0,"token_ids":[5],'
                     b'"text":"{\\"v\\":1,\\"type\\":\\"done\\"}"}': 1}
            for i, (tail, expected) in enumerate(tails.items()):
                keys = [KEYS.events(f"r9-{i}"), owner_key(KEYS, f"r9-{i}")]
                await client.xadd(keys[0], {"data": tail})
                assert await script(keys=keys, args=[60, "", token]) == expected, tail
        finally:
            await client.aclose()

    asyncio.run(main())


def test_dead_letter_moves_the_payload_once(redis_url: str) -> None:
    async def body(pub: Publisher, client: aioredis.Redis) -> None:
        entry_id = await _enqueue_entry(client, "m", "r4")
        ack = AckEntry("m", entry_id, "r4", DeadLetter(b"raw-bytes", "delivered 6 times", 6))
        pub.publish(ErrorEvent(request_id="r4", code="dead_letter", message="x"), ack=ack)
        assert await pub.flush(60)
        pub.ack(ack)  # a replay (e.g. after a lost reply) must not add a second dead letter
        assert await pub.flush(60)
        dlq = await client.xrange(KEYS.dlq("m"))
        assert len(dlq) == 1
        fields = dlq[0][1]
        assert fields == {b"data": b"raw-bytes", b"reason": b"delivered 6 times", b"deliveries": b"6",
                          b"entry_id": entry_id.encode()}
        assert await client.xlen(KEYS.req("m")) == 0

    asyncio.run(_with_publisher(redis_url, body))


def test_reply_state_gives_the_resume_point(redis_url: str) -> None:
    async def body(pub: Publisher, client: aioredis.Redis) -> None:
        state = await read_reply_state(client, KEYS, "r5")
        assert (state.terminal, state.n_started, state.next_index, state.text_chars) == (False, 0, 0, 0)
        pub.publish(StartedEvent(request_id="r5", worker="w", attempt=1, prompt_tokens=1))
        pub.publish_tokens("r5", 0, [1, 2], "ab")
        assert await pub.flush(60)
        pub.publish_tokens("r5", 2, [3], "cé")
        pub.publish(StartedEvent(request_id="r5", worker="w2", attempt=2, prompt_tokens=1))
        pub.publish_tokens("r5", 0, [1, 2, 3], "abcé")  # the taker-over's duplicate, dropped by the rule
        assert await pub.flush(60)
        state = await read_reply_state(client, KEYS, "r5")
        assert (state.terminal, state.n_started, state.next_index, state.text_chars) == (False, 2, 3, 4)
        pub.publish(done("r5", [1, 2, 3], "abcé"))
        assert await pub.flush(60)
        assert (await read_reply_state(client, KEYS, "r5")).terminal

    asyncio.run(_with_publisher(redis_url, body))


def test_events_published_while_redis_is_down_are_written_in_order_when_it_returns(
    redis_server: EmbeddedRedis, redis_url: str,
) -> None:
    async def body(pub: Publisher, client: aioredis.Redis) -> None:
        pub.publish(StartedEvent(request_id="r6", worker="w", attempt=1, prompt_tokens=1))
        assert await pub.flush(60)
        redis_server.stop()
        try:
            for i in range(30):
                pub.publish_tokens("r6", i, [i], str(i % 10))
                await asyncio.sleep(0.01)
            pub.publish(done("r6", list(range(30)), "".join(str(i % 10) for i in range(30))))
            assert not await pub.flush(0.5)  # nothing can be written yet
        finally:
            redis_server.start()  # same port; the data set restarts empty (no persistence)
        assert await pub.flush(120)
        events = await _events(client, "r6")
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [t for e in tokens for t in e.token_ids] == list(range(30))
        assert isinstance(events[-1], DoneEvent)
        assert pub.stats.retries >= 1

    asyncio.run(_with_publisher(redis_url, body, sdk_retry=False))


def test_a_stopped_runs_queued_events_never_take_the_token_of_the_run_that_took_over(redis_url: str) -> None:
    """The same worker stops a run (its lease was lost) and starts the request again before the
    stopped run's last queued tokens are written: those go out under the old token and are refused,
    the new run is not stopped, and the reply stream has no overlapping indices."""
    fenced: list[str] = []

    async def body(a: Publisher, client: aioredis.Redis) -> None:
        a.on_fenced = fenced.append
        entry_id = await _start_run_a1(a, client, "r9")
        await a.take_fence("r9", "A#2")  # the new run's fence, taken before it reads where to resume
        # One loop tick, no await: the stopped run's late token, its stop, the new run's start.
        a.publish_tokens("r9", 2, [3], "c")
        a.release_fence("r9")
        a.set_fence("r9", "A#2")
        a.publish(StartedEvent(request_id="r9", worker="A", attempt=2, prompt_tokens=1))
        a.publish_tokens("r9", 2, [3, 4], "cd")
        a.publish(done("r9", [1, 2, 3, 4], "abcd"), ack=AckEntry("m", entry_id, "r9"))
        assert await a.flush(60)
        assert fenced == [] and a.stats.fenced == 1
        events = await _events(client, "r9")
        assert [(type(e).__name__, getattr(e, "index", None)) for e in events] == [
            ("StartedEvent", None), ("TokenEvent", 0), ("StartedEvent", None), ("TokenEvent", 2), ("DoneEvent", None)]
        assert await client.xlen(KEYS.req("m")) == 0  # the new run acked

    asyncio.run(_with_publisher(redis_url, body))


def test_a_run_that_lost_its_fence_can_no_longer_write_and_does_not_ack(redis_url: str) -> None:
    """Worker A runs a request; worker B takes it over (takes the fence) and resumes; A's later
    tokens and terminal are refused, A is told to stop, and only B's events follow."""
    fenced: list[str] = []

    async def body(a: Publisher, client: aioredis.Redis) -> None:
        a.on_fenced = fenced.append
        entry_id = await _start_run_a1(a, client, "r7")
        b = Publisher(client, KEYS, reply_ttl_s=600)
        b_task = asyncio.create_task(b.run())
        try:
            await b.take_fence("r7", "B#1")
            state = await read_reply_state(client, KEYS, "r7")
            assert (state.next_index, state.text_chars, state.n_started) == (2, 2, 1)
            a.publish_tokens("r7", 2, [3], "c")  # A does not know yet
            a.publish(done("r7", [1, 2, 3], "abc"), ack=AckEntry("m", entry_id, "r7"))
            assert await a.flush(60)
            assert fenced == ["r7"] and a.stats.fenced == 1
            assert await client.xlen(KEYS.req("m")) == 1  # A did not ack
            b.set_fence("r7", "B#1")
            b.publish(StartedEvent(request_id="r7", worker="B", attempt=2, prompt_tokens=1))
            b.publish_tokens("r7", 2, [3, 4], "cd")
            b.publish(done("r7", [1, 2, 3, 4], "abcd"), ack=AckEntry("m", entry_id, "r7"))
            assert await b.flush(60)
        finally:
            b_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await b_task
        events = await _events(client, "r7")
        assert [(type(e).__name__, getattr(e, "index", None)) for e in events] == [
            ("StartedEvent", None), ("TokenEvent", 0), ("StartedEvent", None), ("TokenEvent", 2), ("DoneEvent", None)]
        assert await client.xlen(KEYS.req("m")) == 0  # B acked

    asyncio.run(_with_publisher(redis_url, body))
