"""The stream path of one worker, in-process, with the real engine on tiny random models and a real
Redis: denials with their numbers, undecodable entries, deadlines, cancellation, the exactly-once
view on resume, dead letters, and recovery of pending entries."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from engine import Engine, EngineConfig, SamplingParams
from engine.text import IncrementalDetokenizer, Tokenizer
from producer_sdk.client import AsyncProducer, build_request
from producer_sdk.connection import make_async_client
from producer_sdk.keys import CONSUMER_GROUP, Keys
from producer_sdk.protocol import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    StartedEvent,
    TokenEvent,
    decode_event,
    encode_event,
    encode_request,
)
from tools.model_factory import make_model
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

PREFIX = "t"
KEYS = Keys(PREFIX)
TERMINAL = (DoneEvent, ErrorEvent, CancelledEvent)
WAIT_S = 120.0  # an upper bound for waits only; nothing asserts on time


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker-models")
    common: dict[str, Any] = {"hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate": 128,
                              "init_std": 0.1}
    return {
        "tiny": make_model(root / "tiny", max_position_embeddings=128, seed=1, **common),
        "long": make_model(root / "long", max_position_embeddings=65536, seed=2, **common),
    }


def make_settings(url: str, models: dict[str, Path], **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "redis_url": url, "key_prefix": PREFIX, "worker_id": "test-worker", "stats_interval_s": 0.2,
        "cancel_poll_ms": 20, "device": {"budget": "8MiB", "n_threads": 2},
        "models": [{"name": name, "path": str(path), "max_tokens_limit": 8192 if name == "tiny" else 65536}
                   for name, path in models.items()],
    }
    fields.update(overrides)
    return load_settings(None, **fields)


Body = Callable[[Runtime, AsyncProducer, aioredis.Redis], Awaitable[None]]


async def serve(settings: Settings, body: Body, before_start: Body | None = None) -> None:
    client = make_async_client(settings.redis_url or "")
    producer = AsyncProducer(settings.redis_url or "", prefix=PREFIX)
    runtime = Runtime(settings)
    try:
        if before_start is not None:
            await before_start(runtime, producer, client)
        await runtime.start()
        await body(runtime, producer, client)
    finally:
        await runtime.drain(timeout_s=10)
        await producer.aclose()
        await client.aclose()


async def register_limits(client: aioredis.Redis, model: str) -> None:
    """What a worker writes at startup, so producers can enqueue before the test's worker starts."""
    await client.hset(KEYS.limits(model), mapping={"max_backlog": 1000, "max_tokens": 8192,
                                                  "max_prompt_tokens": 127, "n_ctx": 128, "schema_version": 1})
    await client.sadd(KEYS.models(), model)


async def events_until_terminal(client: aioredis.Redis, request_id: str) -> list[Any]:
    """Every event of the reply stream, read until a terminal one is there."""
    key, last, out = KEYS.events(request_id), "0", []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        reply = await client.xread({key: last}, count=1000, block=500)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id.decode()
                out.append(decode_event(fields[b"data"]))
        if out and isinstance(out[-1], TERMINAL):
            await asyncio.sleep(0.05)  # nothing may follow a terminal event: check below
            rest = await client.xrange(key, min="(" + last)
            assert rest == [], "events after the terminal event"
            return out
    raise AssertionError(f"no terminal event for {request_id}; got {out}")


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def backlog_empty(client: aioredis.Redis, model: str, band: str = "normal") -> bool:
    return await client.xlen(KEYS.req(model, band)) == 0


def reference_tokens(path: Path, prompt_ids: list[int], max_tokens: int, **params: Any) -> list[int]:
    eng = Engine(EngineConfig(budget_bytes=8 << 20, n_threads=2))
    try:
        eng.load_model("m", path)
        return eng.generate("m", prompt_ids, SamplingParams(max_tokens=max_tokens, **params))
    finally:
        eng.close()


def check_stream_shape(events: list[Any]) -> tuple[list[int], str]:
    """Started first, contiguous token indices, one terminal last; returns (ids, text) of the tokens."""
    assert isinstance(events[0], StartedEvent)
    assert sum(isinstance(e, TERMINAL) for e in events) == 1 and isinstance(events[-1], TERMINAL)
    ids: list[int] = []
    text = ""
    for e in events:
        if isinstance(e, TokenEvent):
            assert e.index == len(ids)
            ids.extend(e.token_ids)
            text += e.text
    return ids, text


# -- denials ---------------------------------------------------------------------------------------------


def test_each_denial_code_carries_its_numbers_and_the_entry_is_acked(redis_url: str, models: dict[str, Path]) -> None:
    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        cases: dict[str, Any] = {}
        h = await producer.submit("tiny", prompt_ids=[5] * 10, max_tokens=9000)
        cases["max_tokens_over_limit"] = (h, {"needed": 9000, "limit": 8192})
        h = await producer.submit("tiny", prompt_ids=[5] * 200, max_tokens=1)
        cases["prompt_too_long"] = (h, {"needed_tokens": 200, "limit_tokens": 128})
        h = await producer.submit("tiny", prompt_ids=[5] * 100, max_tokens=50)
        cases["prompt_too_long+max_tokens"] = (h, {"needed_tokens": 150, "limit_tokens": 128})
        h = await producer.submit("tiny", prompt_ids=[5, 100_000], max_tokens=4)
        cases["invalid_request"] = (h, {})
        h = await producer.submit("long", prompt_ids=[5] * 16, max_tokens=16000)
        ledger = rt.driver.ledger()
        fixed = sum(b["weights_bytes"] + b["workspace_bytes"] for b in ledger["models"].values())
        cases["kv_exceeds_budget"] = (h, {"needed_bytes": rt.driver.kv_bytes_for("long", 16016),
                                          "available_bytes": ledger["cap_bytes"] - fixed,
                                          "limit_bytes": ledger["cap_bytes"]})
        for case, (handle, numbers) in cases.items():
            events = await events_until_terminal(client, handle.request_id)
            assert len(events) == 1, case
            error = events[0]
            assert isinstance(error, ErrorEvent), case
            assert error.code == case.split("+")[0], (case, error)
            for key, value in numbers.items():
                assert error.details[key] == value, (case, key, error.details)
        assert cases["kv_exceeds_budget"][1]["needed_bytes"] > cases["kv_exceeds_budget"][1]["available_bytes"]
        await until(lambda: backlog_empty(client, "tiny"))
        await until(lambda: backlog_empty(client, "long"))
        assert await client.hlen(KEYS.ids("tiny")) == 0
        await rt.report_stats_once()
        stats = await client.hgetall(KEYS.stats("tiny"))
        assert stats[b"refused_prompt_too_long"] == b"2" and stats[b"refused_max_tokens_over_limit"] == b"1"
        assert stats[b"refused_invalid_request"] == b"1" and stats[b"admitted"] == b"0"

    asyncio.run(serve(make_settings(redis_url, models), body))


def test_undecodable_entries_are_refused_or_dead_lettered(redis_url: str, models: dict[str, Path]) -> None:
    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        stream = KEYS.req("tiny")
        good = orjson.loads(encode_request(build_request("tiny", prompt="hi", request_id="future")))
        await client.xadd(stream, {"data": orjson.dumps({**good, "v": 2})})
        await client.xadd(stream, {"data": orjson.dumps({**good, "request_id": "extra", "colour": "red"})})
        await client.xadd(stream, {"data": orjson.dumps({**good, "request_id": "other", "model": "long"})})
        garbage_id = (await client.xadd(stream, {"data": b"\xff not json"})).decode()
        future = await events_until_terminal(client, "future")
        assert isinstance(future[0], ErrorEvent) and future[0].code == "unsupported_version"
        extra = await events_until_terminal(client, "extra")
        assert isinstance(extra[0], ErrorEvent) and extra[0].code == "invalid_request"
        assert "colour" in extra[0].message
        other = await events_until_terminal(client, "other")
        assert isinstance(other[0], ErrorEvent) and other[0].code == "invalid_request"
        await until(lambda: backlog_empty(client, "tiny"))
        dlq = await client.xrange(KEYS.dlq("tiny"))
        assert [(f[b"data"], f[b"entry_id"].decode()) for _, f in dlq] == [(b"\xff not json", garbage_id)]
        assert b"invalid_request" in dlq[0][1][b"reason"]

    asyncio.run(serve(make_settings(redis_url, models), body))


def test_deadline_passed_while_queued_is_refused_with_the_lateness(redis_url: str, models: dict[str, Path]) -> None:
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        handles.append(await producer.submit("tiny", prompt="hello", max_tokens=4, deadline_s=0.001))
        await asyncio.sleep(0.01)  # the deadline is behind us before the worker exists

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, handles[0].request_id)
        assert len(events) == 1 and isinstance(events[0], ErrorEvent)
        assert events[0].code == "deadline_exceeded"
        assert events[0].details["late_ms"] > 0  # type: ignore[operator]

    asyncio.run(serve(make_settings(redis_url, models), body, before))


def test_deadline_passing_while_running_ends_the_request(redis_url: str, models: dict[str, Path]) -> None:
    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        h = await producer.submit("long", prompt="hello", max_tokens=60000, ignore_eos=True, deadline_s=0.5)
        events = await events_until_terminal(client, h.request_id)
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == "deadline_exceeded"
        await until(lambda: backlog_empty(client, "long"))
        assert rt.driver.running_count() == 0

    asyncio.run(serve(make_settings(redis_url, models, device={"budget": "64MiB", "n_threads": 2}), body))


# -- cancellation ------------------------------------------------------------------------------------


def test_cancel_asked_before_the_worker_reads_gives_cancelled_with_no_tokens(
    redis_url: str, models: dict[str, Path],
) -> None:
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        handles.append(await producer.submit("tiny", prompt="hello", max_tokens=4))
        await handles[0].cancel()

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, handles[0].request_id)
        assert events == [CancelledEvent(request_id=handles[0].request_id, completion_tokens=0)]
        await until(lambda: backlog_empty(client, "tiny"))
        await until(lambda: _not_member(client, "tiny", handles[0].request_id))

    asyncio.run(serve(make_settings(redis_url, models), body, before))


async def _not_member(client: aioredis.Redis, model: str, request_id: str) -> bool:
    return not await client.sismember(KEYS.cancel(model), request_id)


def test_cancel_while_running_stops_the_engine_request(redis_url: str, models: dict[str, Path]) -> None:
    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        h = await producer.submit("long", prompt="hello", max_tokens=60000, ignore_eos=True)
        async for event in h.events():
            if isinstance(event, TokenEvent):
                await h.cancel()
                break
        events = await events_until_terminal(client, h.request_id)
        ids, _ = check_stream_shape(events)
        cancelled = events[-1]
        assert isinstance(cancelled, CancelledEvent)
        assert 0 < cancelled.completion_tokens < 60000
        assert len(ids) <= cancelled.completion_tokens
        await until(lambda: backlog_empty(client, "long"))
        await until(lambda: _not_member(client, "long", h.request_id))

    asyncio.run(serve(make_settings(redis_url, models, device={"budget": "64MiB", "n_threads": 2}), body))


# -- results, stop strings, resume --------------------------------------------------------------------


def test_greedy_results_match_the_engine_and_tokens_concatenate_to_the_text(
    redis_url: str, models: dict[str, Path],
) -> None:
    tok = Tokenizer.from_model_dir(models["tiny"])
    prompts = ["hello", "The quick brown fox", "a b c d e f"]
    refs = [reference_tokens(models["tiny"], tok.encode(p), 24, temperature=0.0) for p in prompts]

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        handles = [await producer.submit("tiny", prompt=p, max_tokens=24, temperature=0.0) for p in prompts]
        for h, ref in zip(handles, refs):
            events = await events_until_terminal(client, h.request_id)
            ids, text = check_stream_shape(events)
            done = events[-1]
            assert isinstance(done, DoneEvent)
            assert done.token_ids == ref == ids
            assert done.text == text == tok.decode(ref)
            assert done.usage.completion_tokens == len(ref)
            assert events[0].attempt == 1  # type: ignore[union-attr]

    asyncio.run(serve(make_settings(redis_url, models), body))


def test_stop_string_cuts_the_text_and_cancels_the_engine_request(redis_url: str, models: dict[str, Path]) -> None:
    tok = Tokenizer.from_model_dir(models["long"])
    prompt_ids = tok.encode("The quick brown fox")
    ref = reference_tokens(models["long"], prompt_ids, 200, temperature=0.0, ignore_eos=True)
    full = tok.decode(ref)
    stop = full[40:43]  # some three characters of the greedy text
    assert len(stop) == 3
    cut = full.index(stop)

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        h = await producer.submit("long", prompt_ids=prompt_ids, max_tokens=200, temperature=0.0,
                                  ignore_eos=True, stop=["never-appears", stop])
        events = await events_until_terminal(client, h.request_id)
        ids, text = check_stream_shape(events)
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.finish_reason == "stop_string"
        assert done.text == text == full[:cut]
        assert done.token_ids == ids == ref[: len(ids)]
        assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
        await until(lambda: backlog_empty(client, "long"))
        assert rt.driver.running_count() == 0

    asyncio.run(serve(make_settings(redis_url, models), body))


def test_resume_publishes_only_what_the_reply_stream_lacks(redis_url: str, models: dict[str, Path]) -> None:
    """What a worker taking over a crashed one does: attempt 2, tokens from next_index on."""
    tok = Tokenizer.from_model_dir(models["tiny"])
    prompt_ids = tok.encode("hello world")
    ref = reference_tokens(models["tiny"], prompt_ids, 20, temperature=0.0, ignore_eos=True, seed=7)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    first_text = "".join(detok.push(t) for t in ref[:6])
    rid = "resume-me"

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        for ev in (StartedEvent(request_id=rid, worker="dead", attempt=1, prompt_tokens=len(prompt_ids)),
                   TokenEvent(request_id=rid, index=0, token_ids=ref[:4], text=first_text[:3]),
                   TokenEvent(request_id=rid, index=4, token_ids=ref[4:6], text=first_text[3:])):
            await client.xadd(KEYS.events(rid), {"data": encode_event(ev)})
        await producer.submit("tiny", prompt_ids=prompt_ids, max_tokens=20, temperature=0.0, ignore_eos=True,
                              seed=7, request_id=rid)

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, rid)
        assert [e.attempt for e in events if isinstance(e, StartedEvent)] == [1, 2]
        assert isinstance(events[3], StartedEvent)
        new_tokens = [e for e in events[4:] if isinstance(e, TokenEvent)]
        assert new_tokens[0].index == 6
        ids, text = check_stream_shape(events)
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert done.token_ids == ids == ref
        assert done.text == text == tok.decode(ref)

    asyncio.run(serve(make_settings(redis_url, models), body, before))


def test_entry_whose_reply_stream_already_ended_is_only_acked(redis_url: str, models: dict[str, Path]) -> None:
    rid = "finished-before"

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        await client.xadd(KEYS.events(rid), {"data": encode_event(
            CancelledEvent(request_id=rid, completion_tokens=3))})
        await producer.submit("tiny", prompt="hi", max_tokens=4, request_id=rid)

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await until(lambda: backlog_empty(client, "tiny"))
        assert await client.xlen(KEYS.events(rid)) == 1
        assert rt.metrics["tiny"].admitted == 0

    asyncio.run(serve(make_settings(redis_url, models), body, before))


# -- pending entries: dead workers, own restarts, dead letters ---------------------------------------


async def _deliver_to_ghost(client: aioredis.Redis, model: str, times: int) -> None:
    stream = KEYS.req(model)
    await client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    reply = await client.xreadgroup(CONSUMER_GROUP, "ghost", {stream: ">"}, count=10)
    ids = [entry_id for _s, entries in reply for entry_id, _f in entries]
    for _ in range(times - 1):
        await client.xclaim(stream, CONSUMER_GROUP, "ghost", min_idle_time=0, message_ids=ids)


def test_idle_entry_of_a_dead_worker_is_claimed_and_completed(redis_url: str, models: dict[str, Path]) -> None:
    tok = Tokenizer.from_model_dir(models["tiny"])
    ref = reference_tokens(models["tiny"], tok.encode("ghost"), 12, temperature=0.0)
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        handles.append(await producer.submit("tiny", prompt="ghost", max_tokens=12, temperature=0.0))
        await _deliver_to_ghost(client, "tiny", times=1)

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, handles[0].request_id)
        ids, _ = check_stream_shape(events)
        assert ids == ref and events[-1].token_ids == ref  # type: ignore[union-attr]
        await until(lambda: backlog_empty(client, "tiny"))

    asyncio.run(serve(make_settings(redis_url, models, lease_idle_ms=200), body, before))


def test_entry_delivered_too_often_is_dead_lettered(redis_url: str, models: dict[str, Path]) -> None:
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        handles.append(await producer.submit("tiny", prompt="poison", max_tokens=4))
        await _deliver_to_ghost(client, "tiny", times=3)  # the worker's claim is delivery 4 > 2

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, handles[0].request_id)
        assert len(events) == 1 and isinstance(events[0], ErrorEvent)
        assert events[0].code == "dead_letter"
        assert events[0].details == {"deliveries": 4, "limit": 2}
        await until(lambda: backlog_empty(client, "tiny"))
        dlq = await client.xrange(KEYS.dlq("tiny"))
        assert len(dlq) == 1 and dlq[0][1][b"deliveries"] == b"4"
        assert orjson.loads(dlq[0][1][b"data"])["request_id"] == handles[0].request_id

    asyncio.run(serve(make_settings(redis_url, models, lease_idle_ms=100, max_deliveries=2), body, before))


def test_own_pending_entries_are_recovered_at_start(redis_url: str, models: dict[str, Path]) -> None:
    """A worker restarted with the same worker_id takes back what it had read, without waiting for
    the lease to lapse (lease_idle_ms is long here)."""
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        handles.append(await producer.submit("tiny", prompt="mine", max_tokens=6))
        stream = KEYS.req("tiny")
        await client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        await client.xreadgroup(CONSUMER_GROUP, "test-worker", {stream: ">"}, count=10)

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, handles[0].request_id)
        check_stream_shape(events)
        assert isinstance(events[-1], DoneEvent)
        await until(lambda: backlog_empty(client, "tiny"))

    asyncio.run(serve(make_settings(redis_url, models, lease_idle_ms=600_000), body, before))


# -- priority ---------------------------------------------------------------------------------------


_STARTED = re.compile(r"request (\S+) started from band")


def start_order(caplog: pytest.LogCaptureFixture, handles: list[Any]) -> list[str]:
    """Request ids in the order the consumer started them (its debug line, logged in the loop tick of
    the engine submit). Reply-stream ids are server milliseconds: requests this small start within
    one millisecond, so their ids cannot order them."""
    ours = {h.request_id for h in handles}
    return [m.group(1) for r in caplog.records if (m := _STARTED.search(r.getMessage())) and m.group(1) in ours]


def _one_at_a_time(url: str, models: dict[str, Path], aging_s: float) -> Settings:
    settings = make_settings(url, {"tiny": models["tiny"]}, priority_aging_s=aging_s)
    fields = settings.model_dump()
    fields["models"][0]["max_running"] = 1
    return load_settings(None, **fields)


def test_higher_priority_bands_are_read_first(redis_url: str, models: dict[str, Path],
                                             caplog: pytest.LogCaptureFixture) -> None:
    """max_running 1 makes the read order the start order; aging is slow enough not to matter."""
    caplog.set_level(logging.DEBUG, logger="layermux.worker.consumer")
    handles: dict[str, Any] = {}

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        for name, priority in [("low1", -5), ("norm1", 0), ("high1", 1), ("low2", -100), ("norm2", 0),
                               ("high2", 100)]:
            handles[name] = await producer.submit("tiny", prompt_ids=[5, 6], max_tokens=2, priority=priority,
                                                  request_id=f"prio-{name}")

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        for h in handles.values():
            assert isinstance((await events_until_terminal(client, h.request_id))[-1], DoneEvent)
        order = start_order(caplog, list(handles.values()))
        assert order == [f"prio-{n}" for n in ["high1", "high2", "norm1", "norm2", "low1", "low2"]]
        for band in ("high", "normal", "low"):
            assert await client.xlen(KEYS.req("tiny", band)) == 0

    asyncio.run(serve(_one_at_a_time(redis_url, models, aging_s=1000.0), body, before))


def test_aging_lets_a_long_waiting_low_priority_request_go_before_newer_high_ones(
    redis_url: str, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Waiting priority_aging_s is worth one band: low requests queued more than 2 x aging before the
    high ones (two bands apart) are read first. The gap is fixed by the enqueue times alone."""
    caplog.set_level(logging.DEBUG, logger="layermux.worker.consumer")
    aging_s = 0.1
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        for i in range(2):
            handles.append(await producer.submit("tiny", prompt_ids=[5], max_tokens=2, priority=-1,
                                                 request_id=f"old-low{i}"))
        await asyncio.sleep(4 * aging_s)
        for i in range(2):
            handles.append(await producer.submit("tiny", prompt_ids=[5], max_tokens=2, priority=1,
                                                 request_id=f"new-high{i}"))

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        for h in handles:
            await events_until_terminal(client, h.request_id)
        assert start_order(caplog, handles) == ["old-low0", "old-low1", "new-high0", "new-high1"]

    asyncio.run(serve(_one_at_a_time(redis_url, models, aging_s=aging_s), body, before))


def test_idle_entry_of_the_high_band_is_claimed_from_a_dead_worker(redis_url: str, models: dict[str, Path]) -> None:
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        handles.append(await producer.submit("tiny", prompt_ids=[7, 8], max_tokens=3, priority=9))
        stream = KEYS.req("tiny", "high")
        await client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        await client.xreadgroup(CONSUMER_GROUP, "ghost", {stream: ">"}, count=10)

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        events = await events_until_terminal(client, handles[0].request_id)
        check_stream_shape(events)
        assert isinstance(events[-1], DoneEvent)
        await until(lambda: backlog_empty(client, "tiny", "high"))

    asyncio.run(serve(make_settings(redis_url, models, lease_idle_ms=200), body, before))


def test_consumers_of_gone_workers_are_removed_only_when_nothing_is_pending(
    redis_url: str, models: dict[str, Path]
) -> None:
    """XGROUP DELCONSUMER housekeeping: an idle consumer with nothing pending goes; one that still
    owns a pending entry stays (removing it would drop the entry from the pending list)."""
    handles: list[Any] = []

    async def before(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await register_limits(client, "tiny")
        stream = KEYS.req("tiny")
        await client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
        await client.xgroup_createconsumer(stream, CONSUMER_GROUP, "ghost-idle")
        handles.append(await producer.submit("tiny", prompt_ids=[5], max_tokens=2))
        await client.xreadgroup(CONSUMER_GROUP, "ghost-pending", {stream: ">"}, count=1)  # owns the entry

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        await asyncio.sleep(0.5)
        removed = await rt.consumers["tiny"].prune_consumers()
        assert removed == ["ghost-idle"]
        names = {c["name"].decode() for c in await client.xinfo_consumers(KEYS.req("tiny"), CONSUMER_GROUP)}
        assert "ghost-pending" in names and "ghost-idle" not in names
        assert (await client.xpending(KEYS.req("tiny"), CONSUMER_GROUP))["pending"] == 1

    # consumer_expiry_s far above the test's 0.5 s keeps the stats loop from pruning on its own;
    # the long lease keeps the ghost's entry pending (never claimed) during the test.
    settings = make_settings(redis_url, models, consumer_expiry_s=0.3, lease_idle_ms=600_000,
                             stats_interval_s=100.0)
    asyncio.run(serve(settings, body, before))


def test_registration_limits_and_worker_status(redis_url: str, models: dict[str, Path]) -> None:
    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        limits = await client.hgetall(KEYS.limits("tiny"))
        assert limits == {b"max_backlog": b"1000", b"max_tokens": b"8192", b"max_prompt_tokens": b"127",
                          b"n_ctx": b"128", b"schema_version": b"1"}
        assert await client.smembers(KEYS.models()) == {b"tiny", b"long"}
        await rt.report_stats_once()
        doc = orjson.loads(await client.hget(KEYS.workers(), "test-worker"))
        assert doc["worker_id"] == "test-worker" and set(doc["models"]) == {"tiny", "long"}
        assert doc["ledger"]["cap_bytes"] == rt.driver.ledger()["cap_bytes"]
        stats = await client.hgetall(KEYS.stats("long"))
        assert stats[b"worker"] == b"test-worker" and stats[b"backlog"] == b"0"

    asyncio.run(serve(make_settings(redis_url, models), body))


def test_metrics_endpoint_serves_prometheus_text(redis_url: str, models: dict[str, Path]) -> None:
    async def get(port: int, path: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()
            await writer.wait_closed()

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        h = await producer.submit("tiny", prompt="count me", max_tokens=5, temperature=0.0, ignore_eos=True)
        await h.result(timeout=WAIT_S)
        await producer.submit("tiny", prompt="x", max_tokens=9000)
        await until(lambda: backlog_empty(client, "tiny"))
        await rt.report_stats_once()
        assert rt.metrics_port is not None
        text = await get(rt.metrics_port, "/metrics")
        head, _, exposition = text.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200 OK") and "text/plain; version=0.0.4" in head
        from prometheus_client.parser import text_string_to_metric_families

        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(exposition) for s in f.samples}

        def value(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted({"worker": "test-worker", **labels}.items())))]

        assert value("layermux_done_total", model="tiny") == 1
        assert value("layermux_tokens_generated_total", model="tiny") == 5
        assert value("layermux_refused_total", model="tiny", code="max_tokens_over_limit") == 1
        assert value("layermux_queue_wait_seconds_count", model="tiny") == 1
        assert value("layermux_queue_wait_seconds_bucket", model="tiny", le="+Inf") == 1
        assert value("layermux:time_to_first_token_seconds_count", model="tiny") == 1
        assert value("layermux:time_per_output_token_seconds_count", model="tiny") == 1
        assert value("layermux_backlog", model="tiny") == 0
        assert value("layermux_ledger_bytes", kind="cap") == rt.driver.ledger()["cap_bytes"]
        assert (await get(rt.metrics_port, "/nope")).startswith("HTTP/1.1 404")

    settings = make_settings(redis_url, models, metrics_port=0, metrics_host="127.0.0.1")
    asyncio.run(serve(settings, body))


def test_supervisor_restarts_a_crashed_task(redis_url: str, models: dict[str, Path]) -> None:
    calls: list[int] = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("boom")

    async def body(rt: Runtime, producer: AsyncProducer, client: aioredis.Redis) -> None:
        rt._supervise("flaky", flaky)

        async def restarted_twice() -> bool:
            return len(calls) == 3

        await until(restarted_twice)
        assert "flaky" not in rt.task_names()  # a clean return ends supervision
        assert "publisher" in rt.task_names() and "consumer:tiny" in rt.task_names()

    asyncio.run(serve(make_settings(redis_url, models), body))
