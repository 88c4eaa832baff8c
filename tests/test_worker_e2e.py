"""End to end: real worker processes (`worker.arq_app.run(cfg)`), real Redis, producers through the
SDK (in this process and in four producer processes), tiny random models of three variants.
Checks the guarantees: every request ends with exactly one terminal event, token indices are
contiguous, greedy results equal Engine.generate, cancellation, the arq job path, graceful
drain on SIGTERM, and takeover after a worker is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from engine import Engine, EngineConfig, SamplingParams
from engine.text import Tokenizer
from producer_sdk.client import AsyncProducer
from producer_sdk.keys import Keys
from producer_sdk.protocol import CancelledEvent, DoneEvent, ErrorEvent, StartedEvent, TokenEvent, decode_event
from tools.model_factory import make_model

REPO = Path(__file__).resolve().parents[1]
PREFIX = "e2e"
KEYS = Keys(PREFIX)
TERMINAL = (DoneEvent, ErrorEvent, CancelledEvent)
WAIT_S = 180.0  # upper bound of waits only; nothing asserts on time

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "m-llama": {"arch": "llama", "tie_embeddings": True, "seed": 11},
    "m-qwen": {"arch": "qwen2", "tie_embeddings": True, "n_kv_heads": 1, "seed": 12},
    "m-llama3": {"arch": "llama", "tie_embeddings": False, "seed": 13,
                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e-models")
    out = {}
    for name, shape in MODEL_SHAPES.items():
        params: dict[str, Any] = {"hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate": 128,
                                  "init_std": 0.1, "max_position_embeddings": 8192}
        params.update(shape)
        out[name] = make_model(root / name, **params)
    return out


class Reference:
    """Engine.generate in this process: the numerical truth the worker's results must equal."""

    def __init__(self, models: dict[str, Path]) -> None:
        self.eng = Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2))
        self.tok = {}
        for name, path in models.items():
            self.eng.load_model(name, path)
            self.tok[name] = Tokenizer.from_model_dir(path)

    def greedy(self, model: str, prompt: str, max_tokens: int, **params: Any) -> list[int]:
        ids = self.tok[model].encode(prompt)
        return self.eng.generate(model, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, **params))


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> Iterator[Reference]:
    ref = Reference(models)
    yield ref
    ref.eng.close()


def write_config(path: Path, url: str, models: dict[str, Path], worker_id: str, **extra: Any) -> Path:
    lines = [f'redis_url = "{url}"', f'key_prefix = "{PREFIX}"', f'worker_id = "{worker_id}"',
             "stats_interval_s = 0.2", "cancel_poll_ms = 50"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["[device]", 'budget = "64MiB"', "n_threads = 2"]
    for name, model_path in models.items():
        lines += ["[[models]]", f'name = "{name}"', f'path = "{model_path}"', "max_tokens_limit = 8192"]
    path.write_text("\n".join(lines) + "\n")
    return path


class WorkerProcess:
    def __init__(self, config: Path, log: Path, worker_id: str) -> None:
        self.worker_id = worker_id
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import worker.arq_app as a; a.run({str(config)!r})"],
            cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, url: str) -> None:
        client = redis.Redis.from_url(url)
        try:
            deadline = time.monotonic() + WAIT_S
            while not client.hexists(KEYS.workers(), self.worker_id):
                assert self.proc.poll() is None, f"worker exited early:\n{self.log.read_text()}"
                assert time.monotonic() < deadline, f"worker never got ready:\n{self.log.read_text()}"
                time.sleep(0.05)
        finally:
            client.close()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT_S)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log_file.close()


@pytest.fixture
def start_worker(tmp_path: Path, redis_url: str, models: dict[str, Path]) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(worker_id: str = "w1", **extra: Any) -> WorkerProcess:
        cfg = write_config(tmp_path / f"{worker_id}.toml", redis_url, models, worker_id, **extra)
        w = WorkerProcess(cfg, tmp_path / f"{worker_id}.log", worker_id)
        started.append(w)
        w.wait_ready(redis_url)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            code = w.terminate()
            assert code == 0, f"worker {w.worker_id} exited with {code}:\n{w.log.read_text()}"
        elif not w._log_file.closed:
            w._log_file.close()


def reply_events(client: redis.Redis, request_id: str) -> list[Any]:
    """The whole reply stream, once it has a terminal event."""
    key = KEYS.events(request_id)
    deadline = time.monotonic() + WAIT_S
    while True:
        events = [decode_event(f[b"data"]) for _, f in client.xrange(key)]
        if events and isinstance(events[-1], TERMINAL):
            return events
        assert time.monotonic() < deadline, f"no terminal event for {request_id}: {events}"
        time.sleep(0.02)


def check_exactly_once(events: list[Any]) -> tuple[list[int], str]:
    """One terminal event, last; started before any token; token indices contiguous (duplicates
    of a takeover excepted, dropped as the SDK does). Returns the tokens' (ids, text)."""
    assert sum(isinstance(e, TERMINAL) for e in events) == 1 and isinstance(events[-1], TERMINAL)
    assert isinstance(events[0], StartedEvent)
    ids: list[int] = []
    text = ""
    for e in events:
        if isinstance(e, TokenEvent):
            assert e.index <= len(ids), "a gap in token indices"
            if e.index == len(ids):
                ids.extend(e.token_ids)
                text += e.text
            else:
                assert e.index + len(e.token_ids) <= len(ids), "a partial overlap"
    return ids, text


def wait_backlog_empty(client: redis.Redis, names: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while any(client.xlen(KEYS.req(n)) for n in names):
        assert time.monotonic() < deadline, "backlog never drained"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------


def test_greedy_results_equal_engine_generate_for_every_model_variant(
    start_worker: Any, redis_url: str, reference: Reference,
) -> None:
    start_worker("w1")
    prompts = ["Hello world", "The quick brown fox jumps", "Every request waits in a queue"]

    async def submit_all() -> list[tuple[str, str, str]]:
        async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
            out = []
            for model in MODEL_SHAPES:
                for prompt in prompts:
                    h = await producer.submit(model, prompt=prompt, max_tokens=32, temperature=0.0)
                    out.append((h.request_id, model, prompt))
            return out

    submitted = asyncio.run(submit_all())
    client = redis.Redis.from_url(redis_url)
    try:
        for request_id, model, prompt in submitted:
            events = reply_events(client, request_id)
            ids, text = check_exactly_once(events)
            done = events[-1]
            assert isinstance(done, DoneEvent), done
            expected = reference.greedy(model, prompt, 32)
            assert done.token_ids == ids == expected, (model, prompt)
            assert done.text == text
        wait_backlog_empty(client, list(MODEL_SHAPES))
    finally:
        client.close()


def test_cancel_stops_a_running_request(start_worker: Any, redis_url: str) -> None:
    start_worker("w1")

    async def run() -> tuple[str, int]:
        async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
            h = await producer.submit("m-llama", prompt="cancel me", max_tokens=8000, ignore_eos=True)
            async for event in h.events():
                if isinstance(event, TokenEvent):
                    await h.cancel()
                elif isinstance(event, TERMINAL):
                    assert isinstance(event, CancelledEvent), event
                    return h.request_id, event.completion_tokens
            raise AssertionError("no terminal event")

    request_id, completion_tokens = asyncio.run(run())
    assert 0 < completion_tokens < 8000
    client = redis.Redis.from_url(redis_url)
    try:
        check_exactly_once(reply_events(client, request_id))
        wait_backlog_empty(client, ["m-llama"])
    finally:
        client.close()


def test_arq_job_path_returns_what_the_stream_path_returns(start_worker: Any, redis_url: str) -> None:
    from producer_sdk import RejectedError
    from worker.arq_app import create_job_pool, enqueue_generate, job_result

    start_worker("w1")

    async def run() -> None:
        pool = await create_job_pool(redis_url)
        try:
            async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
                for model in MODEL_SHAPES:
                    job = await enqueue_generate(pool, model, prefix=PREFIX, prompt="Hello arq", max_tokens=24,
                                                 temperature=0.0)
                    by_job = await job_result(job, timeout=WAIT_S)
                    h = await producer.submit(model, prompt="Hello arq", max_tokens=24, temperature=0.0)
                    by_stream = await h.result(timeout=WAIT_S)
                    assert by_job["token_ids"] == by_stream.token_ids
                    assert by_job["text"] == by_stream.text
                    assert by_job["finish_reason"] == by_stream.finish_reason
                    assert by_job["usage"]["completion_tokens"] == by_stream.usage.completion_tokens
                    chat = await enqueue_generate(pool, model, prefix=PREFIX,
                                                  messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                                  temperature=0.0)
                    assert len((await job_result(chat, timeout=WAIT_S))["token_ids"]) >= 1
                job = await enqueue_generate(pool, "m-qwen", prefix=PREFIX, prompt="x", max_tokens=9000)
                with pytest.raises(RejectedError) as e:  # orjson on the wire; job_result gives the typed error
                    await job_result(job, timeout=WAIT_S)
                assert e.value.code == "max_tokens_over_limit"
                assert e.value.details == {"needed": 9000, "limit": 8192}
        finally:
            await pool.aclose()

    asyncio.run(run())


PRODUCER_SCRIPT = r"""
import json, random, sys
from producer_sdk.client import Producer
url, prefix, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
models = json.loads(sys.argv[5])
rng = random.Random(seed)
words = "the quick brown fox jumps over a lazy dog every request waits in queue".split()
out = []
with Producer(url, prefix=prefix) as producer:
    handles = []
    for i in range(n):
        model = rng.choice(models)
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        greedy = i % 2 == 0
        params = dict(max_tokens=rng.randint(1, 40), temperature=0.0 if greedy else 0.8,
                      seed=rng.randrange(2**63), top_k=0 if greedy else 20)
        handles.append((producer.submit(model, prompt=prompt, **params), model, prompt, params))
    for h, model, prompt, params in handles:
        r = h.result(timeout=300)
        out.append(dict(request_id=h.request_id, model=model, prompt=prompt, params=params,
                        token_ids=r.token_ids, text=r.text, finish_reason=r.finish_reason))
print(json.dumps(out))
"""


def test_hundred_requests_over_three_models_from_four_producer_processes_complete_exactly_once(
    start_worker: Any, redis_url: str, reference: Reference,
) -> None:
    start_worker("w1")
    start_worker("w2")
    producers = [
        subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT, redis_url, PREFIX, str(seed), "25",
                          json.dumps(list(MODEL_SHAPES))],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for seed in range(4)
    ]
    results: list[dict[str, Any]] = []
    for p in producers:
        out, err = p.communicate(timeout=WAIT_S)
        assert p.returncode == 0, err.decode()
        results.extend(json.loads(out))
    assert len(results) == 100 and len({r["request_id"] for r in results}) == 100
    client = redis.Redis.from_url(redis_url)
    try:
        workers_used = set()
        for r in results:
            events = reply_events(client, r["request_id"])
            ids, text = check_exactly_once(events)
            assert ids == r["token_ids"] and text == r["text"]
            assert len(ids) <= r["params"]["max_tokens"]
            workers_used.add(events[0].worker)
            if r["params"]["temperature"] == 0.0:
                assert ids == reference.greedy(r["model"], r["prompt"], r["params"]["max_tokens"]), r
        wait_backlog_empty(client, list(MODEL_SHAPES))
        for name in MODEL_SHAPES:
            assert client.hlen(KEYS.ids(name)) == 0
        assert workers_used <= {"w1", "w2"}
    finally:
        client.close()


def test_sigterm_lets_running_requests_finish_then_exits(start_worker: Any, redis_url: str,
                                                        reference: Reference) -> None:
    w = start_worker("w1", drain_timeout_s=120)

    async def submit() -> list[str]:
        async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
            handles = [await producer.submit("m-qwen", prompt=f"drain {i}", max_tokens=1500, temperature=0.0,
                                             ignore_eos=True) for i in range(3)]
            for h in handles:  # wait until each runs
                async for event in h.events():
                    if isinstance(event, StartedEvent):
                        break
            return [h.request_id for h in handles]

    request_ids = asyncio.run(submit())
    assert w.terminate() == 0, w.log.read_text()
    client = redis.Redis.from_url(redis_url)
    try:
        for i, request_id in enumerate(request_ids):
            events = [decode_event(f[b"data"]) for _, f in client.xrange(KEYS.events(request_id))]
            ids, _ = check_exactly_once(events)
            assert isinstance(events[-1], DoneEvent)
            assert ids == reference.greedy("m-qwen", f"drain {i}", 1500, ignore_eos=True)
        assert client.xlen(KEYS.req("m-qwen")) == 0
        assert not client.hexists(KEYS.workers(), "w1")
    finally:
        client.close()


def test_request_of_a_killed_worker_is_taken_over_and_finishes_exactly_once(
    start_worker: Any, redis_url: str, reference: Reference,
) -> None:
    first = start_worker("w-dies", lease_idle_ms=500)
    prompt, n = "take me over", 4000

    async def submit_and_wait_for_tokens() -> str:
        async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
            h = await producer.submit("m-llama3", prompt=prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
            async for event in h.events():
                if isinstance(event, TokenEvent):
                    return h.request_id
            raise AssertionError("no token event")

    request_id = asyncio.run(submit_and_wait_for_tokens())
    first.kill()
    start_worker("w-takes-over", lease_idle_ms=500)
    client = redis.Redis.from_url(redis_url)
    try:
        events = reply_events(client, request_id)
        ids, text = check_exactly_once(events)
        started = [e for e in events if isinstance(e, StartedEvent)]
        assert [(e.worker, e.attempt) for e in started] == [("w-dies", 1), ("w-takes-over", 2)]
        done = events[-1]
        assert isinstance(done, DoneEvent)
        expected = reference.greedy("m-llama3", prompt, n, ignore_eos=True)
        assert done.token_ids == ids == expected
        assert done.text == text
        wait_backlog_empty(client, ["m-llama3"])
    finally:
        client.close()


def test_request_unfinished_at_drain_timeout_stays_pending_and_another_worker_finishes_it(
    start_worker: Any, redis_url: str, reference: Reference,
) -> None:
    first = start_worker("w-leaves", drain_timeout_s=0, lease_idle_ms=500)
    prompt, n = "finish me elsewhere", 6000

    async def submit_and_wait_for_tokens() -> str:
        async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
            h = await producer.submit("m-llama", prompt=prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
            async for event in h.events():
                if isinstance(event, TokenEvent):
                    return h.request_id
            raise AssertionError("no token event")

    request_id = asyncio.run(submit_and_wait_for_tokens())
    assert first.terminate() == 0, first.log.read_text()
    client = redis.Redis.from_url(redis_url)
    try:
        events = [decode_event(f[b"data"]) for _, f in client.xrange(KEYS.events(request_id))]
        assert not any(isinstance(e, TERMINAL) for e in events)
        assert client.xpending(KEYS.req("m-llama"), "workers")["pending"] == 1  # not acked
        start_worker("w-finishes", lease_idle_ms=500)
        events = reply_events(client, request_id)
        ids, text = check_exactly_once(events)
        assert [e.attempt for e in events if isinstance(e, StartedEvent)] == [1, 2]
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert done.token_ids == ids == reference.greedy("m-llama", prompt, n, ignore_eos=True)
        assert done.text == text
        wait_backlog_empty(client, ["m-llama"])
    finally:
        client.close()
