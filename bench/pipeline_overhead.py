"""Per-token overhead of the Redis path: the same greedy generations direct on the engine and
through producer SDK -> Redis stream -> worker -> reply stream.

    python bench/pipeline_overhead.py [--tokens 128] [--requests 5]

Both paths use one demo model (random weights) and the same engine settings; the table
shows decode milliseconds per token after the first, and time to first token.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from engine import Engine, EngineConfig, SamplingParams
from engine.model_factory import DEMO_MODELS, make_model
from producer_sdk import Producer
from worker.embedded_redis import EmbeddedRedis


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--model", default="llama-tiny", choices=sorted(DEMO_MODELS))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmx-overhead-"))
    model = make_model(tmp / args.model, **DEMO_MODELS[args.model])
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]

    direct_ms, direct_ttft = [], []
    with Engine(EngineConfig(budget_bytes=256 << 20, n_threads=2)) as eng:
        eng.load_model("m", model)
        for i in range(args.requests):
            t0 = time.perf_counter()
            eng.submit(i + 1, "m", prompt, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))
            first = last = None
            n = 0
            done = False
            while not done:
                for ev in eng.wait_events(5):
                    if ev.kind == "token":
                        n += 1
                        last = time.perf_counter()
                        first = first or last
                    else:
                        done = True
            assert first is not None and last is not None
            direct_ttft.append(1000 * (first - t0))
            direct_ms.append(1000 * (last - first) / (n - 1))

    pipe_ms, pipe_ttft = [], []
    with EmbeddedRedis() as server:
        cfg = tmp / "worker.toml"
        cfg.write_text(f'redis_url = "{server.url}"\n[device]\nbudget = "256MiB"\nn_threads = 2\n'
                       f'[[models]]\nname = "m"\npath = "{model}"\nmax_tokens_limit = 4096\n')
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = redis.Redis.from_url(server.url)
            for _ in range(600):
                if r.exists("lmx:{m:m}:limits"):
                    break
                time.sleep(0.1)
            r.close()
            with Producer(server.url) as producer:
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    h = producer.submit("m", prompt_ids=prompt, max_tokens=args.tokens, temperature=0.0,
                                        ignore_eos=True)
                    first = last = None
                    n = 0
                    for ev in h.events():
                        if ev.type == "token":
                            n += len(ev.token_ids)
                            last = time.perf_counter()
                            first = first or last
                    assert first is not None and last is not None
                    pipe_ttft.append(1000 * (first - t0))
                    pipe_ms.append(1000 * (last - first) / (n - 1))
        finally:
            proc.terminate()
            proc.wait(30)

    med = statistics.median
    print(f"model {args.model}, {args.tokens} greedy tokens, {args.requests} sequential requests, 2 threads")
    print(f"{'path':<28}{'ms/token':>10}{'TTFT ms':>10}")
    print(f"{'engine (direct)':<28}{med(direct_ms):>10.3f}{med(direct_ttft):>10.1f}")
    print(f"{'SDK -> Redis -> worker':<28}{med(pipe_ms):>10.3f}{med(pipe_ttft):>10.1f}")
    print(f"overhead per token: {med(pipe_ms) - med(direct_ms):+.3f} ms; time to first token: "
          f"{med(pipe_ttft) - med(direct_ttft):+.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
