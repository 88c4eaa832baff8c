"""layermux next to Hugging Face transformers: prefill and batch-1 decode tokens/s, one table.

Owner: benchmarks (issue "engine core"). Same random model (SmolLM2-360M's shape by
default), batch 1, the same thread count for both (torch.set_num_threads). Rows:

  layermux (facade)  the engine in-process through engine.Engine, one row per weight format
  layermux generate  the `layermux generate --json` CLI in a subprocess (its own timings)
  HF transformers    torch eager forward with KV cache, greedy loop

Rows of one weight format are loaded together and take turns run by run (so they share
the machine's outside load); each number is the best of --repeats runs, the median next
to it. See bench/README.md for the exact definitions.

    .venv/bin/python bench/engine_vs_hf.py            # full: f32/bf16/f16/q8_0 vs HF f32/bf16
    .venv/bin/python bench/engine_vs_hf.py --quick    # smoke run: fewer formats, 1 repeat
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    N_THREADS,
    best_of,
    cpu_of_best,
    ensure_model,
    log,
    machine_line,
    measure_group,
    median,
    print_table,
)

LMX_FORMATS = ("f32", "bf16", "f16", "q8_0")
HF_FORMATS = ("f32", "bf16")


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", default="smollm2-360m", help="REFERENCE_SHAPES preset (default smollm2-360m)")
    ap.add_argument("--weights", default=",".join(LMX_FORMATS), help="layermux weight formats")
    ap.add_argument("--hf-weights", default=",".join(HF_FORMATS), help="HF dtypes (f32, bf16, f16)")
    ap.add_argument("--cli-weights", default="bf16", help="formats also run through `layermux generate` ('' = none)")
    ap.add_argument("--threads", type=int, default=N_THREADS, help=f"compute threads of every engine (default {N_THREADS})")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; best and median reported")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: layermux bf16+q8_0, HF f32, CLI bf16, 1 repeat, 128-token prefill, 16-token decode")
    ap.add_argument("--json", type=Path, help="also write all samples to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.weights, args.hf_weights, args.cli_weights = "bf16,q8_0", "f32", "bf16"
        args.repeats, args.prefill_tokens, args.decode_tokens = 1, 128, 16

    print(machine_line(args.threads), flush=True)
    model_dir = ensure_model(args.preset)
    engines = {"layermux (facade)": _csv(args.weights), "layermux generate": _csv(args.cli_weights),
               "HF transformers": _csv(args.hf_weights)}

    from hf_runner import HfRunner
    from lmx_runner import CliRunner, LayermuxRunner

    # One group per weight format, its engines taking turns (common.measure_group), so that
    # a row and the rows it is compared with saw the same outside load.
    samples: dict[tuple[str, str], dict[str, Any]] = {}
    for fmt in dict.fromkeys(w for ws in engines.values() for w in ws):
        runners: dict[str, Any] = {}
        try:
            for eng, ws in engines.items():
                if fmt in ws:
                    log(f"loading {eng} {fmt}")
                    cls = {"layermux (facade)": LayermuxRunner, "layermux generate": CliRunner}.get(eng, HfRunner)
                    runners[eng] = cls(model_dir, fmt, n_threads=args.threads)
            for eng, res in measure_group(runners, repeats=args.repeats, prefill_tokens=args.prefill_tokens,
                                          decode_tokens=args.decode_tokens).items():
                samples[(eng, fmt)] = res
        finally:
            for r in runners.values():
                r.close()
            runners.clear()
            gc.collect()
    rows = [{"engine": eng, "weights": w, **samples[(eng, w)]} for eng, ws in engines.items() for w in ws]

    ref = next((r for r in rows if r["engine"] == "HF transformers" and r["weights"] == "f32"), None)
    ref_pre = best_of(ref["prefill"]) if ref else float("nan")
    ref_dec = best_of(ref["decode"]) if ref else float("nan")
    table = []
    for r in rows:
        pre, dec = best_of(r["prefill"]), best_of(r["decode"])
        table.append([r["engine"], r["weights"], pre, median(r["prefill"]), dec, median(r["decode"]),
                      f"{cpu_of_best(r['decode'], r['decode_cpu']):.2f}", f"{pre / ref_pre:.2f}x", f"{dec / ref_dec:.2f}x"])
    print_table(
        ["engine", "weights", f"prefill tok/s ({args.prefill_tokens})", "median", f"decode tok/s ({args.decode_tokens})",
         "median", "cpu", "prefill vs HF f32", "decode vs HF f32"],
        table,
        title=f"engine_vs_hf: {args.preset} (random weights), batch 1, {args.threads} threads, "
              f"best of {args.repeats} runs",
        notes=[(f"prefill: one {args.prefill_tokens}-token prompt; decode: {args.decode_tokens} tokens after an "
                "8-token prompt, rate over the tokens after the first; cpu: CPU s per wall s of the engine's "
                "process during its best decode run.")],
    )
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "time": time.time(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
