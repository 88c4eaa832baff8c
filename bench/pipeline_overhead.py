"""Cost of the queue path: producer SDK -> Redis request stream -> worker -> reply stream -> SDK.

    python bench/pipeline_overhead.py latency    [--tokens 128] [--requests 10] [--threads 2]
    python bench/pipeline_overhead.py throughput [--concurrent 400] [--rate 250] [--stream-tokens 500]
                                                 [--workers 1] [--producers 1] [--vocab text|bytes]
    python bench/pipeline_overhead.py scaling    [--workers-list 1,2,4] [--producers 8] (throughput per worker count)
    python bench/pipeline_overhead.py both       (the default: latency, then throughput)

latency: the same greedy generations of one demo model (random weights), direct on the engine
and through the queue path, one request at a time; time to first token (TTFT) and decode
milliseconds per token, p50 and p90. The worker is a real `layermux worker` process.

throughput: the workers' engine replaced by a fixed-rate token source (FixedRateTokens: every
request gets a token every 1/rate s from a thread, through the same eventfd and event objects
as the engine), so that the queue path is what is measured: detokenization, token events,
publishing, Redis. `--concurrent` requests are submitted at once from `--producers` processes;
the rate published is read back from the reply streams' entry ids (Redis server milliseconds):
tokens and stream entries (one entry may carry several tokens: the publisher coalesces what
queues up while a write is in flight) per second, between the first `started` and the last
`done`. CPU: the worker processes' user+system time over the run (/proc), minus the token
source's own thread, per token published: the figure that does not move with the machine's
load. TTFT here is the request entry's id -> its first token entry's id (both Redis server
milliseconds: enqueued -> first token written), so it has millisecond resolution. Every reply stream is checked: one `started`,
token indices 0..n-1 each once, one `done` (a request served twice or a token repeated counts
as a violation and the run exits 1).

Token ids: `--vocab text` (default) cycles over 64 ids whose pieces are whole UTF-8 text, as a
model's output is; `--vocab bytes` over ids 100..163, single bytes >= 0xA4 that never form valid
UTF-8 (what this bench used before 2026-12-05: the detokenizer then holds every id back and
re-decodes a growing window, ~7 us a token, and nothing is published until a piece completes).

`--worker-tree DIR` runs the workers from DIR/worker (e.g. `git archive <commit> worker | tar -x
-C DIR`): the before/after of a change in one run, on the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import importlib.machinery
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import redis

from engine import Engine, EngineConfig, EventKind, FinishReason, SamplingParams
from producer_sdk import AsyncProducer, Producer
from producer_sdk.keys import Keys
from producer_sdk.protocol import DoneEvent, StartedEvent, TokenEvent, decode_event
from tools.embedded_redis import EmbeddedRedis
from tools.model_factory import DEMO_MODELS, make_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
TICK_S = 0.001  # the token source's clock
N_VOCAB = 64  # distinct token ids the source cycles over
TREE_ENV = "LMX_BENCH_WORKER_TREE"


# -- the fixed-rate token source (bench only) -----------------------------------------------------------


@dataclass(slots=True)
class _Event:
    kind: Any
    req_id: int
    token_id: int = -1  # as the engine: a terminal event carries no token
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
    engine's (with the model loaded), so admission and registration run unchanged. The thread
    writes its native id to `tid_file`, so the bench can take its CPU out of the worker's."""

    def __init__(self, real: Engine, rate_per_request: float, vocab: list[int], tid_file: str = "") -> None:
        self._real = real
        self._rate = rate_per_request
        self._vocab = vocab
        self._tid_file = tid_file
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
        if self._tid_file:
            Path(self._tid_file).write_text(str(threading.get_native_id()))
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


def text_vocab(model_dir: str, n: int = N_VOCAB) -> list[int]:
    """The last `n` ids whose piece alone decodes to text (no U+FFFD, not blank): what a model emits."""
    from engine.text import Tokenizer

    tok = Tokenizer.from_model_dir(model_dir)
    good = []
    for i in range(tok.vocab_size):
        piece = tok.decode([i])
        if piece.strip() and "\ufffd" not in piece:
            good.append(i)
    return good[-n:]


class _TreeFinder:
    """Imports `worker` and its modules from another tree (the editable install's finder would
    otherwise win over sys.path)."""

    def __init__(self, tree: str) -> None:
        self._tree = tree

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "worker":
            return importlib.machinery.PathFinder.find_spec(name, [self._tree])
        if name.startswith("worker."):
            return importlib.machinery.PathFinder.find_spec(name, [os.path.join(self._tree, "worker")])
        return None


def _use_worker_tree() -> None:
    tree = os.environ.get(TREE_ENV)
    if tree:
        sys.meta_path.insert(0, _TreeFinder(tree))


def worker_main(config: str, rate: float, vocab_kind: str, tid_file: str) -> int:
    """`pipeline_overhead.py _worker CONFIG RATE VOCAB TIDFILE`: a worker whose engine is FixedRateTokens;
    SIGTERM drains."""
    _use_worker_tree()
    from worker.engine_driver import engine_config
    from worker.runtime import Runtime
    from worker.settings import load_settings

    settings = load_settings(config)
    vocab = list(range(100, 100 + N_VOCAB)) if vocab_kind == "bytes" else text_vocab(str(settings.models[0].path))

    def factory(s: Any) -> Any:
        return FixedRateTokens(Engine(engine_config(s)), rate, vocab, tid_file)

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


def cli_main(argv: list[str]) -> int:
    """`pipeline_overhead.py _cli ARGS`: `layermux ARGS`, from the --worker-tree when one is given."""
    _use_worker_tree()
    from worker.cli import main as cli

    return cli(argv)


def produce_main(url: str, n: int, tokens: int) -> int:
    """`pipeline_overhead.py _produce URL N TOKENS`: connect, print "ready", and after a line on stdin
    submit N requests at once; print one JSON line [[request_id, enqueue time], ...] (the request entry's
    id: server milliseconds, the clock of the reply entries' ids)."""

    async def run() -> list[tuple[str, float]]:
        async with AsyncProducer(url) as producer:
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)

            async def one() -> tuple[str, float]:
                h = await producer.submit("m", prompt_ids=PROMPT, max_tokens=tokens, ignore_eos=True)
                assert h.entry_id is not None
                return h.request_id, int(h.entry_id.split("-")[0]) / 1000.0  # enqueued (server clock)

            return list(await asyncio.gather(*(one() for _ in range(n))))

    print(orjson.dumps(asyncio.run(run())).decode(), flush=True)
    return 0


# -- helpers ----------------------------------------------------------------------------------------------


def write_config(path: Path, url: str, model: Path, max_running: int, threads: int = 2,
                 worker_id: str = "bench") -> Path:
    path.write_text(f'redis_url = "{url}"\nworker_id = "{worker_id}"\n[device]\nbudget = "256MiB"\n'
                    f"n_threads = {threads}\n"
                    f'[[models]]\nname = "m"\npath = "{model}"\nmax_tokens_limit = 4096\n'
                    f"max_running = {max_running}\nmax_backlog = 100000\n")
    return path


def wait_served(url: str, worker_ids: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    r = redis.Redis.from_url(url)
    try:
        for _ in range(2400):
            if r.exists("lmx:{m:m}:limits") and all(r.hexists("lmx:workers", w) for w in worker_ids):
                return
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a worker exited before serving; its log is in the temporary directory")
            time.sleep(0.05)
    finally:
        r.close()
    raise SystemExit("the workers did not register the model within 120 s")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# -- latency ---------------------------------------------------------------------------------------------


def latency_direct(model: Path, tokens: int, n: int, threads: int) -> dict[str, list[float]]:
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
    return {"direct_ttft": direct_ttft, "direct_ms": direct_ms}


def latency_pipe(model: Path, tokens: int, n: int, threads: int, tree: str | None) -> dict[str, list[float]]:
    pipe_ms, pipe_ttft, start_ms = [], [], []
    env = {**os.environ, TREE_ENV: tree} if tree else None
    with tempfile.TemporaryDirectory(prefix="lmx-overhead-") as tmp, EmbeddedRedis() as server:
        cfg = write_config(Path(tmp) / "worker.toml", server.url, model, 32, threads)
        proc = subprocess.Popen(worker_cmd("_cli", "worker", "--config", str(cfg)), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_served(server.url, ["bench"], [proc])
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
    return {"pipe_ttft": pipe_ttft, "pipe_ms": pipe_ms, "start_ms": start_ms}


def print_latency(direct: dict[str, list[float]], pipes: list[tuple[str, dict[str, list[float]]]], model: str,
                  tokens: int, n: int, threads: int) -> None:
    med = statistics.median
    print(f"latency: model {model}, {tokens} greedy tokens, {n} sequential requests, engine threads {threads}, "
          f"load average {load_average()}")
    print(f"{'path':<34}{'ms/token':>10}{'TTFT p50':>10}{'TTFT p90':>10}{'+TTFT p50':>11}{'started p50':>13}")
    d_ttft = med(direct["direct_ttft"])
    print(f"{'engine (direct)':<34}{med(direct['direct_ms']):>10.3f}{d_ttft:>10.2f}"
          f"{pct(direct['direct_ttft'], 0.9):>10.2f}")
    for label, r in pipes:
        name = "SDK -> Redis -> worker" + (f" ({label})" if label else "")
        print(f"{name:<34}{med(r['pipe_ms']):>10.3f}{med(r['pipe_ttft']):>10.2f}{pct(r['pipe_ttft'], 0.9):>10.2f}"
              f"{med(r['pipe_ttft']) - d_ttft:>+11.2f}{med(r['start_ms']):>13.2f}")


# -- throughput --------------------------------------------------------------------------------------------


def _cpu_ticks(path: str | None) -> int:
    """utime + stime (clock ticks) of a /proc/<pid>[/task/<tid>]/stat file; 0 when it is gone."""
    if path is None:
        return 0
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime and stime: fields 14 and 15 of proc(5)


@dataclass
class _Worker:
    worker_id: str
    proc: subprocess.Popen[bytes]
    tid_file: Path
    log: IO[bytes]

    def cpu_ticks(self) -> tuple[int, int]:
        """(the process, its token-source thread) CPU ticks so far."""
        tid = self.tid_file.read_text().strip() if self.tid_file.exists() else ""
        pid = self.proc.pid
        return _cpu_ticks(f"/proc/{pid}/stat"), _cpu_ticks(f"/proc/{pid}/task/{tid}/stat" if tid else None)


@dataclass
class _Check:
    """What the reply streams hold, request by request."""

    n_tokens: int = 0
    n_entries: int = 0
    errors: int = 0
    served_twice: int = 0  # more than one started event, or tokens from two workers
    bad_tokens: int = 0  # requests whose token indices are not exactly 0..max_tokens-1, once each
    by_worker: dict[str, int] = field(default_factory=dict)
    first_ms: int | None = None
    last_ms: int | None = None
    all_started_ms: int = 0
    first_done_ms: int | None = None
    ttft_ms: list[float] = field(default_factory=list)
    token_times: list[tuple[int, int]] = field(default_factory=list)  # (server ms, tokens) of every token event


def _check_streams(r: redis.Redis, keys: Keys, submitted: list[tuple[str, float]], tokens: int) -> _Check:
    c = _Check()
    for rid, enqueued_s in submitted:
        started: list[str] = []
        next_index, ok, first_token_ms = 0, True, None
        entries: list[tuple[bytes, dict[bytes, bytes]]] = r.xrange(keys.events(rid))  # type: ignore[assignment]
        for entry_id, fields in entries:
            ev = decode_event(fields[b"data"])
            ms = int(entry_id.split(b"-")[0])
            if isinstance(ev, StartedEvent):
                started.append(ev.worker)
                c.first_ms = ms if c.first_ms is None else min(c.first_ms, ms)
                c.all_started_ms = max(c.all_started_ms, ms)
            elif isinstance(ev, TokenEvent):
                ok = ok and ev.index == next_index
                next_index = ev.index + len(ev.token_ids)
                c.n_tokens += len(ev.token_ids)
                c.n_entries += 1
                c.token_times.append((ms, len(ev.token_ids)))
                first_token_ms = ms if first_token_ms is None else first_token_ms
            elif isinstance(ev, DoneEvent):
                c.last_ms = ms if c.last_ms is None else max(c.last_ms, ms)
                c.first_done_ms = ms if c.first_done_ms is None else min(c.first_done_ms, ms)
            else:
                c.errors += 1
        c.served_twice += len(started) != 1
        c.bad_tokens += not ok or next_index != tokens
        for w in set(started):
            c.by_worker[w] = c.by_worker.get(w, 0) + 1
        if first_token_ms is not None:
            c.ttft_ms.append(first_token_ms - 1000.0 * enqueued_s)
    return c


def throughput(model: Path, concurrent: int, rate: float, tokens: int, *, workers: int = 1, producers: int = 1,
               vocab: str = "text", tree: str | None = None, profile_to: str | None = None) -> dict[str, Any]:
    keys = Keys("lmx")
    env = {**os.environ, TREE_ENV: tree} if tree else None
    with tempfile.TemporaryDirectory(prefix="lmx-throughput-") as tmp_dir, EmbeddedRedis() as server:
        tmp = Path(tmp_dir)
        pool: list[_Worker] = []
        prods: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(workers):
                wid = f"bench-{i}"
                cfg = write_config(tmp / f"{wid}.toml", server.url, model, concurrent, worker_id=wid)
                profile = ["-m", "cProfile", "-o", profile_to] if profile_to and i == 0 else []
                log = open(tmp / f"{wid}.log", "wb")  # noqa: SIM115 - closed below
                cmd = [sys.executable, *profile, str(Path(__file__).resolve()), "_worker", str(cfg), str(rate), vocab,
                       str(tmp / f"{wid}.tid")]
                pool.append(_Worker(wid, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log),
                                    tmp / f"{wid}.tid", log))
            wait_served(server.url, [w.worker_id for w in pool], [w.proc for w in pool])
            shares = [concurrent // producers + (1 if i < concurrent % producers else 0) for i in range(producers)]
            for n in shares:
                prods.append(subprocess.Popen(worker_cmd("_produce", server.url, str(n), str(tokens)),
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            for p in prods:
                assert p.stdout is not None
                if p.stdout.readline().strip() != b"ready":
                    raise SystemExit("a producer process failed to start")
            r = redis.Redis.from_url(server.url)
            cpu0: dict[str, float] = r.info("cpu")  # type: ignore[assignment]
            ticks0 = [w.cpu_ticks() for w in pool]
            for p in prods:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                p.stdin.flush()
            submitted: list[tuple[str, float]] = []
            for p in prods:
                out, _ = p.communicate(timeout=600)
                submitted += [(rid, t) for rid, t in orjson.loads(out.strip().splitlines()[-1])]
            try:
                deadline = time.monotonic() + 900
                left = [rid for rid, _ in submitted]
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
                ticks1 = [w.cpu_ticks() for w in pool]
                cpu1: dict[str, float] = r.info("cpu")  # type: ignore[assignment]
                redis_cpu_s = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_sys", "used_cpu_user"))
                check = _check_streams(r, keys, submitted, tokens)
            finally:
                r.close()
        finally:
            stats: list[dict[str, Any]] = []
            for w in pool:
                w.proc.send_signal(signal.SIGTERM)
            for w in pool:
                out, _ = w.proc.communicate(timeout=60)
                w.log.close()
                if out.strip():
                    stats.append(orjson.loads(out.strip().splitlines()[-1]))
            for p in prods:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert check.first_ms is not None and check.last_ms is not None and check.first_done_ms is not None
    hz = os.sysconf("SC_CLK_TCK")
    worker_cpu_s = sum(b[0] - a[0] for a, b in zip(ticks0, ticks1)) / hz
    source_cpu_s = sum(b[1] - a[1] for a, b in zip(ticks0, ticks1)) / hz
    span_s = max(1e-3, (check.last_ms - check.first_ms) / 1000.0)
    # Steady state: while every request runs (after the last start, before the first end).
    steady_s = (check.first_done_ms - check.all_started_ms) / 1000.0
    in_window = [(ms, n) for ms, n in check.token_times if check.all_started_ms <= ms < check.first_done_ms]
    steady = (sum(n for _, n in in_window) / steady_s, len(in_window) / steady_s) if steady_s > 0.2 else None
    return {"concurrent": concurrent, "rate": rate, "tokens": tokens, "workers": workers, "producers": producers,
            "span_s": span_s, "n_tokens": check.n_tokens, "n_entries": check.n_entries, "errors": check.errors,
            "served_twice": check.served_twice, "bad_tokens": check.bad_tokens, "by_worker": check.by_worker,
            "tokens_per_s": check.n_tokens / span_s, "entries_per_s": check.n_entries / span_s,
            "ideal_s": tokens / rate, "worker": stats, "redis_cpu_s": redis_cpu_s, "steady": steady,
            "steady_s": steady_s, "pickup_s": (check.all_started_ms - check.first_ms) / 1000.0,
            "worker_cpu_s": worker_cpu_s, "source_cpu_s": source_cpu_s,
            "us_per_token": 1e6 * (worker_cpu_s - source_cpu_s) / max(1, check.n_tokens),
            "source_us_per_token": 1e6 * source_cpu_s / max(1, check.n_tokens),
            "ttft_p50_ms": pct(check.ttft_ms, 0.5), "ttft_p90_ms": pct(check.ttft_ms, 0.9),
            "load": load_average()}


def print_throughput(t: dict[str, Any], label: str = "") -> None:
    print(f"throughput{f' ({label})' if label else ''}: {t['workers']} worker(s), fixed-rate token source, "
          f"{t['concurrent']} concurrent requests from {t['producers']} producer process(es) x {t['tokens']} tokens "
          f"at {t['rate']:g} tokens/s each (offered {t['concurrent'] * t['rate']:,.0f} tokens/s); "
          f"load average {t['load']}")
    print(f"  published {t['n_tokens']:,} tokens in {t['n_entries']:,} token events over {t['span_s']:.2f} s "
          f"(source alone: {t['ideal_s']:.2f} s): {t['tokens_per_s']:,.0f} tokens/s, "
          f"{t['entries_per_s']:,.0f} token events/s; errors {t['errors']}; redis-server CPU {t['redis_cpu_s']:.2f} s")
    print(f"  worker CPU {t['worker_cpu_s']:.2f} s, of which the token source's thread {t['source_cpu_s']:.2f} s: "
          f"{t['us_per_token']:.1f} us per token without the source ({t['source_us_per_token']:.1f} us with it "
          f"is the source's)")
    print(f"  TTFT (request entry -> first token entry, server ms): p50 {t['ttft_p50_ms']:.1f} ms, "
          f"p90 {t['ttft_p90_ms']:.1f} ms; all requests started within {t['pickup_s']:.2f} s")
    if t["steady"] is not None:
        print(f"  steady state (all {t['concurrent']} running, {t['steady_s']:.2f} s): {t['steady'][0]:,.0f} tokens/s, "
              f"{t['steady'][1]:,.0f} token events/s written in that window (low when the writes lag behind)")
    else:
        print("  no steady state: starting all requests took longer than one request runs")
    print(f"  served twice: {t['served_twice']}; requests with a missing or repeated token index: {t['bad_tokens']}; "
          f"requests per worker: {dict(sorted(t['by_worker'].items()))}")
    for w in t["worker"]:
        print(f"  publisher: {w['rounds']:,} write rounds, {w['events_written']:,} events written, "
              f"{w['tokens_coalesced']:,} token hand-offs merged into earlier events")


def print_scaling(rows: list[dict[str, Any]]) -> None:
    print(f"scaling: fixed-rate token source, same model on every worker; load average {load_average()}")
    print(f"{'workers':>8}{'tokens/s':>11}{'events/s':>10}{'us/token':>10}{'cpu s':>8}{'TTFT p50':>10}{'p90':>8}"
          f"{'pickup s':>10}{'twice':>7}{'bad':>5}  requests per worker")
    for t in rows:
        print(f"{t['workers']:>8}{t['tokens_per_s']:>11,.0f}{t['entries_per_s']:>10,.0f}{t['us_per_token']:>10.1f}"
              f"{t['worker_cpu_s']:>8.2f}{t['ttft_p50_ms']:>10.1f}{t['ttft_p90_ms']:>8.1f}{t['pickup_s']:>10.2f}"
              f"{t['served_twice']:>7}{t['bad_tokens']:>5}  {sorted(t['by_worker'].values())}")


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        return worker_main(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5])
    if len(sys.argv) >= 2 and sys.argv[1] == "_cli":
        return cli_main(sys.argv[2:])
    if len(sys.argv) >= 2 and sys.argv[1] == "_produce":
        return produce_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="both", choices=("latency", "throughput", "both", "scaling"))
    ap.add_argument("--tokens", type=int, default=128, help="latency: tokens per request (default 128)")
    ap.add_argument("--requests", type=int, default=10, help="latency: sequential requests (default 10)")
    ap.add_argument("--model", default="llama-tiny", choices=sorted(DEMO_MODELS))
    ap.add_argument("--concurrent", type=int, default=400, help="throughput: requests at once (default 400)")
    ap.add_argument("--rate", type=float, default=250.0, help="throughput: tokens/s per request (default 250)")
    ap.add_argument("--stream-tokens", type=int, default=500, help="throughput: tokens per request (default 500)")
    ap.add_argument("--workers", type=int, default=1, help="throughput: worker processes (default 1)")
    ap.add_argument("--workers-list", default="1,2,4", help="scaling: worker counts (default 1,2,4)")
    ap.add_argument("--producers", type=int, default=None,
                    help="producer processes the requests are spread over (default 1; scaling: 8)")
    ap.add_argument("--vocab", default="text", choices=("text", "bytes"), help="throughput: token ids (see above)")
    ap.add_argument("--threads", type=int, default=2, help="latency: engine threads, direct and in the worker (default 2)")
    ap.add_argument("--worker-tree", metavar="DIR", help="run the workers from DIR/worker")
    ap.add_argument("--compare-tree", metavar="DIR",
                    help="measure twice per round, workers from DIR/worker ('before') and from this tree ('after')")
    ap.add_argument("--rounds", type=int, default=1, help="with --compare-tree: alternations (default 1)")
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--profile", metavar="FILE", help="throughput: run the (first) worker under cProfile, stats to FILE")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrent, args.stream_tokens = 3, 100, 200
    trees: list[tuple[str, str | None]] = (
        [("before", args.compare_tree), ("after", None)] if args.compare_tree else [("", args.worker_tree)])
    rounds = args.rounds if args.compare_tree else 1
    tmp = Path(tempfile.mkdtemp(prefix="lmx-overhead-model-"))
    model = make_model(tmp / args.model, **DEMO_MODELS[args.model])
    failed = False
    if args.what in ("latency", "both"):
        for _ in range(rounds):
            direct = latency_direct(model, args.tokens, args.requests, args.threads)
            pipes = [(label, latency_pipe(model, args.tokens, args.requests, args.threads, tree))
                     for label, tree in trees]
            print_latency(direct, pipes, args.model, args.tokens, args.requests, args.threads)
    if args.what in ("throughput", "both"):
        for _ in range(rounds):
            for label, tree in trees:
                t = throughput(model, args.concurrent, args.rate, args.stream_tokens, workers=args.workers,
                               producers=args.producers or 1, vocab=args.vocab, tree=tree, profile_to=args.profile)
                print_throughput(t, label)
                failed = failed or bool(t["served_twice"] or t["bad_tokens"] or t["errors"])
    if args.what == "scaling":
        rows = []
        for n in (int(x) for x in args.workers_list.split(",")):
            t = throughput(model, args.concurrent, args.rate, args.stream_tokens, workers=n,
                           producers=args.producers or 8, vocab=args.vocab, tree=args.worker_tree)
            print_throughput(t)
            rows.append(t)
            failed = failed or bool(t["served_twice"] or t["bad_tokens"] or t["errors"])
        print_scaling(rows)
    if failed:
        print("FAILED: a request was served twice, lost or repeated a token index, or ended in an error")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
