"""One request path (worker/request_path.py): `layermux generate`, the arq `generate` job and the stream
path give the same tokens and text for the same request, stop strings and penalties included.

A real worker process (`layermux worker`, which serves both the arq job queue and the request streams)
on the suite's real redis-server; `layermux generate` as a real process on the same model folder.
Each comparison is first shown to matter: the stop string really cuts the text, and the penalties
really change the tokens, so a path that dropped either would fail here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from faultlib import REPO, Fleet

from producer_sdk import AsyncProducer
from tools.model_factory import make_model

PREFIX = "rpath"
MODEL = "tiny"
WAIT_S = 120.0  # bounds a hung request only

# Sampled (not greedy) so that seeds matter, with every filter and every penalty on.
SAMPLING: dict[str, Any] = {"max_tokens": 40, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.02,
                            "seed": 1234, "ignore_eos": True}
PENALTIES: dict[str, Any] = {"repetition_penalty": 1.3, "presence_penalty": 0.8, "frequency_penalty": 0.6}
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / MODEL, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate=128, init_std=0.1, seed=5)


def cli_generate(model_dir: Path, *, chat: bool, stop: list[str], **params: Any) -> dict[str, Any]:
    args = [sys.executable, "-m", "worker.cli", "generate", str(model_dir), "--prompt",
            MESSAGES[0]["content"] if chat else PROMPT, "--json"]
    if chat:
        args.append("--chat")
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    for s in stop:
        args += ["--stop", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=WAIT_S, cwd=REPO, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = orjson.loads(proc.stdout)
    return result


def stop_string_of(text: str) -> str:
    """Three characters from the middle of a completion: the stop string of the second run."""
    middle = len(text) // 2
    stop = text[middle:middle + 3]
    assert len(stop) == 3 and stop.strip(), f"completion too short to pick a stop string from: {text!r}"
    return stop


@pytest.mark.parametrize("chat", [False, True], ids=["prompt", "chat"])
def test_generate_arq_job_and_stream_give_the_same_tokens_with_stop_strings_and_penalties(
        model_dir: Path, tmp_path: Path, redis_url: str, chat: bool) -> None:
    from worker.arq_app import create_job_pool, enqueue_generate, job_result

    full = cli_generate(model_dir, chat=chat, stop=[], **SAMPLING, **PENALTIES)
    assert full["finish_reason"] == "length" and len(full["token_ids"]) == SAMPLING["max_tokens"]
    unpenalized = cli_generate(model_dir, chat=chat, stop=[], **SAMPLING)
    assert unpenalized["token_ids"] != full["token_ids"], "the penalties change nothing: the test could not fail"
    stop = stop_string_of(full["text"])
    local = cli_generate(model_dir, chat=chat, stop=[stop], **SAMPLING, **PENALTIES)
    assert local["finish_reason"] == "stop_string"
    assert local["text"] == full["text"][:full["text"].index(stop)]
    assert local["token_ids"] == full["token_ids"][:len(local["token_ids"])]
    assert len(local["token_ids"]) < len(full["token_ids"])

    fleet = Fleet(tmp_path, redis_url, PREFIX, {MODEL: model_dir})
    client = redis.Redis.from_url(redis_url)
    prompt: dict[str, Any] = {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    try:
        fleet.start("w-path").wait_ready(client)

        async def run() -> tuple[dict[str, Any], Any]:
            pool = await create_job_pool(redis_url)
            try:
                job = await enqueue_generate(pool, MODEL, prefix=PREFIX, stop=[stop], **prompt, **SAMPLING,
                                             **PENALTIES)
                by_job = await job_result(job, timeout=WAIT_S)
            finally:
                await pool.aclose()
            async with AsyncProducer(redis_url, prefix=PREFIX) as producer:
                handle = await producer.submit(MODEL, stop=[stop], **prompt, **SAMPLING, **PENALTIES)
                by_stream = await handle.result(timeout=WAIT_S)
            return by_job, by_stream

        by_job, by_stream = asyncio.run(run())
    finally:
        fleet.close()
        client.close()

    assert by_job["token_ids"] == local["token_ids"] == by_stream.token_ids
    assert by_job["text"] == local["text"] == by_stream.text
    assert by_job["finish_reason"] == local["finish_reason"] == by_stream.finish_reason == "stop_string"
    assert by_job["usage"]["prompt_tokens"] == local["prompt_tokens"] == by_stream.usage.prompt_tokens


def test_generate_refuses_a_request_past_the_context_window_as_the_worker_does(model_dir: Path) -> None:
    """The request check (admission.check_request) is the path's, not the worker's: `generate` names the
    code and the numbers, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "generate", str(model_dir), "--prompt-ids", "1,2,3", "--max-tokens",
         "600"], capture_output=True, text=True, timeout=WAIT_S, cwd=REPO, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("layermux generate: error: prompt_too_long: prompt (3 tokens) plus max_tokens (600) is 603 "
                    "tokens; the model's context window is 512"), proc.stderr
