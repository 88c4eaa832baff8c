"""What the OpenAI gateway adds on top of the SDK: requests/s, relayed tokens/s and time to first
token at 1, 16 and 64 concurrent streaming clients, through one `layermux serve` process versus
the producer SDK talking to Redis directly, against the same worker in the same run.

    python bench/gateway_overhead.py [--tokens 64] [--levels 1,16,64] [--rounds 3]

A private redis-server, one `layermux worker` process on a tiny random model (so the worker
is not the bottleneck) and one gateway process. Each level runs `rounds` waves (at least 128
requests) of `clients`
concurrent streaming requests (greedy, ignore_eos, `--tokens` tokens each) first through the
SDK (AsyncProducer.submit + handle.events()), then through the gateway (a streaming POST
/v1/completions with stream_options.include_usage, by a minimal keep-alive asyncio HTTP client,
or httpx with --client httpx). TTFT is measured by the client: submit or
request sent -> first token event or first text chunk. "added TTFT" is the gateway's p50 minus
the SDK's p50 at the same concurrency. It can come out negative: the SDK path decodes and
validates every event in the measuring process, while through the gateway that work runs in the
gateway process, beside a client that only splits SSE lines. All processes share the machine's
CPUs (and, on a shared box, other people's work), so the wall-clock columns move with the load
average printed above the table. The CPU columns do not: the bench process's own CPU per token
(the SDK client, or the HTTP client parsing SSE), the gateway process's CPU per relayed token
(from /proc), and the streamed tokens/s one fully busy gateway core could relay at that cost.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from producer_sdk import AsyncProducer, TokenEvent
from tools.embedded_redis import EmbeddedRedis
from tools.model_factory import make_model

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


_BODY = {"model": "m", "prompt": PROMPT_IDS, "temperature": 0, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}}


def _on_event(data: bytes, t0: float, state: list[float]) -> None:
    """One SSE payload: the first text chunk sets TTFT (state[0]), the usage chunk the token count (state[1])."""
    if data == b"[DONE]":
        return
    chunk = orjson.loads(data)
    if chunk.get("usage"):
        state[1] = chunk["usage"]["completion_tokens"]
    elif state[0] == 0.0 and chunk["choices"] and chunk["choices"][0]["text"]:
        state[0] = time.perf_counter() - t0


async def httpx_wave(http: httpx.AsyncClient, url: str, clients: int, tokens: int) -> list[tuple[float, int]]:
    async def one() -> tuple[float, int]:
        t0, state = time.perf_counter(), [0.0, 0.0]
        async with http.stream("POST", url + "/v1/completions", json={**_BODY, "max_tokens": tokens}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    _on_event(line[6:].encode(), t0, state)
        return state[0], int(state[1])

    return list(await asyncio.gather(*(one() for _ in range(clients))))


class RawClient:
    """A minimal HTTP/1.1 keep-alive client for the SSE stream (chunked transfer coding only), so that
    the bench process spends little CPU per token and the figures are the gateway's, not httpx's."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stream(self, tokens: int) -> tuple[float, int]:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        body = orjson.dumps({**_BODY, "max_tokens": tokens})
        t0, state = time.perf_counter(), [0.0, 0.0]
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
            raise SystemExit(f"gateway answered {head!r}")
        pending = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    _on_event(event[6:], t0, state)
        self.idle.append((reader, writer))
        return state[0], int(state[1])

    async def wave(self, clients: int, tokens: int) -> list[tuple[float, int]]:
        return list(await asyncio.gather(*(self.stream(tokens) for _ in range(clients))))

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(producer: AsyncProducer, gateway_wave: Callable[[int, int], Awaitable[list[tuple[float, int]]]],
                    clients: int, tokens: int, rounds: int, gateway_pid: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for path in ("sdk", "gateway"):
        await (sdk_wave(producer, clients, tokens) if path == "sdk" else gateway_wave(clients, tokens))
        samples: list[tuple[float, int]] = []
        cpu0, client_cpu0 = cpu_s(gateway_pid), time.process_time()
        t0 = time.perf_counter()
        for _ in range(max(rounds, 128 // clients)):  # at least 128 requests per level (CPU clock ticks are 10 ms)
            if path == "sdk":
                samples += await sdk_wave(producer, clients, tokens)
            else:
                samples += await gateway_wave(clients, tokens)
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
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="HTTP client of the gateway path: a minimal asyncio one (default) or httpx")
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
            results = asyncio.run(_measure(server.url, url, levels, args.tokens, args.rounds, gateway.pid,
                                           args.client))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(f"\ngateway overhead: {args.tokens} tokens/request, tiny model (hidden 64, 2 layers), {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}, {args.client} HTTP client in the bench process\n")
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


async def _measure(redis_url: str, url: str, levels: list[int], tokens: int, rounds: int, gateway_pid: int,
                   client: str) -> dict[int, dict[str, dict[str, float]]]:
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    raw = RawClient(url)
    async with AsyncProducer(redis_url, PREFIX) as producer, \
            httpx.AsyncClient(timeout=300.0, limits=limits) as http:

        async def wave(clients: int, n_tokens: int) -> list[tuple[float, int]]:
            if client == "raw":
                return await raw.wave(clients, n_tokens)
            return await httpx_wave(http, url, clients, n_tokens)

        try:
            return {c: await run_level(producer, wave, c, tokens, rounds, gateway_pid) for c in levels}
        finally:
            raw.close()


if __name__ == "__main__":
    sys.exit(main())
