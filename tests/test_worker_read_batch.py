"""Batched reads: a consumer takes as many new entries per read as its read gate admits (the pick
script reads k entries in the order of k single picks), checks them in one pipeline, and starts
each exactly once, in priority order."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from producer_sdk.client import AsyncProducer
from producer_sdk.connection import make_async_client
from producer_sdk.keys import Keys
from producer_sdk.protocol import DoneEvent, StartedEvent, TokenEvent, decode_event
from tools.model_factory import make_model
from worker.consumer import _PICK_SCRIPT
from worker.runtime import Runtime
from worker.settings import load_settings

PREFIX = "rb"
KEYS = Keys(PREFIX)
WAIT_S = 120.0  # an upper bound for waits only; nothing asserts on time
_STARTED = re.compile(r"request (\S+) started from band")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("read-batch") / "tiny", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate=128, init_std=0.1, max_position_embeddings=128, seed=1)


def test_reading_k_entries_in_one_call_gives_the_order_of_k_single_picks(client: redis.Redis) -> None:
    streams = KEYS.req_streams("m")
    for stream in streams:
        for group in ("single", "batch"):
            client.xgroup_create(stream, group, id="0", mkstream=True)
    for i, band in enumerate(["low", "normal", "high", "low", "normal", "high", "normal", "low"]):
        client.xadd(KEYS.req("m", band), {"data": f"e{i}"})
    pick = client.register_script(_PICK_SCRIPT)
    aging_ms = 10**9  # ages do not matter: bands decide, FIFO within one
    single = []
    while (got := pick(keys=streams, args=["single", aging_ms, "c"])) != 0:
        single.append((got[0], got[1]))
    batch = pick(keys=streams, args=["batch", aging_ms, "c", 5]) + pick(keys=streams, args=["batch", aging_ms, "c", 5])
    assert [(b[0], b[1]) for b in batch] == single and len(single) == 8
    assert [b[2] for b in batch[:3]] == [[b"data", b"e2"], [b"data", b"e5"], [b"data", b"e1"]]
    assert pick(keys=streams, args=["batch", aging_ms, "c", 5]) == []  # nothing left: an empty list
    for stream in streams:  # each entry delivered once to each group
        groups: list[dict[str, Any]] = client.xinfo_groups(stream)  # type: ignore[assignment]
        assert all(g["pending"] == client.xlen(stream) for g in groups)


def test_a_burst_is_started_in_priority_order_each_request_once(redis_url: str, model: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """24 requests queued before the worker starts, max_running 8: reads of up to 8 entries."""
    caplog.set_level(logging.DEBUG, logger="layermux.worker.consumer")
    settings = load_settings(None, redis_url=redis_url, key_prefix=PREFIX, worker_id="w1", stats_interval_s=0.2,
                             priority_aging_s=1000.0, device={"budget": "8MiB", "n_threads": 1},
                             models=[{"name": "tiny", "path": str(model), "max_running": 8}])
    bands = {"high": 1, "normal": 0, "low": -1}
    names = [f"{band}{i}" for i in range(8) for band in ("low", "normal", "high")]  # interleaved arrival

    async def body() -> None:
        client = make_async_client(redis_url)
        producer = AsyncProducer(redis_url, prefix=PREFIX)
        runtime = Runtime(settings)
        try:
            await client.hset(KEYS.limits("tiny"), mapping={  # type: ignore[misc]
                "max_backlog": 1000, "max_tokens": 8192, "max_prompt_tokens": 127, "n_ctx": 128, "schema_version": 1})
            await client.sadd(KEYS.models(), "tiny")  # type: ignore[misc]
            for name in names:
                await producer.submit("tiny", prompt_ids=[5, 6], max_tokens=4, ignore_eos=True,
                                      priority=bands[name.rstrip("0123456789")], request_id=f"rb-{name}")
            await runtime.start()
            deadline = time.monotonic() + WAIT_S
            streams: dict[str, list[Any]] = {}
            for name in names:
                while True:
                    entries = await client.xrange(KEYS.events(f"rb-{name}"))
                    events = [decode_event(f[b"data"]) for _, f in entries]
                    if events and isinstance(events[-1], DoneEvent):
                        streams[name] = events
                        break
                    assert time.monotonic() < deadline, f"rb-{name} did not finish"
                    await asyncio.sleep(0.05)
        finally:
            await runtime.drain(timeout_s=10)
            await producer.aclose()
            await client.aclose()
        for name, events in streams.items():
            assert sum(isinstance(e, StartedEvent) for e in events) == 1, name
            assert [i for e in events if isinstance(e, TokenEvent) for i in range(e.index, e.index + len(e.token_ids))] \
                == [0, 1, 2, 3], name
        order = [m.group(1) for r in caplog.records if (m := _STARTED.search(r.getMessage()))]
        expected = [f"rb-{band}{i}" for band in ("high", "normal", "low") for i in range(8)]
        assert order == expected

    asyncio.run(body())
