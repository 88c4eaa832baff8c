"""What the OpenAI gateway adds on top of the SDK: requests/s, relayed tokens/s and time to first
token at 1, 16 and 64 concurrent streaming clients, through one `layermux serve` process versus
the producer SDK talking to Redis directly, against the same worker in the same run.

    python bench/gateway_overhead.py [--tokens 64] [--levels 1,16,64] [--rounds 3]

A private redis-server, one `layermux worker` process on a tiny random model (so the worker
is not the bottleneck) and one gateway process. Each level runs `rounds` waves (at least 32
requests) of `clients`
concurrent streaming requests (greedy, ignore_eos, `--tokens` tokens each) first through the
SDK (AsyncProducer.submit + handle.events()), then through the gateway (httpx streaming POST
/v1/completions with stream_options.include_usage). TTFT is measured by the client: submit or
request sent -> first token event or first text chunk. "added TTFT" is the gateway's p50 minus
the SDK's p50 at the same concurrency. The clients run in this process, so on a small machine
they share the CPU with the worker, Redis and the gateway: read the figures as an upper bound
of the gateway's cost. The CPU columns do not depend on that sharing: the bench process's own
CPU per token (the SDK client, or httpx parsing SSE), the gateway process's CPU per relayed
token (from /proc), and the streamed tokens/s one fully busy gateway core could relay at that
cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from engine.model_factory import make_model
from producer_sdk import AsyncProducer, TokenEvent
from worker.embedded_redis import EmbeddedRedis

REPO = Path(__file__).resolve().parents[1]
PREFIX = "bench"
SHAPE: dict[str, Any] = {"arch": "llama", "hidden": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate": 128,
                             "max_position_embeddings": 2048, "seed": 5, "init_std": 0.1}
PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]


def _config(path: Path, redis_url: str, model: Path) -> Path:
    path.write_text("\n".join([
        f'redis_url = "{redis_url}"', f'key_prefix = "{PREFIX}"', 'worker_id = "bench-worker"',
        "[device]", 'budget = "256MiB"', "n_threads = 1", "max_batch_tokens = 512",
        "[[models]]", 'name = "m"', f'path = "{model}"', "max_running = 64", "max_backlog = 10000",
    ]) + "\n")
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERMUX_")}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL)


def _wait(check: Any, what: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


async def sdk_wave(producer: AsyncProducer, clients: int, tokens: int) -> list[tuple[float, int]]:
    async def one() -> tuple[float, int]:
        t0 = time.perf_counter()
        handle = await producer.submit("m", prompt_ids=PROMPT_IDS, max_tokens=tokens, temperature=0.0,
                                       ignore_eos=True)
        ttft, n = 0.0, 0
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                if n == 0:
                    ttft = time.perf_counter() - t0
                n += len(event.token_ids)
        return ttft, n

    return list(await asyncio.gather(*(one() for _ in range(clients))))


async def gateway_wave(http: httpx.AsyncClient, url: str, clients: int, tokens: int) -> list[tuple[float, int]]:
    body = {"model": "m", "prompt": PROMPT_IDS, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    async def one() -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft, n = 0.0, 0
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    n = int(chunk["usage"]["completion_tokens"])
                elif ttft == 0.0 and chunk["choices"] and chunk["choices"][0]["text"]:
                    ttft = time.perf_counter() - t0
        return ttft, n

    return list(await asyncio.gather(*(one() for _ in range(clients))))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(producer: AsyncProducer, http: httpx.AsyncClient, url: str, clients: int, tokens: int,
                    rounds: int, gateway_pid: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for path in ("sdk", "gateway"):
        await (sdk_wave(producer, clients, tokens) if path == "sdk" else gateway_wave(http, url, clients, tokens))
        samples: list[tuple[float, int]] = []
        cpu0, client_cpu0 = cpu_s(gateway_pid), time.process_time()
        t0 = time.perf_counter()
        for _ in range(max(rounds, 32 // clients)):  # at least 32 requests per level
            if path == "sdk":
                samples += await sdk_wave(producer, clients, tokens)
            else:
                samples += await gateway_wave(http, url, clients, tokens)
        wall = time.perf_counter() - t0
        assert all(n == tokens for _, n in samples), "a request ended early"
        ttfts = [t * 1000 for t, _ in samples]
        n_tokens = sum(n for _, n in samples)
        out[path] = {"rps": len(samples) / wall, "tps": n_tokens / wall,
                     "p50": statistics.median(ttfts), "p99": _pct(ttfts, 0.99),
                     "cpu_us_per_token": (cpu_s(gateway_pid) - cpu0) * 1e6 / n_tokens,
                     "client_cpu_us_per_token": (time.process_time() - client_cpu0) * 1e6 / n_tokens}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--levels", default="1,16,64", help="concurrent streaming clients, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="waves of requests measured per level and path")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lmx-gw-bench-"))
    model = make_model(tmp / "m", **SHAPE)
    procs: list[subprocess.Popen[bytes]] = []
    with EmbeddedRedis() as server:
        try:
            cfg = _config(tmp / "bench.toml", server.url, model)
            worker = _start(["worker", "--config", str(cfg)], tmp / "worker.log")
            procs.append(worker)
            gw_log = tmp / "gateway.log"
            gateway = _start(["serve", "--config", str(cfg), "--port", "0"], gw_log)
            procs.append(gateway)
            with redis.Redis.from_url(server.url) as c:
                _wait(lambda: c.hget(f"{PREFIX}:workers", "bench-worker"), "worker start", worker, tmp / "worker.log")
            line = _wait(lambda: next((ln for ln in gw_log.read_text().splitlines() if "listening on" in ln), None),
                         "gateway start", gateway, gw_log)
            url = line.split("listening on ", 1)[1].split()[0]
            results = asyncio.run(_measure(server.url, url, levels, args.tokens, args.rounds, gateway.pid))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(f"\ngateway overhead: {args.tokens} tokens/request, {args.rounds} waves per level, tiny model "
          f"(hidden 64, 2 layers), {os.cpu_count()} CPUs, clients in the bench process\n")
    head = ("clients", "path", "req/s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "added TTFT p50 ms",
            "client CPU us/token", "gateway CPU us/token", "tokens/s per gateway CPU")
    rows = []
    for c in levels:
        r = results[c]
        for path in ("sdk", "gateway"):
            x = r[path]
            added = f"{x['p50'] - r['sdk']['p50']:+.2f}" if path == "gateway" else ""
            cpu = x["cpu_us_per_token"]
            rows.append((str(c), path, f"{x['rps']:.1f}", f"{x['tps']:.0f}", f"{x['p50']:.2f}", f"{x['p99']:.2f}",
                         added, f"{x['client_cpu_us_per_token']:.1f}", f"{cpu:.1f}" if path == "gateway" else "",
                         f"{1e6 / cpu:.0f}" if path == "gateway" and cpu > 0 else ""))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    return 0


async def _measure(redis_url: str, url: str, levels: list[int], tokens: int, rounds: int,
                   gateway_pid: int) -> dict[int, dict[str, dict[str, float]]]:
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with AsyncProducer(redis_url, PREFIX) as producer, \
            httpx.AsyncClient(timeout=300.0, limits=limits) as http:
        return {c: await run_level(producer, http, url, c, tokens, rounds, gateway_pid) for c in levels}


if __name__ == "__main__":
    sys.exit(main())
