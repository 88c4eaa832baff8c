"""Runs every benchmark with modest defaults, one after the other, and prints their tables.

Owner: benchmarks (`make bench`). Each benchmark runs in its own process (no model,
torch thread pool or engine outlives its script); stdout carries the tables, stderr the
progress. Defaults keep each benchmark under about 10 minutes on 2 quiet cores:

  engine_vs_hf.py          SmolLM2-360M shape: layermux f32/bf16/f16/q8_0 (+ CLI bf16) vs HF f32/bf16
  kernels_vs_llamacpp.py   SmolLM2-360M shape (--all-models: + Qwen2-0.5B, Llama-3.2-1B):
                           layermux vs llama.cpp vs HF, batch 1/4/16/64, bandwidth floor
  multimodel.py            three models through one budget, residency strategies side by side
                           (its own defaults; --quick: 1/4-depth models)

    .venv/bin/python bench/run_all.py              # modest defaults
    .venv/bin/python bench/run_all.py --quick      # every script's --quick (a few minutes)
    .venv/bin/python bench/run_all.py --all-models # all three shapes in kernels_vs_llamacpp
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def run(script: str, args: list[str]) -> int:
    cmd = [sys.executable, str(BENCH / script), *args]
    print(f"$ {' '.join(['python', f'bench/{script}', *args])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, check=False).returncode
    print(f"({script}: exit {rc}, {time.perf_counter() - t0:.0f} s)\n", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--all-models", action="store_true", help="kernels_vs_llamacpp on all three shapes")
    ap.add_argument("--only", choices=("engine_vs_hf", "kernels_vs_llamacpp", "multimodel"), help="run one benchmark")
    args = ap.parse_args(argv)

    jobs: list[tuple[str, list[str]]] = []
    quick = ["--quick"] if args.quick else []
    if args.only in (None, "engine_vs_hf"):
        jobs.append(("engine_vs_hf.py", quick or ["--repeats", "2"]))
    if args.only in (None, "kernels_vs_llamacpp"):
        models = [] if args.quick or args.all_models else ["--models", "smollm2-360m"]
        jobs.append(("kernels_vs_llamacpp.py", quick + models))
    if args.only in (None, "multimodel") and (BENCH / "multimodel.py").exists():
        jobs.append(("multimodel.py", quick))
    failed = [s for s, a in jobs if run(s, a) != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
