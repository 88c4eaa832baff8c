"""Shared benchmark plumbing: read bandwidth, timing, tables, cached models, bytes per token.

Owner: benchmarks (bench/). Nothing here is imported by the engine. Not thread-safe
beyond what each function says: read_bandwidth_gbs runs its own worker threads.

Numbers on this machine are noisy (2 shared cores, others compile next door), so
every measurement is repeated and reduced with best_of(): the best of N runs is the
closest estimate of what the code can do when nobody else is on the cores.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_MODELS = REPO / "build" / "bench-models"  # gitignored cache of random models and GGUF files
LLAMA_VENV = REPO / "build" / "llama-venv"  # llama-cpp-python, built without AMX (see README)

# Bytes one weight occupies in each format. q8_0: blocks of 32 int8 plus one f16 scale;
# q4_0: blocks of 32 nibbles plus one f16 scale.
FORMAT_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34.0 / 32.0, "q4_0": 18.0 / 32.0}

N_THREADS = 2  # every engine in every table runs with this many compute threads


# --------------------------------------------------------------------------- timing

def best_of(samples: Sequence[float], higher_is_better: bool = True) -> float:
    """The best sample (max for rates, min for times); nan for no samples."""
    if not samples:
        return float("nan")
    return max(samples) if higher_is_better else min(samples)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def time_s(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- bandwidth

@dataclass(frozen=True)
class Bandwidth:
    read_gbs: float  # best streaming read rate over all kernels and thread counts, GB/s (1e9)
    read_1t_gbs: float  # best with one thread
    copy_gbs: float  # best np.copyto rate, counting bytes read + bytes written
    detail: dict[str, float]  # kernel/thread label -> best GB/s


def _reduce_parts(arr: np.ndarray, n_threads: int, op: Callable[[np.ndarray], Any], repeats: int) -> float:
    """Best GB/s of reading arr once with op over n_threads equal parts (numpy drops the GIL)."""
    parts = np.array_split(arr, n_threads)
    best = 0.0
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(op, parts))
            best = max(best, arr.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def read_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5, n_threads: int = N_THREADS) -> Bandwidth:
    """Measured DRAM read bandwidth: numpy sum / or-reduce of an n_bytes array and the engine's probe, best of N.

    The array (1 GiB by default) is far larger than the L3, so every pass streams from DRAM.
    Several reductions are tried because a single numpy reduction can be compute-bound on
    one core; the decode ceiling uses the best of them (the most the memory gave us).
    """
    a = np.ones(n_bytes // 8, dtype=np.float64)
    ops: dict[str, Callable[[np.ndarray], Any]] = {
        "sum_f64": np.sum,
        "sum_f32": lambda x: np.sum(x.view(np.float32)),
        "or_u64": lambda x: np.bitwise_or.reduce(x.view(np.uint64)),
    }
    detail: dict[str, float] = {}
    for name, op in ops.items():
        for t in sorted({1, n_threads}):
            detail[f"{name}/{t}t"] = _reduce_parts(a, t, op, repeats)
    # The engine's own probe (engine/src/membw.cpp): an anonymous mapping like the device
    # arena, four streams per task like a matmul tile, no per-element compute.
    from engine import _core  # here: the llama venv imports this module without the engine

    for t in sorted({1, n_threads}):
        detail[f"engine/{t}t"] = _core.read_bandwidth_gbs(n_bytes, t, repeats)
    b = np.empty_like(a)
    copy = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        copy = max(copy, 2 * a.nbytes / (time.perf_counter() - t0) / 1e9)
    del a, b
    read_1t = max(v for k, v in detail.items() if k.endswith("/1t"))
    return Bandwidth(read_gbs=max(detail.values()), read_1t_gbs=read_1t, copy_gbs=copy, detail=detail)


# --------------------------------------------------------------------------- tables

def fmt_num(x: float | str | None, digits: int = 1) -> str:
    """A table cell: numbers rounded, None/nan as n/a, strings as they are."""
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "",
                 notes: Sequence[str] = ()) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[fmt_num(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        out = [vals[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(vals[1:], widths[1:])]
        return "  ".join(out).rstrip()

    text = []
    if title:
        text.append(title)
    text.append(line(list(headers)))
    text.append("  ".join("-" * w for w in widths))
    text.extend(line(r) for r in cells)
    text.extend(notes)
    return "\n".join(text)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "",
                notes: Sequence[str] = ()) -> None:
    print(format_table(headers, rows, title, notes) + "\n", flush=True)


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the tables."""
    print(msg, file=sys.stderr, flush=True)


def machine_line(n_threads: int = N_THREADS) -> str:
    cpu = "unknown cpu"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {cpu}, {os.cpu_count()} cpus, python {platform.python_version()}, "
            f"load average {load:.1f} at start, {n_threads} compute threads everywhere")


# --------------------------------------------------------------------------- models

def ensure_model(preset: str, dtype: str = "bfloat16", root: Path = BENCH_MODELS) -> Path:
    """The random model folder for a REFERENCE_SHAPES preset, written once and cached under build/.

    A folder counts as complete when its config.json exists: make_model writes it first,
    so a marker file written last tells a finished folder from an interrupted one.
    """
    from tools.model_factory import REFERENCE_SHAPES, make_model

    out = root / f"{preset}-{dtype}"
    marker = out / ".complete"
    if marker.exists():
        return out
    log(f"writing random {preset} ({dtype}) to {out} (once; cached for later runs)")
    t0 = time.perf_counter()

    def progress(done: int, total: int, name: str) -> None:
        if done % 32 == 0 or done == total:
            log(f"  {done}/{total} tensors ({name}) {time.perf_counter() - t0:.0f} s")

    make_model(out, dtype=dtype, progress=progress, **REFERENCE_SHAPES[preset])
    marker.write_text("ok\n")
    return out


def model_config(model_dir: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg


def n_params_read_per_token(cfg: dict[str, Any]) -> tuple[int, int]:
    """(matrix weights, vector weights) that one batch-1 decode step reads.

    Every layer's projections and norms, the final norm and the output head (for tied
    models the head is the embedding table, read in full). The embedding lookup of an
    untied model reads one row, not counted. KV-cache reads are not weights and are
    left out (a few MB at the short contexts measured here, against hundreds of MB).
    """
    h, inter, n_layer = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // n_head
    per_layer = h * n_head * hd + 2 * h * n_kv * hd + n_head * hd * h + 3 * h * inter
    mats = n_layer * per_layer + cfg["vocab_size"] * h
    vecs = (2 * n_layer + 1) * h
    if cfg.get("model_type") == "qwen2":  # q, k, v biases
        vecs += n_layer * (n_head * hd + 2 * n_kv * hd)
    return mats, vecs


def weight_bytes_per_token(cfg: dict[str, Any], fmt: str) -> int:
    """Bytes of weights one batch-1 decode token streams, matrices in fmt and vectors in f32."""
    mats, vecs = n_params_read_per_token(cfg)
    return int(mats * FORMAT_BYTES[fmt] + vecs * 4)


def ceiling_tps(cfg: dict[str, Any], fmt: str, read_gbs: float) -> float:
    """Batch-1 decode tokens/s if every weight byte is read once at read_gbs (GB/s)."""
    return read_gbs * 1e9 / weight_bytes_per_token(cfg, fmt)


def prompt_ids(n: int, seed: int = 0, low: int = 3, high: int = 400) -> list[int]:
    """n token ids, deterministic, clear of the special ids 0..2 and inside the random tokenizer's 480 ids."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(low, high, size=n)]


def process_cpu_s() -> float:
    """CPU seconds used so far by this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def _sample(r: Any, fn: Callable[[], float]) -> tuple[float, float]:
    """(rate, cpu share): the rate fn returns and the CPU seconds per wall second the runner's
    process used meanwhile. A share near N_THREADS means the engine had its cores; near 1
    with 2 threads means another process held one of them."""
    c0, t0 = r.cpu_s(), time.perf_counter()
    rate = fn()
    return rate, (r.cpu_s() - c0) / (time.perf_counter() - t0)


def measure_group(runners: dict[str, Any], *, repeats: int, prefill_tokens: int, decode_tokens: int,
                  batch_sizes: Sequence[int] = (), batch_tokens: int = 32) -> dict[str, dict[str, Any]]:
    """Samples of several engines, taken round-robin so they share the same moments of outside load.

    Each runner has prefill_tps(n), decode_tps(n), cpu_s() and, unless its batched attribute is
    False, batched_decode_tps(n_seqs, n_tokens); each call is one timed run. On a shared machine
    the load changes over minutes, so measuring engine A for a minute then engine B compares
    two different machines; taking turns (A, B, A, B, ...) and keeping each one's best sample
    compares them under the same conditions. Each sample also records its CPU share (_sample).
    """
    out: dict[str, dict[str, Any]] = {
        k: {"prefill": [], "decode": [], "prefill_cpu": [], "decode_cpu": [], "batched": {}} for k in runners}
    for r in runners.values():  # warm-up: first-touch pages, thread start, lazy repacking
        r.prefill_tps(min(prefill_tokens, 32))
        r.decode_tps(8)
    for i in range(repeats):
        for label, r in runners.items():
            o = out[label]
            for kind, fn in (("prefill", lambda r=r: r.prefill_tps(prefill_tokens)),
                             ("decode", lambda r=r: r.decode_tps(decode_tokens))):
                rate, cpu = _sample(r, fn)
                o[kind].append(rate)
                o[f"{kind}_cpu"].append(cpu)
            log(f"    {label} run {i + 1}/{repeats}: prefill {o['prefill'][-1]:.1f} tok/s (cpu {o['prefill_cpu'][-1]:.2f}), "
                f"decode {o['decode'][-1]:.2f} tok/s (cpu {o['decode_cpu'][-1]:.2f})")
    for b in batch_sizes:
        for _ in range(repeats):
            for label, r in runners.items():
                if getattr(r, "batched", True):
                    out[label]["batched"].setdefault(str(b), []).append(r.batched_decode_tps(b, batch_tokens))
        for label in runners:
            if str(b) in out[label]["batched"]:
                log(f"    {label} batch {b}: best {max(out[label]['batched'][str(b)]):.1f} tok/s aggregate")
    return out


def cpu_of_best(samples: Sequence[float], cpus: Sequence[float]) -> float:
    """The CPU share recorded with the best (highest) sample."""
    if not samples or len(cpus) != len(samples):
        return float("nan")
    return cpus[max(range(len(samples)), key=lambda i: samples[i])]
