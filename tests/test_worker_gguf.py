"""End to end: a worker whose config names a .gguf file (`[[models]] path = "…/x.gguf"`) serves it
through real Redis, and its tokens and text are those of the same model loaded from its Hugging Face
folder in this process.

The GGUF file is written by bench/_gguf_write.py run as a program (the bench's writer: llama names,
Q/K rows permuted, the vocabulary and merges in the metadata, llama3 RoPE scaling as a rope_freqs
tensor), so the worker reads weights, RoPE factors and tokenizer from the file alone. The worker
process, the Redis server and the producer are real; the helpers are tests/test_worker_e2e.py's.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from test_worker_e2e import REPO, WorkerProcess, check_exactly_once, reply_events, write_config

from engine import Engine, EngineConfig, SamplingParams
from engine.text import Tokenizer
from producer_sdk.client import AsyncProducer
from producer_sdk.protocol import DoneEvent
from tools.model_factory import make_model

pytest.importorskip("gguf")

ROPE3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 256}
PROMPTS = ["Hello world", "The quick  brown fox 123 jumps", "é ünï 漢字 🙂 and more", "Every request waits in a queue"]
N_TOKENS = 48


@pytest.fixture(scope="module")
def folder_and_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("worker-gguf")
    folder = make_model(root / "llama3", arch="llama", hidden=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate=128, init_std=0.1, max_position_embeddings=8192, rope_scaling=ROPE3, seed=13)
    out = root / "llama3.gguf"
    subprocess.run([sys.executable, str(REPO / "bench" / "_gguf_write.py"), str(folder), str(out), "--outtype", "f32"],
                   check=True, capture_output=True, cwd=REPO)
    return folder, out


def test_worker_serves_a_gguf_path_from_its_config_with_the_folders_tokens_and_text(
    tmp_path: Path, redis_url: str, folder_and_gguf: tuple[Path, Path],
) -> None:
    folder, gguf_file = folder_and_gguf
    cfg = write_config(tmp_path / "wg.toml", redis_url, {"g-llama3": gguf_file}, "wg")
    worker = WorkerProcess(cfg, tmp_path / "wg.log", "wg")
    try:
        worker.wait_ready(redis_url)

        async def submit_all() -> list[str]:
            async with AsyncProducer(redis_url, prefix="e2e") as producer:
                return [(await producer.submit("g-llama3", prompt=p, max_tokens=N_TOKENS, temperature=0.0,
                                               ignore_eos=True)).request_id for p in PROMPTS]

        request_ids = asyncio.run(submit_all())
        tok = Tokenizer.from_model_dir(folder)  # the folder's own tokenizer.json, not the file's metadata
        with Engine(EngineConfig(budget_bytes=64 << 20, n_threads=2)) as eng:
            eng.load_model("folder", folder)
            expected = [eng.generate("folder", tok.encode(p),
                                     SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True))
                        for p in PROMPTS]
        client = redis.Redis.from_url(redis_url)
        try:
            for request_id, prompt, want in zip(request_ids, PROMPTS, expected, strict=True):
                events = reply_events(client, request_id)
                ids, text = check_exactly_once(events)
                done = events[-1]
                assert isinstance(done, DoneEvent), done
                assert done.token_ids == ids == want, prompt
                assert done.text == text == tok.decode(want), prompt
                assert done.usage.prompt_tokens == len(tok.encode(prompt))
        finally:
            client.close()
    finally:
        code = worker.terminate()
    assert code == 0, f"worker exited with {code}:\n{worker.log.read_text()}"
