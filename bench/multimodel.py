"""Multi-model benchmark: three models through one device budget, residency strategies side by side.

    python bench/multimodel.py                 # reference shapes; budget 50 % of the weights, then the smallest
                                               # budget whole-model swapping runs in; 1, 4, 16 requests per model
    python bench/multimodel.py --runs half --concurrency 16 --repeats 3
    python bench/multimodel.py --quick         # 1/4-depth shapes, a smoke run (not the reference)
    python bench/multimodel.py --small --budgets 0.4 0.5 0.75 1.0 --link-ratio 20   # issue 16's grid, small shapes

Link model (issue 16): --link-ratio R paces every host->device copy at (this machine's measured memory read
bandwidth) / R, through the CPU device's link model (EngineConfig.link_gbps), so copies cost what they cost on a
GPU behind PCIe (a GTX 1070: ~256 GB/s reads, ~12 GB/s PCIe 3.0 x16, about 1:20). 0 = unthrottled (copies at memcpy
speed through the same DRAM compute reads). --small: the three models scaled down (SMALL_SHAPES: same
architectures, GQA ratios and relative sizes, about 1/16 of the bytes) so a grid runs in minutes on 2 cores.

Strategies (same engine, same kernels, same requests, same per-model slot split):
  (a) adaptive    layermux as it ships: adaptive turns (engine/src/turns.h, EngineConfig.max_turn_steps = 32): each
                  turn streams on the model's own slots or borrows the other models' slot regions for up to
                  max_turn_steps steps, whichever copies fewer bytes per generated token; prefetch depth 2, Belady
  (a') stream     the fixed policy before adaptive turns (max_turn_steps = 0): every step re-picks a model by stride,
                  each streamed model keeps its own slots (layer streaming with prefetch overlap and Belady eviction)
  (b) swap        whole-model swapping: a model is copied in whole when scheduled, evicting others. The engine
                  interleaves models step by step, so with three busy models this swaps on (almost) every step.
  (b') swap-drain what Ollama does with queued requests for several models: one model's requests run to completion
                  before the next model is swapped in. Every request is still timed from t0.
  (c) no-overlap  layer streaming, copies on demand only (prefetch depth 0)
  (d) lru         layer streaming with prefetch, LRU eviction
  (s) stream-min  pure per-step streaming: every streamed model gets only the minimum slots (MIN_SLOTS), so each
                  step re-copies (almost) all of its layers
Columns: aggregate generated tokens/s over the timed run; time to first token p50/p99 (every request is submitted
at t0); device bytes copied per generated token; copy wait = time compute spent waiting on copies / step time;
ready = acquires of streamed layers that found the layer already on device; steps = engine steps.

Budget split. Every streamed model needs its head (final norm + lm_head) resident, a workspace, and at least two
layer slots (double buffering); the KV cache needs room for every request of the largest concurrency. What is
left of the ledger cap is dealt out one layer slot at a time to the model with the smallest share of its layers
on device, so every model keeps about the same share of its layers cached. Bytes copied per round of steps do not
depend on the split (a slot of any model saves its own size once per round), so the equal-share split costs
nothing in copies and sacrifices no model's latency to another's. The engine's greedy "auto" policy is not used:
it decides at each load without knowing which models come next.

Every cell runs in its own process (a fresh engine, and a failure such as an out-of-budget swap cannot take the
table down) and starts with an untimed warm-up request per model: in this VM the first touch of a device page
runs at ~1 GB/s against ~7 GB/s for a copy into a warm one, and whole-model swapping would otherwise pay it in the
timed run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import (
    MIN_SLOTS,
    CapacityError,
    Engine,
    EngineConfig,
    EventKind,
    Eviction,
    ModelFootprint,
    ModelLoadOptions,
    ResidencyMode,
    SamplingParams,
    plan_slots,
)
from engine._core import read_bandwidth_gbs
from tools.model_factory import REFERENCE_SHAPES, make_model

MODELS = ("smollm2-360m", "qwen2-0.5b", "llama-3.2-1b")
STRATEGIES: dict[str, dict[str, Any]] = {
    "(a) adaptive": {"residency": "split", "prefetch_depth": 2, "eviction": "belady",
                     "max_turn_steps": EngineConfig().max_turn_steps},
    "(a') stream": {"residency": "split", "prefetch_depth": 2, "eviction": "belady"},
    "(b) swap": {"residency": "swap", "prefetch_depth": 2, "eviction": "belady"},
    "(b') swap-drain": {"residency": "swap", "prefetch_depth": 2, "eviction": "belady", "drain": True},
    "(c) no-overlap": {"residency": "split", "prefetch_depth": 0, "eviction": "belady"},
    "(d) lru": {"residency": "split", "prefetch_depth": 2, "eviction": "lru"},
    "(s) stream-min": {"residency": "stream-min", "prefetch_depth": 2, "eviction": "belady"},
}
# --small: the reference shapes scaled down (width 1/4-1/2, depth 1/2-1, vocabulary 16384 or 8192), keeping each
# model's architecture, GQA ratio, tied head and the ordering of sizes (Llama-3.2-1B the largest).
SMALL_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-360m": {"arch": "llama", "hidden": 384, "n_layers": 16, "n_heads": 6, "n_kv_heads": 2,
                     "intermediate": 1024, "vocab": 8192, "tie_embeddings": True, "rope_theta": 100000.0},
    "qwen2-0.5b": {"arch": "qwen2", "hidden": 448, "n_layers": 12, "n_heads": 7, "n_kv_heads": 1,
                   "intermediate": 1536, "vocab": 16384, "tie_embeddings": True, "rope_theta": 1000000.0,
                   "rms_norm_eps": 1e-6},
    "llama-3.2-1b": {"arch": "llama", "hidden": 512, "n_layers": 16, "n_heads": 8, "n_kv_heads": 2,
                     "intermediate": 2048, "vocab": 16384, "tie_embeddings": True, "rope_theta": 500000.0},
}
CAP_FRACTION = EngineConfig().cap_fraction
CELL_TIMEOUT_S = 600
MiB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models

def ensure_models(root: Path, quick: bool, dtype: str, small: bool = False) -> dict[str, Path]:
    """Creates the random reference-shape models once (written to a temporary folder, renamed when complete)."""
    out = {}
    for name in MODELS:
        shape = dict(SMALL_SHAPES[name] if small else REFERENCE_SHAPES[name])
        if quick:  # keep the heads in proportion: a full vocabulary would dominate a 1/4-depth model
            shape["n_layers"] = max(2, shape["n_layers"] // 4)
            shape["vocab"] = shape["vocab"] // 4
        d = root / f"{name}-{dtype}{'-quick' if quick else ''}{'-small' if small else ''}"
        if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
            tmp = d.with_name(d.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"creating {d} (random weights, {dtype}; a few minutes for the reference shapes) ...")
            def progress(done: int, total: int, tensor: str, name: str = name, t0: float = time.perf_counter()) -> None:
                if done % 24 == 0 or done == total:
                    log(f"  {name}: {done}/{total} tensors written ({time.perf_counter() - t0:.0f} s)")

            make_model(tmp, dtype=dtype, progress=progress, **shape)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        out[name] = d
    return out


@dataclass(frozen=True)
class Sizes:
    """Device bytes of one model (its engine footprint, read from the file headers)."""

    n_layer: int
    weight_bytes: int  # all units: layers + head
    layer_bytes: int  # one layer unit (= one slot)
    head_bytes: int  # final norm + lm_head
    ws_bytes: int  # activation workspace
    kv_bytes: int  # KV blocks of one request at full length (prompt + generated)


def measure_sizes(dirs: dict[str, Path], max_context: int, n_tokens: int, threads: int,
                  max_batch_tokens: int, kv_dtype: str = "f32") -> dict[str, Sizes]:
    out = {}
    with Engine(EngineConfig(n_threads=threads, max_batch_tokens=max_batch_tokens, kv_dtype=kv_dtype)) as calc:
        for n, d in dirs.items():
            f = calc.footprint(d, max_context=max_context)
            blocks = -(-n_tokens // f.kv_block_tokens)
            out[n] = Sizes(n_layer=f.n_layer, weight_bytes=f.weight_bytes, layer_bytes=f.layer_bytes,
                           head_bytes=f.head_bytes, ws_bytes=f.workspace_bytes, kv_bytes=blocks * f.kv_block_bytes)
    return out


# --------------------------------------------------------------------------- the budget split

@dataclass
class Split:
    budget: int
    cap: int
    kv_room: int
    slots: dict[str, int]  # streamed layer slots per model (n_layer: every layer on device, loaded resident)
    left: int  # cap bytes no slot could use

    def device_bytes(self, n: str, s: Sizes) -> int:
        return s.head_bytes + self.slots[n] * s.layer_bytes


def split_budget(budget: int, sizes: dict[str, Sizes], max_conc: int) -> Split | None:
    """The per-model slot counts for a budget (engine.plan_slots, as the worker plans them); None
    when the minimums do not fit."""
    cap = int(budget * CAP_FRACTION)
    kv_room = sum(max_conc * s.kv_bytes for s in sizes.values())
    footprints = {n: ModelFootprint(n_layer=s.n_layer, layer_bytes=s.layer_bytes, head_bytes=s.head_bytes,
                                    workspace_bytes=s.ws_bytes) for n, s in sizes.items()}
    slots = plan_slots(footprints, cap, kv_room, MIN_SLOTS)
    if slots is None:
        return None
    used = kv_room + sum(f.device_bytes(slots[n]) for n, f in footprints.items())
    return Split(budget, cap, kv_room, slots, cap - used)


def swap_min_budget(sizes: dict[str, Sizes], max_conc: int) -> tuple[int, int]:
    """The smallest budget whole-model swapping runs in, and the fragmentation allowance inside it.

    The cap must hold the largest model whole, every workspace (booked at load) and the KV room. KV blocks
    booked between swaps stay where first-fit put them and cut the free space into holes, and a hole can waste
    up to one unit that does not fit in it: the allowance is one layer of the largest model. It is empirical:
    at the reference shapes the swap-in of Llama-3.2-1B found no hole at 16 requests per model without it
    (2856 MiB: the engine aborts), and ran at 1, 4 and 16 from 2880 MiB up. The 1/4-depth smoke shapes need
    more (their (b) rows may read n/a).
    """
    big = max(sizes.values(), key=lambda s: s.weight_bytes)
    allowance = big.layer_bytes
    need = big.weight_bytes + sum(s.ws_bytes + max_conc * s.kv_bytes for s in sizes.values()) + allowance
    return math.ceil(need / CAP_FRACTION / MiB) * MiB, allowance


def describe_split(sp: Split, sizes: dict[str, Sizes]) -> list[str]:
    lines = [(f"  ledger cap {sp.cap / MiB:.0f} MiB (= {CAP_FRACTION:.0%} of the budget); KV room "
              f"{sp.kv_room / MiB:.0f} MiB (every request of the largest concurrency at full length)")]
    for n, s in sizes.items():
        k = sp.slots[n]
        lines.append(f"  {n:<14} head {s.head_bytes / MiB:5.0f} MiB + {k:2d}/{s.n_layer:2d} layers x "
                     f"{s.layer_bytes / MiB:5.1f} MiB = {sp.device_bytes(n, s) / MiB:5.0f} MiB of "
                     f"{s.weight_bytes / MiB:5.0f} MiB weights ({k / s.n_layer:.0%} of layers on device), "
                     f"workspace {s.ws_bytes / MiB:.0f} MiB")
    lines.append(f"  unassigned: {sp.left / MiB:.0f} MiB (smaller than any model's next layer)")
    return lines


# --------------------------------------------------------------------------- one measurement (child process)

def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_one(dirs: dict[str, Path], sizes: dict[str, Sizes], budget: int, slots: dict[str, int],
            strategy: dict[str, Any], conc: int, max_tokens: int, prompt_len: int, threads: int,
            max_batch_tokens: int, link_gbps: float = 0.0, kv_dtype: str = "f32",
            first_token_ms: float = EngineConfig().first_token_ms) -> dict[str, Any]:
    cfg = EngineConfig(budget_bytes=budget, n_threads=threads, prefetch_depth=strategy["prefetch_depth"],
                       eviction=Eviction.__members__[strategy["eviction"]], max_batch_tokens=max_batch_tokens,
                       link_gbps=link_gbps, kv_dtype=kv_dtype, max_turn_steps=strategy.get("max_turn_steps", 0),
                       first_token_ms=first_token_ms)
    max_context = prompt_len + max_tokens + 16
    with Engine(cfg) as eng:
        for name, d in dirs.items():
            if strategy["residency"] == "swap":
                opt = ModelLoadOptions(residency=ResidencyMode.swap)
            elif strategy["residency"] == "stream-min" and MIN_SLOTS < sizes[name].n_layer:
                opt = ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=MIN_SLOTS)
            elif slots[name] >= sizes[name].n_layer:
                opt = ModelLoadOptions(residency=ResidencyMode.resident)
            else:
                opt = ModelLoadOptions(residency=ResidencyMode.streamed, stream_slots=slots[name])
            try:
                eng.load_model(name, d, options=opt, max_context=max_context)
            except CapacityError as e:
                return {"error": f"{name}: {str(e).split(';')[0]}"}
        # KV positions the ledger has room for after loading, per model (each as if it took all the free KV room)
        kv_tokens = {n: o.kv_capacity_tokens for n, o in eng.ledger().models.items()}
        # Warm-up, untimed (see the module docstring): one short request per model.
        warm = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        for i, name in enumerate(dirs):
            eng.submit(-1 - i, name, [10, 11, 12, 13], warm)
        n_open = len(dirs)
        while n_open:
            n_open -= sum(ev.kind != EventKind.token for ev in eng.wait_events(10.0))
        st0 = eng.stats()
        t_first: dict[int, float] = {}
        batches: list[list[tuple[int, str, list[int]]]] = []
        rid = 0
        for name in dirs:
            batch = []
            for _ in range(conc):
                rid += 1
                batch.append((rid, name, [(rid * 31 + k) % 1000 + 10 for k in range(prompt_len)]))
            batches.append(batch)
        if not strategy.get("drain"):  # everything at once, interleaved across models
            batches = [[r for i in range(conc) for r in (b[i] for b in batches)]]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        n_tokens = 0
        t0 = time.perf_counter()  # every request counts as submitted now; drain mode holds later models back
        for batch in batches:
            # The step thread is held while a batch is submitted, so its first step sees every request of it
            # (all submitted at t0); else the first step can plan with the first request alone.
            eng.debug_stall(True)
            try:
                for r, name, prompt in batch:
                    eng.submit(r, name, prompt, params)
            finally:
                eng.debug_stall(False)
            open_ids = {r for r, _, _ in batch}
            while open_ids:
                for ev in eng.wait_events(10.0):
                    if ev.kind == EventKind.token:
                        n_tokens += 1
                        t_first.setdefault(ev.req_id, time.perf_counter())
                    elif ev.kind == EventKind.error:
                        raise RuntimeError(ev.message)
                    else:
                        open_ids.discard(ev.req_id)
        wall = time.perf_counter() - t0
        st1 = eng.stats()
    st = {"bytes_copied": st1.residency.bytes_copied - st0.residency.bytes_copied,
          "copy_wait_ms": st1.residency.copy_wait_ms - st0.residency.copy_wait_ms,
          "copy_ms": st1.residency.copy_ms - st0.residency.copy_ms,
          "step_ms_total": st1.step_ms_total - st0.step_ms_total,
          "n_hits": st1.residency.n_hits - st0.residency.n_hits,
          "n_misses": st1.residency.n_misses - st0.residency.n_misses,
          "n_preemptions": st1.n_preemptions - st0.n_preemptions, "n_steps": st1.n_steps - st0.n_steps,
          "n_turns": st1.n_turns - st0.n_turns, "n_borrow_turns": st1.n_borrow_turns - st0.n_borrow_turns}
    ttft = [1000 * (t - t0) for t in t_first.values()]
    n_acq = st["n_hits"] + st["n_misses"]
    return {
        "tok_s": n_tokens / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "copied_per_tok": st["bytes_copied"] / max(1, n_tokens),
        "wait_frac": st["copy_wait_ms"] / max(1e-9, st["step_ms_total"]),
        "ready": st["n_hits"] / n_acq if n_acq and strategy["residency"] != "swap" else float("nan"),
        "n_steps": st["n_steps"],
        "n_preemptions": st["n_preemptions"],
        "n_turns": st["n_turns"],
        "n_borrow_turns": st["n_borrow_turns"],
        "wall_s": wall,
        "copy_ms": st["copy_ms"],
        "kv_tokens": kv_tokens,
    }


def cell_main(spec: dict[str, Any]) -> int:
    sizes = {n: Sizes(**s) for n, s in spec["sizes"].items()}
    r = run_one({n: Path(d) for n, d in spec["dirs"].items()}, sizes, spec["budget"], spec["slots"],
                STRATEGIES[spec["strategy"]], spec["conc"], spec["max_tokens"], spec["prompt_len"], spec["threads"],
                spec["max_batch_tokens"], spec.get("link_gbps", 0.0), spec.get("kv_dtype", "f32"),
                spec.get("first_token_ms", EngineConfig().first_token_ms))
    print(json.dumps(r))
    return 0


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh process; an engine abort becomes an error row."""
    try:
        p = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)], check=False,
                           capture_output=True, text=True, timeout=CELL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CELL_TIMEOUT_S} s"}
    if p.returncode == 0:
        return dict(json.loads(p.stdout.strip().splitlines()[-1]))
    lines = [ln.strip() for ln in p.stderr.strip().splitlines() if ln.strip()]
    return {"error": f"engine process died (exit {p.returncode}): " + (lines[-1] if lines else "no output")}


def median_of(rs: list[dict[str, Any]]) -> dict[str, Any]:
    if any("error" in r for r in rs):
        return next(r for r in rs if "error" in r)
    out = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "kv_tokens"}
    out["kv_tokens"] = rs[0].get("kv_tokens", {})
    out["tok_s_runs"] = sorted(r["tok_s"] for r in rs)
    return out


# --------------------------------------------------------------------------- tables

HEADER = (f"{'strategy':<16}{'req/model':>10}{'tok/s':>8}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
          f"{'MiB copied/tok':>16}{'copy wait':>11}{'ready':>7}{'steps':>7}{'turns':>8}{'wall s':>8}")
LAYERMUX = ("(a) adaptive", "(a') stream")


def row(sname: str, conc: int, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{sname:<16}{conc:>10}     n/a — {r['error']}"
    ready = "-" if math.isnan(r["ready"]) else f"{r['ready']:.0%}"
    turns = f"{r.get('n_turns', 0):.0f}/{r.get('n_borrow_turns', 0):.0f}" if r.get("n_turns") else "-"
    return (f"{sname:<16}{conc:>10}{r['tok_s']:>8.2f}{r['ttft_p50']:>13.0f}{r['ttft_p99']:>13.0f}"
            f"{r['copied_per_tok'] / MiB:>16.1f}{r['wait_frac']:>11.1%}{ready:>7}{r['n_steps']:>7.0f}{turns:>8}"
            f"{r['wall_s']:>8.1f}" + (f"  ({r['n_preemptions']:.0f} preemptions)" if r["n_preemptions"] else "")
            + ("  tok/s runs " + " ".join(f"{x:.1f}" for x in r["tok_s_runs"]) if len(r["tok_s_runs"]) > 1 else ""))


def run_table(title: str, dirs: dict[str, Path], sizes: dict[str, Sizes], budget: int, args: argparse.Namespace,
              note: str = "") -> dict[tuple[str, int], dict[str, Any]]:
    total = sum(s.weight_bytes for s in sizes.values())
    sp = split_budget(budget, sizes, max(args.concurrency))
    print(f"\n## {title}: budget {budget / MiB:.0f} MiB = {budget / total:.1%} of the {total / MiB:.0f} MiB of weights")
    if note:
        print(note)
    if sp is None:
        print("  the streaming minimums (head + 2 slots + workspace per model, plus KV room) do not fit")
        return {}
    print("\n".join(describe_split(sp, sizes)))
    big = max(sizes, key=lambda n: sizes[n].weight_bytes)
    swap_room = sp.cap - sum(s.ws_bytes for s in sizes.values())
    if sizes[big].weight_bytes > swap_room:
        print(f"  whole-model swapping: {big} alone needs {sizes[big].weight_bytes / MiB:.0f} MiB of weights but at "
              f"most {swap_room / MiB:.0f} MiB of the cap are left after the workspaces: (b) cannot run here")
    print()
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for conc in args.concurrency:
        # Repeats go round the strategies, so a slow spell of the shared machine hits each about equally.
        runs: dict[str, list[dict[str, Any]]] = {sname: [] for sname in args.strategies}
        for rep in range(args.repeats):
            for sname in args.strategies:
                if runs[sname] and "error" in runs[sname][-1]:
                    continue  # an error repeats identically (no budget for swapping, an abort)
                spec = {"dirs": {n: str(d) for n, d in dirs.items()},
                        "sizes": {n: asdict(s) for n, s in sizes.items()}, "budget": budget, "slots": sp.slots,
                        "strategy": sname, "conc": conc, "max_tokens": args.max_tokens,
                        "prompt_len": args.prompt_len, "threads": args.threads,
                        "max_batch_tokens": args.max_batch_tokens, "link_gbps": args.link_gbps,
                        "kv_dtype": args.kv_dtype, "first_token_ms": args.first_token_ms}
                log(f"  [{time.strftime('%H:%M:%S')}] {title} | {sname} | {conc} req/model | run {rep + 1} ...")
                runs[sname].append(run_cell(spec))
        for sname in args.strategies:
            results[(sname, conc)] = median_of(runs[sname])
            print(row(sname, conc, results[(sname, conc)]), flush=True)
    for conc in args.concurrency:
        print(dominance(results, conc))
    return results


def dominance(results: dict[tuple[str, int], dict[str, Any]], conc: int) -> str:
    """Issue 16's target for one cell: (a)'s tok/s >= the best baseline's and its TTFT p99 <= 1.2x the best
    baseline's, read two ways: against the baseline with the highest tok/s (its p99), and against each metric's
    best baseline (the highest tok/s of any, the lowest p99 of any). Baselines: every strategy but layermux's."""
    a = results.get(("(a) adaptive", conc))
    base = {n: r for (n, c), r in results.items() if c == conc and n not in LAYERMUX and "error" not in r}
    if not a or "error" in a or not base:
        return f"target at {conc:>2} req/model: n/a"
    top = max(base, key=lambda n: base[n]["tok_s"])
    low = min(base, key=lambda n: base[n]["ttft_p99"])
    tput = a["tok_s"] / base[top]["tok_s"]
    p99_top = a["ttft_p99"] / base[top]["ttft_p99"]
    p99_low = a["ttft_p99"] / base[low]["ttft_p99"]
    ok1 = tput >= 1.0 and p99_top <= 1.2
    ok2 = tput >= 1.0 and p99_low <= 1.2
    return (f"target at {conc:>2} req/model: (a) tok/s = {tput:.2f}x best baseline {top.split()[0]}; TTFT p99 = "
            f"{p99_top:.2f}x {top.split()[0]}'s -> {'MET' if ok1 else 'not met'}; vs lowest p99 "
            f"{low.split()[0]} {p99_low:.2f}x -> {'MET' if ok2 else 'not met'} (both metrics' best)")


def kv_table(dirs: dict[str, Path], args: argparse.Namespace) -> None:
    """KV in f32 vs f16 at one budget (--budget-fraction) and the largest concurrency, strategy (a). Rows: f32; f16
    with f32's layer slots (the same weights on device: the KV positions the ledger has room for after loading,
    each model as if it took all the free KV room); f16 re-split (the KV room it no longer needs goes to layer
    slots: what that buys in throughput)."""
    conc = max(args.concurrency)
    max_context = args.prompt_len + args.max_tokens + 16
    print(f"\n## KV f32 vs f16: budget {args.budget_fraction:.0%} of the weights, {conc} requests per model, "
          f"strategy (a)")
    print(f"{'KV':<16}{'KV tokens ' + MODELS[-1]:>26}{'KV tokens ' + MODELS[1]:>24}{'slots':>12}{'tok/s':>8}"
          f"{'TTFT p50 ms':>13}{'MiB copied/tok':>16}{'copy wait':>11}")
    first_slots: dict[str, int] | None = None
    for label, kv in (("f32", "f32"), ("f16 same slots", "f16"), ("f16 re-split", "f16")):
        sizes = measure_sizes(dirs, max_context, args.prompt_len + args.max_tokens, args.threads,
                              args.max_batch_tokens, kv)
        budget = int(sum(s.weight_bytes for s in sizes.values()) * args.budget_fraction)
        sp = split_budget(budget, sizes, conc)
        if sp is None:
            print(f"{label:<16} the streaming minimums do not fit")
            continue
        if first_slots is None:
            first_slots = dict(sp.slots)
        elif label == "f16 same slots":
            sp.slots = dict(first_slots)
        spec = {"dirs": {n: str(d) for n, d in dirs.items()}, "sizes": {n: asdict(s) for n, s in sizes.items()},
                "budget": budget, "slots": sp.slots, "strategy": "(a) adaptive", "conc": conc,
                "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "threads": args.threads,
                "max_batch_tokens": args.max_batch_tokens, "link_gbps": args.link_gbps, "kv_dtype": kv}
        r = median_of([run_cell(spec) for _ in range(args.repeats)])
        if "error" in r:
            print(f"{label:<16} n/a — {r['error']}")
            continue
        slots = "/".join(str(sp.slots[n]) for n in MODELS)
        print(f"{label:<16}{r['kv_tokens'][MODELS[-1]]:>26}{r['kv_tokens'][MODELS[1]]:>24}{slots:>12}{r['tok_s']:>8.2f}"
              f"{r['ttft_p50']:>13.0f}{r['copied_per_tok'] / MiB:>16.1f}{r['wait_frac']:>11.1%}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/4-depth models (a smoke run, not the reference)")
    ap.add_argument("--budget-fraction", type=float, default=0.5, help="run 'half': budget as a share of all weights")
    ap.add_argument("--runs", nargs="+", default=["half", "swap-min"], choices=["half", "swap-min"],
                    help="half: --budget-fraction of the weights; swap-min: the smallest budget (b) runs in")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests per model")
    ap.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the table shows the median")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent.parent / "build" / "bench-models")
    ap.add_argument("--small", action="store_true", help="SMALL_SHAPES: the three models scaled down (minutes, 2 cores)")
    ap.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="budgets as shares of all weights (replaces --runs); issue 16: 0.4 0.5 0.75 1.0")
    ap.add_argument("--link-ratio", type=float, default=0.0,
                    help="copy:read bandwidth 1:R through the CPU device's link model (20 ~ a GPU on PCIe 3.0); 0 = off")
    ap.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--first-token-ms", type=float, default=EngineConfig().first_token_ms,
                    help="(a)'s EngineConfig.first_token_ms: the longest expected wait for a first token behind "
                         "another model's drained turn before a prefill round runs first (0 = always)")
    ap.add_argument("--kv-table", action="store_true", help="only the KV f32 vs f16 table (--budget-fraction)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one measurement, print it as JSON
    args = ap.parse_args()
    if args.cell:
        return cell_main(json.loads(args.cell))
    t_start = time.perf_counter()
    dirs = ensure_models(args.models_dir, args.quick, args.dtype, args.small)
    max_context = args.prompt_len + args.max_tokens + 16
    sizes = measure_sizes(dirs, max_context, args.prompt_len + args.max_tokens, args.threads, args.max_batch_tokens,
                          args.kv_dtype)
    args.link_gbps = 0.0
    if args.link_ratio > 0:
        read_gbs = read_bandwidth_gbs(256 << 20, args.threads)
        args.link_gbps = read_gbs / args.link_ratio
    total = sum(s.weight_bytes for s in sizes.values())
    shapes = "small shapes (SMALL_SHAPES)" if args.small else "1/4-depth smoke shapes" if args.quick else "reference shapes"
    print(f"# layermux multi-model benchmark ({shapes}, {args.dtype} weights as stored, random values, "
          f"KV {args.kv_dtype})")
    if args.link_gbps > 0:
        print(f"link model: 1:{args.link_ratio:g} — memory read {args.link_gbps * args.link_ratio:.1f} GB/s measured, "
              f"every host->device copy paced at {args.link_gbps:.2f} GB/s")
    else:
        print("link: unthrottled (a copy is a memcpy through the DRAM compute reads)")
    print("weights: " + ", ".join(f"{n} {s.weight_bytes / MiB:.0f} MiB" for n, s in sizes.items())
          + f"; total {total / MiB:.0f} MiB")
    print(f"{args.threads} compute threads; each request: prompt {args.prompt_len} tokens, {args.max_tokens} generated "
          f"(greedy, EOS ignored); all requests submitted at t0; at most {args.max_batch_tokens} tokens per step; "
          f"median of {args.repeats} run(s) per cell")
    if args.kv_table:
        kv_table(dirs, args)
        print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")
        return 0
    for fraction in args.budgets or []:
        run_table(f"budget {fraction:.0%} of the weights", dirs, sizes, int(total * fraction), args)
    for run in ([] if args.budgets else args.runs):
        if run == "half":
            run_table(f"budget {args.budget_fraction:.0%} of the weights", dirs, sizes,
                      int(total * args.budget_fraction), args)
        else:
            budget, allowance = swap_min_budget(sizes, max(args.concurrency))
            big = max(sizes.values(), key=lambda s: s.weight_bytes)
            note = (f"  = (largest model {big.weight_bytes / MiB:.0f} MiB + workspaces + KV room + fragmentation "
                    f"allowance {allowance / MiB:.0f} MiB) / {CAP_FRACTION:.0%} cap")
            run_table("smallest budget whole-model swapping runs in", dirs, sizes, budget, args, note)
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
