"""Multi-model benchmark: three models through one device budget, four residency strategies side by side.

    python bench/multimodel.py                       # reference shapes, budget 50 % of the weights
    python bench/multimodel.py --quick               # 1/4-depth shapes, for a smoke run
    python bench/multimodel.py --budget-fraction 0.65 --concurrency 1 4 16

Strategies (same engine, same kernels, same requests):
  (a) layermux  — layer streaming with prefetch overlap and next-use (Belady) eviction; models that fit stay resident
  (b) swap      — whole-model swapping: a model is copied in whole when scheduled, evicting others (what Ollama does)
  (c) no-overlap— layer streaming, copies on demand only (prefetch depth 0)
  (d) lru       — layer streaming with prefetch, LRU eviction
Columns: aggregate generated tokens/s over the run; time to first token p50/p99; device bytes copied per generated
token; the share of step time compute spent waiting on copies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from engine import CapacityError, Engine, EngineConfig, SamplingParams
from engine.model_factory import REFERENCE_SHAPES, make_model

MODELS = ("smollm2-360m", "qwen2-0.5b", "llama-3.2-1b")
STRATEGIES = {
    "(a) layermux": dict(residency="auto", prefetch_depth=2, eviction="belady"),
    "(b) swap": dict(residency="swap", prefetch_depth=2, eviction="belady"),
    "(c) no-overlap": dict(residency="auto", prefetch_depth=0, eviction="belady"),
    "(d) lru": dict(residency="auto", prefetch_depth=2, eviction="lru"),
}


def ensure_models(root: Path, quick: bool, dtype: str) -> dict[str, Path]:
    out = {}
    for name in MODELS:
        shape = dict(REFERENCE_SHAPES[name])
        if quick:  # keep the heads in proportion: a full vocabulary would dominate a 1/4-depth model
            shape["n_layers"] = max(2, shape["n_layers"] // 4)
            shape["vocab"] = shape["vocab"] // 4
        d = root / f"{name}-{dtype}{'-quick' if quick else ''}"
        if not (d / "config.json").is_file():
            print(f"creating {d.name} (random weights) ...", file=sys.stderr, flush=True)
            make_model(d, dtype=dtype, **shape)
        out[name] = d
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_one(dirs: dict[str, Path], budget: int, strategy: dict[str, Any], conc: int, max_tokens: int,
            prompt_len: int, threads: int) -> dict[str, Any]:
    cfg = EngineConfig(budget_bytes=budget, n_threads=threads, prefetch_depth=strategy["prefetch_depth"],
                       eviction=strategy["eviction"], max_batch_tokens=max(256, prompt_len))
    with Engine(cfg) as eng:
        # Largest first: auto residency is decided at load, greedily.
        for name, d in sorted(dirs.items(), key=lambda kv: -sum(f.stat().st_size for f in kv[1].glob("*.safetensors"))):
            try:
                eng.load_model(name, d, residency=strategy["residency"], max_context=prompt_len + max_tokens + 16)
            except CapacityError as e:
                return {"error": f"{name}: {str(e).split(';')[0]}"}
        residency = {n: ("resident" if m["resident"] else f"{m['n_slots']} slots") for n, m in eng.models().items()}
        if strategy["residency"] == "swap":
            residency = {n: "swap" for n in dirs}
        t_submit: dict[int, float] = {}
        t_first: dict[int, float] = {}
        rid = 0
        t0 = time.perf_counter()
        for i in range(conc):
            for j, name in enumerate(dirs):
                rid += 1
                prompt = [(rid * 31 + k) % 1000 + 10 for k in range(prompt_len)]
                t_submit[rid] = time.perf_counter()
                eng.submit(rid, name, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        open_ids = set(t_submit)
        n_tokens = 0
        while open_ids:
            for ev in eng.wait_events(10.0):
                if ev.kind == "token":
                    n_tokens += 1
                    t_first.setdefault(ev.req_id, time.perf_counter())
                elif ev.kind == "error":
                    raise RuntimeError(ev.message)
                else:
                    open_ids.discard(ev.req_id)
        wall = time.perf_counter() - t0
        st = eng.stats()
        ttft = [1000 * (t_first[r] - t_submit[r]) for r in t_first]
        return {
            "tok_s": n_tokens / wall,
            "ttft_p50": pct(ttft, 0.5),
            "ttft_p99": pct(ttft, 0.99),
            "copied_per_tok": st["bytes_copied"] / max(1, n_tokens),
            "wait_frac": st["copy_wait_ms"] / max(1e-9, st["step_ms_total"]),
            "residency": residency,
            "wall_s": wall,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/4-depth models, fewer tokens")
    ap.add_argument("--budget-fraction", type=float, default=0.5, help="device budget as a share of all weight bytes")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests per model")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent / "build" / "bench-models")
    args = ap.parse_args()
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    dirs = ensure_models(args.models_dir, args.quick, args.dtype)
    with Engine(EngineConfig(budget_bytes=64 << 30)) as probe:
        weights = {}
        for n, d in dirs.items():
            weights[n] = probe.load_model(n, d, residency="streamed", stream_slots=1,
                                          max_context=args.prompt_len + max_tokens + 16)["weight_bytes"]
    total = sum(weights.values())
    budget = int(total * args.budget_fraction)
    print(f"weights: " + ", ".join(f"{n} {w / 2**20:.0f} MiB" for n, w in weights.items())
          + f"; total {total / 2**20:.0f} MiB; budget {budget / 2**20:.0f} MiB ({args.budget_fraction:.0%}); "
          f"{args.threads} threads; {max_tokens} tokens/request, prompt {args.prompt_len}")
    header = f"{'strategy':<16}{'req/model':>10}{'tok/s':>9}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}" \
             f"{'MiB copied/tok':>16}{'copy wait':>11}  residency"
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for conc in args.concurrency:
        for sname in args.strategies:
            r = run_one(dirs, budget, STRATEGIES[sname], conc, max_tokens, args.prompt_len, args.threads)
            results[(sname, conc)] = r
            if "error" in r:
                print(f"{sname:<16}{conc:>10}   n/a: {r['error']}")
                continue
            res = ", ".join(f"{n.split('-')[0]}:{v}" for n, v in r["residency"].items())
            print(f"{sname:<16}{conc:>10}{r['tok_s']:>9.1f}{r['ttft_p50']:>13.0f}{r['ttft_p99']:>13.0f}"
                  f"{r['copied_per_tok'] / 2**20:>16.1f}{r['wait_frac']:>10.0%}  {res}", flush=True)
    for conc in args.concurrency:
        a, b = results.get(("(a) layermux", conc)), results.get(("(b) swap", conc))
        if a and b and "error" not in a and "error" not in b:
            print(f"(a)/(b) at {conc} requests per model: {a['tok_s'] / b['tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
