"""Cost of the queue path: producer SDK -> Redis request stream -> worker -> reply stream -> SDK.

    python bench/pipeline_overhead.py latency    [--tokens 128] [--requests 10]
    python bench/pipeline_overhead.py throughput [--concurrent 400] [--rate 250] [--tokens 500]
    python bench/pipeline_overhead.py both       (the default)

latency: the same greedy generations of one demo model (random weights), direct on the engine
and through the queue path, one request at a time; time to first token (TTFT) and decode
milliseconds per token, p50 and p90. The worker is a real `layermux worker` process.

throughput: the worker's engine replaced by a fixed-rate token source (FixedRateTokens: every
request gets a token every 1/rate s from a thread, through the same eventfd and event objects
as the engine), so that the queue path is what is measured: detokenization, token events,
publishing, Redis. `--concurrent` requests are submitted at once; the rate published by the
worker is read back from the reply streams' entry ids (Redis server milliseconds): tokens and
stream entries (one entry may carry several tokens: the publisher coalesces what queues up
while a write is in flight) per second, between the first `started` and the last `done`.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from engine import Engine, EngineConfig, EventKind, FinishReason, SamplingParams
from producer_sdk import AsyncProducer, Producer
from producer_sdk.keys import Keys
from producer_sdk.protocol import decode_event
from tools.embedded_redis import EmbeddedRedis
from tools.model_factory import DEMO_MODELS, make_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
TICK_S = 0.001  # the token source's clock


# -- the fixed-rate token source (bench only) -----------------------------------------------------------


@dataclass(slots=True)
class _Event:
    kind: Any
    req_id: int
    token_id: int = 0
    finish_reason: Any = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    error_code: Any = None
    message: str = ""


@dataclass(slots=True)
class _Active:
    max_tokens: int
    emitted: int = 0
    cancelled: bool = False


class FixedRateTokens:
    """Stands in for the engine's request path: each submitted request gets one token every 1/rate
    seconds (token ids cycle over `vocab`) until max_tokens, then a done event; events wake the
    worker through an eventfd like the engine's. Loading, the ledger and the rest are the real
    engine's (with the model loaded), so admission and registration run unchanged."""

    def __init__(self, real: Engine, rate_per_request: float, vocab: list[int]) -> None:
        self._real = real
        self._rate = rate_per_request
        self._vocab = vocab
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._events: list[_Event] = []
        self._active: dict[int, _Active] = {}
        self._due: list[tuple[float, int]] = []  # heap of (next token time, engine id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="fixed-rate-tokens", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def fileno(self) -> int:
        return self._fd

    def submit(self, eng_id: int, model: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            self._active[eng_id] = _Active(int(params.max_tokens))
            heapq.heappush(self._due, (time.monotonic(), eng_id))

    def cancel(self, eng_id: int) -> None:
        with self._lock:
            a = self._active.get(eng_id)
            if a is not None:
                a.cancelled = True
                heapq.heappush(self._due, (0.0, eng_id))

    def drain_events(self) -> list[_Event]:
        with self._lock:
            out, self._events = self._events, []
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)
        self._real.close()

    def _tick(self) -> None:
        """Every TICK_S, one token for each request whose next token is due (a heap: work per token,
        not per request and tick), so the source itself costs little of the process's CPU."""
        vocab, n_vocab, period = self._vocab, len(self._vocab), 1.0 / self._rate
        due = self._due
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            with self._lock:
                before = len(self._events)
                while due and due[0][0] <= now:
                    at, eng_id = heapq.heappop(due)
                    a = self._active.get(eng_id)
                    if a is None:
                        continue
                    if a.cancelled:
                        self._events.append(_Event(EventKind.done, eng_id, finish_reason=FinishReason.cancelled))
                        del self._active[eng_id]
                        continue
                    self._events.append(_Event(EventKind.token, eng_id, token_id=vocab[a.emitted % n_vocab]))
                    a.emitted += 1
                    if a.emitted >= a.max_tokens:
                        self._events.append(_Event(EventKind.done, eng_id, finish_reason=FinishReason.length))
                        del self._active[eng_id]
                    else:
                        heapq.heappush(due, (at + period, eng_id))
                if len(self._events) > before:
                    os.eventfd_write(self._fd, 1)


def worker_main(config: str, rate: float) -> int:
    """`pipeline_overhead.py _worker CONFIG RATE`: a worker whose engine is FixedRateTokens; SIGTERM drains."""
    from worker.engine_driver import engine_config
    from worker.runtime import Runtime
    from worker.settings import load_settings

    settings = load_settings(config)

    def factory(s: Any) -> Any:
        return FixedRateTokens(Engine(engine_config(s)), rate, list(range(100, 164)))

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runtime = Runtime(settings, engine_factory=factory)
        await runtime.start()
        try:
            await stop.wait()
        finally:
            await runtime.drain(timeout_s=1.0)
            assert runtime.publisher is not None
            st = runtime.publisher.stats
            print(orjson.dumps({"rounds": st.rounds, "events_written": st.events_written,
                                "tokens_coalesced": st.tokens_coalesced}).decode(), flush=True)

    asyncio.run(main())
    return 0


# -- helpers ----------------------------------------------------------------------------------------------


def write_config(path: Path, url: str, model: Path, max_running: int, threads: int = 2) -> Path:
    path.write_text(f'redis_url = "{url}"\nworker_id = "bench"\n[device]\nbudget = "256MiB"\nn_threads = {threads}\n'
                    f'[[models]]\nname = "m"\npath = "{model}"\nmax_tokens_limit = 4096\n'
                    f"max_running = {max_running}\nmax_backlog = 100000\n")
    return path


def wait_served(url: str) -> None:
    r = redis.Redis.from_url(url)
    try:
        for _ in range(1200):
            if r.exists("lmx:{m:m}:limits") and r.hexists("lmx:workers", "bench"):
                return
            time.sleep(0.05)
    finally:
        r.close()
    raise SystemExit("the worker did not register the model within 60 s")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- latency ---------------------------------------------------------------------------------------------


def latency(model: Path, tokens: int, n: int, threads: int) -> dict[str, Any]:
    direct_ms, direct_ttft = [], []
    with Engine(EngineConfig(budget_bytes=256 << 20, n_threads=threads)) as eng:
        eng.load_model("m", model)
        for i in range(n + 1):  # the first one warms up
            t0 = time.perf_counter()
            eng.submit(i + 1, "m", PROMPT, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
            first = last = None
            k = 0
            done = False
            while not done:
                for ev in eng.wait_events(5):
                    if ev.kind == EventKind.token:
                        k += 1
                        last = time.perf_counter()
                        first = first or last
                    else:
                        done = True
            assert first is not None and last is not None
            if i:
                direct_ttft.append(1000 * (first - t0))
                direct_ms.append(1000 * (last - first) / (k - 1))

    pipe_ms, pipe_ttft, start_ms = [], [], []
    with tempfile.TemporaryDirectory(prefix="lmx-overhead-") as tmp, EmbeddedRedis() as server:
        cfg = write_config(Path(tmp) / "worker.toml", server.url, model, 32, threads)
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_served(server.url)
            with Producer(server.url) as producer:
                for i in range(n + 1):
                    t0 = time.perf_counter()
                    h = producer.submit("m", prompt_ids=PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True)
                    first = last = started = None
                    k = 0
                    for ev in h.events():
                        if ev.type == "started":
                            started = time.perf_counter()
                        if ev.type == "token":
                            k += len(ev.token_ids)
                            last = time.perf_counter()
                            first = first or last
                    assert first is not None and last is not None and started is not None
                    if i:
                        pipe_ttft.append(1000 * (first - t0))
                        pipe_ms.append(1000 * (last - first) / (k - 1))
                        start_ms.append(1000 * (started - t0))
        finally:
            proc.terminate()
            proc.wait(30)
    return {"direct_ttft": direct_ttft, "direct_ms": direct_ms, "pipe_ttft": pipe_ttft, "pipe_ms": pipe_ms,
            "start_ms": start_ms}


def print_latency(r: dict[str, Any], model: str, tokens: int, n: int, threads: int) -> None:
    med = statistics.median
    print(f"latency: model {model}, {tokens} greedy tokens, {n} sequential requests, engine threads {threads}")
    print(f"{'path':<28}{'ms/token':>10}{'TTFT p50':>10}{'TTFT p90':>10}")
    print(f"{'engine (direct)':<28}{med(r['direct_ms']):>10.3f}{med(r['direct_ttft']):>10.2f}"
          f"{pct(r['direct_ttft'], 0.9):>10.2f}")
    print(f"{'SDK -> Redis -> worker':<28}{med(r['pipe_ms']):>10.3f}{med(r['pipe_ttft']):>10.2f}"
          f"{pct(r['pipe_ttft'], 0.9):>10.2f}")
    print(f"queue path: {med(r['pipe_ttft']) - med(r['direct_ttft']):+.2f} ms TTFT p50 "
          f"(submit -> started event seen: {med(r['start_ms']):.2f} ms), "
          f"{med(r['pipe_ms']) - med(r['direct_ms']):+.3f} ms per token")


# -- throughput --------------------------------------------------------------------------------------------


def throughput(model: Path, concurrent: int, rate: float, tokens: int, profile_to: str | None = None) -> dict[str, Any]:
    keys = Keys("lmx")
    with tempfile.TemporaryDirectory(prefix="lmx-throughput-") as tmp, EmbeddedRedis() as server:
        cfg = write_config(Path(tmp) / "worker.toml", server.url, model, concurrent)
        log = open(Path(tmp) / "worker.log", "wb")  # noqa: SIM115 - closed below
        profile = ["-m", "cProfile", "-o", profile_to] if profile_to else []
        proc = subprocess.Popen([sys.executable, *profile, str(Path(__file__).resolve()), "_worker", str(cfg),
                                 str(rate)], stdout=subprocess.PIPE, stderr=log)
        try:
            wait_served(server.url)

            async def submit_all() -> list[str]:
                async with AsyncProducer(server.url) as producer:
                    hs = await asyncio.gather(*(producer.submit("m", prompt_ids=PROMPT, max_tokens=tokens,
                                                                ignore_eos=True) for _ in range(concurrent)))
                return [h.request_id for h in hs]

            r = redis.Redis.from_url(server.url)
            cpu0 = r.info("cpu")
            rids = asyncio.run(submit_all())
            try:
                deadline = time.monotonic() + 600
                left = list(rids)
                while left:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{len(left)} requests never finished")
                    pipe = r.pipeline(transaction=False)
                    for rid in left:
                        pipe.xrevrange(keys.events(rid), count=1)
                    last = pipe.execute()
                    left = [rid for rid, entries in zip(left, last)
                            if not entries or decode_event(entries[0][1][b"data"]).type not in
                            ("done", "error", "cancelled")]
                    time.sleep(0.2)
                cpu1 = r.info("cpu")
                redis_cpu_s = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_sys", "used_cpu_user"))
                first_ms, last_ms, n_tokens, n_entries, errors = None, None, 0, 0, 0
                all_started_ms, first_done_ms = 0, None
                token_times: list[tuple[int, int]] = []  # (server ms, tokens) of every token event
                for rid in rids:
                    for entry_id, fields in r.xrange(keys.events(rid)):
                        ev = decode_event(fields[b"data"])
                        ms = int(entry_id.split(b"-")[0])
                        if ev.type == "started":
                            first_ms = ms if first_ms is None else min(first_ms, ms)
                            all_started_ms = max(all_started_ms, ms)
                        elif ev.type == "token":
                            n_tokens += len(ev.token_ids)
                            n_entries += 1
                            token_times.append((ms, len(ev.token_ids)))
                        elif ev.type == "done":
                            last_ms = ms if last_ms is None else max(last_ms, ms)
                            first_done_ms = ms if first_done_ms is None else min(first_done_ms, ms)
                        else:
                            errors += 1
            finally:
                r.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            log.close()
    assert first_ms is not None and last_ms is not None and first_done_ms is not None
    span_s = max(1e-3, (last_ms - first_ms) / 1000.0)
    # Steady state: while every request runs (after the last start, before the first end).
    steady_s = (first_done_ms - all_started_ms) / 1000.0
    in_window = [(ms, n) for ms, n in token_times if all_started_ms <= ms < first_done_ms]
    steady = (sum(n for _, n in in_window) / steady_s, len(in_window) / steady_s) if steady_s > 0.2 else None
    stats = orjson.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {"concurrent": concurrent, "rate": rate, "tokens": tokens, "span_s": span_s, "n_tokens": n_tokens,
            "n_entries": n_entries, "errors": errors, "tokens_per_s": n_tokens / span_s,
            "entries_per_s": n_entries / span_s, "ideal_s": tokens / rate, "worker": stats,
            "redis_cpu_s": redis_cpu_s, "steady": steady, "steady_s": steady_s,
            "pickup_s": (all_started_ms - first_ms) / 1000.0}


def print_throughput(t: dict[str, Any]) -> None:
    print(f"throughput: one worker, fixed-rate token source, {t['concurrent']} concurrent requests x "
          f"{t['tokens']} tokens at {t['rate']:g} tokens/s each (offered {t['concurrent'] * t['rate']:,.0f} tokens/s)")
    print(f"  published {t['n_tokens']:,} tokens in {t['n_entries']:,} token events over {t['span_s']:.2f} s "
          f"(source alone: {t['ideal_s']:.2f} s): {t['tokens_per_s']:,.0f} tokens/s, "
          f"{t['entries_per_s']:,.0f} token events/s; errors {t['errors']}; redis-server CPU {t['redis_cpu_s']:.2f} s")
    if t["steady"] is not None:
        print(f"  steady state (all {t['concurrent']} running, {t['steady_s']:.2f} s): {t['steady'][0]:,.0f} tokens/s, "
              f"{t['steady'][1]:,.0f} token events/s; all requests started within {t['pickup_s']:.2f} s")
    else:
        print(f"  no steady state: starting all requests took {t['pickup_s']:.2f} s, longer than one request runs")
    if t["worker"]:
        w = t["worker"]
        print(f"  publisher: {w['rounds']:,} write rounds, {w['events_written']:,} events written, "
              f"{w['tokens_coalesced']:,} token hand-offs merged into earlier events")


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        return worker_main(sys.argv[2], float(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="both", choices=("latency", "throughput", "both"))
    ap.add_argument("--tokens", type=int, default=128, help="latency: tokens per request (default 128)")
    ap.add_argument("--requests", type=int, default=10, help="latency: sequential requests (default 10)")
    ap.add_argument("--model", default="llama-tiny", choices=sorted(DEMO_MODELS))
    ap.add_argument("--concurrent", type=int, default=400, help="throughput: requests at once (default 400)")
    ap.add_argument("--rate", type=float, default=250.0, help="throughput: tokens/s per request (default 250)")
    ap.add_argument("--stream-tokens", type=int, default=500, help="throughput: tokens per request (default 500)")
    ap.add_argument("--threads", type=int, default=2, help="latency: engine threads, direct and in the worker (default 2)")
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--profile", metavar="FILE", help="throughput: run the worker under cProfile, stats to FILE")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrent, args.stream_tokens = 3, 100, 200
    tmp = Path(tempfile.mkdtemp(prefix="lmx-overhead-model-"))
    model = make_model(tmp / args.model, **DEMO_MODELS[args.model])
    if args.what in ("latency", "both"):
        print_latency(latency(model, args.tokens, args.requests, args.threads), args.model, args.tokens,
                      args.requests, args.threads)
    if args.what in ("throughput", "both"):
        print_throughput(throughput(model, args.concurrent, args.rate, args.stream_tokens, args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
