"""layermux vs llama.cpp vs HF transformers on the same random weights, against the bandwidth floor.

Owner: benchmarks (issue "fast kernels"). For each model shape (SmolLM2-360M, Qwen2-0.5B,
Llama-3.2-1B; random weights from tools.model_factory, stored bf16), every engine
with the same thread count, one table per model:

  MB/tok        weight bytes one batch-1 decode token must stream (matrices in the row's
                format, norms and biases f32, the tied head counted once)
  ceiling       measured read bandwidth / MB/tok: batch-1 decode tokens/s if weights
                stream at the bandwidth numpy measured at the start of the run
  decode        batch-1 greedy decode tok/s (64 tokens after an 8-token prompt)
  % ceil        decode / ceiling
  prefill       tok/s for one 512-token prompt
  bN            aggregate decode tok/s of N sequences decoding together

layermux runs in matmul precision "exact" (f32 activations, bitwise reproducible) and/or
"fast" (--precision; activations rounded once per matmul to the weights' dot-product
format: bf16 on AVX512_BF16, int8 blocks for q8_0 / q4_0, as llama.cpp does). With
--precision both (the default) the fast row is added only where it differs from exact
(bf16, q8_0, q4_0); f16 and f32 have no fast path.

llama.cpp runs from build/llama-venv (llama-cpp-python built from source without AMX)
on GGUF files written from the same safetensors (bench/_gguf_write.py). A parity table
checks that the three engines compute the same function: last-position logits on one
prompt against HF f32.

    .venv/bin/python bench/kernels_vs_llamacpp.py                          # all three shapes
    .venv/bin/python bench/kernels_vs_llamacpp.py --models smollm2-360m
    .venv/bin/python bench/kernels_vs_llamacpp.py --quick                  # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    N_THREADS,
    Bandwidth,
    best_of,
    ceiling_tps,
    cpu_of_best,
    ensure_model,
    log,
    machine_line,
    measure_group,
    model_config,
    print_table,
    prompt_ids,
    read_bandwidth_gbs,
    weight_bytes_per_token,
)

ALL_MODELS = ("smollm2-360m", "qwen2-0.5b", "llama-3.2-1b")
FAST_DIFFERS = ("bf16", "q8_0", "q4_0")  # formats whose "fast" matmul is not the exact one
LMX_EXACT, LMX_FAST = "layermux exact", "layermux fast"


def lmx_engines(precision: str, formats: list[str]) -> dict[str, list[str]]:
    """layermux row labels -> formats, for --precision exact | fast | both."""
    if precision == "exact":
        return {LMX_EXACT: formats}
    if precision == "fast":
        return {LMX_FAST: formats}
    return {LMX_EXACT: formats, LMX_FAST: [w for w in formats if w in FAST_DIFFERS]}
PARITY_PROMPT = prompt_ids(16, seed=7)


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parity_row(engine: str, weights: str, logits: np.ndarray, ref: np.ndarray) -> list[Any]:
    diff = np.abs(logits.astype(np.float64) - ref)
    rel = float(np.linalg.norm(logits.astype(np.float64) - ref) / np.linalg.norm(ref))
    top1 = "yes" if int(np.argmax(logits)) == int(np.argmax(ref)) else "NO"
    return [engine, weights, top1, f"{diff.max():.4f}", f"{rel:.2e}"]


def bench_model(preset: str, args: argparse.Namespace, bw: Bandwidth) -> dict[str, Any]:
    model_dir = ensure_model(preset)
    cfg = model_config(model_dir)
    bw_gbs = bw.read_1t_gbs if args.threads == 1 else bw.read_gbs
    batch_sizes = [int(b) for b in _csv(args.batch_sizes)]
    llama_why = None
    if _csv(args.llama_weights):
        from llama_runner import llama_available
        llama_why = llama_available()
        if llama_why:
            log(f"llama.cpp skipped: {llama_why}")
    kw = {"repeats": args.repeats, "prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens,
          "batch_sizes": batch_sizes, "batch_tokens": args.batch_tokens}
    engines = {**lmx_engines(args.precision, _csv(args.lmx_weights)),
               "llama.cpp": [] if llama_why else _csv(args.llama_weights), "HF transformers": _csv(args.hf_weights)}
    samples: dict[tuple[str, str], dict[str, Any]] = {}
    parity: list[list[Any]] = []
    ref: np.ndarray | None = None

    from hf_runner import HfRunner
    from llama_runner import LlamaRunner, ensure_gguf
    from lmx_runner import LayermuxRunner
    if not args.no_parity:  # HF f32 reference logits first, then drop the model
        hf = HfRunner(model_dir, "f32")
        ref = hf.last_logits(PARITY_PROMPT).numpy().astype(np.float64)
        hf.close()
        del hf
        gc.collect()
    ggufs = {w: ensure_gguf(model_dir, w) for w in engines["llama.cpp"]}  # before any timing

    # One group per weight format: its engines are loaded together and take turns
    # (common.measure_group), so same-format rows share the same outside load.
    for fmt in dict.fromkeys(w for ws in engines.values() for w in ws):
        runners: dict[str, Any] = {}
        try:
            for eng, ws in engines.items():
                if fmt not in ws:
                    continue
                log(f"[{preset}] loading {eng} {fmt}")
                if eng in (LMX_EXACT, LMX_FAST):
                    runners[eng] = LayermuxRunner(model_dir, fmt, n_threads=args.threads,
                                                  precision="fast" if eng == LMX_FAST else "exact")
                elif eng == "llama.cpp":
                    runners[eng] = LlamaRunner(ggufs[fmt], n_threads=args.threads)
                    runners[eng].batched = args.llama_batched
                else:
                    runners[eng] = HfRunner(model_dir, fmt, n_threads=args.threads)
                if ref is not None and not (eng == "HF transformers" and fmt == "f32"):
                    parity.append(parity_row(eng, fmt, np.asarray(runners[eng].last_logits(PARITY_PROMPT)), ref))
            if args.parity_only:
                continue
            log(f"[{preset}] measuring {fmt}: {', '.join(runners)} in turns")
            for eng, res in measure_group(runners, **kw).items():
                samples[(eng, fmt)] = res
        finally:
            for r in runners.values():
                r.close()
            runners.clear()
            gc.collect()
    rows = [{"engine": eng, "weights": w, **samples[(eng, w)]} for eng, ws in engines.items() for w in ws
            if (eng, w) in samples]

    if args.parity_only:
        print_table(["engine", "weights", "top-1 = HF", "max |dlogit|", "rel L2 err"], parity,
                    title=f"{preset}: parity, last-position logits of a 16-token prompt vs HF f32")
        return {"preset": preset, "rows": [], "parity": parity}
    table = []
    for r in rows:
        mb = weight_bytes_per_token(cfg, r["weights"]) / 1e6
        ceil = ceiling_tps(cfg, r["weights"], bw_gbs)
        dec = best_of(r["decode"])
        table.append([r["engine"], r["weights"], f"{mb:.0f}", ceil, dec, f"{100 * dec / ceil:.0f}%",
                      f"{cpu_of_best(r['decode'], r['decode_cpu']):.2f}", best_of(r["prefill"])]
                     + [best_of(r["batched"].get(str(b), [])) for b in batch_sizes])
    print_table(
        ["engine", "weights", "MB/tok", "ceiling tok/s", "decode tok/s", "% ceil", "cpu",
         f"prefill tok/s ({args.prefill_tokens})"] + [f"b{b} tok/s" for b in batch_sizes],
        table,
        title=f"kernels_vs_llamacpp: {preset} (random weights, {cfg['num_hidden_layers']} layers, hidden "
              f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}), {args.threads} threads, best of {args.repeats} runs",
        notes=[(f"read bandwidth {bw_gbs:.1f} GB/s (numpy, best of kernels, <= {args.threads} threads); cpu: "
                f"CPU s per wall s of the engine's process during its best decode run; "
                f"decode: {args.decode_tokens} tokens after an 8-token prompt; bN: N sequences x "
                f"{args.batch_tokens} tokens, aggregate; n/a = not measured")],
    )
    by = {(r["engine"], r["weights"]): r for r in rows}
    ratio = []
    for w in _csv(args.lmx_weights):
        for lmx in (LMX_EXACT, LMX_FAST):
            if ("llama.cpp", w) in by and (lmx, w) in by:
                a, b = by[(lmx, w)], by[("llama.cpp", w)]
                ratio.append([lmx, w, f"{best_of(a['decode']) / best_of(b['decode']):.2f}x",
                              f"{best_of(a['prefill']) / best_of(b['prefill']):.2f}x"])
    if ratio:
        print_table(["engine", "weights", "decode vs llama.cpp", "prefill vs llama.cpp"], ratio,
                    title=f"{preset}: layermux relative to llama.cpp, same format")
    if parity:
        print_table(["engine", "weights", "top-1 = HF", "max |dlogit|", "rel L2 err"], parity,
                    title=f"{preset}: parity, last-position logits of a 16-token prompt vs HF f32")
    return {"preset": preset, "rows": rows, "parity": parity}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated presets of {ALL_MODELS}")
    ap.add_argument("--lmx-weights", default="bf16,f16,q8_0,q4_0", help="layermux formats (f32,bf16,f16,q8_0,q4_0)")
    ap.add_argument("--precision", choices=("exact", "fast", "both"), default="both",
                    help="layermux matmul precision; both: a fast row too where it differs (bf16, q8_0, q4_0)")
    ap.add_argument("--llama-weights", default="bf16,f16,q8_0,q4_0", help="llama.cpp GGUF types ('' = skip llama.cpp)")
    ap.add_argument("--hf-weights", default="bf16", help="HF dtypes, e.g. f32,bf16 ('' = skip HF; f32 is in engine_vs_hf)")
    ap.add_argument("--batch-sizes", default="4,16,64", help="batched decode sizes ('' = none)")
    ap.add_argument("--batch-tokens", type=int, default=16, help="tokens per sequence in batched decode")
    ap.add_argument("--no-llama-batched", dest="llama_batched", action="store_false",
                    help="skip llama.cpp's batched decode (llama_batch with one seq_id per sequence)")
    ap.add_argument("--threads", type=int, default=N_THREADS, help=f"compute threads of every engine (default {N_THREADS})")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-parity", action="store_true", help="skip the logits parity check")
    ap.add_argument("--parity-only", action="store_true", help="only the parity check (no timings)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: smollm2-360m, q8_0 only, HF f32, batch 4, 1 repeat, short prompts")
    ap.add_argument("--json", type=Path, help="also write all samples to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.lmx_weights, args.llama_weights, args.hf_weights = "smollm2-360m", "q8_0", "q8_0", "f32"
        args.batch_sizes, args.batch_tokens, args.repeats = "4", 8, 1
        args.prefill_tokens, args.decode_tokens = 128, 16
    unknown = set(_csv(args.models)) - set(ALL_MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {ALL_MODELS}")

    print(machine_line(args.threads), flush=True)
    log("measuring read bandwidth (1 GiB, numpy)")
    bw = read_bandwidth_gbs(repeats=3 if args.quick else 5, n_threads=max(args.threads, 1))
    print(f"read bandwidth: {bw.read_gbs:.1f} GB/s (1 thread {bw.read_1t_gbs:.1f}), copy {bw.copy_gbs:.1f} GB/s "
          f"(read+write); " + ", ".join(f"{k} {v:.1f}" for k, v in bw.detail.items()) + "\n", flush=True)
    t0 = time.perf_counter()
    results = [bench_model(p, args, bw) for p in _csv(args.models)]
    log(f"done in {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bw.__dict__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
