"""The OpenAI-compatible gateway end to end: a real redis-server, a real `layermux worker` process on
random tiny models, and the gateway as real `layermux serve` processes, driven by the official
`openai` package (sync and async, streaming and not) and by plain HTTP (httpx).

Owned by the tests. Nothing is mocked. Where a test needs the queue to answer something a
healthy worker never does (a worker failure, a full queue), it plays a worker through the
protocol itself: a limits hash for a model no process serves, and an error event on a reply
stream. Nothing asserts on time; waits have upper bounds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import openai
import orjson
import pytest
import redis
from faultlib import WorkerProc, raw_events, wait_until

from engine.text import IncrementalDetokenizer, Tokenizer
from producer_sdk.connection import stream_entries
from producer_sdk.keys import CONSUMER_GROUP, Keys
from producer_sdk.protocol import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    StartedEvent,
    TokenEvent,
    decode_request,
    encode_event,
)
from tools.embedded_redis import EmbeddedRedis
from tools.model_factory import make_model

pytestmark = pytest.mark.slow

REPO: Final = Path(__file__).resolve().parents[1]
PREFIX: Final = "gw"
KEYS: Final = Keys(PREFIX)
WAIT_S: Final = 120.0  # upper bound of waits only
PROMPT: Final = "Tell me about the sea"

# "tiny" answers quickly; "slow" (six 256-wide layers) keeps a long completion running long enough
# for a client to leave in the middle of it.
SHAPES: Final[dict[str, dict[str, Any]]] = {
    "tiny": {"arch": "llama", "hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate": 128,
                 "max_position_embeddings": 4096, "seed": 21, "init_std": 0.1},
    "slow": {"arch": "qwen2", "hidden": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 2, "intermediate": 768,
                 "max_position_embeddings": 4096, "seed": 22, "init_std": 0.1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, redis_url: str, models: dict[str, Path], gateway: dict[str, Any] | None = None,
                 **top: Any) -> Path:
    lines = [f"redis_url = {_toml(redis_url)}", f"key_prefix = {_toml(PREFIX)}"]
    lines += [f"{k} = {_toml(v)}" for k, v in top.items()]
    lines += ["[device]", 'budget = "256MiB"', "n_threads = 1"]
    lines += ["[gateway]"] + [f"{k} = {_toml(v)}" for k, v in (gateway or {}).items()]
    for name, model_path in models.items():
        lines += ["[[models]]", f"name = {_toml(name)}", f"path = {_toml(str(model_path))}",
                  "max_tokens_limit = 4096", "max_running = 8"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class GatewayProc:
    """One `layermux serve --port 0` process; `url` once it printed the address it listens on."""

    def __init__(self, config: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "serve", "--config", str(config), "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.url = ""
        deadline = time.monotonic() + WAIT_S
        while not self.url:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "listening on http://" in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"layermux serve exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"layermux serve did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Stack:
    redis_url: str
    models: dict[str, Path]
    worker: WorkerProc
    worker_metrics_port: int
    gw: GatewayProc  # default settings: no keys, CORS off
    gw_locked: GatewayProc  # API keys, a small body limit, CORS on for one origin
    root: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


API_KEY: Final = "sk-test-1234"
FILE_KEY: Final = "sk-from-file"
ORIGIN: Final = "https://app.example"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway")
    models = {name: make_model(root / name, **shape) for name, shape in SHAPES.items()}
    procs: list[Any] = []
    with EmbeddedRedis() as server:
        try:
            port = _free_port()
            cfg = write_config(root / "worker.toml", server.url, models, worker_id="gw-worker",
                               metrics_port=port, metrics_host="127.0.0.1")
            worker = WorkerProc(cfg, "gw-worker", root / "worker.log", KEYS)
            procs.append(worker)
            gw = GatewayProc(write_config(root / "gw.toml", server.url, {}), root / "gw.log")
            procs.append(gw)
            (root / "keys.txt").write_text(f"# one key per line\n{FILE_KEY}\n")
            gw_locked = GatewayProc(write_config(root / "gw-locked.toml", server.url, {}, gateway={
                "api_keys": [API_KEY], "api_keys_file": str(root / "keys.txt"), "max_body_bytes": 2048,
                "cors_origins": [ORIGIN]}), root / "gw-locked.log")
            procs.append(gw_locked)
            with redis.Redis.from_url(server.url) as c:
                worker.wait_ready(c)
            yield Stack(server.url, models, worker, port, gw, gw_locked, root)
        finally:
            for p in procs:
                if isinstance(p, WorkerProc):
                    p.kill()
                else:
                    p.stop()


def generate_cli(model_dir: Path, prompt: str, max_tokens: int, chat: bool) -> dict[str, Any]:
    """`layermux generate --json` (in-process engine, no Redis, greedy): the reference."""
    cmd = [sys.executable, "-m", "worker.cli", "generate", str(model_dir), "--prompt", prompt,
           "--max-tokens", str(max_tokens), "--json", "--threads", "1"] + (["--chat"] if chat else [])
    out = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=WAIT_S, check=True)
    return dict(orjson.loads(out.stdout))


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The JSON payloads of an SSE body, and "[DONE]" as the string."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- endpoints, parameters, real clients -----------------------------------------------------------------


def test_greedy_chat_through_the_gateway_equals_layermux_generate(stack: Stack) -> None:
    ref = generate_cli(stack.models["tiny"], PROMPT, 24, chat=True)
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                       temperature=0, max_tokens=24)
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if ref["finish_reason"] == "length" else "stop")
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref["prompt_tokens"], len(ref["token_ids"]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # Streaming: the deltas concatenate to the same text; include_usage adds one usage chunk.
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ref["token_ids"])
    assert chunks[-1].usage.prompt_tokens == ref["prompt_tokens"]


def test_completions_sync_and_async_clients_stream_and_not(stack: Stack) -> None:
    ref = generate_cli(stack.models["tiny"], PROMPT, 16, chat=False)
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=16)
    assert r.choices[0].text == ref["text"] and r.object == "text_completion"
    assert r.usage is not None and r.usage.completion_tokens == len(ref["token_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, temperature=0, max_tokens=16, stream=True) if c.choices)
    assert streamed == ref["text"]

    async def with_async_client() -> tuple[str, str, str]:
        aclient = openai.AsyncOpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
        try:
            c = await aclient.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=16)
            ch = await aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=24,
                stream=True)
            pieces = [x.choices[0].delta.content or "" async for x in ch if x.choices]
            ids = await aclient.models.list()
            return c.choices[0].text, "".join(pieces), ",".join(sorted(m.id for m in ids.data))
        finally:
            await aclient.close()

    text, chat_text, model_ids = asyncio.run(with_async_client())
    assert text == ref["text"]
    assert chat_text == generate_cli(stack.models["tiny"], PROMPT, 24, chat=True)["text"]
    assert model_ids == "slow,tiny"


def test_prompt_as_token_ids_and_a_list_of_prompts(stack: Stack) -> None:
    tok = Tokenizer.from_model_dir(str(stack.models["tiny"]))
    ids = tok.encode(PROMPT, add_special_tokens=True)
    body = {"model": "tiny", "prompt": [PROMPT, "Another one"], "temperature": 0, "max_tokens": 8}
    r = httpx.post(stack.gw.url + "/v1/completions", json=body, timeout=WAIT_S).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    by_ids = httpx.post(stack.gw.url + "/v1/completions", json={**body, "prompt": ids}, timeout=WAIT_S).json()
    assert by_ids["choices"][0]["text"] == r["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)


def test_n_3_gives_three_choices_streaming_and_not(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": PROMPT}]
    greedy = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12, n=3)  # type: ignore[arg-type]
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: the same text three times
    sampled = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, max_tokens=12,  # type: ignore[arg-type]
                                             n=3, seed=5)
    again = client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, max_tokens=12,  # type: ignore[arg-type]
                                           n=3, seed=5)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert greedy.usage is not None and sampled.usage is not None
    assert sampled.usage.prompt_tokens == greedy.usage.prompt_tokens  # the prompt counts once
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0,  # type: ignore[arg-type]
                                                max_tokens=12, n=3, seed=5, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in sampled.choices]


def test_stop_string_across_a_token_boundary_is_cut_and_not_returned(stack: Stack) -> None:
    n = 48
    ref = generate_cli(stack.models["tiny"], PROMPT, n, chat=True)
    tok = Tokenizer.from_model_dir(str(stack.models["tiny"]))
    prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                    add_generation_prompt=True), add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.push(t) for t in ref["token_ids"]]
    full = ref["text"]
    # A stop string made of the end of one token's text and the start of the next one's, whose
    # first occurrence is at that boundary.
    stop, cut = None, -1
    at = 0
    for k in range(len(pieces) - 1):
        at += len(pieces[k])
        a, b = pieces[k], pieces[k + 1]
        if len(a) >= 1 and len(b) >= 1:
            candidate = a[-1:] + b[:2]
            if full.find(candidate) == at - 1 and candidate.strip():
                stop, cut = candidate, at - 1
                break
    assert stop is not None, f"no usable token boundary in {pieces!r}"
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=n,  # type: ignore[arg-type]
                                       stop=["\x00never", stop])
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=msgs, temperature=0, max_tokens=n, stop=stop, stream=True) if c.choices)  # type: ignore[arg-type]
    assert streamed == full[:cut]


def test_models_health_and_unknown_fields_ignored(stack: Stack) -> None:
    models = httpx.get(stack.gw.url + "/v1/models", timeout=WAIT_S).json()
    assert models["object"] == "list" and sorted(m["id"] for m in models["data"]) == ["slow", "tiny"]
    tiny = httpx.get(stack.gw.url + "/v1/models/tiny", timeout=WAIT_S).json()
    assert (tiny["id"], tiny["object"], tiny["max_model_len"]) == ("tiny", "model", 4096)
    _error(httpx.get(stack.gw.url + "/v1/models/nope", timeout=WAIT_S), 404, "model_not_found", "model")
    health = httpx.get(stack.gw.url + "/health", timeout=WAIT_S)
    assert health.status_code == 200
    assert health.json()["models"] == {"slow": {"live_workers": 1}, "tiny": {"live_workers": 1}}
    body = {"model": "tiny", "messages": [{"role": "developer", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
            "max_completion_tokens": 4, "temperature": 0, "tools": [{"type": "function"}],
            "response_format": {"type": "text"}, "user": "u-1", "metadata": {"x": 1}, "priority": 5,
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "top_p": 0.9, "seed": 3}
    r = httpx.post(stack.gw.url + "/v1/chat/completions", json=body, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_without_max_tokens_a_long_prompt_gets_the_room_left_in_the_context(stack: Stack) -> None:
    # 4000 of the 4096 positions: the default max_tokens (512) does not fit; the room left (96) does.
    ids = [(i * 7919) % 400 + 3 for i in range(4000)]
    r = httpx.post(stack.gw.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "ignore_eos": True},
                   timeout=WAIT_S)
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 4000, "completion_tokens": 96, "total_tokens": 4096}
    assert r.json()["choices"][0]["finish_reason"] == "length"
    asked = httpx.post(stack.gw.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 512},
                       timeout=WAIT_S)
    _error(asked, 400, "context_length_exceeded", "prompt")  # an explicit max_tokens is never shortened


def test_request_id_is_idempotent_across_gateways(stack: Stack) -> None:
    """Gateways keep no state: the same request_id sent to another gateway gets the same request."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "request_id": "idem-1"}
    a = httpx.post(stack.gw.url + "/v1/completions", json=body, timeout=WAIT_S)
    b = httpx.post(stack.gw_locked.url + "/v1/completions", json={**body, "seed": 99}, timeout=WAIT_S,
                   headers={"authorization": f"Bearer {API_KEY}"})
    assert a.headers["x-layermux-request-ids"] == "idem-1" == b.headers["x-layermux-request-ids"]
    assert a.json()["choices"] == b.json()["choices"]
    with stack.client() as c:
        assert sum(isinstance(e, StartedEvent) for e in raw_events(c, KEYS, "idem-1")) == 1


# -- the error table --------------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text
    return dict(err)


def test_error_table_from_the_queue(stack: Stack) -> None:
    url = stack.gw.url
    chat = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}]}
    _error(httpx.post(url + "/v1/chat/completions", json={**chat, "model": "nope"}, timeout=WAIT_S),
           404, "model_not_found", "model")
    _error(httpx.post(url + "/v1/chat/completions", json={**chat, "model": "bad name!"}, timeout=WAIT_S),
           404, "model_not_found", "model")
    # Prompt plus max_tokens beyond the 4096-token context: refused by the worker, with the numbers.
    err = _error(httpx.post(url + "/v1/chat/completions", json={**chat, "max_tokens": 4090}, timeout=WAIT_S),
                 400, "context_length_exceeded", "messages")
    assert "4096" in err["message"]
    streamed = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4090,
                                                          "stream": True}, timeout=WAIT_S)
    _error(streamed, 400, "context_length_exceeded", "prompt")  # refused before any byte of the stream
    _error(httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 5000},
                      timeout=WAIT_S), 400, "max_tokens_over_limit", "max_tokens")
    # A deadline that passes while it runs: 504.
    _error(httpx.post(url + "/v1/completions", json={"model": "slow", "prompt": PROMPT, "max_tokens": 2000,
                                                      "ignore_eos": True, "deadline_ms": 1}, timeout=WAIT_S),
           504, "deadline_exceeded")


def test_error_table_queue_full_and_worker_failure(stack: Stack) -> None:
    """The queue answers as a worker would: a model "ghost" no process serves, whose limits hash
    this test writes; a full backlog is 429 with Retry-After, a worker_failure event is 500."""
    url = stack.gw.url
    with stack.client() as c:
        c.hset(KEYS.limits("ghost"), mapping={"max_backlog": 0, "max_tokens": 64})
        r = httpx.post(url + "/v1/completions", json={"model": "ghost", "prompt": "x", "max_tokens": 4},
                       timeout=WAIT_S)
        _error(r, 429, "rate_limit_exceeded")
        assert r.headers["retry-after"] == "1"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="ghost", prompt="x", max_tokens=4)

        c.hset(KEYS.limits("ghost"), "max_backlog", 10)
        for band in ("high", "normal", "low"):
            c.xgroup_create(KEYS.req("ghost", band), CONSUMER_GROUP, id="0", mkstream=True)

        def fail_the_request() -> None:
            with stack.client() as worker_side:
                deadline = time.monotonic() + WAIT_S
                entries: list[Any] = []
                while not entries:
                    assert time.monotonic() < deadline, "the ghost request never arrived"
                    entries = stream_entries(worker_side.xreadgroup(
                        CONSUMER_GROUP, "test", {KEYS.req("ghost"): ">"}, count=1, block=1000))
                msg = decode_request(entries[0][1][b"data"])
                worker_side.xadd(KEYS.events(msg.request_id), {"data": encode_event(ErrorEvent(
                    request_id=msg.request_id, code="worker_failure", message="engine error: the test says so"))})

        loop_result: list[httpx.Response] = []

        async def call() -> None:
            async with httpx.AsyncClient(timeout=WAIT_S) as h:
                loop_result.append(await h.post(url + "/v1/completions",
                                                json={"model": "ghost", "prompt": "x", "max_tokens": 4}))

        async def both() -> None:
            task = asyncio.create_task(call())
            await asyncio.to_thread(fail_the_request)
            await task

        asyncio.run(both())
        err = _error(loop_result[0], 500, "worker_failure")
        assert "the test says so" in err["message"]
        c.delete(KEYS.limits("ghost"))


def test_an_error_after_tokens_were_streamed_is_an_error_chunk_then_done(stack: Stack) -> None:
    """Headers are out once tokens flow; a worker failure then is one `data: {"error": ...}` chunk and
    `[DONE]`, which the openai client raises as an APIError. The test plays the worker of "ghost2"."""

    def play_worker(n_requests: int) -> None:
        with stack.client() as w:
            w.hset(KEYS.limits("ghost2"), mapping={"max_backlog": 10, "max_tokens": 64})
            for band in ("high", "normal", "low"):
                with contextlib.suppress(redis.ResponseError):  # BUSYGROUP
                    w.xgroup_create(KEYS.req("ghost2", band), CONSUMER_GROUP, id="0", mkstream=True)
            ready.set()
            deadline = time.monotonic() + WAIT_S
            served = 0
            while served < n_requests:
                assert time.monotonic() < deadline, "the ghost2 requests never arrived"
                for _, fields in stream_entries(w.xreadgroup(CONSUMER_GROUP, "test", {KEYS.req("ghost2"): ">"},
                                                             count=1, block=200)):
                    rid = decode_request(fields[b"data"]).request_id
                    for event in (StartedEvent(request_id=rid, worker="test", attempt=1, prompt_tokens=3),
                                  TokenEvent(request_id=rid, index=0, token_ids=[5, 6], text="Hi"),
                                  ErrorEvent(request_id=rid, code="worker_failure", message="engine error: boom")):
                        w.xadd(KEYS.events(rid), {"data": encode_event(event)})
                    served += 1

    ready = threading.Event()
    worker = threading.Thread(target=play_worker, args=(2,), daemon=True)
    worker.start()
    try:
        assert ready.wait(WAIT_S)
        client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
        seen = []
        with pytest.raises(openai.APIError, match="boom"):
            for chunk in client.chat.completions.create(model="ghost2", messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=8, stream=True):
                seen.append(chunk.choices[0].delta.content if chunk.choices else None)
        assert "Hi" in seen
        with httpx.stream("POST", stack.gw.url + "/v1/completions", timeout=WAIT_S,
                          json={"model": "ghost2", "prompt": "x", "max_tokens": 8, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        assert events[0]["choices"][0]["text"] == "Hi"
        assert events[-2]["error"]["code"] == "worker_failure" and events[-1] == "[DONE]"
    finally:
        worker.join(WAIT_S)
        with stack.client() as c:
            c.delete(KEYS.limits("ghost2"))


def test_error_table_malformed_bodies_name_the_field(stack: Stack) -> None:
    url = stack.gw.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=WAIT_S)
    assert "invalid JSON" in _error(r, 400, None)["message"]
    _error(httpx.post(url, json=[1, 2], timeout=WAIT_S), 400, None)
    err = _error(httpx.post(url, json={"model": "tiny", "messages": msgs, "max_tokens": "5"}, timeout=WAIT_S),
                 400, None, "max_tokens")
    assert err["message"].startswith("max_tokens: expected")
    _error(httpx.post(url, json={"model": "tiny", "messages": msgs, "temperature": True}, timeout=WAIT_S),
           400, None, "temperature")
    _error(httpx.post(url, json={"model": "tiny"}, timeout=WAIT_S), 400, None, "messages")
    _error(httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": 5}]}, timeout=WAIT_S),
           400, None, "messages[0].content")
    _error(httpx.post(url, json={"model": "tiny", "messages": msgs, "n": 0}, timeout=WAIT_S), 400, None, "n")
    _error(httpx.post(url, json={"model": "tiny", "messages": msgs, "stop": ["a"] * 17}, timeout=WAIT_S),
           400, None, "stop")
    _error(httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, timeout=WAIT_S), 400, None, "messages[0].content")
    _error(httpx.get(stack.gw.url + "/v1/nope", timeout=WAIT_S), 404, "unknown_url")
    _error(httpx.get(url, timeout=WAIT_S), 405, "unknown_url")


# -- disconnects and dying gateways ----------------------------------------------------------------------------


def test_a_client_gone_while_sending_its_body_costs_nothing(stack: Stack) -> None:
    host, port = stack.gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny\"")
    assert httpx.get(stack.gw.url + "/health", timeout=WAIT_S).status_code == 200
    counted = 'layermux_gateway_requests_total{route="completions",status="499"}'
    wait_until(lambda: counted in httpx.get(stack.gw.url + "/metrics", timeout=WAIT_S).text, WAIT_S,
               "the gateway to count the abandoned request")
    assert "Traceback" not in stack.gw.log()


def _terminal(c: redis.Redis, request_id: str) -> Any:
    terminals = [e for e in raw_events(c, KEYS, request_id) if isinstance(e, DoneEvent | ErrorEvent | CancelledEvent)]
    assert len(terminals) <= 1
    return terminals[0] if terminals else None


def _kv_bytes(c: redis.Redis, model: str) -> int:
    doc = orjson.loads(c.hget(KEYS.workers(), "gw-worker") or b"{}")
    return int(((doc.get("ledger") or {}).get("models") or {}).get(model, {}).get("kv_bytes", -1))


def test_client_disconnect_mid_stream_cancels_the_request_and_frees_its_kv(stack: Stack) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=WAIT_S) as h, h.stream("POST", stack.gw.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        request_id = r.headers["x-layermux-request-ids"]
        n_content = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                n_content += 1
                if n_content == 3:
                    break  # leaving the block closes the connection mid-stream
    with stack.client() as c:
        wait_until(lambda: _terminal(c, request_id) is not None, WAIT_S, "the terminal event")
        terminal = _terminal(c, request_id)
        assert isinstance(terminal, CancelledEvent), terminal
        assert 3 <= terminal.completion_tokens < 4000
        wait_until(lambda: _kv_bytes(c, "slow") == 0, WAIT_S, "the worker to free the request's KV")
    metrics = httpx.get(stack.gw.url + "/metrics", timeout=WAIT_S).text
    assert 'layermux_gateway_client_disconnects_total{model="slow"}' in metrics


def test_client_disconnect_while_waiting_for_a_whole_response_cancels_too(stack: Stack) -> None:
    body = {"model": "slow", "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "request_id": "leaver-1"}
    with stack.client() as c:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(stack.gw.url + "/v1/completions", json=body, timeout=httpx.Timeout(WAIT_S, read=0.5))
        wait_until(lambda: _terminal(c, "leaver-1") is not None, WAIT_S, "the terminal event")
        assert isinstance(_terminal(c, "leaver-1"), CancelledEvent)


def test_a_gateway_killed_mid_stream_loses_nothing_in_the_queue(stack: Stack) -> None:
    gw = GatewayProc(write_config(stack.root / "gw-doomed.toml", stack.redis_url, {}), stack.root / "gw-doomed.log")
    try:
        body = {"model": "slow", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=WAIT_S) as h, h.stream("POST", gw.url + "/v1/completions", json=body) as r:
            request_id = r.headers["x-layermux-request-ids"]
            lines = r.iter_lines()
            next(lines)
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait()
            with pytest.raises(httpx.HTTPError):  # the stream is cut: no final chunk
                for _ in lines:
                    pass
    finally:
        gw.stop()
    with stack.client() as c:
        wait_until(lambda: _terminal(c, request_id) is not None, WAIT_S, "the terminal event")
        done = _terminal(c, request_id)
        assert isinstance(done, DoneEvent) and done.usage.completion_tokens == 300


# -- API keys, body limit, CORS, metrics ------------------------------------------------------------------


def test_api_keys_body_limit_and_cors(stack: Stack) -> None:
    locked, open_ = stack.gw_locked.url, stack.gw.url
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    _error(httpx.post(locked + "/v1/completions", json=body, timeout=WAIT_S), 401, "invalid_api_key")
    _error(httpx.get(locked + "/v1/models", headers={"authorization": "Bearer wrong"}, timeout=WAIT_S),
           401, "invalid_api_key")
    _error(httpx.get(locked + "/metrics", timeout=WAIT_S), 401, "invalid_api_key")
    assert httpx.get(locked + "/health", timeout=WAIT_S).status_code == 200  # no key needed
    for key in (API_KEY, FILE_KEY):
        client = openai.OpenAI(base_url=locked + "/v1", api_key=key, max_retries=0)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked + "/v1", api_key="nope", max_retries=0).models.list()
    auth = {"authorization": f"Bearer {API_KEY}"}
    big = {**body, "prompt": "x" * 4096}
    _error(httpx.post(locked + "/v1/completions", json=big, headers=auth, timeout=WAIT_S), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield orjson.dumps(big)

    _error(httpx.post(locked + "/v1/completions", content=chunked(), headers=auth, timeout=WAIT_S),
           413, "request_too_large")
    # CORS: answered for the configured origin on the locked gateway, absent by default.
    pre = httpx.options(locked + "/v1/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST"}, timeout=WAIT_S)
    assert pre.headers.get("access-control-allow-origin") == ORIGIN
    plain = httpx.get(open_ + "/v1/models", headers={"origin": ORIGIN}, timeout=WAIT_S)
    assert "access-control-allow-origin" not in plain.headers


def test_metrics_of_gateway_and_worker_through_prometheus_client(stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="unused", max_retries=0)
    list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                        max_tokens=4, stream=True))
    gw = {f.name: f for f in text_string_to_metric_families(httpx.get(stack.gw.url + "/metrics",
                                                                       timeout=WAIT_S).text)}
    assert any(s.value >= 1 for s in gw["layermux_gateway_requests"].samples
               if s.labels.get("route") == "chat_completions" and s.labels.get("status") == "200")
    assert any(s.name.endswith("_count") and s.value >= 1 for s in gw["layermux_gateway_time_to_first_token_seconds"]
               .samples if s.labels.get("model") == "tiny")
    worker_text = httpx.get(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics", timeout=WAIT_S).text
    worker = {f.name: f for f in text_string_to_metric_families(worker_text)}
    for name in ("layermux_done", "layermux_queue_wait_seconds", "layermux_backlog", "layermux_ledger_bytes",
                 "layermux:time_to_first_token_seconds", "layermux:time_per_output_token_seconds",
                 "layermux:request_queue_time_seconds", "layermux:e2e_request_latency_seconds"):
        assert name in worker, (name, sorted(worker))
    ttft = [s for s in worker["layermux:time_to_first_token_seconds"].samples
            if s.name.endswith("_count") and s.labels.get("model") == "tiny"]
    assert ttft and ttft[0].value >= 1


def test_the_gateway_acl_user_of_deploy_is_enough(stack: Stack) -> None:
    """deploy/redis/users.acl's `gateway` user, loaded into the test's Redis: every route works and
    Redis logs no refused command or key (ACL LOG)."""
    line = next(ln for ln in (REPO / "deploy/redis/users.acl").read_text().splitlines()
                if ln.startswith("user gateway "))
    # The deploy files assume key prefix "lmx"; this suite's is PREFIX.
    rules = [">gw-test-password" if r.startswith(">") else r.replace("~lmx:", f"~{PREFIX}:") for r in line.split()[2:]]
    with stack.client() as c:
        c.execute_command("ACL", "SETUSER", "gateway", *rules)
        c.execute_command("ACL", "LOG", "RESET")
        host_port = stack.redis_url.split("//", 1)[1]
        url = f"redis://gateway:gw-test-password@{host_port}"
        gw = GatewayProc(write_config(stack.root / "gw-acl.toml", url, {}), stack.root / "gw-acl.log")
        try:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
            msgs = [{"role": "user", "content": PROMPT}]
            assert client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,  # type: ignore[arg-type]
                                                  extra_body={"priority": 1}).choices
            assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                             extra_body={"priority": -1}).choices
            assert list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,  # type: ignore[arg-type]
                                                       stream=True))
            assert {m.id for m in client.models.list().data} == {"slow", "tiny"}
            assert httpx.get(gw.url + "/health", timeout=WAIT_S).json()["live_workers"] >= 1
            body = {"model": "slow", "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
            with httpx.Client(timeout=WAIT_S) as h, h.stream("POST", gw.url + "/v1/completions", json=body) as r:
                request_id = r.headers["x-layermux-request-ids"]
                next(r.iter_lines())
            wait_until(lambda: _terminal(c, request_id) is not None, WAIT_S, "the terminal event")
            assert isinstance(_terminal(c, request_id), CancelledEvent)
            refused = [dict(zip(e[::2], e[1::2])) for e in c.execute_command("ACL", "LOG")]
            # Redis 6.2 lacks CLIENT SETINFO, which redis-py sends on connect and ignores the refusal of
            # (deploy/README.md, "ACL users"); anything else is a rule the gateway user misses.
            assert [e for e in refused if e[b"object"] != b"client"] == [], refused
        finally:
            gw.stop()
